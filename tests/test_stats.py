"""The stats API of issue 2 ("The API" and "API keys"), through the HTTP interface."""

import re
import uuid
from datetime import datetime, timezone
from urllib.parse import urlsplit

import pytest

from conftest import assert_error_object, key, new_org, whole_list

STATS = "/api/v2/stats/"
ISO_MICRO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}")
HEX24 = re.compile(r"[0-9a-f]{24}")
LINK = re.compile(r"<link rel='(?P<rel>[^']*)' title='[^']*' href='(?P<href>[^']*)'/>")

FULL = {"anr": 2, "type": "risk", "day": 1, "week": 1, "month": 1, "quarter": 1, "year": 2020,
        "data": {"what": "you want", "super": "cool"}}


def stat_url(stat_id, slash=True):
    return f"{STATS}{stat_id}" + ("/" if slash else "")


async def error(resp, status):
    return await assert_error_object(resp, status, "stats")


async def create(api, token, body=None, **extra):
    resp = await api.post(STATS, json={"type": "risk", "data": {"n": 1}, **(body or {}), **extra},
                          headers=key(token))
    assert resp.status == 201, await resp.text()
    return await resp.json()


async def everything(api, token=None):
    """Every stat the (admin) key sees, as stored."""
    return await whole_list(api, STATS, token)


def parse_link(value):
    found = LINK.fullmatch(value)
    assert found, value
    return found["rel"], found["href"]


def now_utc():
    return datetime.now(timezone.utc).replace(tzinfo=None)


# ------------------------------------------------------------- routes ---

@pytest.mark.parametrize("slash", [True, False])
async def test_every_stats_route_answers_with_and_without_trailing_slash(api, slash):
    h = key(api.cases)
    base = STATS if slash else STATS.rstrip("/")
    resp = await api.post(base, json={"type": "risk", "data": 1}, headers=h)
    assert resp.status == 201
    stat = await resp.json()
    resp = await api.get(base, headers=h)
    assert resp.status == 200
    assert [s["id"] for s in (await resp.json())["data"]] == [stat["id"]]
    url = stat_url(stat["id"], slash)
    assert (await api.get(url, headers=h)).status == 200
    resp = await api.put(url, json={"type": "vuln", "data": 2}, headers=h)
    assert resp.status == 200 and (await resp.json())["type"] == "vuln"
    resp = await api.patch(url, json={"data": 3}, headers=h)
    assert resp.status == 200 and (await resp.json())["data"] == 3
    resp = await api.delete(url, headers=h)
    assert resp.status == 204
    await error(await api.get(url, headers=h), 404)
    assert await everything(api) == []


async def test_unknown_stat_id_is_404_for_every_method(api):
    await create(api, api.cases)
    before = await everything(api)
    h = key(api.admin)
    missing = stat_url("0" * 24)
    await error(await api.get(missing, headers=h), 404)
    await error(await api.put(missing, json={"type": "a", "data": 1}, headers=h), 404)
    await error(await api.patch(missing, json={"data": 1}, headers=h), 404)
    await error(await api.delete(missing, headers=h), 404)
    assert await everything(api) == before


# ------------------------------------------------------------- fields ---

async def test_created_stat_holds_what_was_sent_plus_server_fields(api):
    before = now_utc()
    resp = await api.post(STATS, json=FULL, headers=key(api.cases))
    after = now_utc()
    assert resp.status == 201
    stat = await resp.json()
    for name, value in FULL.items():
        assert stat[name] == value
    assert stat["organization"] == "CASES"
    assert HEX24.fullmatch(stat["id"])
    assert uuid.UUID(stat["uuid"]).version == 4
    for name in ("created_at", "updated_at"):
        assert ISO_MICRO.fullmatch(stat[name]), stat[name]
        assert before <= datetime.fromisoformat(stat[name]) <= after
    assert stat["created_at"] == stat["updated_at"]
    assert set(stat) == set(FULL) | {"id", "uuid", "organization", "created_at", "updated_at",
                                     "link", "links"}
    resp = await api.get(stat_url(stat["id"]), headers=key(api.cases))
    assert await resp.json() == stat


async def test_ids_are_24_lowercase_hex_and_unique(api):
    resp = await api.post(STATS, json=[{"type": "t", "data": i} for i in range(50)], headers=key(api.cases))
    assert resp.status == 201
    ids = [s["id"] for s in (await resp.json())["data"]]
    ids.append((await create(api, api.other))["id"])
    assert all(HEX24.fullmatch(i) for i in ids), ids
    assert len(set(ids)) == len(ids)
    assert sorted(s["id"] for s in await everything(api)) == sorted(ids)


async def test_uuid_given_by_the_client_is_kept(api):
    given = str(uuid.uuid4())
    stat = await create(api, api.cases, uuid=given)
    assert stat["uuid"] == given
    assert (await everything(api))[0]["uuid"] == given


async def test_uuid_is_generated_and_unique_when_absent(api):
    first = await create(api, api.cases)
    second = await create(api, api.cases)
    assert uuid.UUID(first["uuid"]).version == 4
    assert uuid.UUID(second["uuid"]).version == 4
    assert first["uuid"] != second["uuid"]


async def test_duplicate_uuid_is_409_and_stores_nothing(api):
    given = str(uuid.uuid4())
    first = await create(api, api.cases, uuid=given)
    resp = await api.post(STATS, json={"type": "other", "data": 2, "uuid": given}, headers=key(api.cases))
    await error(resp, 409)
    # another organization cannot reuse it either
    resp = await api.post(STATS, json={"type": "other", "data": 2, "uuid": given}, headers=key(api.other))
    await error(resp, 409)
    assert await everything(api) == [first]


@pytest.mark.parametrize("anr", [0, 2, -7, 10**12, "76a3999f-ab22-4008-a540-f68082f44cb2"])
async def test_anr_may_be_an_integer_or_a_uuid(api, anr):
    stat = await create(api, api.cases, anr=anr)
    assert stat["anr"] == anr
    assert (await everything(api))[0]["anr"] == anr


@pytest.mark.parametrize("field,value", [
    ("type", "x"), ("type", "x" * 120), ("type", " risk "),
    ("day", 1), ("day", 366), ("week", 1), ("week", 53), ("month", 1), ("month", 12),
    ("quarter", 1), ("quarter", 4), ("year", 2020), ("year", 0), ("year", -44),
])
async def test_values_at_the_bounds_are_accepted(api, field, value):
    stat = await create(api, api.cases, **{field: value})
    assert stat[field] == value


@pytest.mark.parametrize("data", [None, 0, 1.5, "text", True, [], {}, [1, {"a": [None]}],
                                  {"total": {"current": {"operational": 7}}}])
async def test_data_takes_any_json_value_including_null(api, data):
    stat = await create(api, api.cases, data=data)
    assert stat["data"] == data
    assert "data" in stat
    resp = await api.get(stat_url(stat["id"]), headers=key(api.cases))
    assert (await resp.json())["data"] == data


BAD_VALUES = [
    ("uuid", "not-a-uuid"), ("uuid", ""), ("uuid", 12), ("uuid", None), ("uuid", ["x"]),
    ("uuid", "76a3999f-ab22-4008-a540"),
    ("anr", "abc"), ("anr", "12"), ("anr", 1.5), ("anr", True), ("anr", None), ("anr", [1]),
    ("anr", {"id": 1}), ("anr", ""),
    ("type", ""), ("type", " "), ("type", "\t\n  "), ("type", "x" * 121), ("type", 5),
    ("type", None), ("type", ["risk"]), ("type", True),
    ("day", 0), ("day", 367), ("day", -1), ("day", 1.5), ("day", "1"), ("day", True), ("day", None),
    ("week", 0), ("week", 54), ("week", 2.5), ("week", "1"), ("week", False), ("week", None),
    ("month", 0), ("month", 13), ("month", 1.5), ("month", "1"), ("month", True), ("month", None),
    ("quarter", 0), ("quarter", 5), ("quarter", 1.5), ("quarter", "1"), ("quarter", True),
    ("quarter", None),
    ("year", 2020.5), ("year", "2020"), ("year", True), ("year", None), ("year", [2020]),
]


@pytest.mark.parametrize("field,value", BAD_VALUES)
async def test_bad_field_value_on_create_is_400_naming_it_and_stores_nothing(api, field, value):
    resp = await api.post(STATS, json={"type": "risk", "data": 1, field: value}, headers=key(api.cases))
    body = await error(resp, 400)
    assert field in body["error"]
    assert set(body["errors"]) == {field}
    assert await everything(api) == []


@pytest.mark.parametrize("field,value", [(f, v) for f, v in BAD_VALUES if f != "uuid"])
async def test_bad_field_value_on_update_is_400_and_changes_nothing(api, field, value):
    stat = await create(api, api.cases, FULL)
    for method in ("PUT", "PATCH"):
        resp = await api.request(method, stat_url(stat["id"]), json={"type": "risk", "data": 1, field: value},
                                 headers=key(api.cases))
        body = await error(resp, 400)
        assert field in body["error"]
        assert set(body["errors"]) == {field}
    assert await everything(api) == [stat]


@pytest.mark.parametrize("missing", ["type", "data"])
async def test_type_and_data_are_required(api, missing):
    body = {"type": "risk", "data": 1}
    del body[missing]
    resp = await api.post(STATS, json=body, headers=key(api.cases))
    assert missing in (await error(resp, 400))["errors"]
    assert await everything(api) == []


async def test_unknown_field_is_400_that_names_it(api):
    resp = await api.post(STATS, json={"type": "risk", "data": 1, "colour": "blue"}, headers=key(api.cases))
    body = await error(resp, 400)
    assert "colour" in body["error"]
    assert "colour" in body["errors"]
    assert await everything(api) == []
    stat = await create(api, api.cases)
    for method in ("PUT", "PATCH"):
        resp = await api.request(method, stat_url(stat["id"]), json={"type": "r", "data": 1, "colour": 1},
                                 headers=key(api.cases))
        assert "colour" in (await error(resp, 400))["error"]
    assert await everything(api) == [stat]


@pytest.mark.parametrize("field", ["id", "created_at", "updated_at", "link", "links"])
async def test_server_fields_cannot_be_set_on_create(api, field):
    value = {"id": "5eb9ca210381f6f321022ae6", "created_at": "2020-05-11T21:56:49.584000",
             "updated_at": "2020-05-11T21:56:49.584000",
             "link": "<link rel='self' title='stat' href='http://x/api/v2/stats/1/'/>",
             "links": []}[field]
    resp = await api.post(STATS, json={"type": "risk", "data": 1, field: value}, headers=key(api.cases))
    assert field in (await error(resp, 400))["errors"]
    assert await everything(api) == []


# ---------------------------------------------------------- hypermedia ---

async def test_link_is_the_absolute_self_url_and_links_point_to_the_organization(api):
    stat = await create(api, api.cases)
    rel, href = parse_link(stat["link"])
    assert rel == "self"
    parts = urlsplit(href)
    assert parts.scheme == "http" and parts.netloc == f"{api.host}:{api.port}"
    assert parts.path.rstrip("/") == f"{STATS}{stat['id']}"
    resp = await api.get(parts.path, headers=key(api.cases))
    assert (await resp.json())["id"] == stat["id"]
    assert len(stat["links"]) == 1
    rel, href = parse_link(stat["links"][0])
    assert rel == "parent"
    parts = urlsplit(href)
    assert parts.scheme == "http" and parts.netloc == f"{api.host}:{api.port}"
    resp = await api.get(parts.path, headers=key(api.admin))
    assert resp.status == 200
    assert (await resp.json())["name"] == "CASES"


async def test_listed_and_batch_created_stats_carry_links(api):
    resp = await api.post(STATS, json=[{"type": "a", "data": 1}, {"type": "b", "data": 2}], headers=key(api.cases))
    created = (await resp.json())["data"]
    listed = await everything(api, api.cases)
    assert listed == created
    for stat in listed:
        assert parse_link(stat["link"])[0] == "self"
        assert urlsplit(parse_link(stat["link"])[1]).path.rstrip("/") == f"{STATS}{stat['id']}"
        assert [parse_link(link)[0] for link in stat["links"]] == ["parent"]


async def test_create_answers_201_with_a_location_header(api):
    resp = await api.post(STATS, json={"type": "risk", "data": 1}, headers=key(api.cases))
    assert resp.status == 201
    stat = await resp.json()
    location = urlsplit(resp.headers["Location"])
    assert location.scheme == "http" and location.netloc == f"{api.host}:{api.port}"
    assert location.path.rstrip("/") == f"{STATS}{stat['id']}"
    resp = await api.get(location.path, headers=key(api.cases))
    assert await resp.json() == stat


# --------------------------------------------------------------- batch ---

async def test_batch_creates_every_stat_in_order(api):
    items = [{"type": f"t{i}", "data": i, "day": i + 1} for i in range(3)]
    resp = await api.post(STATS, json=items, headers=key(api.cases))
    assert resp.status == 201
    created = (await resp.json())["data"]
    assert [(s["type"], s["data"], s["day"], s["organization"]) for s in created] == \
        [(i["type"], i["data"], i["day"], "CASES") for i in items]
    assert await everything(api) == created


@pytest.fixture
async def small(make_client):
    """A client whose max_limit is 5, with one ordinary organization (token at .token)."""
    client = await make_client(max_limit=5, default_limit=5)
    client.token = await new_org(client, "CASES")
    client.admin = await new_org(client, "admin", admin=True)
    return client


async def test_batch_of_max_limit_items_is_accepted(small):
    resp = await small.post(STATS, json=[{"type": "t", "data": i} for i in range(5)], headers=key(small.token))
    assert resp.status == 201
    assert len((await resp.json())["data"]) == 5
    resp = await small.get(STATS, headers=key(small.token), params={"_limit": "5", "_skip": "0"})
    assert len((await resp.json())["data"]) == 5


@pytest.mark.parametrize("count", [0, 6])
async def test_batch_of_zero_or_more_than_max_limit_is_400(small, count):
    resp = await small.post(STATS, json=[{"type": "t", "data": i} for i in range(count)], headers=key(small.token))
    await error(resp, 400)
    resp = await small.get(STATS, headers=key(small.admin))
    assert (await resp.json()) == {"data": [], "has_more": False}


async def test_batch_with_invalid_items_is_400_per_index_and_stores_nothing(api):
    items = [{"type": "ok", "data": 1}, {"type": "bad", "data": 2, "day": 0},
             {"type": "ok", "data": 3}, {"data": 4}, "not an object"]
    resp = await api.post(STATS, json=items, headers=key(api.cases))
    body = await error(resp, 400)
    errors = body["errors"]
    assert set(errors) == {"1", "3", "4"}
    assert set(errors["1"]) == {"day"}
    assert set(errors["3"]) == {"type"}
    assert isinstance(errors["4"], (str, dict)) and errors["4"]
    assert await everything(api) == []


async def test_batch_item_with_an_unknown_field_stores_nothing(api):
    resp = await api.post(STATS, json=[{"type": "ok", "data": 1}, {"type": "x", "data": 1, "extra": 1}],
                          headers=key(api.cases))
    body = await error(resp, 400)
    assert body["errors"] == {"1": {"extra": body["errors"]["1"]["extra"]}}
    assert await everything(api) == []


async def test_batch_with_a_uuid_repeated_inside_it_is_409_and_stores_nothing(api):
    same = str(uuid.uuid4())
    items = [{"type": "a", "data": 1, "uuid": same}, {"type": "b", "data": 2},
             {"type": "c", "data": 3, "uuid": same}]
    await error(await api.post(STATS, json=items, headers=key(api.cases)), 409)
    assert await everything(api) == []


async def test_batch_with_a_uuid_already_stored_is_409_and_stores_nothing(api):
    stored = await create(api, api.other, uuid=str(uuid.uuid4()))
    items = [{"type": "a", "data": 1}, {"type": "b", "data": 2, "uuid": stored["uuid"]}]
    await error(await api.post(STATS, json=items, headers=key(api.cases)), 409)
    assert await everything(api) == [stored]


# --------------------------------------------------- update and delete ---

async def test_a_fetched_stat_can_be_edited_and_put_back_whole(api):
    stat = await create(api, api.cases, FULL)
    resp = await api.get(stat_url(stat["id"]), headers=key(api.cases))
    body = await resp.json()
    body["type"], body["data"], body["day"] = "vulnerability", {"edited": True}, 200
    resp = await api.put(stat_url(stat["id"]), json=body, headers=key(api.cases))
    assert resp.status == 200, await resp.text()
    updated = await resp.json()
    assert (updated["type"], updated["data"], updated["day"]) == ("vulnerability", {"edited": True}, 200)
    for name in ("id", "uuid", "organization", "created_at", "anr", "week", "month", "year", "link", "links"):
        assert updated[name] == stat[name]
    assert updated["updated_at"] > stat["updated_at"]
    assert ISO_MICRO.fullmatch(updated["updated_at"])
    assert await everything(api) == [updated]


async def test_a_fetched_stat_can_be_patched_back_whole(api):
    stat = await create(api, api.cases, FULL)
    body = await (await api.get(stat_url(stat["id"]), headers=key(api.cases))).json()
    body["month"] = 7
    resp = await api.patch(stat_url(stat["id"]), json=body, headers=key(api.cases))
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["month"] == 7


async def test_put_keeps_server_fields_and_drops_optional_fields_not_given(api):
    stat = await create(api, api.cases, FULL, uuid=str(uuid.uuid4()))
    resp = await api.put(stat_url(stat["id"]), json={"type": "new", "data": None}, headers=key(api.cases))
    assert resp.status == 200
    updated = await resp.json()
    for name in ("id", "uuid", "organization", "created_at", "link", "links"):
        assert updated[name] == stat[name]
    assert updated["type"] == "new" and updated["data"] is None
    for name in ("anr", "day", "week", "month", "quarter", "year"):
        assert name not in updated
    assert updated["updated_at"] > stat["updated_at"]
    assert await everything(api) == [updated]


async def test_put_requires_type_and_data(api):
    stat = await create(api, api.cases, FULL)
    for body in ({"type": "t"}, {"data": 1}, {}):
        resp = await api.put(stat_url(stat["id"]), json=body, headers=key(api.cases))
        errors = (await error(resp, 400))["errors"]
        assert {"type", "data"} - set(body) <= set(errors)
    assert await everything(api) == [stat]


async def test_patch_merges_the_given_fields(api):
    stat = await create(api, api.cases, FULL)
    resp = await api.patch(stat_url(stat["id"]), json={"day": 100, "anr": "66f20692-b627-41e6-8d11-030bd84ee479"},
                           headers=key(api.cases))
    assert resp.status == 200
    updated = await resp.json()
    expected = {**stat, "day": 100, "anr": "66f20692-b627-41e6-8d11-030bd84ee479",
                "updated_at": updated["updated_at"]}
    assert updated == expected
    assert updated["updated_at"] > stat["updated_at"]
    assert await everything(api) == [updated]


async def test_patch_may_set_data_to_null(api):
    stat = await create(api, api.cases, FULL)
    resp = await api.patch(stat_url(stat["id"]), json={"data": None}, headers=key(api.cases))
    assert resp.status == 200
    assert (await everything(api))[0]["data"] is None


@pytest.mark.parametrize("field", ["anr", "day", "week", "month", "quarter", "year", "type"])
async def test_patch_null_on_another_field_is_400(api, field):
    stat = await create(api, api.cases, FULL)
    resp = await api.patch(stat_url(stat["id"]), json={field: None}, headers=key(api.cases))
    assert field in (await error(resp, 400))["errors"]
    assert await everything(api) == [stat]


CHANGED_READ_ONLY = {
    "id": "5eb9ca210381f6f321022ae6",
    "uuid": "76a3999f-ab22-4008-a540-f68082f44cb2",
    "organization": "OTHER",
    "created_at": "2020-05-11T21:56:49.584000",
    "updated_at": "2020-05-11T21:56:49.584000",
    "link": "<link rel='self' title='stat' href='http://127.0.0.1:5000/api/v2/stats/5eb9ca210381f6f321022ae6/'/>",
    "links": ["<link rel='parent' title='organization' href='http://127.0.0.1:5000/api/v2/organizations/OTHER/'/>"],
}


@pytest.mark.parametrize("method", ["PUT", "PATCH"])
@pytest.mark.parametrize("field", sorted(CHANGED_READ_ONLY))
async def test_changing_a_read_only_field_is_400_naming_it(api, method, field):
    stat = await create(api, api.cases, FULL)
    body = {**stat, field: CHANGED_READ_ONLY[field]}
    resp = await api.request(method, stat_url(stat["id"]), json=body, headers=key(api.cases))
    err = await error(resp, 400)
    assert field in err["error"]
    assert field in err["errors"]
    assert await everything(api) == [stat]


async def test_delete_answers_204_and_removes_only_that_stat(api):
    first = await create(api, api.cases)
    second = await create(api, api.cases)
    resp = await api.delete(stat_url(first["id"]), headers=key(api.cases))
    assert resp.status == 204
    assert await resp.read() == b""
    assert await everything(api) == [second]
    await error(await api.delete(stat_url(first["id"]), headers=key(api.cases)), 404)


# --------------------------------------------------------- body errors ---

BAD_BODIES = [
    pytest.param(b'{"type": "risk", "data":', "application/json", 400, id="invalid-json"),
    pytest.param(b"", "application/json", 400, id="empty"),
    pytest.param(b"   \n", "application/json", 400, id="blank"),
    pytest.param(b'{"type": "risk", "data": 1}', "text/plain", 415, id="text-plain"),
    pytest.param(b'type=risk&data=1', "application/x-www-form-urlencoded", 415, id="form"),
    pytest.param(b'{"type": "\xff\xfe", "data": 1}', "application/json", 400, id="invalid-utf8"),
    pytest.param(b'"risk"', "application/json", 400, id="string"),
    pytest.param(b"5", "application/json", 400, id="number"),
    pytest.param(b"null", "application/json", 400, id="null"),
    pytest.param(b"true", "application/json", 400, id="true"),
    pytest.param(b"{'type': 'risk', 'data': 1}", "application/json", 400, id="python-dict"),
]


@pytest.fixture
async def one_stat(api):
    api.stat = await create(api, api.cases, FULL)
    return api


@pytest.mark.parametrize("raw,content_type,status", BAD_BODIES)
@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH"])
async def test_bad_body_is_4xx_json_and_changes_nothing(one_stat, method, raw, content_type, status):
    api = one_stat
    url = STATS if method == "POST" else stat_url(api.stat["id"])
    resp = await api.request(method, url, data=raw, headers={**key(api.cases), "Content-Type": content_type})
    await error(resp, status)
    assert await everything(api) == [api.stat]


async def test_body_without_content_type_is_415(one_stat):
    api = one_stat
    resp = await api.post(STATS, data=b'{"type": "risk", "data": 1}', headers=key(api.cases),
                          skip_auto_headers=["Content-Type"])
    await error(resp, 415)
    assert await everything(api) == [api.stat]


@pytest.mark.parametrize("method", ["PUT", "PATCH"])
@pytest.mark.parametrize("body", [[{"type": "risk", "data": 1}], []])
async def test_update_with_a_list_is_400(one_stat, method, body):
    api = one_stat
    resp = await api.request(method, stat_url(api.stat["id"]), json=body, headers=key(api.cases))
    await error(resp, 400)
    assert await everything(api) == [api.stat]


@pytest.mark.parametrize("method,on_item", [("POST", False), ("GET", True), ("PUT", True),
                                            ("PATCH", True), ("DELETE", True)])
async def test_query_parameters_on_routes_that_take_none_are_400(one_stat, method, on_item):
    api = one_stat
    url = stat_url(api.stat["id"]) if on_item else STATS
    body = None if method in ("GET", "DELETE") else {"type": "changed", "data": 9}
    resp = await api.request(method, url, json=body, params={"day": "1"}, headers=key(api.cases))
    assert "day" in (await error(resp, 400))["error"]
    assert await everything(api) == [api.stat]


# ------------------------------------------------------------ API keys ---

ROUTES = [("GET", STATS), ("POST", STATS), ("GET", "ID"), ("PUT", "ID"), ("PATCH", "ID"), ("DELETE", "ID")]


@pytest.mark.parametrize("method,url", ROUTES)
@pytest.mark.parametrize("headers", [{}, {"X-API-KEY": "BAD-TOKEN"}, {"X-API-KEY": ""}],
                         ids=["missing", "unknown", "empty"])
async def test_missing_or_unknown_key_is_401_unauthorized(one_stat, method, url, headers):
    api = one_stat
    url = stat_url(api.stat["id"]) if url == "ID" else url
    body = {"type": "changed", "data": 9} if method in ("POST", "PUT", "PATCH") else None
    resp = await api.request(method, url, json=body, headers=headers)
    assert (await error(resp, 401))["error"] == "Unauthorized"
    assert await everything(api) == [api.stat]


async def test_unknown_key_in_the_query_is_401(one_stat):
    api = one_stat
    resp = await api.get(STATS, params={"api_key": "BAD-TOKEN-0123456789"})
    assert (await error(resp, 401))["error"] == "Unauthorized"
    resp = await api.delete(stat_url(api.stat["id"]), params={"api_key": api.cases + "x"})
    await error(resp, 401)
    assert await everything(api) == [api.stat]


async def test_api_key_query_argument_works_like_the_header(api):
    resp = await api.post(STATS, json={"type": "risk", "data": 1}, params={"api_key": api.cases})
    assert resp.status == 201
    stat = await resp.json()
    assert stat["organization"] == "CASES"
    resp = await api.get(STATS, params={"api_key": api.cases})
    assert [s["id"] for s in (await resp.json())["data"]] == [stat["id"]]
    resp = await api.patch(stat_url(stat["id"]), json={"day": 3}, params={"api_key": api.cases})
    assert resp.status == 200
    resp = await api.get(stat_url(stat["id"]), params={"api_key": api.cases})
    assert (await resp.json())["day"] == 3
    resp = await api.delete(stat_url(stat["id"]), params={"api_key": api.cases})
    assert resp.status == 204


async def test_an_organization_lists_only_its_own_stats(api):
    mine = [await create(api, api.cases, type="a"), await create(api, api.cases, type="b")]
    theirs = await create(api, api.other, type="a")
    assert await everything(api, api.cases) == mine
    assert await everything(api, api.other) == [theirs]
    resp = await api.get(STATS, params={"organization": "OTHER"}, headers=key(api.cases))
    assert (await resp.json())["data"] == []
    resp = await api.get(STATS, params={"type": "a"}, headers=key(api.cases))
    assert (await resp.json())["data"] == [mine[0]]


async def test_another_organizations_stat_is_404_for_every_method(api):
    theirs = await create(api, api.other, FULL)
    url = stat_url(theirs["id"])
    h = key(api.cases)
    await error(await api.get(url, headers=h), 404)
    await error(await api.put(url, json={"type": "x", "data": 1}, headers=h), 404)
    await error(await api.patch(url, json={"data": 1}, headers=h), 404)
    await error(await api.delete(url, headers=h), 404)
    assert await everything(api) == [theirs]


async def test_admin_sees_changes_and_deletes_every_stat(api):
    a = await create(api, api.cases)
    b = await create(api, api.other)
    assert await everything(api, api.admin) == [a, b]
    h = key(api.admin)
    assert await (await api.get(stat_url(a["id"]), headers=h)).json() == a
    resp = await api.patch(stat_url(a["id"]), json={"day": 9}, headers=h)
    assert resp.status == 200
    patched = await resp.json()
    assert patched["organization"] == "CASES" and patched["day"] == 9
    resp = await api.delete(stat_url(b["id"]), headers=h)
    assert resp.status == 204
    assert await everything(api, api.admin) == [patched]


async def test_organization_comes_from_the_key(api):
    stat = await create(api, api.other)
    assert stat["organization"] == "OTHER"
    stat = await create(api, api.cases, organization="CASES")
    assert stat["organization"] == "CASES"
    stat = await create(api, api.admin)
    assert stat["organization"] == "admin"


@pytest.mark.parametrize("token_name,given", [("cases", "OTHER"), ("cases", "NOPE"), ("cases", None),
                                              ("cases", 5), ("admin", "CASES")])
async def test_another_organization_in_the_body_is_400(api, token_name, given):
    resp = await api.post(STATS, json={"type": "risk", "data": 1, "organization": given},
                          headers=key(getattr(api, token_name)))
    assert "organization" in (await error(resp, 400))["errors"]
    assert await everything(api) == []


async def test_batch_with_another_organization_in_one_item_stores_nothing(api):
    items = [{"type": "a", "data": 1}, {"type": "b", "data": 2, "organization": "OTHER"}]
    body = await error(await api.post(STATS, json=items, headers=key(api.cases)), 400)
    assert set(body["errors"]) == {"1"}
    assert await everything(api) == []


# ------------------------------------------- authentication switched off ---

@pytest.fixture
async def open_api(make_client):
    client = await make_client(api_key_authentication=False)
    await new_org(client, "CASES")
    return client


async def open_everything(client):
    resp = await client.get(STATS, params={"_limit": "1000"})
    assert resp.status == 200
    return (await resp.json())["data"]


async def test_without_authentication_no_key_is_needed(open_api):
    resp = await open_api.post(STATS, json={"type": "risk", "data": 1})
    assert resp.status == 201
    stat = await resp.json()
    assert "organization" not in stat and "links" not in stat
    assert parse_link(stat["link"])[0] == "self"
    resp = await open_api.put(stat_url(stat["id"]), json={"type": "new", "data": 2})
    assert resp.status == 200
    resp = await open_api.patch(stat_url(stat["id"]), json={"day": 4})
    assert resp.status == 200
    assert (await (await open_api.get(stat_url(stat["id"]))).json())["day"] == 4
    resp = await open_api.get("/api/v2/organizations/")
    assert resp.status == 200
    assert [o["name"] for o in (await resp.json())["data"]] == ["CASES"]
    assert (await open_api.delete(stat_url(stat["id"]))).status == 204
    assert await open_everything(open_api) == []


async def test_without_authentication_the_body_may_name_an_existing_organization(open_api):
    resp = await open_api.post(STATS, json={"type": "risk", "data": 1, "organization": "CASES"})
    assert resp.status == 201
    stat = await resp.json()
    assert stat["organization"] == "CASES"
    rel, href = parse_link(stat["links"][0])
    assert rel == "parent" and urlsplit(href).path.rstrip("/") == "/api/v2/organizations/CASES"
    assert await open_everything(open_api) == [stat]


@pytest.mark.parametrize("given", ["NOPE", "", 5, None])
async def test_without_authentication_an_unknown_organization_is_400(open_api, given):
    resp = await open_api.post(STATS, json={"type": "risk", "data": 1, "organization": given})
    assert "organization" in (await error(resp, 400))["errors"]
    assert await open_everything(open_api) == []


async def test_get_of_one_stat_takes_fields_as_lists_do(api):
    resp = await api.post("/api/v2/stats/", json={"type": "risk", "anr": 4, "data": {"x": 1}}, headers=key(api.cases))
    stat = await resp.json()
    url = f"/api/v2/stats/{stat['id']}/"
    resp = await api.get(url, params={"_fields": "type,data"}, headers=key(api.cases))
    assert resp.status == 200, await resp.text()
    assert await resp.json() == {"id": stat["id"], "type": "risk", "data": {"x": 1}}
    resp = await api.get(url, params={"_fields": "link,anr"}, headers=key(api.cases))
    assert await resp.json() == {"id": stat["id"], "link": stat["link"], "anr": 4}
    listed = await api.get("/api/v2/stats/", params={"_fields": "type,links"}, headers=key(api.cases))
    one = await api.get(url, params={"_fields": "type,links"}, headers=key(api.cases))
    assert [await one.json()] == (await listed.json())["data"]
    assert await (await api.get(url, headers=key(api.cases))).json() == stat  # without it, the whole stat
    for params, reason in (({"_fields": "colour"}, "unknown field 'colour' in _fields"),
                           ({"_fields": "type", "type": "risk"}, "unknown query parameter 'type'")):
        body = await assert_error_object(await api.get(url, params=params, headers=key(api.cases)), 400, "stats")
        assert body["error"] == reason
    resp = await api.get(url, params={"_fields": "type"}, headers=key(api.other))
    await assert_error_object(resp, 404, "stats")  # another organization's stat stays hidden
