"""Hostile clients (issue 5): every abuse gets a 4xx JSON error object or a correct answer,
never a crash, never a change of data. Plus key handling: a copied database gives away no key."""

import hashlib
import json
import shutil
import socket
import subprocess
import sys
import time

import orjson
import pytest
import requests
from yarl import URL
from conftest import ROOT, ServerProcess, assert_error_object, key, new_org

import statsd

STATS = "/api/v2/stats/"
ORGS = "/api/v2/organizations/"
ABUSE_CASES = []  # every abuse tried, counted in the report


async def snapshot(client):
    """Everything a client could change: the stats and organizations, as the store holds them."""
    store = client.app[statsd.STORE_KEY]
    return statsd.dumps(store.snapshot(), option=orjson.OPT_SORT_KEYS)


@pytest.fixture
async def seeded(api):
    resp = await api.post(STATS, json=[{"type": "risk", "anr": i, "data": {"i": i}} for i in range(3)],
                          headers=key(api.cases))
    assert resp.status == 201
    api.before = await snapshot(api)
    return api


async def refused(client, resp, status, target):
    ABUSE_CASES.append(resp.url.path)
    body = await assert_error_object(resp, status, target)
    assert await snapshot(client) == client.before
    return body


# ------------------------------------------------------------- bodies ---

async def test_bodies_over_max_body_size_are_413_with_or_without_content_length(make_client):
    client = await make_client(max_body_size=4096, api_key_authentication=False)
    client.before = await snapshot(client)
    big = json.dumps({"type": "risk", "data": "x" * 5000}).encode()

    async def chunks():
        for i in range(0, len(big), 1000):
            yield big[i:i + 1000]
    for path in (STATS, "/api/v1/stats/"):  # both answer with the target "stats"
        for data in (big, chunks()):
            body = await refused(client, await client.post(path, data=data,
                                                           headers={"Content-Type": "application/json"}),
                                 413, "stats")
            assert "max_body_size (4096 bytes)" in body["error"]
            assert ("Error" in body) == (path != STATS)  # v1 errors carry the upstream's key too


@pytest.mark.parametrize("depth", [65, 2000, 200_000])
async def test_deeply_nested_json_is_refused(seeded, depth):
    body = '{"type": "risk", "data": ' + "[" * depth + "]" * depth + "}"
    await refused(seeded, await seeded.post(STATS, data=body, headers={**key(seeded.cases),
                                                                       "Content-Type": "application/json"}),
                  400, "stats")


def nested(depth: int, leaf, kinds: str = "ld"):
    """`leaf` inside `depth` containers, alternating list and object in the order of `kinds`."""
    value = leaf
    for i in range(depth):
        value = [value] if kinds[i % len(kinds)] == "l" else {"k": value}
    return value


@pytest.mark.parametrize("kinds", ["l", "d", "ld", "dl"])
async def test_data_nested_exactly_max_data_depth_is_stored_and_one_deeper_is_refused(seeded, kinds):
    """The limit is MAX_DATA_DEPTH containers on a path, whatever the containers: 64 is stored
    as sent (v2 and v1), 65 is a 400 naming the limit, in a batch as alone."""
    deepest = nested(statsd.MAX_DATA_DEPTH, "[{x}]", kinds)
    resp = await seeded.post(STATS, json={"type": "risk", "anr": 9, "data": deepest}, headers=key(seeded.cases))
    assert resp.status == 201, await resp.text()
    stat = await resp.json()
    assert stat["data"] == deepest
    got = await seeded.get(f"{STATS}{stat['id']}/", headers=key(seeded.cases))
    assert (await got.json())["data"] == deepest
    deleted = await seeded.delete(f"{STATS}{stat['id']}/", headers=key(seeded.cases))
    assert deleted.status == 204

    too_deep = nested(statsd.MAX_DATA_DEPTH + 1, 1, kinds)
    body = await refused(seeded, await seeded.post(STATS, json=[{"type": "risk", "data": {"ok": 1}},
                                                                {"type": "risk", "data": too_deep}],
                                                   headers=key(seeded.cases)), 400, "stats")
    assert body["errors"] == {"1": {"data": f"is nested deeper than {statsd.MAX_DATA_DEPTH} levels"}}


async def test_wide_shallow_data_with_many_brackets_is_stored_as_sent(seeded):
    """Containers side by side, and brackets inside strings, are no depth: far more than
    MAX_DATA_DEPTH of them, at most five containers deep, are stored and answered as sent."""
    wide = {"lists": [[i] for i in range(200)], "text": "[{" * 100,
            "objects": [{"k": i, "in": [{}]} for i in range(100)]}
    resp = await seeded.post(STATS, json={"type": "risk", "anr": 9, "data": wide}, headers=key(seeded.cases))
    assert resp.status == 201, await resp.text()
    got = await seeded.get(f"{STATS}{(await resp.json())['id']}/", headers=key(seeded.cases))
    assert (await got.json())["data"] == wide


async def test_v1_batch_refuses_only_the_item_nested_too_deep(make_client):
    client = await make_client()
    token = await new_org(client, "deep")
    anr = "11111111-2222-4333-8444-555555555555"
    items = [{"anr": anr, "type": "risk", "date": "2026-01-05", "data": nested(statsd.MAX_DATA_DEPTH, 0)},
             {"anr": anr, "type": "risk", "date": "2026-01-06", "data": nested(statsd.MAX_DATA_DEPTH + 1, 0)}]
    resp = await client.post("/api/v1/stats/", json=items,
                             headers={"X-API-KEY": token, "User-Agent": "MONARC/2.13.1"})
    assert resp.status == 207, await resp.text()
    results = (await resp.json())["results"]
    assert [r["status"] for r in results] == [201, 400]
    assert results[1]["errors"]["data"] == f"is nested deeper than {statsd.MAX_DATA_DEPTH} levels"
    listed = await client.get("/api/v1/stats/", json={"type": "risk", "date_from": "2026-01-01"},
                              headers={"X-API-KEY": token, "User-Agent": "MONARC/2.13.1"})
    assert [s["data"] for s in (await listed.json())["data"]] == [items[0]["data"]]


async def test_invalid_utf8_in_a_body_is_refused(seeded):
    for raw in (b'{"type": "ri\xffsk", "data": 1}', b'\xfe\xff{}', b'{"type": "\xed\xa0\x80", "data": 1}'):
        await refused(seeded, await seeded.post(STATS, data=raw, headers={**key(seeded.cases),
                                                                          "Content-Type": "application/json"}),
                      400, "stats")


# ------------------------------------------------------------ queries ---

async def test_huge_in_lists_and_very_long_filter_values_are_served(seeded):
    for params in ({"anr__in": ",".join(str(i) for i in range(20_000))},
                   {"type__in": ",".join(["risk"] * 20_000)},
                   {"type__contains": "r" * 100_000}, {"data__i__nin": ",".join(["1"] * 20_000)}):
        resp = await seeded.get(STATS, params=params, headers=key(seeded.cases))
        ABUSE_CASES.append("query")
        assert resp.status == 200, await resp.text()
        body = await resp.json()
        expected = {"anr__in": 3, "type__in": 3, "type__contains": 0, "data__i__nin": 2}[next(iter(params))]
        assert len(body["data"]) == expected


async def test_a_huge_in_list_of_invalid_values_is_a_400(seeded):
    resp = await seeded.get(STATS, params={"anr__in": ",".join(["x"] * 20_000)}, headers=key(seeded.cases))
    await refused(seeded, resp, 400, "stats")


async def test_invalid_utf8_in_the_query_string_is_handled(seeded):
    """Bytes that are not UTF-8 are read as U+FFFD: a value matches what holds that, a name is unknown."""
    resp = await seeded.post(STATS, json={"type": "\ufffd\ufffd", "data": {"i": "odd"}}, headers=key(seeded.cases))
    assert resp.status == 201
    odd = await resp.json()
    seeded.before = await snapshot(seeded)
    for query, found in (("type=%ff%fe", [odd["id"]]), ("type=%ff", []), ("data__%c3=1", [])):
        resp = await seeded.get(STATS + "?" + query, headers=key(seeded.cases))
        ABUSE_CASES.append(query)
        assert resp.status == 200, await resp.text()
        assert [s["id"] for s in (await resp.json())["data"]] == found, query
    for query, message in (("%ff=1", "unknown field '\ufffd' in filter '\ufffd'"),
                           ("_order_by=%ff", "unknown field '\ufffd' in _order_by")):
        resp = await seeded.get(STATS + "?" + query, headers=key(seeded.cases))
        ABUSE_CASES.append(query)
        assert (await refused(seeded, resp, 400, "stats"))["error"] == message


# ----------------------------------------------------------------- keys ---

@pytest.mark.parametrize("value", ["", " ", "x" * 10_000, "é" * 20, "key\twith\ttabs", "' OR 1=1 --",
                                   "%00", "${jndi:ldap://x}", "\u00ff" * 40])
async def test_keys_with_odd_characters_are_401(seeded, value):
    resp = await seeded.get(STATS, headers={"X-API-KEY": value.encode("utf-8").decode("latin-1")})
    await refused(seeded, resp, 401, "stats")
    resp = await seeded.post(STATS, params={"api_key": value}, json={"type": "t", "data": 1})
    await refused(seeded, resp, 401, "stats")


def test_a_key_that_is_not_utf8_is_refused_without_a_traceback(tmp_path):
    """Raw header bytes (é in Latin-1, a lone continuation byte, a truncated sequence) are no key."""
    database = tmp_path / "statsd.json"
    created = subprocess.run([sys.executable, str(ROOT / "statsd.py"), "create-organization", "ADMIN", "--admin",
                              "--database", str(database)], capture_output=True, text=True, timeout=60)
    assert created.returncode == 0, created.stderr
    srv = ServerProcess(database).start()
    try:
        for raw in (b"caf\xe9", b"\x80\x80\x80\x80", b"\xe2\x82", created.stdout.splitlines()[-1].encode() + b"\xe9"):
            for path, status, message in (("/api/v2/stats/", 401, "Unauthorized"),
                                          ("/api/v1/stats/?type=risk", 403, "Forbidden - Authentication failed."),
                                          ("/api/v1/client/me", 403, "Forbidden - Authentication failed.")):
                with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
                    sock.sendall(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nX-API-KEY: " + raw
                                 + b"\r\nConnection: close\r\n\r\n")
                    answer = b""
                    while chunk := sock.recv(65536):
                        answer += chunk
                head, _, body = answer.partition(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 %d " % status), (raw, path, head)
                assert b"Content-Type: application/json" in head
                assert json.loads(body)["error"] == message
                ABUSE_CASES.append("non-utf8 key")
    finally:
        srv.stop()
    log = srv.proc.stderr.read().decode()
    assert "Traceback" not in log and "ERROR" not in log, log


@pytest.mark.parametrize("path, target", [(STATS, "stats"), ("/api/v1/stats/?type=risk", "stats"),
                                          ("/api/v1/client/me", "/api/v1/client/me")])
async def test_a_key_sent_twice_is_a_400_that_says_so_even_when_both_are_valid(seeded, path, target):
    for params, headers, counts in (({"api_key": "wrong-key-wrong-key"}, key(seeded.admin), "1 X-API-KEY header(s), 1"),
                                    ({"api_key": seeded.admin}, key(seeded.admin), "1 X-API-KEY header(s), 1"),
                                    ({}, [("X-API-KEY", seeded.admin), ("X-API-KEY", seeded.admin)], "2 X-API-KEY"),
                                    ({"api_key": [seeded.cases, seeded.cases]}, {}, "0 X-API-KEY header(s), 2")):
        url = URL(path).extend_query(params)
        resp = await seeded.get(url, headers=headers)
        body = await refused(seeded, resp, 400, target)
        assert "the API key is sent 2 times" in body["error"] and counts in body["error"], body["error"]
        assert "send it once" in body["error"]


# ------------------------------------------------------------------ URLs ---

@pytest.mark.parametrize("path", ["/api/v2/stats/..%2Forganizations/", "/api/v2/stats/%2e%2e/%2e%2e/etc/passwd",
                                  "/api/v2/organizations/..%2F..%2Fetc%2Fpasswd/", "/api/v2/stats/%00/",
                                  "/api/v2/stats/" + "a" * 5000 + "/", "/api/v2/organizations/%ff%fe/",
                                  "/api/v2/stats/{id}/", "/api/v2/organizations/*/", "/api/v2/stats/1;DROP/"])
async def test_path_traversal_and_odd_ids_are_404_and_touch_nothing(seeded, path, tmp_path):
    for method in ("GET", "DELETE", "PATCH"):
        resp = await seeded.request(method, path, json={"data": 2}, headers=key(seeded.admin))
        ABUSE_CASES.append(path)
        assert resp.status in (400, 404), (method, path, resp.status)
        body = await resp.json()
        assert body["status"] == "failed" and body["status_code"] == resp.status
        assert await snapshot(seeded) == seeded.before


# ------------------------------------------------------------ rate limit ---

async def test_forwarded_for_from_a_peer_outside_trusted_proxies_cannot_escape_the_limit(make_client):
    client = await make_client(rate_limit="3/minute", trusted_proxies=["10.0.0.0/8"], api_key_authentication=False)
    statuses = []
    for i in range(6):
        headers = {"X-Forwarded-For": f"203.0.113.{i}, 10.0.0.{i}", "X-Real-IP": f"198.51.100.{i}",
                   "Forwarded": f"for=192.0.2.{i}"}
        resp = await client.get(STATS, headers=headers)
        statuses.append(resp.status)
        ABUSE_CASES.append("xff")
    assert statuses == [200, 200, 200, 429, 429, 429]


@pytest.mark.parametrize("header", ["unknown", "", ",,,", "not-an-ip, 203.0.113.9", "1.2.3.4" * 1000,
                                    ", ".join(f"10.1.{i // 250}.{i % 250}" for i in range(1000))])
async def test_garbage_forwarded_for_from_a_trusted_proxy_is_served(make_client, header):
    client = await make_client(rate_limit="100/minute", trusted_proxies=["127.0.0.1"],
                               api_key_authentication=False)
    resp = await client.get(STATS, headers={"X-Forwarded-For": header})
    ABUSE_CASES.append("xff")
    assert resp.status == 200


async def test_many_client_addresses_keep_the_rate_limit_memory_bounded(make_client, monkeypatch):
    monkeypatch.setattr(statsd, "RATE_LIMIT_MAX_COUNTERS", 50)
    client = await make_client(rate_limit="5/minute", trusted_proxies=["127.0.0.1"], api_key_authentication=False)
    counters = client.app[statsd.LIMITER_KEY].db.events
    statuses = []
    for i in range(400):
        resp = await client.get(STATS, headers={"X-Forwarded-For": f"2001:db8::{i:x}"})
        statuses.append(resp.status)
        ABUSE_CASES.append("address")
        assert len(counters) <= 51  # the cap, plus the one counter that newcomers share
    assert statuses[:50] == [200] * 50  # the first clients each had their own counter
    assert statuses.count(429) >= 400 - 50 - 5  # the rest share one, and cannot run up memory
    # a client known before the table filled up keeps its own counter
    assert (await client.get(STATS, headers={"X-Forwarded-For": "2001:db8::1"})).status == 200


# ------------------------------------------------------------ slow client ---

def test_a_slow_client_does_not_stop_the_server_answering_others(tmp_path):
    srv = ServerProcess(tmp_path / "statsd.json", env={"STATSD_API_KEY_AUTHENTICATION": "false"}).start()
    try:
        slow = []
        for i in range(20):  # twenty connections that never finish their request
            sock = socket.create_connection(("127.0.0.1", srv.port))
            sock.sendall(b"POST /api/v2/stats/ HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100000\r\n\r\n" + b'{"type": "risk", "data": "' if i % 2 else b"GET /api/v2/sta")
            slow.append(sock)
        for i in range(20):
            resp = requests.post(srv.url + STATS, json={"type": "risk", "data": i}, timeout=5)
            assert resp.status_code == 201
            time.sleep(0.01)
        for sock in slow:
            sock.close()
        stats = requests.get(srv.url + STATS, timeout=5).json()["data"]
        assert [s["data"] for s in stats] == list(range(20))  # the unfinished posts stored nothing
        ABUSE_CASES.extend(["slow"] * 20)
    finally:
        srv.kill()


def test_ten_thousand_query_parameters_get_a_json_error(tmp_path):
    srv = ServerProcess(tmp_path / "statsd.json", env={"STATSD_API_KEY_AUTHENTICATION": "false"}).start()
    try:
        for query in ("&".join(f"p{i}=1" for i in range(10_000)), "&".join(["type=risk"] * 10_000),
                      "&".join(f"data__k{i}=1" for i in range(10_000))):
            resp = requests.get(srv.url + STATS + "?" + query, timeout=30)
            ABUSE_CASES.append("10k")
            if query.startswith("data"):  # ten thousand valid filters: over the cap on filters
                assert resp.status_code == 400 and "filters" in resp.json()["error"], resp.text[:200]
            else:
                assert resp.status_code == 400 and resp.json()["status_code"] == 400, resp.text[:200]
        assert requests.get(srv.url + "/", timeout=5).status_code == 200
    finally:
        srv.kill()


# --------------------------------------------------------- key handling ---

async def test_a_copied_database_file_gives_away_no_token(make_client, db_path, tmp_path):
    client = await make_client()
    tokens = [await new_org(client, f"ORG{i}", admin=i == 0) for i in range(3)]
    resp = await client.post(ORGS, json={"name": "CHOSEN", "token": "my-chosen-token-0123456789"},
                             headers=key(tokens[0]))
    tokens.append((await resp.json())["token"])
    resp = await client.patch(ORGS + "ORG1", json={"token": "rotated-token-abcdefghijkl"}, headers=key(tokens[0]))
    assert resp.status == 200
    tokens.append("rotated-token-abcdefghijkl")
    copy = tmp_path / "copy.json"
    shutil.copyfile(db_path, copy)  # the checkpoint ...
    shutil.copyfile(db_path + ".journal", str(copy) + ".journal")  # ... and the journal a thief would take
    await client.close()  # and what a clean stop leaves
    for path in (copy, str(copy) + ".journal", db_path):
        raw = open(path, "rb").read()
        for token in tokens:
            assert token.encode() not in raw
            assert token[8:24].encode() not in raw  # not even a slice of it
        if path == db_path:
            orgs = json.loads(raw)["organizations"].values()
            assert {o["token_sha256"] for o in orgs} <= {hashlib.sha256(t.encode()).hexdigest() for t in tokens}
            assert all(set(o) == {"name", "token_sha256", "is_admin", "created_at", "updated_at"} for o in orgs)


async def test_keys_are_compared_in_constant_time(monkeypatch, api):
    """The stored hash is looked up, then compared with hmac.compare_digest (no early exit): the
    comparison takes the stored record's hash and the hash of the key presented, not one hash twice."""
    calls = []
    real = statsd.hmac.compare_digest
    monkeypatch.setattr(statsd.hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))
    stored = api.app[statsd.STORE_KEY].orgs.get("CASES")["token_sha256"]
    assert (await api.get(STATS, headers=key(api.cases))).status == 200
    [(a, b)] = calls
    presented = hashlib.sha256(api.cases.encode()).hexdigest()
    assert {id(a), id(b)} & {id(stored)}, "the stored hash is not one of the compared values"
    assert (b if a is stored else a) == presented and (b if a is stored else a) is not stored
    calls.clear()
    assert (await api.get(STATS, headers=key(api.cases[:-1] + "x"))).status == 401
    assert calls == []  # a key whose hash nobody holds is refused without comparing anything


@pytest.fixture(scope="module", autouse=True)
def report_abuse_cases_tried():
    """After the module: how many abuse cases its tests tried (shown with -s)."""
    yield
    print(f"\nabuse cases tried in this module: {len(ABUSE_CASES)}")
