"""Durability and storage engine (issue 2 "Storage", issue 3 engine tests).

The engine keeps records in memory, appends every transaction to a journal
(`DB.journal`, one `%08x <json ops>` line each, CRC32 first) that is fsynced
before the answer, and checkpoints by atomically rewriting the TinyDB file
`DB`. Everything here goes through HTTP (the in-process client or a real
`statsd.py serve` process) and reads the results back through the API and,
after a clean stop, with plain `tinydb.TinyDB`.
"""

import asyncio
import http.client
import json
import os
import random
import shutil
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
import zlib

import pytest
from conftest import cli, free_port, key, new_org
from tinydb import TinyDB

import statsd

NO_AUTH = {"STATSD_API_KEY_AUTHENTICATION": "false"}
SERVER_FIELDS = {"id", "created_at", "updated_at", "link", "links"}
TYPES = ["risk", "threat", "vulnerability", "cartography", "compliance"]
STATS = "/api/v2/stats/"
ORGS = "/api/v2/organizations/"


# ------------------------------------------------------------- helpers ---

def journal_of(db):
    return str(db) + ".journal"


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def journal_lines(db):
    """The journal's complete lines, each checked against its CRC: [(raw line, ops)]."""
    out = []
    for line in read_bytes(journal_of(db)).split(b"\n")[:-1]:
        crc, body = line[:8], line[9:]
        assert line[8:9] == b" " and int(crc, 16) == zlib.crc32(body), line[:80]
        out.append((line, json.loads(body)))
    return out


def journal_line(ops, crc_delta=0):
    """A journal line in the engine's format (with a wrong CRC if crc_delta)."""
    body = json.dumps(ops, separators=(",", ":")).encode()
    return b"%08x %s\n" % ((zlib.crc32(body) + crc_delta) & 0xFFFFFFFF, body)


def tinydb_tables(db):
    """What plain TinyDB sees in the file: {table: {doc_id: doc}}."""
    database = TinyDB(str(db))
    try:
        return {name: {d.doc_id: dict(d) for d in database.table(name).all()}
                for name in database.tables()}
    finally:
        database.close()


def client_fields(stat):
    return {k: v for k, v in stat.items() if k not in SERVER_FIELDS}


def stored(stat):
    """A stat as the database file holds it: the API answer without its hypermedia fields."""
    return {k: v for k, v in stat.items() if k not in ("link", "links")}


def call(base, method, path, body=None, timeout=15):
    """(status, parsed JSON body or None) of one request to a real server."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Accept": "application/json", **({"Content-Type": "application/json"} if data else {})}
    req = urllib.request.Request(base + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as e:
        raw = e.read()
        return e.code, json.loads(raw) if raw else None


def http_all_stats(base):
    """Every stat a real server holds, page by page, in its order."""
    out = []
    while True:
        status, body = call(base, "GET", f"{STATS}?_limit=1000&_skip={len(out)}")
        assert status == 200, body
        out += body["data"]
        if not body["has_more"]:
            return out


async def all_stats(client, headers=None):
    """Every stat visible to the client, page by page, in the API's order."""
    out = []
    while True:
        resp = await client.get(STATS, params={"_limit": "1000", "_skip": str(len(out))}, headers=headers)
        assert resp.status == 200, await resp.text()
        body = await resp.json()
        out += body["data"]
        if not body["has_more"]:
            return out


def stat_body(rnd, seq):
    """A MONARC-like stat with a client uuid, so the client knows what it sent."""
    return {"uuid": str(uuid.UUID(int=rnd.getrandbits(128), version=4)), "type": rnd.choice(TYPES),
            "anr": rnd.randrange(1, 40), "year": 2024, "month": rnd.randrange(1, 13),
            "data": {"seq": seq, "risks": [{"score": rnd.randrange(100), "label": "x" * rnd.randrange(5, 120)}
                                           for _ in range(rnd.randrange(1, 4))]}}


def check_batches(stats, batches, acked):
    """Every acknowledged stat is there and whole; every batch is all there or all absent."""
    by_uuid = {s["uuid"]: s for s in stats}
    assert len(by_uuid) == len(stats), "a uuid is stored twice"
    sent = {b["uuid"]: b for batch in batches for b in batch}
    assert set(by_uuid) <= set(sent), "the database holds stats nobody sent"
    for batch in batches:
        present = [b["uuid"] in by_uuid for b in batch]
        assert all(present) or not any(present), f"half a batch: {sum(present)} of {len(batch)}"
    for batch in acked:
        for body in batch:
            assert body["uuid"] in by_uuid, "an acknowledged write was lost"
            assert client_fields(by_uuid[body["uuid"]]) == body


class Writers:
    """Threads POSTing single stats and small batches until told to stop (or the server dies)."""

    def __init__(self, base, seed, threads=4):
        self.base = base
        self.sent, self.acked, self.failures = [], [], []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.run, args=(seed * 100 + i,), daemon=True)
                        for i in range(threads)]

    def run(self, seed):
        rnd = random.Random(seed)
        while not self.stop.is_set():
            size = rnd.choice([1, 1, 1, 2, 3, 5, 8])
            batch = [stat_body(rnd, i) for i in range(size)]
            payload = batch[0] if size == 1 and rnd.random() < 0.8 else batch
            self.sent.append(batch)
            try:
                status, body = call(self.base, "POST", STATS, payload, timeout=15)
            except (OSError, http.client.HTTPException, ValueError):
                return  # the server died under this request: not acknowledged
            if status != 201:
                self.failures.append((status, body))
                return
            self.acked.append(batch)

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(30)
        assert not any(t.is_alive() for t in self.threads), "a writer thread hung"

    def wait_for_acks(self, count, timeout=30):
        deadline = time.monotonic() + timeout
        while len(self.acked) < count and not self.failures and time.monotonic() < deadline:
            time.sleep(0.005)
        assert not self.failures, self.failures[:3]
        assert len(self.acked) >= count, "the server acknowledged too few writes before the deadline"


def setup_writes(base):
    """Organizations and stats written through a real server (auth off); their expected state."""
    orgs = {}  # name -> is_admin
    for name, admin in (("CASES", False), ("BOSS", True), ("TEMP", False)):
        status, body = call(base, "POST", ORGS, {"name": name, "is_admin": admin})
        assert status == 201, body
        orgs[name] = admin
    status, body = call(base, "PATCH", ORGS + "CASES", {"is_admin": True})
    assert status == 200, body
    orgs["CASES"] = True
    status, body = call(base, "DELETE", ORGS + "TEMP")
    assert status == 204, body
    del orgs["TEMP"]
    stats = {}
    status, one = call(base, "POST", STATS, {"organization": "CASES", "type": "risk", "anr": 7,
                                             "data": {"total": 1}})
    assert status == 201, one
    stats[one["id"]] = one
    status, batch = call(base, "POST", STATS, [{"type": "threat", "year": 2023, "data": [i]} for i in range(3)])
    assert status == 201, batch
    stats.update({s["id"]: s for s in batch["data"]})
    status, patched = call(base, "PATCH", STATS + one["id"], {"month": 6, "data": {"total": 2}})
    assert status == 200, patched
    stats[one["id"]] = patched
    gone = batch["data"][1]["id"]
    status, _ = call(base, "DELETE", STATS + gone)
    assert status == 204
    del stats[gone]
    status, put = call(base, "PUT", STATS + batch["data"][2]["id"], {"type": "cartography", "data": None})
    assert status == 200, put
    stats[put["id"]] = put
    return orgs, stats


def assert_api_holds(base, orgs, stats):
    got = http_all_stats(base)
    assert [s["id"] for s in got] == list(stats)
    assert {s["id"]: stored(s) for s in got} == {i: stored(s) for i, s in stats.items()}
    status, body = call(base, "GET", ORGS)
    assert status == 200, body
    assert {o["name"]: o["is_admin"] for o in body["data"]} == orgs


def assert_file_holds(db, orgs, stats):
    tables = tinydb_tables(db)
    assert {d["name"]: d["is_admin"] for d in tables["organizations"].values()} == orgs
    assert sorted(tables["stats"].values(), key=lambda d: d["id"]) == \
        sorted((stored(s) for s in stats.values()), key=lambda d: d["id"])


# ------------------------------------------------- clean stop, real process ---

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_clean_stop_folds_journal_into_plain_tinydb_file(server, tmp_path, sig):
    db = tmp_path / "statsd.json"
    srv = server(db, env=NO_AUTH)
    orgs, stats = setup_writes(srv.url)
    assert srv.kill(sig) == 0
    assert not os.path.exists(journal_of(db)) or os.path.getsize(journal_of(db)) == 0
    assert_file_holds(db, orgs, stats)
    assert_api_holds(server(db, env=NO_AUTH).url, orgs, stats)


# ---------------------------------------------- journal replay after kill -9 ---

def test_journal_replay_after_kill9(server, tmp_path):
    db = tmp_path / "statsd.json"
    srv = server(db, env=NO_AUTH)
    orgs, stats = setup_writes(srv.url)
    srv.kill()
    # The TinyDB file alone does not have these writes: the journal does.
    assert tinydb_tables(db).get("stats", {}) == {}
    ops = [op for _, line_ops in journal_lines(db) for op in line_ops]
    journaled = {op[2]["id"] for op in ops if op[0] == "stats" and op[2]}
    assert set(stats) <= journaled
    assert set(orgs) <= {op[2]["name"] for op in ops if op[0] == "organizations" and op[2]}
    srv = server(db, env=NO_AUTH)
    assert_api_holds(srv.url, orgs, stats)
    assert srv.stop() == 0
    assert_file_holds(db, orgs, stats)


# --------------------------------------------------------- torn journal lines ---

def _crash_with_writes(server, db):
    srv = server(db, env=NO_AUTH)
    orgs, stats = setup_writes(srv.url)
    srv.kill()
    return orgs, stats


def _phantom_op(db):
    """An op creating a stat under the next free doc id, as the engine would journal it."""
    doc_ids = [op[1] for _, ops in journal_lines(db) for op in ops if op[0] == "stats"]
    phantom = {"uuid": str(uuid.uuid4()), "type": "risk", "data": {"phantom": True},
               "created_at": "2024-01-01T00:00:00.000000", "updated_at": "2024-01-01T00:00:00.000000",
               "id": "0123456789abcdef01234567"}
    return [["stats", max(doc_ids) + 1, phantom]], phantom


def _torn(db):
    ops, phantom = _phantom_op(db)
    line = journal_line(ops)
    return line[:len(line) // 2], phantom


def _bad_crc(db):
    ops, phantom = _phantom_op(db)
    return journal_line(ops, crc_delta=1), phantom


@pytest.mark.parametrize("damage", [_torn, _bad_crc], ids=["partial-last-line", "bad-crc-last-line"])
def test_damaged_last_journal_line_is_dropped_alone(server, tmp_path, damage):
    db = tmp_path / "statsd.json"
    orgs, stats = _crash_with_writes(server, db)
    tail, phantom = damage(db)
    with open(journal_of(db), "ab") as f:
        f.write(tail)
    srv = server(db, env=NO_AUTH)
    assert_api_holds(srv.url, orgs, stats)
    status, body = call(srv.url, "GET", f"{STATS}?uuid={phantom['uuid']}")
    assert status == 200 and body["data"] == []
    status, new = call(srv.url, "POST", STATS, {"type": "after", "data": 1})
    assert status == 201, new
    stats[new["id"]] = new
    assert srv.stop() == 0
    assert_file_holds(db, orgs, stats)
    assert_api_holds(server(db, env=NO_AUTH).url, orgs, stats)


def test_corrupt_line_inside_journal_refuses_start_and_touches_nothing(server, tmp_path):
    db = tmp_path / "statsd.json"
    _crash_with_writes(server, db)
    lines = [line for line, _ in journal_lines(db)]
    victim = next(i for i, line in enumerate(lines) if b'"BOSS"' in line)
    assert 0 < victim < len(lines) - 2
    lines[victim] = lines[victim].replace(b'"BOSS"', b'"BOSZ"')  # still JSON, but not what was written
    damaged = b"\n".join(lines) + b"\n"
    with open(journal_of(db), "wb") as f:
        f.write(damaged)
    before = read_bytes(db)
    done = cli("serve", "--database", str(db), "--port", str(free_port()),
               env={**NO_AUTH, "STATSD_RATE_LIMIT": ""}, timeout=30)
    assert done.returncode != 0
    assert "journal" in done.stderr and "corrupt" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert read_bytes(db) == before
    assert read_bytes(journal_of(db)) == damaged


# ---------------------------------------------------- invalid database file ---

@pytest.mark.parametrize("content", [b'{"stats": {"1": {"id": "aa", "type": "ri', b"\x00\xff garbage",
                                     b"[1, 2, 3]"], ids=["truncated", "binary", "not-tinydb"])
def test_invalid_database_file_is_refused_and_never_overwritten(tmp_path, content):
    db = tmp_path / "statsd.json"
    db.write_bytes(content)
    done = cli("serve", "--database", str(db), "--port", str(free_port()),
               env={**NO_AUTH, "STATSD_RATE_LIMIT": ""}, timeout=30)
    assert done.returncode != 0
    assert str(db) in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert read_bytes(db) == content
    assert not os.path.exists(str(db) + ".tmp")


STAT_LINE = b'{"uuid":"5b0e2bb1-8c67-4a43-9c3d-8f4c2b5d1e01","type":"risk","date":"2024-03-05",' \
            b'"created_at":"2024-03-05T10:00:00.000000","updated_at":"2024-03-05T10:00:00.000000",'


@pytest.mark.parametrize("record", [
    b'"1":' + STAT_LINE + b'"data":{"n":1}}',  # no id
    b'"x1":' + STAT_LINE + b'"id":"aa","data":{"n":1}}',  # a document id that is not a number
    b'"1":' + STAT_LINE + b'"id":7,"data":{"n":1}}',  # an id that is not a string
    b'"1":[1,2]',  # not an object
], ids=["no-id", "doc-id", "id-number", "list"])
def test_a_file_in_statsd_layout_with_a_foreign_record_is_refused_and_never_overwritten(tmp_path, record):
    db = tmp_path / "statsd.json"
    content = statsd.CHECKPOINT_MARK + b'"stats":{\n' + record + b"\n}}\n"
    db.write_bytes(content)
    done = cli("serve", "--database", str(db), "--port", str(free_port()),
               env={**NO_AUTH, "STATSD_RATE_LIMIT": ""}, timeout=30)
    assert done.returncode != 0
    assert str(db) in done.stderr and "not a statsd record" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert read_bytes(db) == content


@pytest.mark.parametrize("layout", ["statsd", "plain"])
def test_other_tables_of_the_file_are_kept_as_they_are(server, tmp_path, layout):
    """A table statsd does not know, even one of records with a `data` field, comes back whole after a checkpoint."""
    notes = {"1": {"text": "kept", "data": {"a": [1, 2]}}, "7": {"data": "x"}}
    db = tmp_path / "statsd.json"
    stat = json.loads(STAT_LINE + b'"id":"aa","data":{"n":1}}')
    if layout == "statsd":
        db.write_bytes(statsd.CHECKPOINT_MARK + b'"notes":{\n"1":{"text":"kept","data":{"a":[1,2]}},\n'
                       b'"7":{"data":"x"}\n},\n"stats":{\n"1":' + json.dumps(stat).encode() + b"\n}}\n")
    else:
        db.write_text(json.dumps({"notes": notes, "stats": {"1": stat}}))
    srv = server(db, env=NO_AUTH)
    status, new = call(srv.url, "POST", STATS, {"type": "risk", "data": {"n": 2}})
    assert status == 201
    assert [s["id"] for s in http_all_stats(srv.url)] == ["aa", new["id"]]
    assert srv.stop() == 0
    tables = tinydb_tables(db)
    assert tables["notes"] == {int(k): v for k, v in notes.items()}
    assert sorted(d["id"] for d in tables["stats"].values()) == sorted(["aa", new["id"]])
    srv = server(db, env=NO_AUTH)  # and again, from the file statsd wrote
    assert [s["data"] for s in http_all_stats(srv.url)] == [{"n": 1}, {"n": 2}]
    assert srv.stop() == 0
    assert tinydb_tables(db)["notes"] == {int(k): v for k, v in notes.items()}


# ---------------------------------------------------------- one server only ---

def test_second_server_on_same_database_exits_at_once(server, tmp_path):
    db = tmp_path / "statsd.json"
    first = server(db, env=NO_AUTH)
    status, stat = call(first.url, "POST", STATS, {"type": "risk", "data": 1})
    assert status == 201
    before = read_bytes(db), read_bytes(journal_of(db))
    done = cli("serve", "--database", str(db), "--port", str(free_port()),
               env={**NO_AUTH, "STATSD_RATE_LIMIT": ""}, timeout=30)
    assert done.returncode != 0
    assert "in use" in done.stderr or "another" in done.stderr, done.stderr
    assert (read_bytes(db), read_bytes(journal_of(db))) == before
    status, again = call(first.url, "POST", STATS, {"type": "risk", "data": 2})
    assert status == 201
    assert [s["id"] for s in http_all_stats(first.url)] == [stat["id"], again["id"]]
    assert first.stop() == 0
    assert sorted(d["id"] for d in tinydb_tables(db)["stats"].values()) == sorted([stat["id"], again["id"]])


# -------------------------------------------------- kill -9 during writes ---

def test_kill9_during_concurrent_writes_loses_no_acknowledged_write(server, tmp_path):
    db = tmp_path / "statsd.json"
    batches, acked = [], []
    for round_ in range(4):
        srv = server(db, env=NO_AUTH)
        if round_:
            check_batches(http_all_stats(srv.url), batches, acked)
        with Writers(srv.url, seed=round_) as writers:
            writers.wait_for_acks(25 + 25 * round_)
            srv.kill()
        batches += writers.sent
        acked += writers.acked
    srv = server(db, env=NO_AUTH)
    stats = http_all_stats(srv.url)
    check_batches(stats, batches, acked)
    assert srv.stop() == 0
    assert sorted(d["uuid"] for d in tinydb_tables(db)["stats"].values()) == sorted(s["uuid"] for s in stats)


def _post_batch_then_kill(srv, batch, delay):
    """POST a batch over a raw socket and SIGKILL the server `delay` s after its last byte
    (None: once the answer came). (acknowledged with 201?, seconds from last byte to answer)."""
    body = json.dumps(batch).encode()
    head = (f"POST {STATS} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as sock:
        sock.sendall(head + body[:-1])
        sock.sendall(body[-1:])
        sent = time.monotonic()
        if delay is not None:
            time.sleep(delay)
            srv.kill()
        answer = b""
        try:
            while len(answer) < 12:
                chunk = sock.recv(12 - len(answer))
                if not chunk:
                    break
                answer += chunk
        except OSError:
            pass
        took = time.monotonic() - sent
        srv.kill()
    return answer.startswith(b"HTTP/1.1 201"), took


def test_kill9_during_batch_of_1000_keeps_it_whole_or_absent(server, tmp_path):
    db = tmp_path / "statsd.json"
    rnd = random.Random(1000)
    batches, acked, handling = [], [], None
    # First a batch whose answer is awaited (it must survive); it also tells how long
    # a batch takes here, so the next kills land early, midway and late in its handling.
    for share in (None, 0.5, 0.8, 0.95):
        srv = server(db, env=NO_AUTH)
        check_batches(http_all_stats(srv.url), batches, acked)
        batch = [stat_body(rnd, i) for i in range(1000)]
        batches.append(batch)
        ok, took = _post_batch_then_kill(srv, batch, None if share is None else share * handling)
        if share is None:
            assert ok, "a batch of 1000 got no 201"
            handling = took
        if ok:
            acked.append(batch)
    check_batches(http_all_stats(server(db, env=NO_AUTH).url), batches, acked)


def test_kill9_during_checkpoint_leaves_a_whole_file(server, tmp_path):
    """Fill the journal past its 8 MiB checkpoint threshold, then kill -9 while it is folded."""
    db = tmp_path / "statsd.json"
    rnd = random.Random(8)
    batches, acked = [], []
    for delay in (0, 0.02):
        srv = server(db, env=NO_AUTH)
        check_batches(http_all_stats(srv.url), batches, acked)
        while True:
            batch = [{**stat_body(rnd, i), "data": {"risks": [{"id": j, "label": "r" * 40, "score": j % 25}
                                                              for j in range(60)]}} for i in range(1000)]
            batches.append(batch)
            status, body = call(srv.url, "POST", STATS, batch, timeout=60)
            assert status == 201, body
            acked.append(batch)
            journal = os.path.getsize(journal_of(db))
            if journal == 0 or journal >= statsd.Store.MIN_CHECKPOINT_BYTES:
                break  # this write started a checkpoint (or it is already done)
        time.sleep(delay)
        srv.kill()
        json.loads(read_bytes(db))  # whichever checkpoint the file holds, it is whole
    check_batches(http_all_stats(server(db, env=NO_AUTH).url), batches, acked)


# ------------------------------------------ checkpoint while writing (in-process) ---

async def open_crash_copy(make_client, db, copy, **settings):
    """An app on a copy of what a kill -9 would leave now (no request in flight).

    The journal, then the journal a running checkpoint set aside, then the file:
    a checkpoint sets the journal aside before it replaces the file, and drops
    the set-aside journal only after, so the copies are whole together.
    """
    shutil.copyfile(journal_of(db), journal_of(copy))
    try:
        shutil.copyfile(journal_of(db) + ".folding", journal_of(copy) + ".folding")
    except FileNotFoundError:  # no checkpoint running (or it just ended: the file holds it)
        pass
    shutil.copyfile(db, copy)
    return await make_client(database=str(copy), **settings)


async def write_waves(make_client, db_path, tmp_path, admin, model, rnd, tokens, post, change):
    """Ten waves of concurrent creates, changes and deletes; every third, what a kill -9 would leave."""
    for wave in range(10):
        targets = rnd.sample(sorted(model), min(len(model), 40))
        jobs = [post(rnd.choice(list(tokens)), stat_body(rnd, i)) for i in range(10)]
        jobs += [post(rnd.choice(list(tokens)), [stat_body(rnd, i) for i in range(5)]) for _ in range(3)]
        jobs += [change(stat_id) for stat_id in targets]
        await asyncio.gather(*jobs)
        if wave % 3 == 2:  # what a kill -9 would leave now holds every acknowledged write
            crashed = await open_crash_copy(make_client, db_path, tmp_path / f"crash{wave}.json")
            assert {s["id"]: stored(s) for s in await all_stats(crashed, key(admin))} == model
            await crashed.close()


async def test_checkpoints_while_writing_keep_every_acknowledged_write(make_client, db_path, tmp_path,
                                                                      monkeypatch):
    monkeypatch.setattr(statsd.Store, "MIN_CHECKPOINT_BYTES", 1)
    client = await make_client()
    admin = await new_org(client, "admin", admin=True)
    tokens = {"CASES": await new_org(client, "CASES"), "OTHER": await new_org(client, "OTHER")}
    rnd = random.Random(7)
    model = {}  # id -> stat as stored
    seen_in_file = set()

    async def post(org, payload):
        resp = await client.post(STATS, json=payload, headers=key(tokens[org]))
        assert resp.status == 201, await resp.text()
        body = await resp.json()
        for stat in body["data"] if isinstance(payload, list) else [body]:
            model[stat["id"]] = stored(stat)

    async def change(stat_id):
        org = model[stat_id]["organization"]
        action = rnd.choice(["PATCH", "PATCH", "PUT", "DELETE"])
        if action == "DELETE":
            resp = await client.delete(STATS + stat_id, headers=key(tokens[org]))
            assert resp.status == 204, await resp.text()
            del model[stat_id]
            return
        payload = {"type": rnd.choice(TYPES), "data": {"v": rnd.random()}}
        if action == "PATCH":
            payload = {rnd.choice(["month", "anr", "year"]): rnd.randrange(1, 13), "data": [rnd.random()]}
        resp = await client.request(action, STATS + stat_id, json=payload, headers=key(tokens[org]))
        assert resp.status == 200, await resp.text()
        model[stat_id] = stored(await resp.json())

    done = threading.Event()

    def watch_file():  # every state of the TinyDB file while the waves run
        while not done.is_set():
            with open(db_path, "rb") as f:
                data = json.loads(f.read())  # a checkpoint is never seen half written
            seen_in_file.add(frozenset(d["id"] for d in data.get("stats", {}).values()))

    watcher = asyncio.create_task(asyncio.to_thread(watch_file))
    try:
        await write_waves(make_client, db_path, tmp_path, admin, model, rnd, tokens, post, change)
    finally:  # a failure must not leave the watching thread running (the test would never end)
        done.set()
        await watcher
    # Several distinct checkpoints were written while the waves ran.
    assert len({ids for ids in seen_in_file if ids}) >= 3

    got = await all_stats(client, key(admin))
    assert {s["id"]: stored(s) for s in got} == model
    await client.close()
    assert not os.path.exists(journal_of(db_path))
    tables = tinydb_tables(db_path)
    assert {d["id"]: d for d in tables["stats"].values()} == model
    assert sorted(d["name"] for d in tables["organizations"].values()) == ["CASES", "OTHER", "admin"]
    again = await make_client()
    assert [s["id"] for s in await all_stats(again, key(tokens["CASES"]))] == \
        [i for i in model if model[i]["organization"] == "CASES"]


# --------------------------------------- indexes through create/update/delete ---

ANR_UUIDS = ["5f2b7a6e-8a3c-4c1e-9d0b-2b1f3c4d5e6f", "A1B2C3D4-E5F6-4A7B-8C9D-0E1F2A3B4C5D"]
DOMAINS = {"type": TYPES, "anr": [1, 2, 3, *ANR_UUIDS], "year": [2019, 2020, 2021],
           "month": [1, 6, 12], "quarter": [1, 2, 4], "week": [1, 27, 53], "day": [1, 200, 366]}
ORG_NAMES = ["ALPHA", "BETA", "GAMMA", "GONE"]


def normal(name, value):
    return str(uuid.UUID(value)) if name == "anr" and isinstance(value, str) else value


class IndexModel:
    """The stats a client expects after what it sent, in creation order."""

    def __init__(self, client, seed):
        self.client = client
        self.rnd = random.Random(seed)
        self.stats = {}  # id -> client fields (normalized)
        self.gone = False

    def fields(self):
        rnd = self.rnd
        body = {"type": rnd.choice(TYPES), "data": {"n": rnd.randrange(100)}}
        for name, values in DOMAINS.items():
            if name != "type" and rnd.random() < 0.8:
                body[name] = rnd.choice(values)
        return body

    def expect(self, answer, sent, base=None):
        want = {**(base or {}), **{k: normal(k, v) for k, v in sent.items()}}
        want["uuid"] = answer["uuid"]
        assert client_fields(answer) == want
        self.stats[answer["id"]] = want

    async def step(self):
        rnd, client = self.rnd, self.client
        action = rnd.choices(["one", "batch", "patch", "put", "delete"], [4, 1, 3, 1, 1.5])[0]
        if action in ("patch", "put", "delete") and not self.stats:
            action = "one"
        if action in ("one", "batch"):
            bodies = [self.fields() for _ in range(1 if action == "one" else rnd.randrange(2, 6))]
            for body in bodies:
                if rnd.random() < 0.9:
                    body["organization"] = rnd.choice(ORG_NAMES[:-1] if self.gone else ORG_NAMES)
            resp = await client.post(STATS, json=bodies[0] if action == "one" else bodies)
            assert resp.status == 201, await resp.text()
            answer = await resp.json()
            for sent, got in zip(bodies, [answer] if action == "one" else answer["data"], strict=True):
                self.expect(got, sent)
            return
        stat_id = rnd.choice(list(self.stats))
        old = self.stats[stat_id]
        if action == "delete":
            resp = await client.delete(STATS + stat_id)
            assert resp.status == 204
            del self.stats[stat_id]
        elif action == "patch":
            names = rnd.sample(sorted(DOMAINS), rnd.randrange(1, 4))
            patch = {n: rnd.choice(DOMAINS[n]) for n in names}
            resp = await client.patch(STATS + stat_id, json=patch)
            assert resp.status == 200, await resp.text()
            self.expect(await resp.json(), patch, old)
        else:
            body = self.fields()
            resp = await client.put(STATS + stat_id, json=body)
            assert resp.status == 200, await resp.text()
            kept = {k: old[k] for k in ("uuid", "organization") if k in old}
            self.expect(await resp.json(), body, kept)

    async def delete_org_cascade(self, name):
        resp = await self.client.delete(ORGS + name, params={"cascade": "true"})
        assert resp.status == 204, await resp.text()
        self.stats = {i: s for i, s in self.stats.items() if s.get("organization") != name}
        self.gone = True


def _matches(stat, name, value):
    stored_ = stat.get(name, statsd.MISSING)
    return stored_ == value and type(stored_) is type(value)


async def check_indexes(client, model):
    """Every equality filter on an indexed field answers what a full scan computes."""
    full = await all_stats(client)
    assert [s["id"] for s in full] == list(model.stats), "not the creation order of what was sent"
    assert {s["id"]: client_fields(s) for s in full} == model.stats
    queries = [(name, v) for name, values in DOMAINS.items() for v in values]
    queries += [("anr", 99), ("type", "never-used"), ("year", 1999)]
    queries += [("organization", o) for o in ORG_NAMES + ["NOBODY"]]
    for name, value in queries:
        wanted = normal(name, value)
        expected = [s["id"] for s in full if _matches(s, name, wanted)]
        resp = await client.get(STATS, params={name: str(value), "_limit": "1000"})
        assert resp.status == 200, await resp.text()
        body = await resp.json()
        assert [s["id"] for s in body["data"]] == expected, (name, value)
        assert body["has_more"] is False
        if name == "type":  # paging on an index stops at the right place
            resp = await client.get(STATS, params={name: value, "_skip": "1", "_limit": "2"})
            body = await resp.json()
            assert [s["id"] for s in body["data"]] == expected[1:3]
            assert body["has_more"] is (len(expected) > 3)
    for org in ORG_NAMES:
        for type_ in TYPES[:3]:
            for year in DOMAINS["year"]:
                expected = [s["id"] for s in full if s.get("organization") == org
                            and s["type"] == type_ and s.get("year") == year]
                resp = await client.get(STATS, params={"organization": org, "type": type_,
                                                       "year": str(year), "_limit": "1000"})
                assert [s["id"] for s in (await resp.json())["data"]] == expected, (org, type_, year)


async def stepped_model(make_client, seed: int, steps: int) -> IndexModel:
    """A client with ORG_NAMES (authentication off) after `steps` random writes of an IndexModel."""
    client = await make_client(api_key_authentication=False)
    for name in ORG_NAMES:
        resp = await client.post(ORGS, json={"name": name})
        assert resp.status == 201, await resp.text()
    model = IndexModel(client, seed=seed)
    for _ in range(steps):
        await model.step()
    return model


async def test_indexes_stay_consistent_through_create_update_delete_and_restart(make_client, db_path, tmp_path):
    model = await stepped_model(make_client, 20240501, 250)
    client = model.client
    await check_indexes(client, model)

    await client.close()  # clean stop: everything folded into the file
    client = model.client = await make_client(api_key_authentication=False)
    await check_indexes(client, model)
    for _ in range(100):
        await model.step()
    await model.delete_org_cascade("GONE")
    for _ in range(100):
        await model.step()
    await check_indexes(client, model)

    # What a kill -9 would leave now (every write acknowledged): the file plus the journal.
    assert journal_lines(db_path), "the journal holds the writes since the last start"
    model.client = await open_crash_copy(make_client, db_path, tmp_path / "crash.json",
                                         api_key_authentication=False)
    await check_indexes(model.client, model)


async def test_deferred_indexes_filled_beside_writes_answer_as_a_full_scan(make_client, db_path, monkeypatch):
    """The period indexes are filled after a start, a few records at a time, while writes land."""
    model = await stepped_model(make_client, 20261202, 300)
    await model.client.close()

    async def always_yield(self):
        await asyncio.sleep(0)
    monkeypatch.setattr(statsd.LoopBudget, "spend", always_yield)
    monkeypatch.setattr(statsd.Index, "FILL_STEP", 1)  # a record between two yields
    client = model.client = await make_client(api_key_authentication=False)
    indexes = [client.app[statsd.STORE_KEY].stats.indexes[name] for name in statsd.STAT_PERIODS]
    steps = 0
    while any(index.docs is not None for index in indexes):
        assert any(index.touched is not None for index in indexes) or steps == 0, "nothing fills them"
        await model.step()  # a create, update or delete while the fill runs
        steps += 1
        assert steps < 1000
    assert steps > 0, "the writes did not land while the indexes were filling"
    await check_indexes(client, model)

    # A lookup before the background fill (right after a start) reads the records at once
    await client.close()
    monkeypatch.setattr(statsd.Store, "_pack_forever", lambda self: asyncio.sleep(0))
    client = model.client = await make_client(api_key_authentication=False)
    assert client.app[statsd.STORE_KEY].stats.indexes["year"].docs is not None
    await check_indexes(client, model)
