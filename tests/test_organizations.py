"""The organizations API and API keys of issue 2, through the HTTP interface."""

import hashlib
import re
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest

from conftest import assert_error_object, key, new_org, whole_list

import statsd

ORGS = "/api/v2/organizations/"
STATS = "/api/v2/stats/"
ISO_MICRO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}")
LINK = re.compile(r"<link rel='(?P<rel>[^']*)' title='[^']*' href='(?P<href>[^']*)'/>")
ORG_FIELDS = {"id", "name", "is_admin", "created_at", "updated_at", "link"}


def org_url(name, slash=True):
    return ORGS + quote(name, safe="") + ("/" if slash else "")


async def error(resp, status):
    return await assert_error_object(resp, status, "organizations")


async def orgs(api, token=None):
    """Every organization, as listed by the admin."""
    return await whole_list(api, ORGS, token)


async def names(api):
    return [o["name"] for o in await orgs(api)]


async def stats(api):
    resp = await api.get(STATS, params={"_limit": "1000"}, headers=key(api.admin))
    assert resp.status == 200
    return (await resp.json())["data"]


async def add_stat(api, token, **fields):
    resp = await api.post(STATS, json={"type": "risk", "data": 1, **fields}, headers=key(token))
    assert resp.status == 201
    return await resp.json()


async def create_org(api, body):
    resp = await api.post(ORGS, json=body, headers=key(api.admin))
    assert resp.status == 201, await resp.text()
    return await resp.json()


def assert_no_token(org):
    assert set(org) <= ORG_FIELDS, org
    assert not any("token" in name for name in org)


# ----------------------------------------------------------------- list ---

@pytest.mark.parametrize("slash", [True, False])
async def test_admin_lists_organizations_in_creation_order_without_tokens(api, slash):
    resp = await api.get(ORGS if slash else ORGS.rstrip("/"), headers=key(api.admin))
    assert resp.status == 200
    body = await resp.json()
    assert body["has_more"] is False
    assert [o["name"] for o in body["data"]] == ["admin", "CASES", "OTHER"]
    assert [o["is_admin"] for o in body["data"]] == [True, False, False]
    for org in body["data"]:
        assert set(org) == ORG_FIELDS
        assert org["id"] == org["name"]
        assert ISO_MICRO.fullmatch(org["created_at"]) and ISO_MICRO.fullmatch(org["updated_at"])
        rel, href = LINK.fullmatch(org["link"]).groups()
        assert rel == "self"
        parts = urlsplit(href)
        assert parts.scheme == "http" and parts.netloc == f"{api.host}:{api.port}"
        assert parts.path.rstrip("/") == org_url(org["name"], slash=False)
    text = await resp.text()
    for token in (api.admin, api.cases, api.other):
        assert token not in text


async def test_organizations_list_pages_and_filters_like_stats(api):
    h = key(api.admin)
    resp = await api.get(ORGS, params={"_skip": "1", "_limit": "1"}, headers=h)
    assert await resp.json() == {"data": [(await orgs(api))[1]], "has_more": True}
    resp = await api.get(ORGS, params={"offset": "2", "limit": "1"}, headers=h)
    body = await resp.json()
    assert [o["name"] for o in body["data"]] == ["OTHER"] and body["has_more"] is False
    resp = await api.get(ORGS, params={"_limit": "0"}, headers=h)
    assert await resp.json() == {"data": [], "has_more": True}
    resp = await api.get(ORGS, params={"is_admin": "false"}, headers=h)
    assert [o["name"] for o in (await resp.json())["data"]] == ["CASES", "OTHER"]
    resp = await api.get(ORGS, params={"name__istartswith": "c"}, headers=h)
    assert [o["name"] for o in (await resp.json())["data"]] == ["CASES"]
    resp = await api.get(ORGS, params={"name__in": "OTHER,admin,NOPE"}, headers=h)
    assert [o["name"] for o in (await resp.json())["data"]] == ["admin", "OTHER"]
    resp = await api.get(ORGS, params={"_order_by": "-name"}, headers=h)
    assert [o["name"] for o in (await resp.json())["data"]] == sorted(["admin", "CASES", "OTHER"], reverse=True)
    resp = await api.get(ORGS, params={"_fields": "is_admin", "name": "CASES"}, headers=h)
    assert (await resp.json())["data"] == [{"id": "CASES", "is_admin": False}]


@pytest.mark.parametrize("params,named", [
    ({"_limit": "1001"}, "_limit"), ({"_limit": "-1"}, "_limit"), ({"_skip": "x"}, "_skip"),
    ({"colour": "red"}, "colour"), ({"name__like": "C"}, "like"), ({"is_admin": "maybe"}, "maybe"),
    ({"_bogus": "1"}, "_bogus"), ({"token": "x"}, "token"), ({"_order_by": "token_sha256"}, "token_sha256"),
])
async def test_bad_organizations_query_is_400_naming_it(api, params, named):
    resp = await api.get(ORGS, params=params, headers=key(api.admin))
    assert named in (await error(resp, 400))["error"]


async def test_organizations_list_cannot_be_filtered_on_the_token_hash(api):
    digest = hashlib.sha256(api.cases.encode()).hexdigest()
    for name in ("token_sha256", "token_sha256__startswith", "token_sha256__exists"):
        answers = []
        for value in (digest, digest[:8], "0" * 64, "true"):  # a hash held, a prefix of it, one held by nobody
            resp = await api.get(ORGS, params={name: value}, headers=key(api.admin))
            body = await error(resp, 400)
            assert body["error"] == f"unknown field 'token_sha256' in filter '{name}'"
            answers.append(body)
        assert all(answer == answers[0] for answer in answers)  # nothing tells a held hash from another


# --------------------------------------------------------------- create ---

async def test_create_answers_201_with_the_generated_token_once(api):
    resp = await api.post(ORGS, json={"name": "NEW"}, headers=key(api.admin))
    assert resp.status == 201
    org = await resp.json()
    assert set(org) == ORG_FIELDS | {"token"}
    assert (org["id"], org["name"], org["is_admin"]) == ("NEW", "NEW", False)
    token = org["token"]
    assert re.fullmatch(r"[A-Za-z0-9_-]{86}", token)  # secrets.token_urlsafe(64)
    location = urlsplit(resp.headers["Location"])
    assert location.scheme == "http" and location.netloc == f"{api.host}:{api.port}"
    resp = await api.get(location.path, headers=key(api.admin))
    fetched = await resp.json()
    assert_no_token(fetched)
    assert fetched == {k: v for k, v in org.items() if k != "token"}
    stat = await add_stat(api, token)
    assert stat["organization"] == "NEW"


async def test_generated_tokens_differ(api):
    first = await create_org(api, {"name": "A1"})
    second = await create_org(api, {"name": "A2"})
    assert first["token"] != second["token"]


@pytest.mark.parametrize("token", ["x" * 16, "oypvIaGU7uvuJbR4wgYrB7ef1HeXc9sh5g-zrH9WjmHbWHDk3L36lycYEgJevQ9wo",
                                   "!#$%&()*+,-./:;<=>?@[]^_`{|}~'\"\\", "y" * 512])
async def test_given_token_is_kept_and_works(api, token):
    org = await create_org(api, {"name": "GIVEN", "token": token})
    assert org["token"] == token
    resp = await api.get(STATS, headers=key(token))
    assert resp.status == 200


async def test_created_admin_organization_may_manage_organizations(api):
    org = await create_org(api, {"name": "BOSS", "is_admin": True})
    assert org["is_admin"] is True
    resp = await api.get(ORGS, headers=key(org["token"]))
    assert resp.status == 200


@pytest.mark.parametrize("body,field", [
    ({"name": "T", "token": "x" * 15}, "token"),
    ({"name": "T", "token": ""}, "token"),
    ({"name": "T", "token": "has a space in it!!"}, "token"),
    ({"name": "T", "token": "é" * 20}, "token"),
    ({"name": "T", "token": "x" * 513}, "token"),
    ({"name": "T", "token": 1234567890123456789}, "token"),
    ({"name": "T", "token": None}, "token"),
    ({"name": ""}, "name"),
    ({"name": "a/b"}, "name"),
    ({"name": " lead"}, "name"),
    ({"name": "trail "}, "name"),
    ({"name": "tab\there"}, "name"),
    ({"name": "new\nline"}, "name"),
    ({"name": "x" * 121}, "name"),
    ({"name": 5}, "name"),
    ({"name": None}, "name"),
    ({"name": ["CASES"]}, "name"),
    ({}, "name"),
    ({"token": "x" * 20}, "name"),
    ({"name": "T", "is_admin": "yes"}, "is_admin"),
    ({"name": "T", "is_admin": 1}, "is_admin"),
    ({"name": "T", "is_admin": None}, "is_admin"),
    ({"name": "T", "colour": "blue"}, "colour"),
    ({"name": "T", "id": "T"}, "id"),
])
async def test_bad_organization_body_is_400_naming_the_field(api, body, field):
    resp = await api.post(ORGS, json=body, headers=key(api.admin))
    err = await error(resp, 400)
    assert field in err["error"]
    assert field in err["errors"]
    assert await names(api) == ["admin", "CASES", "OTHER"]


@pytest.mark.parametrize("name", ["x", "x" * 120, "Org ü 1", "a.b-c_d", "CASES2"])
async def test_good_names_are_accepted_and_reachable(api, name):
    org = await create_org(api, {"name": name})
    assert org["name"] == name
    resp = await api.get(org_url(name), headers=key(api.admin))
    assert (await resp.json())["name"] == name


async def test_duplicate_name_is_409(api):
    resp = await api.post(ORGS, json={"name": "CASES", "token": "z" * 32}, headers=key(api.admin))
    await error(resp, 409)
    assert await names(api) == ["admin", "CASES", "OTHER"]
    resp = await api.get(STATS, headers=key("z" * 32))
    assert resp.status == 401
    resp = await api.get(STATS, headers=key(api.cases))
    assert resp.status == 200


async def test_a_token_already_in_use_is_refused(api):
    # a key belongs to one organization: reusing one would make it ambiguous
    resp = await api.post(ORGS, json={"name": "COPY", "token": api.cases}, headers=key(api.admin))
    await error(resp, 409)
    assert await names(api) == ["admin", "CASES", "OTHER"]
    assert (await add_stat(api, api.cases))["organization"] == "CASES"


# ------------------------------------------------------------------ get ---

@pytest.mark.parametrize("slash", [True, False])
async def test_get_shows_the_organization_without_its_token(api, slash):
    resp = await api.get(org_url("CASES", slash), headers=key(api.admin))
    assert resp.status == 200
    org = await resp.json()
    assert set(org) == ORG_FIELDS
    assert (org["id"], org["name"], org["is_admin"]) == ("CASES", "CASES", False)
    assert api.cases not in await resp.text()


async def test_unknown_organization_is_404(api):
    h = key(api.admin)
    await error(await api.get(org_url("NOPE"), headers=h), 404)
    await error(await api.put(org_url("NOPE"), json={"is_admin": True}, headers=h), 404)
    await error(await api.patch(org_url("NOPE"), json={"is_admin": True}, headers=h), 404)
    await error(await api.delete(org_url("NOPE"), headers=h), 404)
    assert await names(api) == ["admin", "CASES", "OTHER"]


# ------------------------------------------------------ update (PUT/PATCH) ---

@pytest.mark.parametrize("slash", [True, False])
async def test_put_sets_is_admin_and_refreshes_updated_at(api, slash):
    before = (await orgs(api))[1]
    resp = await api.put(org_url("CASES", slash), json={"is_admin": True}, headers=key(api.admin))
    assert resp.status == 200
    org = await resp.json()
    assert "token" not in org
    assert org["is_admin"] is True
    assert org["created_at"] == before["created_at"]
    assert org["updated_at"] > before["updated_at"]
    assert (await api.get(ORGS, headers=key(api.cases))).status == 200
    assert await stats(api) == []


async def test_put_requires_is_admin(api):
    before = await orgs(api)
    resp = await api.put(org_url("CASES"), json={}, headers=key(api.admin))
    assert "is_admin" in (await error(resp, 400))["errors"]
    assert await orgs(api) == before


@pytest.mark.parametrize("slash", [True, False])
async def test_patch_can_demote_an_admin(api, slash):
    boss = await create_org(api, {"name": "BOSS", "is_admin": True})
    resp = await api.patch(org_url("BOSS", slash), json={"is_admin": False}, headers=key(api.admin))
    assert resp.status == 200
    assert (await resp.json())["is_admin"] is False
    await error(await api.get(ORGS, headers=key(boss["token"])), 403)


async def test_a_fetched_organization_can_be_put_back_unchanged(api):
    org = await (await api.get(org_url("CASES"), headers=key(api.admin))).json()
    org["is_admin"] = True
    resp = await api.put(org_url("CASES"), json=org, headers=key(api.admin))
    assert resp.status == 200, await resp.text()
    updated = await resp.json()
    assert updated["is_admin"] is True
    assert (updated["id"], updated["name"], updated["created_at"]) == (org["id"], org["name"], org["created_at"])


@pytest.mark.parametrize("method", ["PATCH", "PUT"])
async def test_token_rotation_answers_the_new_token_once(api, method):
    new_token = "rotated-token-0123456789"
    body = {"token": new_token} if method == "PATCH" else {"token": new_token, "is_admin": False}
    resp = await api.request(method, org_url("CASES"), json=body, headers=key(api.admin))
    assert resp.status == 200
    assert (await resp.json())["token"] == new_token
    resp = await api.get(STATS, headers=key(api.cases))
    assert resp.status == 401
    assert (await resp.json())["error"] == "Unauthorized"
    assert (await add_stat(api, new_token))["organization"] == "CASES"
    fetched = await (await api.get(org_url("CASES"), headers=key(api.admin))).json()
    assert_no_token(fetched)
    assert new_token not in str(await orgs(api))


async def test_patch_without_token_answers_no_token(api):
    resp = await api.patch(org_url("CASES"), json={"is_admin": False}, headers=key(api.admin))
    assert resp.status == 200
    assert_no_token(await resp.json())
    assert (await api.get(STATS, headers=key(api.cases))).status == 200


@pytest.mark.parametrize("token", ["short", "x" * 15, "with space inside it", 42, None])
async def test_rotation_to_a_bad_token_is_400_and_the_old_key_still_works(api, token):
    resp = await api.patch(org_url("CASES"), json={"token": token}, headers=key(api.admin))
    assert "token" in (await error(resp, 400))["errors"]
    assert (await api.get(STATS, headers=key(api.cases))).status == 200


@pytest.mark.parametrize("method", ["PUT", "PATCH"])
@pytest.mark.parametrize("field,value", [("name", "RENAMED"), ("id", "RENAMED"),
                                         ("created_at", "2020-05-11T21:56:49.584000"),
                                         ("updated_at", "2020-05-11T21:56:49.584000"),
                                         ("link", "<link rel='self' title='organization' "
                                                  "href='http://127.0.0.1:5000/api/v2/organizations/RENAMED/'/>"),
                                         ("colour", "blue")])
async def test_renaming_or_changing_a_server_field_is_400_naming_it(api, method, field, value):
    before = await orgs(api)
    resp = await api.request(method, org_url("CASES"), json={"is_admin": False, field: value}, headers=key(api.admin))
    err = await error(resp, 400)
    assert field in err["error"] and field in err["errors"]
    assert await orgs(api) == before


@pytest.mark.parametrize("method", ["PUT", "PATCH"])
@pytest.mark.parametrize("raw,content_type,status", [
    (b"{", "application/json", 400), (b"", "application/json", 400), (b"[]", "application/json", 400),
    (b'"x"', "application/json", 400), (b"7", "application/json", 400),
    (b'{"is_admin": true}', "text/plain", 415), (b'{"is_admin": "\xff"}', "application/json", 400),
])
async def test_bad_update_body_is_4xx_and_changes_nothing(api, method, raw, content_type, status):
    before = await orgs(api)
    resp = await api.request(method, org_url("CASES"), data=raw,
                             headers={**key(api.admin), "Content-Type": content_type})
    await error(resp, status)
    assert await orgs(api) == before


@pytest.mark.parametrize("raw,content_type,status", [
    (b"{", "application/json", 400), (b"", "application/json", 400),
    (b'[{"name": "X"}]', "application/json", 400), (b'"X"', "application/json", 400),
    (b'{"name": "X"}', "text/plain", 415), (b'{"name": "\xff\xfe"}', "application/json", 400),
])
async def test_bad_create_body_is_4xx_and_creates_nothing(api, raw, content_type, status):
    resp = await api.post(ORGS, data=raw, headers={**key(api.admin), "Content-Type": content_type})
    await error(resp, status)
    assert await names(api) == ["admin", "CASES", "OTHER"]


@pytest.mark.parametrize("method,url", [("POST", ORGS), ("GET", "CASES"), ("PUT", "CASES"), ("PATCH", "CASES")])
async def test_query_parameters_on_organization_routes_that_take_none_are_400(api, method, url):
    before = await orgs(api)
    url = org_url(url) if url == "CASES" else url
    body = {"name": "X", "is_admin": True} if method == "POST" else {"is_admin": True} if method != "GET" else None
    resp = await api.request(method, url, json=body, params={"force": "1"}, headers=key(api.admin))
    assert "force" in (await error(resp, 400))["error"]
    assert await orgs(api) == before


# --------------------------------------------------------------- delete ---

async def test_delete_of_an_organization_with_stats_is_409_and_keeps_everything(api):
    stat = await add_stat(api, api.cases)
    resp = await api.delete(org_url("CASES"), headers=key(api.admin))
    body = await error(resp, 409)
    assert "cascade" in body["error"]
    assert await names(api) == ["admin", "CASES", "OTHER"]
    assert await stats(api) == [stat]
    assert (await api.get(STATS, headers=key(api.cases))).status == 200


@pytest.mark.parametrize("slash", [True, False])
async def test_cascade_deletes_the_organization_and_its_stats_only(api, slash):
    await add_stat(api, api.cases)
    theirs = await add_stat(api, api.other)
    await add_stat(api, api.cases, type="second")
    resp = await api.delete(org_url("CASES", slash), params={"cascade": "true"}, headers=key(api.admin))
    assert resp.status == 204
    assert await names(api) == ["admin", "OTHER"]
    remaining = await stats(api)
    assert remaining == [theirs]
    existing = set(await names(api))
    assert all(s["organization"] in existing for s in remaining)
    await error(await api.get(org_url("CASES"), headers=key(api.admin)), 404)
    resp = await api.get(STATS, headers=key(api.cases))
    assert (await resp.json())["error"] == "Unauthorized"


@pytest.mark.parametrize("params", [{}, {"cascade": "false"}, {"cascade": "true"}])
async def test_delete_of_an_organization_without_stats_is_204(api, params):
    await add_stat(api, api.other)
    resp = await api.delete(org_url("CASES"), params=params, headers=key(api.admin))
    assert resp.status == 204
    assert await names(api) == ["admin", "OTHER"]
    assert (await api.get(STATS, headers=key(api.cases))).status == 401
    assert len(await stats(api)) == 1


@pytest.mark.parametrize("word, cascade", [("true", True), ("1", True), ("yes", True), ("on", True), ("TRUE", True),
                                           ("false", False), ("0", False), ("no", False), ("off", False)])
async def test_cascade_takes_the_boolean_words_the_config_takes(api, word, cascade):
    stat = await add_stat(api, api.cases)
    resp = await api.delete(org_url("CASES"), params={"cascade": word}, headers=key(api.admin))
    if cascade:
        assert resp.status == 204
        assert await names(api) == ["admin", "OTHER"] and await stats(api) == []
    else:
        assert "still has 1 stat(s)" in (await error(resp, 409))["error"]
        assert await names(api) == ["admin", "CASES", "OTHER"] and await stats(api) == [stat]
    assert statsd.parse_bool(word) is cascade
    assert statsd.Config.load(environ={"STATSD_API_KEY_AUTHENTICATION": word}).api_key_authentication is cascade


@pytest.mark.parametrize("params,named", [({"cascade": "maybe"}, "cascade"), ({"cascade": "2"}, "cascade"),
                                          ({"cascade": ""}, "cascade"), ({"force": "true"}, "force")])
async def test_delete_with_a_bad_parameter_is_400_and_deletes_nothing(api, params, named):
    stat = await add_stat(api, api.cases)
    resp = await api.delete(org_url("CASES"), params=params, headers=key(api.admin))
    assert named in (await error(resp, 400))["error"]
    assert await names(api) == ["admin", "CASES", "OTHER"]
    assert await stats(api) == [stat]


async def test_a_stat_cannot_be_left_pointing_at_a_missing_organization_without_auth(make_client):
    client = await make_client(api_key_authentication=False)
    await new_org(client, "CASES")
    resp = await client.post(STATS, json={"type": "risk", "data": 1, "organization": "CASES"})
    assert resp.status == 201
    await error(await client.delete(org_url("CASES")), 409)
    resp = await client.delete(org_url("CASES"), params={"cascade": "true"})
    assert resp.status == 204
    resp = await client.get(STATS)
    assert (await resp.json())["data"] == []
    resp = await client.post(STATS, json={"type": "risk", "data": 1, "organization": "CASES"})
    await assert_error_object(resp, 400, "stats")


# ----------------------------------------------------------- permissions ---

ORG_ROUTES = [("GET", ORGS, None), ("POST", ORGS, {"name": "SNEAKY", "is_admin": True}),
              ("GET", "OTHER", None), ("PUT", "OTHER", {"is_admin": True}),
              ("PATCH", "CASES", {"is_admin": True}), ("PATCH", "OTHER", {"token": "stolen-token-0123456789"}),
              ("DELETE", "OTHER", None)]


@pytest.mark.parametrize("method,url,body", ORG_ROUTES)
async def test_only_an_admin_may_use_organizations(api, method, url, body):
    await add_stat(api, api.other)
    before_orgs, before_stats = await orgs(api), await stats(api)
    url = org_url(url) if url != ORGS else url
    resp = await api.request(method, url, json=body, headers=key(api.cases))
    await error(resp, 403)
    assert await orgs(api) == before_orgs
    assert await stats(api) == before_stats
    assert (await api.get(STATS, headers=key("stolen-token-0123456789"))).status == 401


@pytest.mark.parametrize("method,url,body", ORG_ROUTES)
@pytest.mark.parametrize("headers", [{}, {"X-API-KEY": "BAD-TOKEN"}], ids=["missing", "unknown"])
async def test_organizations_need_a_key(api, method, url, body, headers):
    before = await orgs(api)
    url = org_url(url) if url != ORGS else url
    resp = await api.request(method, url, json=body, headers=headers)
    assert (await error(resp, 401))["error"] == "Unauthorized"
    assert await orgs(api) == before


async def test_admin_key_in_the_query_argument_works_on_organizations(api):
    resp = await api.get(ORGS, params={"api_key": api.admin})
    assert resp.status == 200
    resp = await api.post(ORGS, json={"name": "Q"}, params={"api_key": api.admin})
    assert resp.status == 201
    resp = await api.delete(org_url("Q"), params={"api_key": api.admin})
    assert resp.status == 204
    assert await names(api) == ["admin", "CASES", "OTHER"]


async def test_without_authentication_organizations_are_open(make_client):
    client = await make_client(api_key_authentication=False)
    resp = await client.post(ORGS, json={"name": "OPEN"})
    assert resp.status == 201
    assert (await resp.json())["token"]
    resp = await client.get(ORGS)
    assert [o["name"] for o in (await resp.json())["data"]] == ["OPEN"]
    assert (await client.patch(org_url("OPEN"), json={"is_admin": True})).status == 200
    assert (await client.delete(org_url("OPEN"))).status == 204


# --------------------------------------------------------- hashed tokens ---

def database_bytes(db_path):
    """The database file and every file beside it that statsd writes (journal, temp)."""
    folder = Path(db_path).parent
    return b"".join(p.read_bytes() for p in sorted(folder.iterdir())
                    if p.is_file() and p.name.startswith(Path(db_path).name))


async def test_tokens_are_not_in_the_database_files(api, db_path):
    given = "my-very-own-given-token-4242"
    rotated = "the-rotated-token-for-OTHER-77"
    generated = (await create_org(api, {"name": "GEN"}))["token"]
    await create_org(api, {"name": "GIVEN", "token": given})
    resp = await api.patch(org_url("OTHER"), json={"token": rotated}, headers=key(api.admin))
    assert resp.status == 200
    tokens = [api.admin, api.cases, api.other, generated, given, rotated]
    # while the server runs: the file plus its journal
    running = database_bytes(db_path)
    assert b"GEN" in running and b"GIVEN" in running  # the records are there...
    for token in tokens:
        assert token.encode() not in running  # ...their tokens are not
    # after a clean stop the journal is folded into the file
    await api.close()
    stopped = database_bytes(db_path)
    assert b"GEN" in stopped and b"GIVEN" in stopped
    for token in tokens:
        assert token.encode() not in stopped


async def test_keys_still_work_after_a_restart_from_the_hashed_file(make_client, db_path):
    client = await make_client()
    admin = await new_org(client, "admin", admin=True)
    resp = await client.post(ORGS, json={"name": "LATER", "token": "later-token-123456789"}, headers=key(admin))
    assert resp.status == 201
    await client.close()
    again = await make_client()
    resp = await again.get(STATS, headers=key("later-token-123456789"))
    assert resp.status == 200
    resp = await again.get(ORGS, headers=key(admin))
    assert [o["name"] for o in (await resp.json())["data"]] == ["admin", "LATER"]


async def test_an_admin_demoted_while_its_body_is_on_the_way_cannot_use_admin_rights(api):
    """Authentication runs before the body arrives; the write must see the key as it stands after."""
    import asyncio
    import json as jsonlib
    adm2 = await new_org(api, "ADM2", admin=True)
    body = jsonlib.dumps({"is_admin": True}).encode()
    reader, writer = await asyncio.open_connection(api.server.host, api.server.port)
    writer.write(f"PATCH /api/v2/organizations/OTHER/ HTTP/1.1\r\nHost: test\r\nX-API-KEY: {adm2}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode())
    await writer.drain()
    await asyncio.sleep(0.2)  # ADM2's request is authenticated and waits for its body
    resp = await api.patch(ORGS + "ADM2/", json={"is_admin": False}, headers=key(api.admin))
    assert resp.status == 200
    writer.write(body)
    await writer.drain()
    status_line = await reader.readline()
    writer.close()
    assert b" 403 " in status_line, status_line
    resp = await api.get(ORGS + "OTHER/", headers=key(api.admin))
    assert (await resp.json())["is_admin"] is False


async def test_organizations_filter_and_order_on_id_as_on_name(api):
    """An organization's id is its name: filters and ordering on id behave as on name."""
    async def names(**params):
        resp = await api.get(ORGS, params=params, headers=key(api.admin))
        assert resp.status == 200, await resp.text()
        return [o["id"] for o in (await resp.json())["data"]]
    everyone = await names()
    assert await names(id="CASES") == ["CASES"]
    assert await names(id__ne="CASES") == [n for n in everyone if n != "CASES"]
    assert await names(id__in="CASES,OTHER") == ["CASES", "OTHER"]
    assert await names(_order_by="-id") == sorted(everyone, reverse=True)


async def test_dot_names_are_refused_since_their_url_would_point_elsewhere(api):
    before = await names(api)
    for name in (".", ".."):
        resp = await api.post(ORGS, json={"name": name}, headers=key(api.admin))
        body = await error(resp, 400)
        assert body["errors"] == {"name": "must not be '.' or '..' (its URL would point elsewhere)"}
    for name in (".a", "a.", "..."):  # only the two names a URL resolves are refused
        await create_org(api, {"name": name})
    assert await names(api) == before + [".a", "a.", "..."]


async def test_get_of_one_organization_takes_fields_as_lists_do(api):
    resp = await api.get(org_url("CASES"), params={"_fields": "is_admin,created_at"}, headers=key(api.admin))
    assert resp.status == 200, await resp.text()
    listed = await api.get(ORGS, params={"_fields": "is_admin,created_at", "name": "CASES"}, headers=key(api.admin))
    assert [await resp.json()] == (await listed.json())["data"]
    assert set(await resp.json()) == {"id", "is_admin", "created_at"}
    body = await error(await api.get(org_url("CASES"), params={"_fields": "token_sha256"}, headers=key(api.admin)), 400)
    assert body["error"] == "unknown field 'token_sha256' in _fields"
    await error(await api.get(org_url("CASES"), params={"_fields": "name"}, headers=key(api.cases)), 403)

