"""Querying lists (issue 2, "Querying (in memory)"): pagination, order, fields and filters.

Every expected result is computed here, in plain Python, from the stats the test sent.
"""

import asyncio
import functools
import json
import random
import uuid
from datetime import date, datetime, timedelta

import pytest

import statsd

from conftest import key, new_org

STATS = "/api/v2/stats/"
ORGS = "/api/v2/organizations/"
MISSING = object()

ANR_UUIDS = ["6c6f5a2e-6f3b-4d6a-9d1e-0f1b2c3d4e5f", "0a9b8c7d-6e5f-4a3b-8c2d-1e0f9a8b7c6d",
             "f0e1d2c3-b4a5-4968-8776-655443322110"]
STAT_UUIDS = ["11111111-2222-4333-8444-555555555555", "aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee",
              "12345678-9abc-4def-8123-456789abcdef"]

# A small, hand-made data set: present, missing and mixed-type values everywhere.
SAMPLE = [
    {"uuid": STAT_UUIDS[0], "organization": "CASES", "anr": 1, "type": "risk", "day": 10, "week": 2,
     "month": 1, "quarter": 1, "year": 2019,
     "data": {"x": 1, "flag": True, "code": "007", "total": {"current": {"operational": 6}}}},
    {"uuid": STAT_UUIDS[1], "organization": "CASES", "anr": 2, "type": "Risk", "day": 40, "week": 6,
     "month": 2, "quarter": 1, "year": 2020,
     "data": {"x": 2.5, "flag": "true", "code": 7, "total": {"current": {"operational": 5}}}},
    {"uuid": STAT_UUIDS[2], "organization": "OTHER", "anr": ANR_UUIDS[0], "type": "threat", "day": 100,
     "week": 15, "month": 4, "quarter": 2, "year": 2020,
     "data": {"x": "abc", "flag": False, "total": {"current": {"operational": 7.5}}}},
    {"organization": "OTHER", "anr": 10, "type": "vulnerability", "day": 200, "week": 29, "month": 7,
     "quarter": 3, "year": 2021,
     "data": {"x": None, "flag": None, "code": "7", "total": {"current": {"operational": "9"}}}},
    {"organization": "CASES", "anr": ANR_UUIDS[1], "type": "cases-risk", "year": 2021,
     "data": {"x": True, "total": {"current": {}}}},
    {"type": "RISK-summary", "anr": ANR_UUIDS[2], "month": 12, "quarter": 4,
     "data": {"x": "10", "total": 3}},
    {"organization": "CASES", "type": "threat", "day": 366, "week": 53, "month": 12, "quarter": 4,
     "year": 2019, "data": {"y": 1}},
    {"organization": "OTHER", "anr": 2, "type": "risk", "year": 2022, "data": None},
    {"organization": "CASES", "anr": 1, "type": "risk", "day": 1, "week": 1, "month": 1, "quarter": 1,
     "year": 2022, "data": [1, 2, 3]},
    {"organization": "CASES", "anr": 3, "type": "Threat", "year": 2020, "data": 5},
    {"organization": "OTHER", "anr": ANR_UUIDS[0], "type": "risk", "year": 2018,
     "data": {"x": -3, "flag": True, "code": 7.0}},
    {"organization": "CASES", "type": "vulnerability", "year": 2020, "data": "plain text"},
    {"organization": "OTHER", "anr": 4, "type": "Vulnerability", "day": 50, "week": 8, "month": 2,
     "quarter": 1, "year": 2021, "data": {"x": False, "total": {"current": {"operational": 5.5}}}},
]


# ------------------------------------------------------------------ helpers ---

def get(record, *path):
    """The value at `path` in a record, or MISSING (like a filter path `a__b__c`)."""
    value = record
    for part in path:
        if not isinstance(value, dict) or part not in value:
            return MISSING
        value = value[part]
    return value


def is_num(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_str(value):
    return isinstance(value, str)


async def assert_error(resp, status, *names, method="GET", target="stats"):
    """The JSON error object of both specs; its message names every one of `names`."""
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert body["status"] == "failed"
    assert body["action"] == method
    assert body["target"] == target
    assert body["status_code"] == status
    assert body["exception_cls"] == {400: "BadRequest"}[status]
    assert isinstance(body["error"], str) and body["error"] == body["exception_msg"]
    assert "Traceback" not in body["error"]
    for name in names:
        assert name in body["error"], (name, body["error"])
    return body


@pytest.fixture
async def open_api(make_client):
    """A client without API keys, with the organizations CASES and OTHER."""
    client = await make_client(api_key_authentication=False)
    await new_org(client, "CASES")
    await new_org(client, "OTHER")
    return client


async def create(client, stats, headers=None, batch=1000):
    """POST `stats` in batches of `batch`; the created stats, in the order sent."""
    created = []
    for start in range(0, len(stats), batch):
        resp = await client.post(STATS, json=stats[start:start + batch], headers=headers)
        assert resp.status == 201, await resp.text()
        created += (await resp.json())["data"]
    assert len(created) == len(stats)
    return created


async def listing(client, params=(), path=STATS, headers=None):
    """(response, body) of a list request with `params` (pairs, repeats allowed)."""
    resp = await client.get(path, params=list(params), headers=headers)
    body = await resp.json() if resp.content_type == "application/json" else await resp.text()
    return resp, body


async def bad_query_problems(client, cases, path=STATS, headers=None, target="stats"):
    """Each case (params, names) must be a 400 error naming every one of `names`.

    Returns the list of cases that were not, with what was wrong (empty when all were).
    """
    problems = []
    for params, names in cases:
        resp, _ = await listing(client, params, path, headers)
        try:
            await assert_error(resp, 400, *names, target=target)
        except AssertionError as e:
            problems.append(f"{params}: {e}")
    return problems


async def page(client, params=(), path=STATS, headers=None):
    """(ids, has_more) of a list request that must succeed."""
    resp, body = await listing(client, params, path, headers)
    assert resp.status == 200, body
    assert set(body) == {"data", "has_more"}
    assert isinstance(body["has_more"], bool)
    return [d["id"] for d in body["data"]], body["has_more"]


async def all_ids(client, params=(), path=STATS, headers=None):
    ids, more = await page(client, [*params, ("_limit", "1000")], path, headers)
    assert more is False
    return ids


@pytest.fixture
async def sample(open_api):
    """(client, [(sent stat, created stat), ...]) for SAMPLE."""
    created = await create(open_api, SAMPLE)
    return open_api, list(zip(SAMPLE, created))


def ids_where(pairs, test):
    """Ids, in creation order, of the sent stats for which `test` holds."""
    return [made["id"] for sent, made in pairs if test(sent)]


# --------------------------------------------------------------- pagination ---

async def test_default_skip_is_zero_and_default_limit_applies(make_client):
    client = await make_client(api_key_authentication=False, default_limit=3, max_limit=5)
    created = await create(client, [{"type": f"t{i}", "data": i} for i in range(7)], batch=5)
    ids = [c["id"] for c in created]
    assert await page(client) == (ids[:3], True)
    assert await page(client, [("_skip", "5")]) == (ids[5:], False)
    assert await page(client, [("_limit", "5")]) == (ids[:5], True)


async def test_default_limit_is_100_and_max_limit_1000_by_default(make_client):
    client = await make_client(api_key_authentication=False)
    created = await create(client, [{"type": "risk", "data": i} for i in range(101)])
    ids = [c["id"] for c in created]
    assert await page(client) == (ids[:100], True)
    assert await page(client, [("_limit", "1000")]) == (ids, False)
    resp, _ = await listing(client, [("_limit", "1001")])
    await assert_error(resp, 400, "_limit", "1001")


async def test_limit_above_max_limit_is_400_naming_parameter_and_value(make_client):
    client = await make_client(api_key_authentication=False, default_limit=2, max_limit=5)
    created = await create(client, [{"type": "risk", "data": i} for i in range(8)], batch=5)
    assert await page(client, [("_limit", "5")]) == ([c["id"] for c in created[:5]], True)
    for name in ("_limit", "limit"):
        resp, _ = await listing(client, [(name, "6")])
        await assert_error(resp, 400, name, "6")


async def test_skip_limit_and_their_aliases_offset_limit(open_api):
    created = await create(open_api, [{"type": "risk", "data": i} for i in range(9)])
    ids = [c["id"] for c in created]
    expected = (ids[2:5], True)
    assert await page(open_api, [("_skip", "2"), ("_limit", "3")]) == expected
    assert await page(open_api, [("offset", "2"), ("limit", "3")]) == expected
    assert await page(open_api, [("offset", "2"), ("_limit", "3")]) == expected
    assert await page(open_api, [("_skip", "2"), ("limit", "3")]) == expected
    assert await page(open_api, [("offset", "7"), ("limit", "5")]) == (ids[7:], False)
    assert await page(open_api, [("offset", "9")]) == ([], False)
    assert await page(open_api, [("offset", "50")]) == ([], False)


async def test_has_more_exactly_when_more_matching_records_follow(open_api):
    kinds = ["a", "b", "a", "b", "b", "a", "a", "b"]
    created = await create(open_api, [{"type": t, "data": i} for i, t in enumerate(kinds)])
    a_ids = [c["id"] for c, t in zip(created, kinds) if t == "a"]
    assert len(a_ids) == 4
    # exactly `limit` matches: nothing more matches, though other records follow them
    assert await page(open_api, [("type", "a"), ("_limit", "4")]) == (a_ids, False)
    assert await page(open_api, [("type", "a"), ("_limit", "3")]) == (a_ids[:3], True)
    assert await page(open_api, [("type", "a"), ("_skip", "1"), ("_limit", "3")]) == (a_ids[1:], False)
    assert await page(open_api, [("type", "a"), ("_skip", "1"), ("_limit", "2")]) == (a_ids[1:3], True)
    assert await page(open_api, [("type", "a"), ("_skip", "4")]) == ([], False)
    # whole table
    ids = [c["id"] for c in created]
    assert await page(open_api, [("_limit", "8")]) == (ids, False)
    assert await page(open_api, [("_limit", "7")]) == (ids[:7], True)


async def test_limit_zero_gives_an_empty_page_telling_whether_matches_exist(open_api):
    await create(open_api, [{"type": "a", "data": 1}, {"type": "b", "data": 2}])
    assert await page(open_api, [("_limit", "0")]) == ([], True)
    assert await page(open_api, [("_limit", "0"), ("_skip", "1")]) == ([], True)
    assert await page(open_api, [("_limit", "0"), ("_skip", "2")]) == ([], False)
    assert await page(open_api, [("_limit", "0"), ("type", "c")]) == ([], False)


async def test_lists_are_in_creation_order_by_default(open_api):
    types = ["zeta", "alpha", "mu", "beta", "omega"]
    ids = []
    for t in types:  # one request each: creation order is the order of these requests
        resp = await open_api.post(STATS, json={"type": t, "data": None})
        assert resp.status == 201
        ids.append((await resp.json())["id"])
    ids += [c["id"] for c in await create(open_api, [{"type": "b", "data": 1}, {"type": "a", "data": 2}])]
    assert await all_ids(open_api) == ids
    # an update does not move a stat
    resp = await open_api.patch(f"{STATS}{ids[0]}/", json={"type": "zzz"})
    assert resp.status == 200
    assert await all_ids(open_api) == ids


BAD_PAGINATION = [("_skip", "abc"), ("_skip", "-1"), ("_skip", "1.5"), ("_skip", ""),
                  ("offset", "x1"), ("offset", "-3"),
                  ("_limit", "ten"), ("_limit", "-1"), ("_limit", "2.0"), ("_limit", ""),
                  ("limit", "1e2"), ("limit", "-7")]


async def test_bad_pagination_value_is_400_naming_parameter_and_value(sample):
    client, pairs = sample
    cases = [([(name, value)], [name, value]) for name, value in BAD_PAGINATION]
    assert await bad_query_problems(client, cases) == []
    assert await all_ids(client) == [made["id"] for _, made in pairs]


# ----------------------------------------------------------------- ordering ---

def rank(value):
    """Order of kinds: missing, null, booleans, numbers, strings."""
    if value is MISSING:
        return 0, 0
    if value is None:
        return 1, 0
    if isinstance(value, bool):
        return 2, value
    if is_num(value):
        return 3, value
    if is_str(value):
        return 4, value
    raise AssertionError(f"no order defined for {value!r} here")


def reference_order(records, order_by):
    """Sort records (which carry their `id`) by `_order_by` keys; ties by id ascending."""
    keys = []
    for part in order_by.split(","):
        desc = part.startswith("-")
        keys.append((tuple(part.lstrip("-").split("__")), desc))

    def compare(a, b):
        for path, desc in keys:
            ra, rb = rank(get(a, *path)), rank(get(b, *path))
            if ra != rb:
                result = -1 if ra < rb else 1
                return -result if desc else result
        return (a["id"] > b["id"]) - (a["id"] < b["id"])
    return [r["id"] for r in sorted(records, key=functools.cmp_to_key(compare))]


def with_ids(pairs):
    return [{**sent, "id": made["id"]} for sent, made in pairs]


ORDERS = ["year", "-year", "type", "-type", "day", "-month", "organization", "type,-year",
          "-quarter,day", "-year,type,-day", "year,-organization,type"]


async def test_order_by_one_or_several_keys(sample):
    client, pairs = sample
    for order_by in ORDERS:
        expected = reference_order(with_ids(pairs), order_by)
        assert await all_ids(client, [("_order_by", order_by)]) == expected, order_by


async def test_order_ties_are_broken_by_id_ascending_in_both_directions(open_api):
    kinds = ["b", "a", "b", "c", "a", "b"]
    created = await create(open_api, [{"type": t, "data": i} for i, t in enumerate(kinds)])
    by_type = {}
    for made, t in zip(created, kinds):
        by_type.setdefault(t, []).append(made["id"])
    for t in by_type:
        by_type[t].sort()
    assert await all_ids(open_api, [("_order_by", "type")]) == by_type["a"] + by_type["b"] + by_type["c"]
    assert await all_ids(open_api, [("_order_by", "-type")]) == by_type["c"] + by_type["b"] + by_type["a"]


async def test_order_ties_go_by_id_even_when_ids_do_not_follow_creation_order(make_client):
    """Ids made by successive server runs on one file need not grow with creation order.

    (Within one run they usually do; then this test still checks the order, it just
    cannot tell "by id" from "by creation".)
    """
    made = []
    for run in range(6):
        client = await make_client(api_key_authentication=False)
        made += await create(client, [{"type": "same", "data": run}, {"type": "same", "data": run}])
        if run < 5:
            await client.close()
    ids = [m["id"] for m in made]
    run_of = {m["id"]: m["data"] for m in made}
    assert await all_ids(client) == ids  # creation order
    assert await all_ids(client, [("_order_by", "type")]) == sorted(ids)
    assert await all_ids(client, [("_order_by", "-type")]) == sorted(ids)
    assert await all_ids(client, [("_order_by", "-data,type")]) == sorted(ids, key=lambda i: (-run_of[i], i))


async def test_paging_through_a_sorted_list_yields_every_record_once(sample):
    client, pairs = sample
    for order_by in ["-type", "type", "year,-anr", "-data__x", "anr"]:
        expected = reference_order(with_ids(pairs), order_by)
        seen, skip, more = [], 0, True
        while more:
            ids, more = await page(client, [("_order_by", order_by), ("_skip", str(skip)), ("_limit", "2")])
            assert len(ids) == 2 or not more
            seen += ids
            skip += 2
        assert seen == expected, order_by
        assert sorted(seen) == sorted(made["id"] for _, made in pairs)


async def test_order_by_anr_puts_missing_first_then_numbers_then_uuid_strings(sample):
    client, pairs = sample
    records = with_ids(pairs)
    anr = {r["id"]: get(r, "anr") for r in records}
    ascending = await all_ids(client, [("_order_by", "anr")])
    assert ascending == reference_order(records, "anr")
    kinds = [rank(anr[i])[0] for i in ascending]
    assert kinds == sorted(kinds) and set(kinds) == {0, 3, 4}
    descending = await all_ids(client, [("_order_by", "-anr")])
    assert descending == reference_order(records, "-anr")
    kinds = [rank(anr[i])[0] for i in descending]
    assert kinds == sorted(kinds, reverse=True)


async def test_order_by_data_path_mixed_types_missing_null_bool_number_string(open_api):
    values = ["b", 3, None, MISSING, True, -1.5, "A", False, MISSING, 10, None, "10", 2]
    sent = [{"type": "t", "data": {} if v is MISSING else {"x": v}} for v in values]
    created = await create(open_api, sent)
    records = [{**s, "id": c["id"]} for s, c in zip(sent, created)]
    ascending = await all_ids(open_api, [("_order_by", "data__x")])
    assert ascending == reference_order(records, "data__x")
    by_id = {r["id"]: get(r, "data", "x") for r in records}
    got = [by_id[i] for i in ascending]
    assert [rank(v)[0] for v in got] == [0, 0, 1, 1, 2, 2, 3, 3, 3, 3, 4, 4, 4]
    assert got[4:] == [False, True, -1.5, 2, 3, 10, "10", "A", "b"]
    descending = await all_ids(open_api, [("_order_by", "-data__x")])
    assert descending == reference_order(records, "-data__x")
    assert [by_id[i] for i in descending][:9] == ["b", "A", "10", 10, 3, 2, -1.5, True, False]


async def test_order_by_unknown_field_is_400(sample):
    client, _ = sample
    cases = [([("_order_by", order_by)], [named]) for order_by, named in [
        ("colour", "colour"), ("-colour", "colour"), ("type,nope", "nope"), ("", "_order_by"),
        ("type__x", "type__x"), ("-", "_order_by"), ("link", "link")]]
    assert await bad_query_problems(client, cases) == []


# ------------------------------------------------------------------- fields ---

async def test_fields_returns_only_those_fields_plus_id(sample):
    client, pairs = sample
    resp, body = await listing(client, [("_fields", "type,year"), ("_limit", "1000")])
    assert resp.status == 200
    expected = [{name: made[name] for name in ("id", "type", "year") if name in sent or name == "id"}
                for sent, made in pairs]
    assert body["data"] == expected
    resp, body = await listing(client, [("_fields", "data")])
    assert body["data"] == [{"id": made["id"], "data": sent["data"]} for sent, made in pairs]


async def test_fields_with_an_unknown_field_is_400(sample):
    client, _ = sample
    cases = [([("_fields", fields)], [named]) for fields, named in [
        ("colour", "colour"), ("type,colour", "colour"), ("data__x", "data__x"), ("", "_fields"),
        ("token", "token")]]
    assert await bad_query_problems(client, cases) == []


# ------------------------------------------------------------------ filters ---

U0, U1, U2 = ANR_UUIDS
OPERATOR_CASES = [
    # exact, and the bare shortcut
    ("type", "risk", lambda s: s["type"] == "risk"),
    ("type__exact", "risk", lambda s: s["type"] == "risk"),
    ("type__iexact", "RISK", lambda s: s["type"].lower() == "risk"),
    ("type__ne", "risk", lambda s: s["type"] != "risk"),
    ("type__lt", "m", lambda s: s["type"] < "m"),
    ("type__gte", "risk", lambda s: s["type"] >= "risk"),
    ("type__in", "risk,threat", lambda s: s["type"] in ("risk", "threat")),
    ("type__nin", "risk,threat", lambda s: s["type"] not in ("risk", "threat")),
    ("type__contains", "isk", lambda s: "isk" in s["type"]),
    ("type__contains", "ISK", lambda s: "ISK" in s["type"]),
    ("type__icontains", "ISK", lambda s: "isk" in s["type"].lower()),
    ("type__startswith", "risk", lambda s: s["type"].startswith("risk")),
    ("type__istartswith", "RISK", lambda s: s["type"].lower().startswith("risk")),
    ("type__endswith", "risk", lambda s: s["type"].endswith("risk")),
    ("type__iendswith", "RISK", lambda s: s["type"].lower().endswith("risk")),
    ("type__exists", "true", lambda s: True),
    ("type__exists", "false", lambda s: False),
    # organization, including stats without one (authentication off)
    ("organization", "OTHER", lambda s: get(s, "organization") == "OTHER"),
    ("organization__ne", "CASES", lambda s: get(s, "organization") != "CASES"),
    ("organization__in", "CASES,OTHER", lambda s: get(s, "organization") in ("CASES", "OTHER")),
    ("organization__nin", "OTHER", lambda s: get(s, "organization") != "OTHER"),
    ("organization__exists", "false", lambda s: "organization" not in s),
    ("organization__istartswith", "ca", lambda s: get(s, "organization", ) == "CASES"),
    # integer fields (ne/nin also match stats without the field)
    ("year", "2020", lambda s: get(s, "year") == 2020),
    ("year__ne", "2020", lambda s: get(s, "year") != 2020),
    ("year__lt", "2020", lambda s: is_num(get(s, "year")) and s["year"] < 2020),
    ("year__lte", "2020", lambda s: is_num(get(s, "year")) and s["year"] <= 2020),
    ("year__gt", "2020", lambda s: is_num(get(s, "year")) and s["year"] > 2020),
    ("year__gte", "2020", lambda s: is_num(get(s, "year")) and s["year"] >= 2020),
    ("year__in", "2019,2021", lambda s: get(s, "year") in (2019, 2021)),
    ("year__nin", "2019,2021", lambda s: get(s, "year") not in (2019, 2021)),
    ("year__exists", "false", lambda s: "year" not in s),
    ("day", "366", lambda s: get(s, "day") == 366),
    ("day__gte", "100", lambda s: is_num(get(s, "day")) and s["day"] >= 100),
    ("day__ne", "10", lambda s: get(s, "day") != 10),
    ("week__lt", "10", lambda s: is_num(get(s, "week")) and s["week"] < 10),
    ("week__in", "1,53", lambda s: get(s, "week") in (1, 53)),
    ("month", "12", lambda s: get(s, "month") == 12),
    ("month__nin", "1,12", lambda s: get(s, "month") not in (1, 12)),
    ("quarter__lte", "2", lambda s: is_num(get(s, "quarter")) and s["quarter"] <= 2),
    ("quarter__exists", "true", lambda s: "quarter" in s),
    # anr: an integer value matches stored integers only, a UUID value UUID anrs only
    ("anr", "2", lambda s: is_num(get(s, "anr")) and s["anr"] == 2),
    ("anr", U0, lambda s: get(s, "anr") == U0),
    ("anr__ne", "1", lambda s: get(s, "anr") != 1),
    ("anr__gt", "1", lambda s: is_num(get(s, "anr")) and s["anr"] > 1),
    ("anr__lte", U1, lambda s: is_str(get(s, "anr")) and s["anr"] <= U1),
    ("anr__in", f"1,{U1}", lambda s: get(s, "anr") in (1, U1)),
    ("anr__nin", f"1,2,{U0}", lambda s: get(s, "anr") not in (1, 2, U0)),
    ("anr__exists", "false", lambda s: "anr" not in s),
    ("anr__startswith", U2[:6], lambda s: is_str(get(s, "anr")) and s["anr"].startswith(U2[:6])),
    ("anr__icontains", "9D1E", lambda s: is_str(get(s, "anr")) and "9d1e" in s["anr"]),
    # uuid
    ("uuid", STAT_UUIDS[1], lambda s: get(s, "uuid") == STAT_UUIDS[1]),
    ("uuid__in", f"{STAT_UUIDS[0]},{STAT_UUIDS[2]}", lambda s: get(s, "uuid") in (STAT_UUIDS[0], STAT_UUIDS[2])),
    ("uuid__ne", STAT_UUIDS[0], lambda s: get(s, "uuid") != STAT_UUIDS[0]),
    ("uuid__startswith", "1234", lambda s: get(s, "uuid") == STAT_UUIDS[2]),
    # data itself, and paths inside it: JSON number/true/false/null, else a string
    ("data", "5", lambda s: is_num(s["data"]) and s["data"] == 5),
    ("data", "null", lambda s: s["data"] is None),
    ("data__ne", "null", lambda s: s["data"] is not None),
    ("data", "plain text", lambda s: s["data"] == "plain text"),
    ("data__icontains", "PLAIN", lambda s: is_str(s["data"]) and "plain" in s["data"].lower()),
    ("data__x", "1", lambda s: is_num(get(s, "data", "x")) and s["data"]["x"] == 1),
    ("data__x", "true", lambda s: get(s, "data", "x") is True),
    ("data__x", "false", lambda s: get(s, "data", "x") is False),
    ("data__x", "null", lambda s: get(s, "data", "x") is None),
    ("data__x", "abc", lambda s: get(s, "data", "x") == "abc"),
    ("data__x", "10", lambda s: is_num(get(s, "data", "x")) and s["data"]["x"] == 10),
    ("data__x__iexact", "ABC", lambda s: is_str(get(s, "data", "x")) and s["data"]["x"].lower() == "abc"),
    ("data__x__ne", "1", lambda s: not (is_num(get(s, "data", "x")) and s["data"]["x"] == 1)),
    ("data__x__gt", "1", lambda s: is_num(get(s, "data", "x")) and s["data"]["x"] > 1),
    ("data__x__lte", "2.5", lambda s: is_num(get(s, "data", "x")) and s["data"]["x"] <= 2.5),
    ("data__x__lt", "b", lambda s: is_str(get(s, "data", "x")) and s["data"]["x"] < "b"),
    ("data__x__gte", "true", lambda s: False),  # booleans never compare
    ("data__x__lt", "null", lambda s: False),
    ("data__x__in", "1,abc,true", lambda s: get(s, "data", "x") is True or get(s, "data", "x") == "abc"
        or (is_num(get(s, "data", "x")) and s["data"]["x"] == 1)),
    ("data__x__in", "1,abc", lambda s: get(s, "data", "x") == "abc"
        or (is_num(get(s, "data", "x")) and s["data"]["x"] == 1)),  # not x=true
    ("data__x__nin", "0,1,null", lambda s: not (get(s, "data", "x") is None
        or (is_num(get(s, "data", "x")) and s["data"]["x"] in (0, 1)))),  # x=true/false still match
    ("data__x__nin", "null,abc", lambda s: get(s, "data", "x") is MISSING
        or (get(s, "data", "x") is not None and get(s, "data", "x") != "abc")),
    ("data__x__exists", "true", lambda s: get(s, "data", "x") is not MISSING),
    ("data__x__exists", "false", lambda s: get(s, "data", "x") is MISSING),
    ("data__x__contains", "1", lambda s: is_str(get(s, "data", "x")) and "1" in s["data"]["x"]),
    ("data__x__startswith", "a", lambda s: is_str(get(s, "data", "x")) and s["data"]["x"].startswith("a")),
    ("data__x__endswith", "C", lambda s: False),
    ("data__x__iendswith", "C", lambda s: is_str(get(s, "data", "x")) and s["data"]["x"].lower().endswith("c")),
    ("data__flag", "true", lambda s: get(s, "data", "flag") is True),
    ("data__flag", "null", lambda s: get(s, "data", "flag") is None),
    ("data__flag__exists", "false", lambda s: get(s, "data", "flag") is MISSING),
    ("data__code", "007", lambda s: get(s, "data", "code") == "007"),
    ("data__code", "7", lambda s: is_num(get(s, "data", "code")) and s["data"]["code"] == 7),
    ("data__code__in", "7,8", lambda s: is_num(get(s, "data", "code")) and s["data"]["code"] in (7, 8)),
    ("data__code__in", "007,7", lambda s: get(s, "data", "code") == "007"
        or (is_num(get(s, "data", "code")) and s["data"]["code"] == 7)),
    ("data__total__current__operational__gt", "5",
     lambda s: is_num(get(s, "data", "total", "current", "operational"))
     and s["data"]["total"]["current"]["operational"] > 5),
    ("data__total__current__operational__lte", "5.5",
     lambda s: is_num(get(s, "data", "total", "current", "operational"))
     and s["data"]["total"]["current"]["operational"] <= 5.5),
    ("data__total__current__operational__exists", "false",
     lambda s: get(s, "data", "total", "current", "operational") is MISSING),
    ("data__total__gt", "1", lambda s: is_num(get(s, "data", "total")) and s["data"]["total"] > 1),
    ("data__total__contains", "current", lambda s: False),  # a dict is not a string
    ("data__nothing__here", "1", lambda s: False),
    ("data__nothing__here__ne", "1", lambda s: True),
]


async def test_every_operator_on_every_field(sample):
    client, pairs = sample
    position = {made["id"]: i for i, (_, made) in enumerate(pairs)}  # index in SAMPLE
    wrong = []
    for name, value, test in OPERATOR_CASES:
        resp, body = await listing(client, [(name, value), ("_limit", "1000")])
        expected = [position[i] for i in ids_where(pairs, test)]
        got = [position[d["id"]] for d in body["data"]] if resp.status == 200 else body
        if got != expected:
            wrong.append(f"{name}={value}: expected SAMPLE items {expected}, got {got}")
    assert wrong == []


def test_operator_cases_are_not_trivial():
    """Most cases must select some but not all stats, so that they can fail."""
    trivial = [(n, v) for n, v, t in OPERATOR_CASES
               if len({bool(t(s)) for s in SAMPLE}) == 1]
    assert len(trivial) <= 12, trivial


async def test_filters_on_id(sample):
    client, pairs = sample
    ids = [made["id"] for _, made in pairs]
    assert await all_ids(client, [("id", ids[3])]) == [ids[3]]
    assert await all_ids(client, [("id__in", f"{ids[5]},{ids[1]}")]) == [ids[1], ids[5]]
    assert await all_ids(client, [("id__ne", ids[0])]) == ids[1:]
    assert await all_ids(client, [("id__nin", f"{ids[0]},{ids[-1]}")]) == ids[1:-1]
    assert await all_ids(client, [("id", "0" * 24)]) == []
    assert await all_ids(client, [("id__gt", ids[4])]) == [i for i in ids if i > ids[4]]


async def test_several_filters_combine_with_and(sample):
    client, pairs = sample
    params = [("type__icontains", "risk"), ("year__gte", "2020"), ("organization", "OTHER")]
    expected = ids_where(pairs, lambda s: "risk" in s["type"].lower() and get(s, "year") != MISSING
                         and s["year"] >= 2020 and get(s, "organization") == "OTHER")
    assert await all_ids(client, params) == expected
    params = [("data__x__exists", "true"), ("anr__nin", "1,2"), ("month__lte", "6"), ("type__ne", "risk")]
    expected = ids_where(pairs, lambda s: get(s, "data", "x") is not MISSING and get(s, "anr") not in (1, 2)
                         and is_num(get(s, "month")) and s["month"] <= 6 and s["type"] != "risk")
    assert expected and await all_ids(client, params) == expected
    # filters and pagination together
    everything = ids_where(pairs, lambda s: get(s, "organization") == "CASES" and get(s, "year") != 2019)
    assert await page(client, [("organization", "CASES"), ("year__ne", "2019"), ("_skip", "1"),
                               ("_limit", "2")]) == (everything[1:3], len(everything) > 3)


async def test_integer_filters_take_every_integer_a_stat_may_hold(open_api):
    """A year (or anr) that POST accepted can be filtered on: the filter parses the same integers."""
    big, small = 2 ** 63 - 1, -(2 ** 63)
    created = await create(open_api, [{"type": "t", "year": big, "anr": big, "data": 1},
                                      {"type": "t", "year": small, "data": 2},
                                      {"type": "t", "year": 2020, "data": 3}])
    ids = [c["id"] for c in created]
    assert await all_ids(open_api, [("year", str(big))]) == [ids[0]]
    assert await all_ids(open_api, [("anr", str(big))]) == [ids[0]]
    assert await all_ids(open_api, [("year__lt", str(small + 1))]) == [ids[1]]
    assert await all_ids(open_api, [("year__in", f"{small},2020")]) == ids[1:]


async def test_filters_and_order_see_every_create_update_and_delete(open_api):
    """Answers come from memory: each write shows in the very next query, whatever path it uses."""
    created = await create(open_api, [{"type": "a", "year": 2020, "data": {"x": i}} for i in range(4)])
    ids = [c["id"] for c in created]
    queries = [[("data__x", "1")], [("type", "a"), ("year", "2020")], [("data__x__gte", "1"), ("type", "a")],
               [("_order_by", "-data__x")]]
    for params in queries:  # warm whatever the server keeps per query
        await all_ids(open_api, params)
    resp = await open_api.patch(f"{STATS}{ids[1]}/", json={"data": {"x": 7}, "type": "b"})
    assert resp.status == 200
    resp = await open_api.put(f"{STATS}{ids[2]}/", json={"type": "a", "year": 2021, "data": {"x": 1}})
    assert resp.status == 200
    resp = await open_api.delete(f"{STATS}{ids[3]}/")
    assert resp.status == 204
    ids.append((await create(open_api, [{"type": "a", "year": 2020, "data": {"x": 1}}]))[0]["id"])
    # now: 0 a/2020/x=0, 1 b/2020/x=7, 2 a/2021/x=1, 4 a/2020/x=1
    assert await all_ids(open_api, queries[0]) == [ids[2], ids[4]]
    assert await all_ids(open_api, queries[1]) == [ids[0], ids[4]]
    assert await all_ids(open_api, queries[2]) == [ids[2], ids[4]]
    ties = sorted([ids[2], ids[4]])
    assert await all_ids(open_api, queries[3]) == [ids[1], *ties, ids[0]]


async def test_queries_whose_candidates_span_many_steps_see_each_match_once_in_creation_order(open_api):
    """More candidates than one step of the query engine (statsd.STEP): an index set, the whole
    table and a data column are read a step at a time, after updates and deletes anywhere in them."""
    count = 3 * statsd.STEP + 17
    values = [i if i % 5 else float(i) for i in range(count)]
    values[7], values[300], values[600] = "700", True, None  # neither numbers nor the compared kind
    made = await create(open_api, [{"type": "a" if i % 3 else "b", "data": {"v": v}} for i, v in enumerate(values)])
    ids = [m["id"] for m in made]
    for i in (2, statsd.STEP + 1, 2 * statsd.STEP + 3):  # a change in each of the first three steps
        resp = await open_api.patch(f"{STATS}{ids[i]}/", json={"type": "b"})
        assert resp.status == 200
    for i in (4, statsd.STEP + 4):
        assert (await open_api.delete(f"{STATS}{ids[i]}/")).status == 204
    types = {i: ("b" if i in (2, statsd.STEP + 1, 2 * statsd.STEP + 3) else "a" if i % 3 else "b")
             for i in range(count) if i not in (4, statsd.STEP + 4)}

    def number(v):
        return v.__class__ in (int, float)
    cases = [
        ([("type", "a"), ("data__v__gte", str(count - 40))], [i for i in types if types[i] == "a" and
                                                              number(values[i]) and values[i] >= count - 40]),
        ([("data__v__gt", "250")], [i for i in types if number(values[i]) and values[i] > 250]),
        ([("data__v__lt", "8x")], [i for i in types if values[i].__class__ is str and values[i] < "8x"]),
        ([("data__v__exists", "true"), ("type", "b")], [i for i in types if types[i] == "b"]),
        ([("month__exists", "false")], list(types)),
        ([("type", "a")], [i for i in types if types[i] == "a"]),  # a deleted one among the first five
        ([], list(types)),
    ]
    for params, expected in cases:
        assert await all_ids(open_api, params) == [ids[i] for i in expected], params
        resp, body = await listing(open_api, params + [("_limit", "5")])
        assert [s["id"] for s in body["data"]] == [ids[i] for i in expected[:5]], params
        assert body["has_more"] == (len(expected) > 5)


async def test_writes_landing_while_a_query_waits_for_its_column_change_no_answer_order(open_api, monkeypatch):
    """A query that waits (a data column being filled, giving the loop back at every step) while
    PATCHes move records to the end of its index set still answers each match once, in creation order."""
    async def give_back_every_step(self):  # the loop budget, spent at every step
        await asyncio.sleep(0)
    monkeypatch.setattr(statsd.LoopBudget, "spend", give_back_every_step)
    count = statsd.STEP + 44
    made = await create(open_api, [{"type": "a", "data": {"v": i}} for i in range(count)])
    ids = [m["id"] for m in made]
    patched = [1, 5, statsd.STEP - 1, statsd.STEP + 3]

    async def patch(i):
        resp = await open_api.patch(f"{STATS}{ids[i]}/", json={"data": {"v": i, "patched": True}})
        assert resp.status == 200
    query = open_api.get(STATS, params={"type": "a", "data__v__gte": "0", "_limit": "1000"})
    resp, *_ = await asyncio.gather(query, *(patch(i) for i in patched))
    assert resp.status == 200
    assert [s["id"] for s in (await resp.json())["data"]] == ids
    assert await all_ids(open_api, [("type", "a"), ("data__patched", "true")]) == [ids[i] for i in patched]


async def test_filters_of_every_kind_never_fail_on_mixed_types(sample):
    """Comparisons between different types never match and never raise (no 500)."""
    client, pairs = sample
    for name in ("data", "data__x", "data__total", "data__total__current", "data__flag", "anr",
                 "data__total__current__operational"):
        for op in ("", "__exact", "__ne", "__lt", "__lte", "__gt", "__gte", "__in", "__nin",
                   "__contains", "__icontains", "__startswith", "__iendswith"):
            for value in ("1", "abc", "true", "null", "-2.5", "1,abc,null", U0):
                if name == "anr" and value not in ("1", U0):
                    continue
                resp, body = await listing(client, [(name + op, value)])
                assert resp.status == 200, (name + op, value, body)


# ---------------------------------------------------------- dates as filters ---

def moment(text):
    return datetime.fromisoformat(text)


async def test_created_at_filters_compare_chronologically_and_accept_a_date(open_api):
    made = []
    for i in range(4):  # one request each, so the creation times differ
        resp = await open_api.post(STATS, json={"type": "risk", "data": i})
        assert resp.status == 201
        made.append(await resp.json())
    ids = [m["id"] for m in made]
    when = {m["id"]: moment(m["created_at"]) for m in made}

    def where(test):
        return [i for i in ids if test(when[i])]
    middle = made[1]["created_at"]
    assert await all_ids(open_api, [("created_at", middle)]) == where(lambda t: t == moment(middle))
    assert ids[1] in await all_ids(open_api, [("created_at", middle)])
    assert await all_ids(open_api, [("created_at__gt", middle)]) == where(lambda t: t > moment(middle))
    assert await all_ids(open_api, [("created_at__lte", middle)]) == where(lambda t: t <= moment(middle))
    assert await all_ids(open_api, [("created_at__ne", middle)]) == where(lambda t: t != moment(middle))
    both = f"{made[0]['created_at']},{made[3]['created_at']}"
    assert await all_ids(open_api, [("created_at__in", both)]) == \
        where(lambda t: t in (moment(made[0]["created_at"]), moment(made[3]["created_at"])))
    # seconds only, no microseconds: still a point in time
    seconds = middle[:19]
    assert await all_ids(open_api, [("created_at__gte", seconds)]) == where(lambda t: t >= moment(seconds))
    # a bare date means its midnight UTC
    day = date.fromisoformat(made[0]["created_at"][:10])
    midnight = datetime(day.year, day.month, day.day)
    next_day = (day + timedelta(days=1)).isoformat()
    assert await all_ids(open_api, [("created_at__gte", day.isoformat())]) == where(lambda t: t >= midnight)
    assert await all_ids(open_api, [("created_at__lt", day.isoformat())]) == where(lambda t: t < midnight)
    assert await all_ids(open_api, [("created_at", day.isoformat())]) == where(lambda t: t == midnight)
    assert await all_ids(open_api, [("created_at__lt", next_day)]) == \
        where(lambda t: t < midnight + timedelta(days=1))
    assert await all_ids(open_api, [("created_at__gt", "2020-05-12")]) == \
        where(lambda t: t > datetime(2020, 5, 12))
    assert await all_ids(open_api, [("created_at__lte", "2020-05-12")]) == \
        where(lambda t: t <= datetime(2020, 5, 12))


async def test_updated_at_filters_follow_updates(open_api):
    created = await create(open_api, [{"type": "risk", "data": i} for i in range(3)])
    latest_creation = max(moment(c["created_at"]) for c in created)
    resp = await open_api.patch(f"{STATS}{created[1]['id']}/", json={"data": "changed"})
    assert resp.status == 200
    _, body = await listing(open_api)
    records = body["data"]
    expected = [r["id"] for r in records if moment(r["updated_at"]) > latest_creation]
    assert expected == [created[1]["id"]]
    assert await all_ids(open_api, [("updated_at__gt", latest_creation.isoformat())]) == expected
    assert await all_ids(open_api, [("updated_at__lte", latest_creation.isoformat())]) == \
        [r["id"] for r in records if moment(r["updated_at"]) <= latest_creation]
    day = records[0]["updated_at"][:10]
    assert await all_ids(open_api, [("updated_at__gte", day)]) == \
        [r["id"] for r in records if moment(r["updated_at"]) >= moment(day)]


# ------------------------------------------------------------------- errors ---

STRING_OPERATORS = ["iexact", "contains", "icontains", "startswith", "istartswith", "endswith", "iendswith"]


async def test_string_operator_on_an_integer_field_is_400(sample):
    client, pairs = sample
    names = [f"year__{op}" for op in STRING_OPERATORS] + [f"{f}__contains" for f in ("day", "week", "month", "quarter")]
    cases = [([(name, "1")], name.split("__")) for name in names]
    assert await bad_query_problems(client, cases) == []


async def test_value_that_does_not_convert_is_400_naming_it(sample):
    client, _ = sample
    bad = [("year", "abc"), ("year", "2020.0"), ("day__gt", "1.5"), ("week__in", "1,x"), ("month__nin", "a"),
           ("quarter__lte", "true"), ("year", ""),
           ("anr", "abc"), ("anr__in", "1,not-a-uuid"), ("anr__gt", "1.5"),
           ("uuid", "not-a-uuid"), ("uuid__in", f"{STAT_UUIDS[0]},nope"), ("uuid__ne", "12"),
           ("created_at__gt", "yesterday"), ("created_at", "2020-13-01"), ("updated_at__lte", "12:00"),
           ("type__exists", "maybe"), ("data__x__exists", "2"), ("anr__exists", "")]
    # the message names the parameter and the item that does not convert (the last one here)
    cases = [([(name, value)], [name, value.split(",")[-1]]) for name, value in bad]
    assert await bad_query_problems(client, cases) == []


async def test_unknown_field_is_400_naming_it(sample):
    client, _ = sample
    cases = [([(name, "1")], [named]) for name, named in [
        ("colour", "colour"), ("colour__exact", "colour"), ("data_x", "data_x"), ("Type", "Type"),
        ("typ__contains", "typ"), ("api", "api")]]
    assert await bad_query_problems(client, cases) == []


async def test_unknown_operator_is_400_naming_it(sample):
    client, _ = sample
    cases = [([(name, "1")], [named]) for name, named in [
        ("type__like", "like"), ("year__between", "between"), ("anr__regex", "regex"),
        ("type__EXACT", "EXACT"), ("uuid__isnull", "isnull")]]
    assert await bad_query_problems(client, cases) == []


async def test_unknown_underscore_parameter_is_400_naming_it(sample):
    client, _ = sample
    cases = [([(name, "1")], [name]) for name in ["_foo", "_sort", "_page", "_offset", "_", "_order"]]
    assert await bad_query_problems(client, cases) == []


SAME_TWICE = [
    ([("type", "risk"), ("type", "threat")], ["type"]),
    ([("year__gt", "2019"), ("year__gt", "2019")], ["year__gt"]),
    ([("_order_by", "type"), ("_order_by", "year")], ["_order_by"]),
    ([("_fields", "type"), ("_fields", "type")], ["_fields"]),
    ([("_skip", "1"), ("_skip", "2")], ["_skip"]),
    ([("limit", "1"), ("limit", "1")], ["limit"]),
    ([("_skip", "1"), ("offset", "1")], ["_skip", "offset"]),
    ([("offset", "1"), ("_skip", "2")], ["_skip", "offset"]),
    ([("_limit", "1"), ("limit", "2")], ["_limit", "limit"]),
    ([("limit", "5"), ("_limit", "5")], ["_limit", "limit"]),
]


async def test_same_parameter_twice_is_400_naming_it(sample):
    client, _ = sample
    assert await bad_query_problems(client, SAME_TWICE) == []


# ------------------------------------------------------------ organizations ---

async def test_organizations_list_takes_pagination_order_fields_and_filters(api):
    for name, admin in (("alpha", False), ("beta", False), ("gamma", True)):
        await new_org(api, name, admin=admin)
    names = ["admin", "CASES", "OTHER", "alpha", "beta", "gamma"]
    admins = {"admin", "gamma"}
    head = key(api.admin)
    assert await page(api, [("_limit", "2")], ORGS, head) == (names[:2], True)
    assert await page(api, [("offset", "3"), ("limit", "3")], ORGS, head) == (names[3:], False)
    assert await page(api, [("_skip", "2"), ("_limit", "3")], ORGS, head) == (names[2:5], True)
    assert await all_ids(api, [("is_admin", "true")], ORGS, head) == [n for n in names if n in admins]
    assert await all_ids(api, [("is_admin__ne", "true")], ORGS, head) == [n for n in names if n not in admins]
    assert await all_ids(api, [("name__istartswith", "A")], ORGS, head) == \
        [n for n in names if n.lower().startswith("a")]
    assert await all_ids(api, [("name__in", "beta,OTHER,nobody")], ORGS, head) == \
        [n for n in names if n in ("beta", "OTHER")]
    assert await all_ids(api, [("name__gt", "a"), ("is_admin", "false")], ORGS, head) == \
        [n for n in names if n > "a" and n not in admins]
    assert await all_ids(api, [("_order_by", "-name")], ORGS, head) == sorted(names, reverse=True)
    assert await all_ids(api, [("_order_by", "-is_admin,name")], ORGS, head) == \
        sorted(n for n in names if n in admins) + sorted(n for n in names if n not in admins)
    # the key may come as the api_key argument among the filters
    assert await page(api, [("api_key", api.admin), ("name", "CASES")], ORGS) == (["CASES"], False)
    resp, body = await listing(api, [("_fields", "is_admin"), ("_limit", "1000")], ORGS, head)
    assert body["data"] == [{"id": n, "is_admin": n in admins} for n in names]


async def test_organizations_list_bad_query_is_400(api):
    cases = [([(name, value)], [name, named]) for name, value, named in [
        ("_limit", "-1", "-1"), ("limit", "x", "x"), ("offset", "1.5", "1.5"), ("_limit", "1001", "1001"),
        ("colour", "red", "colour"), ("name__like", "a", "like"), ("is_admin", "maybe", "maybe"),
        ("_bogus", "1", "_bogus"), ("_fields", "token", "token"), ("_order_by", "token", "token"),
        ("token", "x" * 20, "token")]]
    cases.append(([("name", "a"), ("name", "b")], ["name"]))
    cases.append(([("_skip", "1"), ("offset", "1")], ["_skip", "offset"]))
    assert await bad_query_problems(api, cases, ORGS, key(api.admin), "organizations") == []
    ids, _ = await page(api, [], ORGS, key(api.admin))
    assert ids == ["admin", "CASES", "OTHER"]


# ---------------------------------------------------------------- reference ---

SCALARS = [None, True, False, 0, 1, 2, -1, 2.5, 1.0, 10, "a", "ab", "B", "abc", "10", "007", "true",
           "null", "x y", "Ab"]
TYPES = ["risk", "Risk", "threat", "THREAT-x", "vuln", "cases risk", "ab", "Ab"]
INT_FIELDS = {"day": [1, 2, 50, 100, 366], "week": [1, 2, 30, 53], "month": [1, 6, 12],
              "quarter": [1, 2, 3, 4], "year": [2018, 2019, 2020, 2021]}


def generate_stats(rng):
    stats = []
    for _ in range(60):
        stat = {"uuid": str(uuid.UUID(int=rng.getrandbits(128), version=4)), "type": rng.choice(TYPES)}
        organization = rng.choice(["CASES", "OTHER", None])
        if organization:
            stat["organization"] = organization
        if rng.random() < 0.8:
            stat["anr"] = rng.choice([1, 2, 3, 7, *ANR_UUIDS])
        for name, values in INT_FIELDS.items():
            if rng.random() < 0.75:
                stat[name] = rng.choice(values)
        if rng.random() < 0.1:
            stat["data"] = rng.choice(SCALARS)
        else:
            data = {}
            for name in ("x", "y"):
                if rng.random() < 0.7:
                    data[name] = rng.choice(SCALARS)
            if rng.random() < 0.6:
                data["t"] = {"c": rng.choice(SCALARS)} if rng.random() < 0.8 else rng.choice(SCALARS)
            stat["data"] = data
        stats.append(stat)
    return stats


def as_query_value(value):
    """How a client writes a stored value in a query string."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if is_num(value):
        return json.dumps(value)
    return value


def parse_data_value(raw):
    """JSON number, true, false or null; anything else is the string itself."""
    try:
        value = json.loads(raw, parse_constant=lambda c: raw)
    except ValueError:
        return raw
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return raw


def convert(field, raw):
    if field in INT_FIELDS:
        return int(raw)
    if field == "anr":
        return int(raw) if raw.lstrip("-").isdigit() else str(uuid.UUID(raw))
    if field == "uuid":
        return str(uuid.UUID(raw))
    if field == "data":
        return parse_data_value(raw)
    return raw


def kind(value):
    """missing, null, boolean, number, string, or something else (a list or an object)."""
    return rank(value)[0] if value is MISSING or value is None or isinstance(value, (bool, int, float, str)) else 5


def same(a, b):
    return a is not MISSING and kind(a) == kind(b) and a == b


def reference_match(record, name, raw):
    """Whether `record` passes the filter `name=raw`, as issue 2 describes it."""
    parts = name.split("__")
    op = parts.pop() if len(parts) > 1 and parts[-1] in REFERENCE_OPS else "exact"
    value = get(record, *parts)
    field = parts[0]
    if op == "exists":
        return (value is not MISSING) == (raw == "true")
    if op in ("in", "nin"):
        hit = any(same(value, convert(field, item)) for item in raw.split(","))
        return hit if op == "in" else not hit
    if op in STRING_OPERATORS:
        if not is_str(value):
            return False
        if op.startswith("i"):
            value, raw, op = value.lower(), raw.lower(), op[1:]
        return {"exact": value == raw, "contains": raw in value, "startswith": value.startswith(raw),
                "endswith": value.endswith(raw)}[op]
    wanted = convert(field, raw)
    if op == "exact":
        return same(value, wanted)
    if op == "ne":
        return not same(value, wanted)
    if not ((is_num(value) and is_num(wanted)) or (is_str(value) and is_str(wanted))):
        return False
    return {"lt": value < wanted, "lte": value <= wanted, "gt": value > wanted, "gte": value >= wanted}[op]


REFERENCE_OPS = ["exact", "ne", "lt", "lte", "gt", "gte", "in", "nin", "exists", *STRING_OPERATORS]
REFERENCE_FIELDS = ["organization", "anr", "type", "day", "week", "month", "quarter", "year", "uuid",
                    "data", "data__x", "data__y", "data__t", "data__t__c"]
ORDER_KEYS = ["type", "year", "anr", "data__x", "data__y", "data__t__c", "day", "organization", "month"]


def random_filter(rng, records, used):
    field = rng.choice([f for f in REFERENCE_FIELDS if f not in used])
    path = field.split("__")
    ops = ["", *REFERENCE_OPS]
    if path[0] in INT_FIELDS:
        ops = [op for op in ops if op not in STRING_OPERATORS]
    op = rng.choice(ops)
    stored = [v for r in records if (v := get(r, *path)) is not MISSING]
    if path[0] == "data":
        stored = [v for v in stored if v is None or isinstance(v, (bool, int, float, str))]
        stored += ["zzz", 3, True, None]
    candidates = [as_query_value(v) for v in stored]
    if op == "exists":
        value = rng.choice(["true", "false"])
    elif op in STRING_OPERATORS:
        text = rng.choice([c for c in candidates if is_str(c)] or ["zz"])
        start = rng.randrange(len(text))
        value = text[start:start + rng.randint(1, 4)]
        if op.startswith("i") and rng.random() < 0.5:
            value = value.swapcase()
    elif op in ("in", "nin"):
        value = ",".join(rng.choice(candidates) for _ in range(rng.randint(1, 3)))
    else:
        value = rng.choice(candidates)
    return field, (field if not op else f"{field}__{op}"), value


async def test_random_filters_agree_with_a_reference_evaluation(open_api):
    rng = random.Random(1)
    sent = generate_stats(rng)
    created = await create(open_api, sent)
    records = [{**s, "id": c["id"]} for s, c in zip(sent, created)]
    nonempty = 0
    for _ in range(60):
        used, params = set(), []
        for _ in range(rng.choice([1, 1, 2, 2, 3])):
            field, name, value = random_filter(rng, records, used)
            used.add(field)
            params.append((name, value))
        matching = [r for r in records if all(reference_match(r, n, v) for n, v in params)]
        order_by = None
        if rng.random() < 0.5:
            order_by = ",".join(("-" if rng.random() < 0.5 else "") + k
                                for k in rng.sample(ORDER_KEYS, rng.randint(1, 2)))
            expected = reference_order(matching, order_by)
            params.append(("_order_by", order_by))
        else:
            expected = [r["id"] for r in matching]
        skip, limit = rng.choice([0, 0, 1, 3, 10]), rng.choice([1, 5, 20, 100])
        params += [("_skip", str(skip)), ("_limit", str(limit))]
        got = await page(open_api, params)
        assert got == (expected[skip:skip + limit], len(expected) > skip + limit), params
        nonempty += bool(matching)
    assert nonempty >= 20  # the combinations do select records


async def test_the_largest_skip_is_an_empty_page_not_a_500(sample):
    client, _ = sample
    for skip in (str(2 ** 63 - 2), str(2 ** 63 - 1)):
        for extra in ({}, {"_order_by": "-year"}):
            resp = await client.get("/api/v2/stats/", params={"_skip": skip, "_limit": "1000", **extra})
            assert resp.status == 200, await resp.text()
            assert await resp.json() == {"data": [], "has_more": False}



# ------------------------------------------------------------ ordered by date ---
# A query ordered by date first walks the kept date order and stops at the page's last day
# instead of sorting every match: its pages must be exactly those of the full sort.

DATE_ORDERS = ["date", "-date", "date,-data__x", "-date,type", "-date,-organization,data__x", "date,anr,-data__x",
               "-date,data__t__c"]
DATE_FILTERS = [[], [("type", "risk")], [("organization", "CASES")], [("type", "risk"), ("organization", "OTHER")],
                [("anr", "1")], [("type__in", "risk,threat")], [("type__ne", "risk"), ("anr", "2")],
                [("date__gte", "2024-03-05")], [("date__lte", "2024-03-09"), ("type", "threat")],
                [("date__gt", "2024-03-02"), ("date__lt", "2024-03-12"), ("organization", "CASES")],
                [("date", "2024-03-07")], [("month", "3"), ("type", "vulnerability")], [("date__exists", "false")],
                [("type", "risk"), ("data__x__gte", "3")], [("data__x__lte", "2")], [("organization__in", "OTHER")]]


def dated_stats(rng, count):
    """Stats over few days (many ties on the date and on the later keys), some with no date."""
    days = [f"2024-03-{d:02d}" for d in range(1, 15)]
    stats = []
    for _ in range(count):
        stat = {"organization": rng.choice(["CASES", "OTHER", None]), "anr": rng.choice([1, 2, 3, ANR_UUIDS[0]]),
                "type": rng.choice(["risk", "risk", "threat", "vulnerability", "other"]),
                "data": {"x": rng.choice([1, 2, 2, 3, 3, 5, None, "s"])}}
        if rng.random() < 0.3:
            stat["data"]["t"] = {"c": rng.choice([0, 1, 1, "a"])}
        if rng.random() < 0.9:
            stat["date"] = rng.choice(days)
        elif rng.random() < 0.5:
            stat.update(year=2024, day=rng.randint(60, 75))  # placed by its day, sorted as having no date
        stats.append({k: v for k, v in stat.items() if v is not None})
    return stats


def walked(monkeypatch):
    """The queries that the date walk answered (a spy on statsd._walk_by_date; the real one runs)."""
    answered = []
    real = statsd._walk_by_date

    async def spy(table, query, *args):
        found = await real(table, query, *args)
        answered.append(found is not None)
        return found
    monkeypatch.setattr(statsd, "_walk_by_date", spy)
    return answered


async def test_pages_ordered_by_date_are_those_of_the_full_sort(make_client, db_path, monkeypatch):
    rng = random.Random(12)
    now = statsd.utcnow()
    stored = {}  # a database file whose ids do not follow the order of creation (as after several runs)
    for i, stat in enumerate(dated_stats(rng, 300)):
        periods = statsd.periods_of(stat["date"]) if "date" in stat else {}
        stored[str(i + 1)] = statsd.ordered_stat({**periods, **stat, "uuid": str(uuid.UUID(int=rng.getrandbits(128))),
                                                  "id": f"{rng.getrandbits(96):024x}", "created_at": now,
                                                  "updated_at": now})
    with open(db_path, "wb") as f:
        f.write(statsd.dumps({"stats": stored}))
    client = await make_client(api_key_authentication=False)
    await new_org(client, "CASES")
    await new_org(client, "OTHER")
    await create(client, dated_stats(rng, 150))
    ids = [m["id"] for m in await whole_list_of(client)]
    for stat_id in rng.sample(ids, 40):  # dates changed, dates removed, stats deleted
        choice = rng.random()
        if choice < 0.4:
            resp = await client.patch(f"{STATS}{stat_id}/", json={"date": f"2024-03-{rng.randint(1, 16):02d}"})
        elif choice < 0.6:
            resp = await client.put(f"{STATS}{stat_id}/", json={"type": "risk", "anr": 1, "data": {"x": 2}})
        else:
            resp = await client.delete(f"{STATS}{stat_id}/")
        assert resp.status in (200, 204), await resp.text()
    records = await whole_list_of(client)
    assert len({r["id"] for r in records}) == len(records) > 300
    assert sum("date" not in r for r in records) > 20
    assert sorted(r["id"] for r in records) != [r["id"] for r in records]  # ids do not follow creation
    answered = walked(monkeypatch)
    cases = 0
    for filters in DATE_FILTERS:
        matching = [r for r in records if all(reference_match(r, n, v) for n, v in filters)]
        for order_by in DATE_ORDERS:
            expected = reference_order(matching, order_by)
            assert len(set(r.get("date") for r in matching)) < len(matching) or len(matching) < 2  # ties
            for skip, limit in [(0, 1), (0, 7), (5, 10), (rng.randrange(len(expected) + 1), rng.randint(1, 40)),
                                (max(0, len(expected) - 3), 5), (0, 1000)]:
                got = await page(client, [*filters, ("_order_by", order_by), ("_skip", str(skip)),
                                          ("_limit", str(limit))])
                assert got == (expected[skip:skip + limit], len(expected) > skip + limit), (filters, order_by, skip)
                cases += 1
    only_data = sum(1 for filters in DATE_FILTERS if filters and all(n.startswith("data") for n, _ in filters))
    assert answered.count(True) == cases - only_data * len(DATE_ORDERS) * 6  # a data filter alone: the sort
    assert answered.count(False) == only_data * len(DATE_ORDERS) * 6


async def test_a_day_with_more_stats_than_one_sorted_run_pages_like_the_full_sort(open_api, monkeypatch):
    """Days of a few thousand stats are sorted in runs and merged, in the walk as in the full sort."""
    rng = random.Random(5)
    stats = [{"type": "risk", "date": rng.choice(["2024-01-01", "2024-01-02"]), "data": {"x": rng.randint(0, 9)}}
             for _ in range(2600)]
    stats += [{"type": "risk", "year": 2024, "day": 3, "data": {"x": rng.randint(0, 9)}} for _ in range(1100)]
    await create(open_api, stats)
    records = await whole_list_of(open_api)
    answered = walked(monkeypatch)
    for order_by in ["date,data__x", "-date,-data__x", "-date", "date"]:
        expected = reference_order(records, order_by)
        for skip, limit in [(0, 3), (1020, 30), (1290, 20), (2595, 10), (3690, 20)]:
            got = await page(open_api, [("type", "risk"), ("_order_by", order_by), ("_skip", str(skip)),
                                        ("_limit", str(limit))])
            assert got == (expected[skip:skip + limit], len(expected) > skip + limit), (order_by, skip)
    assert answered and all(answered)


async def whole_list_of(client):
    """Every stat, in creation order, as the server gives it."""
    found, skip = [], 0
    while True:
        resp, body = await listing(client, [("_skip", str(skip)), ("_limit", "1000")])
        assert resp.status == 200, body
        found += body["data"]
        if not body["has_more"]:
            return found
        skip += 1000


async def test_a_data_path_step_of_thousands_of_digits_matches_nothing_rather_than_failing(api):
    long_step = "9" * 5000  # past int()'s 4,300-digit limit
    resp = await api.post("/api/v2/stats/", json={"type": "risk", "anr": 1, "data": {"x": {"a": 1}, "l": [1, 2]}},
                          headers=key(api.admin))
    assert resp.status == 201, await resp.text()
    for query in (f"data__x__{long_step}=1", f"data__l__{long_step}=1", f"_order_by=data__l__{long_step}"):
        resp = await api.get(f"/api/v2/stats/?{query}", headers=key(api.admin))
        assert resp.status == 200, (query[:40], await resp.text())
        assert len((await resp.json())["data"]) == (1 if query.startswith("_order_by") else 0)
