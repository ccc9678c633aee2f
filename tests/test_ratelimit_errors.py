"""Issue 2, "Rate limits" and "Errors": per-client, per-endpoint counters, their headers, the error object."""

import logging
import time
import uuid

from conftest import key, new_org

import statsd

STATS = "/api/v2/stats/"
ORGS = "/api/v2/organizations/"
ERROR_CLASSES = {400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound",
                 405: "MethodNotAllowed", 409: "Conflict", 413: "RequestEntityTooLarge",
                 415: "UnsupportedMediaType", 429: "TooManyRequests", 500: "InternalServerError"}
RATE_HEADERS = ("X-Rate-Limit-Limit", "X-Rate-Limit-Remaining", "X-Rate-Limit-Reset")


async def assert_error(resp, status, method, target):
    """The JSON error object of both specs; returns it."""
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert isinstance(body, dict)
    assert {"error", "status", "action", "target", "exception_msg", "status_code", "exception_cls"} <= set(body)
    assert body["status"] == "failed"
    assert body["action"] == method
    assert body["target"] == target
    assert body["status_code"] == status
    assert body["exception_cls"] == ERROR_CLASSES[status]
    assert isinstance(body["error"], str) and body["error"].strip()
    assert body["exception_msg"] == body["error"]
    assert "Traceback" not in await resp.text()
    return body


async def limited(make_client, rate_limit="5/minute", **settings):
    """A client with rate limiting on and an organization CASES (its token at .cases)."""
    client = await make_client(rate_limit=rate_limit, **settings)
    client.cases = await new_org(client, "CASES")
    return client


async def post_stat(client, token, **fields):
    resp = await client.post(STATS, json={"type": "risk", "data": {"n": 1}, **fields}, headers=key(token))
    assert resp.status == 201, await resp.text()
    return await resp.json()


async def stored_uuids(client, token):
    resp = await client.get(STATS + "?_limit=1000", headers=key(token))
    assert resp.status == 200
    return [s["uuid"] for s in (await resp.json())["data"]]


# ---------------------------------------------------------------- headers ---

async def test_every_api_response_carries_the_rate_limit_headers(make_client):
    client = await limited(make_client, "50/minute")
    stat = await post_stat(client, client.cases)  # POST /stats/: 201
    requests = [
        ("GET", STATS, {}, key(client.cases), 200),
        ("POST", STATS, {"json": {"type": "risk"}}, key(client.cases), 400),
        ("GET", STATS, {}, {}, 401),
        ("GET", STATS + "0123456789abcdef01234567/", {}, key(client.cases), 404),
        ("GET", "/api/v2/nowhere/", {}, key(client.cases), 404),
        ("DELETE", STATS, {}, key(client.cases), 405),
        ("GET", STATS + stat["id"] + "/", {}, key(client.cases), 200),
    ]
    for method, path, kwargs, headers, status in requests:
        before = time.time()
        resp = await client.request(method, path, headers=headers, **kwargs)
        assert resp.status == status, (method, path, await resp.text())
        for name in RATE_HEADERS:
            assert name in resp.headers, (method, path, status, name)
        assert resp.headers["X-Rate-Limit-Limit"] == "50"
        assert 0 <= int(resp.headers["X-Rate-Limit-Remaining"]) < 50
        reset = int(resp.headers["X-Rate-Limit-Reset"])  # an absolute epoch second within the window
        assert before < reset <= time.time() + 60 + 1, (method, path, reset)


async def test_remaining_counts_down_per_request(make_client):
    client = await limited(make_client, "5/minute")
    remaining = []
    for _ in range(5):
        resp = await client.get(STATS, headers=key(client.cases))
        assert resp.status == 200
        remaining.append(int(resp.headers["X-Rate-Limit-Remaining"]))
    assert remaining == [4, 3, 2, 1, 0]


async def test_no_rate_limit_headers_when_rate_limiting_is_off(make_client):
    client = await limited(make_client, "")
    resp = await client.get(STATS, headers=key(client.cases))
    assert resp.status == 200
    assert not any(name in resp.headers for name in RATE_HEADERS)


# ------------------------------------------------------- over the limit ---

async def test_over_the_limit_is_a_429_error_with_retry_after(make_client):
    client = await limited(make_client, "3/minute")
    for _ in range(3):
        assert (await client.get(STATS, headers=key(client.cases))).status == 200
    before = time.time()
    resp = await client.get(STATS, headers=key(client.cases))
    await assert_error(resp, 429, "GET", "stats")
    retry_after = int(resp.headers["Retry-After"])  # whole seconds: allow one for rounding
    assert 1 <= retry_after <= 60 + 1
    assert resp.headers["X-Rate-Limit-Limit"] == "3"
    assert resp.headers["X-Rate-Limit-Remaining"] == "0"
    assert before < int(resp.headers["X-Rate-Limit-Reset"]) <= time.time() + 61


async def test_a_post_over_the_limit_stores_nothing(make_client):
    client = await limited(make_client, "2/minute")
    sent = [(await post_stat(client, client.cases))["uuid"] for _ in range(2)]
    refused = str(uuid.uuid4())
    resp = await client.post(STATS, json={"uuid": refused, "type": "risk", "data": 1}, headers=key(client.cases))
    await assert_error(resp, 429, "POST", "stats")
    assert await stored_uuids(client, client.cases) == sent


async def test_a_delete_over_the_limit_deletes_nothing(make_client):
    client = await limited(make_client, "2/minute")
    resp = await client.post(STATS, json=[{"type": "risk", "data": i} for i in range(3)], headers=key(client.cases))
    assert resp.status == 201
    stats = (await resp.json())["data"]
    for stat in stats[:2]:
        assert (await client.delete(STATS + stat["id"] + "/", headers=key(client.cases))).status == 204
    resp = await client.delete(STATS + stats[2]["id"] + "/", headers=key(client.cases))
    await assert_error(resp, 429, "DELETE", "stats")
    assert await stored_uuids(client, client.cases) == [stats[2]["uuid"]]


# ------------------------------------------------------- which counter ---

async def test_each_endpoint_has_its_own_counter(make_client):
    client = await limited(make_client, "2/minute")
    stat = await post_stat(client, client.cases)
    for _ in range(2):
        assert (await client.get(STATS, headers=key(client.cases))).status == 200
    assert (await client.get(STATS, headers=key(client.cases))).status == 429
    # the same route without the trailing slash is the same endpoint
    assert (await client.get("/api/v2/stats", headers=key(client.cases))).status == 429
    # other methods and routes are untouched
    resp = await client.post(STATS, json={"type": "risk", "data": 2}, headers=key(client.cases))
    assert resp.status == 201
    assert resp.headers["X-Rate-Limit-Remaining"] == "0"  # the second POST of its window
    resp = await client.get(STATS + stat["id"] + "/", headers=key(client.cases))
    assert resp.status == 200
    assert resp.headers["X-Rate-Limit-Remaining"] == "1"


async def test_different_ids_share_the_counter_of_their_route(make_client):
    client = await limited(make_client, "3/minute")
    ids = [(await post_stat(client, client.cases))["id"] for _ in range(3)]
    remaining = []
    for stat_id in ids:
        resp = await client.get(STATS + stat_id + "/", headers=key(client.cases))
        assert resp.status == 200
        remaining.append(int(resp.headers["X-Rate-Limit-Remaining"]))
    assert remaining == [2, 1, 0]
    resp = await client.get(STATS + "0123456789abcdef01234567/", headers=key(client.cases))
    await assert_error(resp, 429, "GET", "stats")


async def test_unauthorized_requests_count(make_client):
    client = await limited(make_client, "3/minute")
    for headers in ({}, key("not-a-key-of-anyone"), {}):
        assert (await client.get(STATS, headers=headers)).status == 401
    resp = await client.get(STATS, headers=key(client.cases))
    await assert_error(resp, 429, "GET", "stats")


async def test_not_found_requests_count(make_client):
    client = await limited(make_client, "3/minute")
    stat = await post_stat(client, client.cases)
    for _ in range(3):
        resp = await client.get(STATS + "0123456789abcdef01234567/", headers=key(client.cases))
        assert resp.status == 404
    resp = await client.get(STATS + stat["id"] + "/", headers=key(client.cases))
    await assert_error(resp, 429, "GET", "stats")


async def test_unknown_routes_share_one_counter_per_method(make_client):
    client = await limited(make_client, "3/minute")
    for path in ("/api/v2/a", "/api/v2/b/c/", "/api/v3/stats/"):
        assert (await client.get(path, headers=key(client.cases))).status == 404
    resp = await client.get("/api/v2/" + uuid.uuid4().hex, headers=key(client.cases))
    await assert_error(resp, 429, "GET", resp.url.path)
    # another method has its own counter; the known routes are untouched
    assert (await client.post("/api/v2/a", json={}, headers=key(client.cases))).status == 404
    assert (await client.get(STATS, headers=key(client.cases))).status == 200


async def test_forwarded_for_from_an_untrusted_peer_is_ignored(make_client):
    client = await limited(make_client, "2/minute")
    for spoofed in ("203.0.113.1", "203.0.113.2"):
        resp = await client.get(STATS, headers={**key(client.cases), "X-Forwarded-For": spoofed})
        assert resp.status == 200
    resp = await client.get(STATS, headers={**key(client.cases), "X-Forwarded-For": "203.0.113.3"})
    await assert_error(resp, 429, "GET", "stats")


async def test_forwarded_for_from_a_trusted_proxy_gets_its_own_counter(make_client):
    client = await limited(make_client, "2/minute", trusted_proxies=["127.0.0.1"])
    alice = {**key(client.cases), "X-Forwarded-For": "203.0.113.1"}
    for _ in range(2):
        assert (await client.get(STATS, headers=alice)).status == 200
    await assert_error(await client.get(STATS, headers=alice), 429, "GET", "stats")
    # alice cannot escape by prepending a made-up address: the proxy appends the one it saw
    spoofing = {**key(client.cases), "X-Forwarded-For": "198.51.100.7, 203.0.113.1"}
    await assert_error(await client.get(STATS, headers=spoofing), 429, "GET", "stats")
    # another client behind the proxy, and the proxy itself, have their own counters
    bob = {**key(client.cases), "X-Forwarded-For": "203.0.113.2"}
    resp = await client.get(STATS, headers=bob)
    assert resp.status == 200 and resp.headers["X-Rate-Limit-Remaining"] == "1"
    resp = await client.get(STATS, headers=key(client.cases))
    assert resp.status == 200 and resp.headers["X-Rate-Limit-Remaining"] == "1"


# --------------------------------------------------------- error objects ---

async def test_400_error_object_for_invalid_json_changes_nothing(api):
    resp = await api.post(STATS, data=b'{"type": "risk", "data": ', headers={
        **key(api.cases), "Content-Type": "application/json"})
    await assert_error(resp, 400, "POST", "stats")
    assert await stored_uuids(api, api.cases) == []


async def test_401_error_object(api):
    body = await assert_error(await api.get(STATS), 401, "GET", "stats")
    assert body["error"] == "Unauthorized"
    body = await assert_error(await api.get(ORGS, headers=key("x" * 40)), 401, "GET", "organizations")
    assert body["error"] == "Unauthorized"


async def test_403_error_object(api):
    await assert_error(await api.get(ORGS, headers=key(api.cases)), 403, "GET", "organizations")
    resp = await api.post(ORGS, json={"name": "SNEAKY", "is_admin": True}, headers=key(api.cases))
    await assert_error(resp, 403, "POST", "organizations")
    resp = await api.get(ORGS + "?_limit=1000", headers=key(api.admin))
    assert "SNEAKY" not in [o["name"] for o in (await resp.json())["data"]]


async def test_404_error_objects_for_unknown_routes_and_ids(api):
    resp = await api.get("/api/v2/nowhere/", headers=key(api.cases))
    await assert_error(resp, 404, "GET", "/api/v2/nowhere/")
    resp = await api.get(STATS + "0123456789abcdef01234567/", headers=key(api.cases))
    await assert_error(resp, 404, "GET", "stats")
    resp = await api.delete(ORGS + "NOBODY/", headers=key(api.admin))
    await assert_error(resp, 404, "DELETE", "organizations")


async def test_405_error_object_names_the_allowed_methods(api):
    resp = await api.delete(STATS, headers=key(api.cases))
    await assert_error(resp, 405, "DELETE", "stats")
    allowed = {m.strip() for m in resp.headers["Allow"].split(",")}
    assert {"GET", "POST"} <= allowed and "DELETE" not in allowed
    resp = await api.post(STATS + "0123456789abcdef01234567/", json={}, headers=key(api.cases))
    await assert_error(resp, 405, "POST", "stats")
    assert {"GET", "PUT", "PATCH", "DELETE"} <= {m.strip() for m in resp.headers["Allow"].split(",")}


async def test_409_error_object_for_a_duplicate_uuid_changes_nothing(api):
    first = await post_stat(api, api.cases)
    resp = await api.post(STATS, json={"uuid": first["uuid"], "type": "other", "data": 2}, headers=key(api.cases))
    await assert_error(resp, 409, "POST", "stats")
    resp = await api.get(STATS, headers=key(api.cases))
    assert [(s["uuid"], s["type"]) for s in (await resp.json())["data"]] == [(first["uuid"], "risk")]


async def test_413_error_object(make_client):
    client = await limited(make_client, "", max_body_size=2048)
    resp = await client.post(STATS, json={"type": "risk", "data": "x" * 4096}, headers=key(client.cases))
    await assert_error(resp, 413, "POST", "stats")
    assert await stored_uuids(client, client.cases) == []


async def test_415_error_object_for_a_non_json_content_type(api):
    resp = await api.post(STATS, data='{"type": "risk", "data": 1}',
                          headers={**key(api.cases), "Content-Type": "text/plain"})
    body = await assert_error(resp, 415, "POST", "stats")
    assert "application/json" in body["error"]  # says what to send
    assert await stored_uuids(api, api.cases) == []


async def test_error_objects_carry_rate_limit_headers_and_429_is_one_too(make_client):
    client = await limited(make_client, "1/minute")
    resp = await client.post(ORGS, json={"name": "X"}, headers=key(client.cases))
    await assert_error(resp, 403, "POST", "organizations")
    assert resp.headers["X-Rate-Limit-Remaining"] == "0"
    resp = await client.post(ORGS, json={"name": "X"}, headers=key(client.cases))
    await assert_error(resp, 429, "POST", "organizations")
    assert "Retry-After" in resp.headers


async def test_500_is_the_error_object_without_a_traceback_and_is_logged(aiohttp_client, db_path, caplog):
    config = statsd.Config(database=db_path, rate_limit="", api_key_authentication=False)
    config.validate()
    app = statsd.create_app(config)

    async def failing_handler(request):
        raise RuntimeError("secret internals: /etc/statsd/key")
    app.router.add_get("/api/v2/boom", failing_handler)
    client = await aiohttp_client(app)
    with caplog.at_level(logging.ERROR):
        resp = await client.get("/api/v2/boom")
    body = await assert_error(resp, 500, "GET", "/api/v2/boom")
    text = await resp.text()
    assert "secret internals" not in text and "RuntimeError" not in text
    assert body["exception_cls"] == "InternalServerError"
    assert any("secret internals" in (r.exc_text or "") or (r.exc_info and "secret internals" in str(r.exc_info[1]))
               for r in caplog.records), "the failure is logged on the server"


async def test_forwarded_chain_is_walked_only_through_trusted_proxies(make_client):
    """The client is the first untrusted hop from the right, however the chain is split."""
    client = await make_client(rate_limit="2/minute", trusted_proxies=["127.0.0.1", "10.0.0.0/8"],
                               api_key_authentication=False)

    async def remaining(*forwarded):
        headers = [("X-Forwarded-For", value) for value in forwarded]
        resp = await client.get("/api/v2/stats/", headers=headers)
        return int(resp.headers["X-Rate-Limit-Remaining"])

    # 1.1.1.1 reached us through the trusted 10.0.0.5: the chain in one header or in two
    assert await remaining("1.1.1.1, 10.0.0.5") == 1
    assert await remaining("1.1.1.1", "10.0.0.5") == 0
    # a spoofed left-most entry does not make 2.2.2.2 someone else
    assert await remaining("9.9.9.9, 2.2.2.2") == 1
    assert await remaining("8.8.8.8, 2.2.2.2") == 0
    # an untrusted hop stops the walk: 3.3.3.3 is the client, not what it claims
    assert await remaining("1.1.1.1, 3.3.3.3, 10.0.0.5") == 1


async def test_links_follow_forwarded_proto_and_host_only_from_a_trusted_proxy(make_client):
    forwarded = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "stats.example.org"}
    for proxies, expected in (([], "http://127.0.0.1:"), (["127.0.0.1"], "https://stats.example.org/")):
        client = await make_client(api_key_authentication=False, trusted_proxies=proxies)
        resp = await client.post("/api/v2/stats/", json={"type": "risk", "data": 1}, headers=forwarded)
        assert resp.status == 201
        assert resp.headers["Location"].startswith(expected)
        assert f"href='{expected}" in (await resp.json())["link"]
        await client.close()
