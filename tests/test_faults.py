"""Faults on a real server process (issue 5): kill -9 at random moments, a full disk, a bad file.

test_storage.py already kills the server during concurrent writes (4 rounds), during a batch of
1000 and during a checkpoint, and refuses three kinds of invalid database file; this file repeats
the kill at random moments for many rounds, fills a real (tmpfs) disk, and extends the bad-file
cases to the command line and to a journal lying beside the file.
"""

import errno
import os
import random
import shutil
import subprocess
import time
import uuid

import pytest
from conftest import cli, free_port
from test_storage import (NO_AUTH, STATS, Writers, call, check_batches, http_all_stats, journal_of, read_bytes,
                          tinydb_tables)

KILL_ROUNDS = 24


def test_kill9_at_random_moments_for_many_rounds_keeps_every_acknowledged_write(server, tmp_path):
    db = tmp_path / "statsd.json"
    rnd = random.Random(20)
    batches, acked = [], []
    for round_ in range(KILL_ROUNDS):
        srv = server(db, env=NO_AUTH)
        check_batches(http_all_stats(srv.url), batches, acked)  # what the last kill left
        with Writers(srv.url, seed=1000 + round_, threads=rnd.choice([2, 3, 4])) as writers:
            writers.wait_for_acks(rnd.randrange(1, 6))
            time.sleep(rnd.uniform(0, 0.15))  # the kill lands at an arbitrary point of some request
            srv.kill()
        batches += writers.sent
        acked += writers.acked
    srv = server(db, env=NO_AUTH)
    stats = http_all_stats(srv.url)
    check_batches(stats, batches, acked)
    found = {s["uuid"] for s in stats}
    acknowledged = [b["uuid"] for batch in acked for b in batch]
    assert srv.stop() == 0
    assert {d["uuid"] for d in tinydb_tables(db)["stats"].values()} == found
    print(f"\n{KILL_ROUNDS} kill -9 rounds: {len(acknowledged)} stats acknowledged, all found;"
          f" {len(found) - len(acknowledged)} sent but unacknowledged stats also stored whole")


# ------------------------------------------------------------- disk full ---

@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs (skipped where mounting is not allowed)."""
    folder = tmp_path / "disk"
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(folder)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def big_stat(i):
    return {"uuid": str(uuid.uuid4()), "type": "risk", "anr": i, "data": {"blob": "x" * 40_000, "i": i}}


def test_disk_full_answers_507_keeps_serving_loses_nothing_and_recovers(server, small_disk):
    db = small_disk / "statsd.json"
    srv = server(db, env=NO_AUTH)
    free = shutil.disk_usage(small_disk).free
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (free - 600_000))  # leave about 600 kB for the journal
    stored, refused = [], []
    for i in range(100):
        body = big_stat(i) if i % 3 else [big_stat(i), big_stat(1000 + i)]
        status, answer = call(srv.url, "POST", STATS, body)
        if status == 201:
            stored += body if isinstance(body, list) else [body]
            continue
        assert status == 507, answer
        assert answer["status_code"] == 507 and answer["exception_cls"] == "InsufficientStorage"
        assert answer["status"] == "failed" and answer["action"] == "POST" and answer["target"] == "stats"
        refused += body if isinstance(body, list) else [body]
        if len(refused) >= 3:
            break
    assert stored and refused, "the disk never filled up"
    # still alive, serving every acknowledged write and none of the refused ones
    assert call(srv.url, "GET", "/")[0] == 200
    uuids = [s["uuid"] for s in http_all_stats(srv.url)]
    assert uuids == [s["uuid"] for s in stored]
    # a small write may still fit or not, but never half: an update of a stored stat
    status, _ = call(srv.url, "PATCH", STATS + http_all_stats(srv.url)[0]["id"], {"data": "y" * 200_000})
    assert status in (200, 507)
    if status == 200:
        stored[0] = {**stored[0], "data": "y" * 200_000}
    # space comes back: writes succeed again, and a restart finds exactly what was acknowledged
    filler.unlink()
    status, answer = call(srv.url, "POST", STATS, big_stat(5000))
    assert status == 201, answer
    stored.append(answer)
    srv.kill()
    srv = server(db, env=NO_AUTH)
    after = http_all_stats(srv.url)
    assert [s["uuid"] for s in after] == [s["uuid"] for s in stored]
    assert [s["data"] for s in after] == [s["data"] for s in stored]
    assert srv.stop() == 0
    assert len(tinydb_tables(db)["stats"]) == len(stored)


# ------------------------------------------------------ invalid database file ---

BAD_FILES = [b'{"stats": {"1": {"id": "a"', b'{"stats": {"1": 5}}', b'{"stats": {"x": {"id": "a"}}}',
             b"\xef\xbb\xbf\xff\xfe not json", b'{"organizations": []}']


@pytest.mark.parametrize("content", BAD_FILES, ids=["truncated", "record-not-object", "bad-doc-id",
                                                    "invalid-utf8", "table-not-object"])
@pytest.mark.parametrize("command", [["serve", "--port", "0"], ["create-organization", "X"],
                                     ["list-organizations"], ["delete-organization", "X"]])
def test_invalid_database_file_is_a_clear_error_for_every_command_and_never_overwritten(tmp_path, content,
                                                                                      command):
    db = tmp_path / "statsd.json"
    db.write_bytes(content)
    journal = b'00000000 [["stats", 1, null]]\n'
    with open(journal_of(db), "wb") as f:
        f.write(journal)
    if command[0] == "serve":
        command = ["serve", "--port", str(free_port())]
    done = cli(*command, "--database", str(db), env={**NO_AUTH, "STATSD_RATE_LIMIT": ""}, timeout=30)
    assert done.returncode != 0
    assert str(db) in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert read_bytes(db) == content
    assert read_bytes(journal_of(db)) == journal
    assert sorted(os.listdir(tmp_path)) == sorted(["statsd.json", "statsd.json.journal", "statsd.json.lock"])


async def test_a_disk_that_fails_to_write_and_then_to_read_loses_nothing_acknowledged(
        make_client, db_path, monkeypatch):
    """Write fails, the reload fails too: writes are refused, and the stop keeps the file and journal."""
    import tinydb

    import statsd
    client = await make_client(api_key_authentication=False)
    acked = []
    for n in range(5):
        resp = await client.post("/api/v2/stats/", json={"type": "risk", "data": n})
        assert resp.status == 201
        acked.append((await resp.json())["uuid"])

    def eio(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(statsd.Store, "_append", eio)
    monkeypatch.setattr(statsd.AtomicJSONStorage, "read_raw", lambda self: eio())
    monkeypatch.setattr(statsd.AtomicJSONStorage, "open_raw", lambda self: eio())
    resp = await client.post("/api/v2/stats/", json={"type": "risk", "data": "lost"})
    assert resp.status == 503 and (await resp.json())["exception_cls"] == "ServiceUnavailable"
    resp = await client.post("/api/v2/stats/", json={"type": "risk", "data": "refused"})
    assert resp.status == 503 and "restart" in (await resp.json())["error"]
    monkeypatch.undo()
    await client.close()  # a broken store must not fold its (possibly partial) memory into the file

    restarted = await make_client(api_key_authentication=False)
    resp = await restarted.get("/api/v2/stats/")
    assert sorted(s["uuid"] for s in (await resp.json())["data"]) == sorted(acked)
    await restarted.close()
    assert sorted(d["uuid"] for d in tinydb.TinyDB(db_path).table("stats").all()) == sorted(acked)
