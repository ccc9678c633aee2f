"""The read caches (issue 3) never answer from a stale state.

statsd keeps each stat's serialized answer, each parsed list query and each
intersection of equality indexes.  These tests repeat the same requests between
writes, so every cache is warm when a write lands, and compare each answer
with what the test computes from what it sent.
"""

import random

import pytest
from conftest import key
from test_storage import ORG_NAMES, IndexModel, all_stats, client_fields

import statsd

STATS = "/api/v2/stats/"
ORGS = "/api/v2/organizations/"

# (query parameters, test of a stat's client fields): run again after every write
QUERIES = [
    ({"type": "risk"}, lambda s: s["type"] == "risk"),
    ({"organization": "ALPHA", "type": "risk"}, lambda s: s.get("organization") == "ALPHA" and s["type"] == "risk"),
    ({"type": "risk", "organization": "ALPHA"}, lambda s: s.get("organization") == "ALPHA" and s["type"] == "risk"),
    ({"organization": "BETA", "type": "threat", "year": "2020"},
     lambda s: s.get("organization") == "BETA" and s["type"] == "threat" and s.get("year") == 2020),
    ({"organization": "ALPHA", "month__gte": "6"},
     lambda s: s.get("organization") == "ALPHA" and isinstance(s.get("month"), int) and s["month"] >= 6),
    ({"organization": "ALPHA", "month__lt": "6"},
     lambda s: s.get("organization") == "ALPHA" and isinstance(s.get("month"), int) and s["month"] < 6),
    ({"organization": "ALPHA", "month__exists": "false"}, lambda s: s.get("organization") == "ALPHA" and "month" not in s),
    ({"anr": "1", "year": "2019"}, lambda s: s.get("anr") == 1 and s.get("year") == 2019),
    ({"organization": "GAMMA", "type": "cartography", "quarter": "4", "anr": "2"},
     lambda s: (s.get("organization"), s["type"], s.get("quarter"), s.get("anr")) == ("GAMMA", "cartography", 4, 2)),
    ({"week": "27", "day__lte": "200", "type": "threat"},
     lambda s: s.get("week") == 27 and isinstance(s.get("day"), int) and s["day"] <= 200 and s["type"] == "threat"),
    ({"organization__in": "ALPHA,BETA", "type": "risk"},
     lambda s: s.get("organization") in ("ALPHA", "BETA") and s["type"] == "risk"),
    ({"type": "threat", "organization__ne": "ALPHA"}, lambda s: s["type"] == "threat" and s.get("organization") != "ALPHA"),
    ({"year": "2020", "anr__exists": "false"}, lambda s: s.get("year") == 2020 and "anr" not in s),
    ({"organization": "BETA", "type__istartswith": "RI", "month__lt": "12"},
     lambda s: s.get("organization") == "BETA" and s["type"].lower().startswith("ri")
     and isinstance(s.get("month"), int) and s["month"] < 12),
    ({"data__n__lt": "50", "type": "risk"}, lambda s: s["type"] == "risk" and s["data"]["n"] < 50),
]


def shrink_caches(client):
    """Caches so small that they start over all the time."""
    client.app[statsd.STAT_VIEWS_KEY].MAX = 3
    client.app[statsd.STAT_VIEWS_KEY].MAX_BYTES = 1500  # a few answers, not always the same number
    client.app[statsd.STAT_QUERIES_KEY].MAX = 2
    client.app[statsd.STORE_KEY].stats.MAX_INTERSECTION_IDS = 5
    client.app[statsd.STORE_KEY].stats.MAX_INTERSECTIONS = 2


async def check_queries(client, model, gone, rnd):
    for params, wanted in QUERIES:
        expected = [i for i, s in model.stats.items() if wanted(s)]
        for limit in ("1000", "3"):
            resp = await client.get(STATS, params={**params, "_limit": limit})
            assert resp.status == 200, await resp.text()
            body = await resp.json()
            page = expected[:int(limit)]
            assert [s["id"] for s in body["data"]] == page, params
            assert [client_fields(s) for s in body["data"]] == [model.stats[i] for i in page], params
            assert body["has_more"] is (len(expected) > int(limit)), params
    for stat_id in rnd.sample(list(model.stats), min(3, len(model.stats))):
        resp = await client.get(STATS + stat_id + "/")
        assert resp.status == 200
        assert client_fields(await resp.json()) == model.stats[stat_id]
        stat = model.stats[stat_id]
        for params in ({"uuid": stat["uuid"], "type": stat["type"]}, {"id": stat_id, "type": stat["type"]},
                       {"uuid": stat["uuid"], "type": "never"}):
            for _ in range(2):  # a unique field in an intersection, first lazily, then kept
                resp = await client.get(STATS, params=params)
                got = [s["id"] for s in (await resp.json())["data"]]
                assert got == ([] if params["type"] == "never" else [stat_id]), params
    for stat_id in rnd.sample(sorted(gone), min(3, len(gone))):
        resp = await client.get(STATS + stat_id + "/")
        assert resp.status == 404, f"deleted stat {stat_id} still answered"


@pytest.mark.parametrize("tiny", [False, True], ids=["default caches", "caches that start over"])
async def test_answers_follow_every_write_while_the_same_queries_repeat(make_client, tiny):
    client = await make_client(api_key_authentication=False)
    if tiny:
        shrink_caches(client)
    for name in ORG_NAMES:
        resp = await client.post(ORGS, json={"name": name})
        assert resp.status == 201
    model, rnd, gone = IndexModel(client, seed=20261123 + tiny), random.Random(7), set()
    for _ in range(40):
        await model.step()
    for _ in range(120):
        before = set(model.stats)
        await model.step()
        gone |= before - set(model.stats)
        await check_queries(client, model, gone, rnd)
    await model.delete_org_cascade("GONE")
    await check_queries(client, model, gone, rnd)
    full = await all_stats(client)
    assert {s["id"]: client_fields(s) for s in full} == model.stats


async def test_a_repeated_query_keeps_each_callers_own_view(api):
    tokens = {"CASES": api.cases, "OTHER": api.other, "admin": api.admin}
    ids = []
    for i, (org, kind) in enumerate([("CASES", "risk"), ("OTHER", "risk"), ("CASES", "threat"),
                                     ("OTHER", "risk"), ("admin", "risk")]):
        resp = await api.post(STATS, json={"type": kind, "data": {"i": i}}, headers=key(tokens[org]))
        assert resp.status == 201
        ids.append((await resp.json())["id"])
    views = {api.admin: [ids[0], ids[1], ids[3], ids[4]], api.cases: [ids[0]], api.other: [ids[1], ids[3]]}
    for _ in range(2):
        for token in (api.admin, api.cases, api.other, api.admin, api.other, api.cases):
            for params in ({"type": "risk"}, {"type": "risk", "_limit": "10"}):
                resp = await api.get(STATS, params=params, headers=key(token))
                assert [s["id"] for s in (await resp.json())["data"]] == views[token]
            resp = await api.get(STATS, params={"organization": "OTHER", "type": "risk"}, headers=key(token))
            assert [s["id"] for s in (await resp.json())["data"]] == \
                ([] if token == api.cases else [ids[1], ids[3]])
    resp = await api.get(STATS + ids[1] + "/", headers=key(api.cases))
    assert resp.status == 404, "a stat seen by its owner must stay hidden from another organization"


async def test_links_follow_the_host_each_request_names(api):
    resp = await api.post(STATS, json={"type": "risk", "data": {}}, headers=key(api.cases))
    stat_id = (await resp.json())["id"]
    for host in ("a.example", "b.example:8080", "a.example"):
        headers = {**key(api.cases), "Host": host}
        one = await (await api.get(STATS + stat_id + "/", headers=headers)).json()
        page = await (await api.get(STATS, params={"type": "risk"}, headers=headers)).json()
        for stat in (one, page["data"][0]):
            assert stat["link"] == f"<link rel='self' title='stat' href='http://{host}/api/v2/stats/{stat_id}/'/>"
            assert stat["links"] == [f"<link rel='parent' title='organization'"
                                     f" href='http://{host}/api/v2/organizations/CASES/'/>"]


async def test_fields_and_order_still_shape_a_page_of_cached_stats(api):
    body = [{"type": "risk", "anr": n, "data": {"n": n}} for n in (3, 1, 2)]
    await api.post(STATS, json=body, headers=key(api.cases))
    for _ in range(2):
        resp = await api.get(STATS, params={"type": "risk"}, headers=key(api.cases))
        assert [s["anr"] for s in (await resp.json())["data"]] == [3, 1, 2]
        resp = await api.get(STATS, params={"type": "risk", "_fields": "anr"}, headers=key(api.cases))
        assert [sorted(s) for s in (await resp.json())["data"]] == [["anr", "id"]] * 3
        resp = await api.get(STATS, params={"type": "risk", "_order_by": "-anr"}, headers=key(api.cases))
        assert [s["anr"] for s in (await resp.json())["data"]] == [3, 2, 1]


async def test_long_queries_and_host_names_are_not_kept(api):
    """What a client sends cannot make the caches hold much memory."""
    resp = await api.post(STATS, json={"type": "risk", "data": {}}, headers=key(api.cases))
    stat_id = (await resp.json())["id"]
    queries, views = api.app[statsd.STAT_QUERIES_KEY].parsed, api.app[statsd.STAT_VIEWS_KEY].entries
    long_in = ",".join(f"{n:024x}" for n in range(200)) + "," + stat_id
    resp = await api.get(STATS, params={"id__in": long_in}, headers=key(api.cases))
    assert [s["id"] for s in (await resp.json())["data"]] == [stat_id]
    assert queries == {}, "a 5 KB query string is not kept"
    views.clear()
    host = "h" * 300 + ".example"
    for url in (STATS + stat_id + "/", STATS):
        resp = await api.get(url, headers={**key(api.cases), "Host": host})
        assert host in await resp.text()
    assert views == {}, "an answer for a 300-character host name is not kept"
    resp = await api.get(STATS, headers=key(api.cases))
    assert (await resp.json())["data"][0]["id"] == stat_id
    assert list(views) == [stat_id] and list(queries) == [""]


async def test_many_different_filters_without_a_write_keep_bounded_memory(make_client):
    client = await make_client(api_key_authentication=False)
    await client.post(ORGS, json={"name": "ALPHA"})
    resp = await client.post(STATS, json={"organization": "ALPHA", "type": "risk", "data": {}})
    stat_id = (await resp.json())["id"]
    table = client.app[statsd.STORE_KEY].stats
    table.MAX_INTERSECTIONS = 10
    for n in range(40):  # 40 combinations never asked before, and no write between them
        resp = await client.get(STATS, params={"organization": "ALPHA", "type": f"t{n}"})
        assert (await resp.json())["data"] == []
        assert len(table.intersections) <= 10
    resp = await client.get(STATS, params={"organization": "ALPHA", "type": "risk"})
    assert [s["id"] for s in (await resp.json())["data"]] == [stat_id]


async def test_a_query_carrying_an_api_key_is_not_kept(api):
    for params in ({"type": "risk", "api_key": api.cases}, {"type": "risk"}):
        resp = await api.get(STATS, params=params, headers={} if "api_key" in params else key(api.cases))
        assert resp.status == 200
    kept = api.app[statsd.STAT_QUERIES_KEY].parsed
    assert kept, "the query without a key is kept"
    assert not [raw for raw in kept if api.cases in raw or "api_key" in raw]

