"""GET /api/v2/openapi.json (issue 5): an OpenAPI 3.1 description that matches the app's routes."""

import re

import pytest
from conftest import assert_error_object, key

import statsd

DOC = statsd.OPENAPI_PATH
METHODS = {"get", "put", "post", "delete", "patch"}


def app_operations(app):
    """(METHOD, path with one trailing slash) of every route the app answers (HEAD and the
    dashboard's HTML pages under /dashboard/ aside)."""
    out = set()
    for route in app.router.routes():
        if route.method == "HEAD" or route.resource.canonical.startswith(statsd.DASHBOARD_PREFIX):
            continue
        path = route.resource.canonical
        out.add((route.method, path if path == "/" or path.endswith(".json") else path.rstrip("/") + "/"))
    return out


def document_operations(doc):
    return {(method.upper(), path) for path, item in doc["paths"].items() for method in item if method in METHODS}


@pytest.mark.parametrize("settings", [{}, {"api_key_authentication": False}, {"rate_limit": "5/second"}])
async def test_document_paths_and_methods_are_exactly_the_app_routes(make_client, settings):
    client = await make_client(**settings)
    resp = await client.get(DOC)
    assert resp.status == 200 and resp.content_type == "application/json"
    doc = await resp.json()
    assert doc["openapi"].startswith("3.1")
    assert document_operations(doc) == app_operations(client.app)
    for path, item in doc["paths"].items():
        for method, op in item.items():
            assert op["summary"] and op["summary"] != "UNDOCUMENTED", (method, path)
            assert any(status.startswith("2") for status in op["responses"]), (method, path)


async def test_every_route_also_answers_without_or_with_its_trailing_slash(api):
    """Each route, sent with and without its trailing slash, reaches its handler (not a 404 or 405 of
    the router) and both forms answer alike; bodies are left out so that nothing is changed."""
    values = {"{id}": "0" * 24, "{name}": "NOBODY", "{anr}": "00000000-0000-0000-0000-000000000000"}
    tried = set()
    for method, path in app_operations(api.app):
        if path == "/" or path == DOC:
            continue
        for placeholder, value in values.items():
            path = path.replace(placeholder, value)
        answers = []
        for form in (path, path.rstrip("/")):
            resp = await api.request(method, form, headers={**key(api.admin), "User-Agent": "MONARC/2.13.1"})
            body = await resp.json() if resp.status >= 400 else None
            assert resp.status != 405, (method, form)
            assert not (body and "no route" in body["error"]), (method, form)
            answers.append((resp.status, body and body["error"]))
        assert answers[0] == answers[1], (method, path, answers)
        tried.add((method, path))
    assert len(tried) == len(app_operations(api.app)) - 2


async def test_every_route_has_both_forms_except_the_dashboard_files(make_client):
    client = await make_client()
    paths = {r.resource.canonical for r in client.app.router.routes()}
    files = {p for p in paths if p.startswith(statsd.DASHBOARD_PREFIX) and re.search(r"\.[a-z{}]+$", p)}
    for path in paths - {"/", DOC} - files:  # the dashboard's stylesheet and chart files: one form
        twin = path[:-1] if path.endswith("/") else path + "/"
        assert twin in paths, path


async def test_the_document_is_public_and_counted_by_the_rate_limit(make_client):
    client = await make_client(rate_limit="2/minute")
    for remaining in ("1", "0"):
        resp = await client.get(DOC)
        assert resp.status == 200
        assert resp.headers["X-Rate-Limit-Remaining"] == remaining
    await assert_error_object(await client.get(DOC), 429, DOC)


async def test_the_document_refuses_unknown_parameters(api):
    await assert_error_object(await api.get(DOC, params={"x": "1"}), 400, DOC)
    assert (await api.get(DOC, params={"api_key": api.cases})).status == 200


async def test_servers_names_the_address_the_client_used(api):
    doc = await (await api.get(DOC, headers={"Host": "stats.example.org:8443"})).json()
    assert doc["servers"] == [{"url": "http://stats.example.org:8443"}]


def resolve(doc, ref):
    node = doc
    for part in ref.lstrip("#/").split("/"):
        node = node[part]
    return node


async def test_every_error_status_of_the_app_is_described_with_the_error_object(api):
    doc = await (await api.get(DOC)).json()
    for status, name in statsd.ApiError.NAMES.items():
        response = doc["components"]["responses"][name]
        assert response["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
    error = doc["components"]["schemas"]["Error"]
    assert set(error["required"]) == {"error", "status", "action", "target", "exception_msg", "status_code",
                                      "exception_cls"}
    for path, item in doc["paths"].items():
        for method, op in item.items():
            for status, answer in op["responses"].items():
                if int(status) >= 400:
                    assert resolve(doc, answer["$ref"]) is not None
                    assert answer["$ref"].endswith("/" + statsd.ApiError.NAMES[int(status)])
            if path.startswith("/api/") and op.get("security") != []:
                assert "401" in op["responses"], (method, path)


async def test_list_filters_cover_every_field_and_operator(api):
    doc = await (await api.get(DOC)).json()
    for path, table in (("/api/v2/stats/", statsd.STAT_FIELDS), ("/api/v2/organizations/", statsd.ORG_FIELDS)):
        params = {p["name"]: p for p in doc["paths"][path]["get"]["parameters"]}
        assert {"_skip", "_limit", "_order_by", "_fields"} <= set(params)
        assert params["_limit"]["schema"]["maximum"] == api.app[statsd.CONFIG_KEY].max_limit
        names = set(params["filters"]["schema"]["properties"])
        for field, (_, strings_ok) in table.items():
            assert field in names
            for op in statsd.OPERATORS:
                assert (f"{field}__{op}" in names) == (strings_ok or op not in statsd.STRING_OPS), (field, op)
    patterns = doc["paths"]["/api/v2/stats/"]["get"]["parameters"][-1]["schema"]["patternProperties"]
    assert any(re.fullmatch(p, "data__total__current__operational__gt") for p in patterns)


async def test_stat_schema_bounds_come_from_the_validation_rules(api):
    doc = await (await api.get(DOC)).json()
    new = doc["components"]["schemas"]["NewStat"]
    assert set(new["required"]) == {"type", "data"}
    for name, (low, high) in statsd.PERIODS.items():
        assert (new["properties"][name]["minimum"], new["properties"][name]["maximum"]) == (low, high)
    # a stat answered by the app carries exactly the documented fields
    resp = await api.post("/api/v2/stats/", json={"type": "risk", "anr": 3, "date": "2024-02-29", "data": {}},
                          headers=key(api.cases))
    stat = await resp.json()
    assert set(stat) <= set(doc["components"]["schemas"]["Stat"]["properties"])
    assert set(doc["components"]["schemas"]["Stat"]["required"]) <= set(stat)


async def test_security_follows_api_key_authentication(make_client, tmp_path):
    on = await (await (await make_client()).get(DOC)).json()
    assert {"ApiKeyHeader", "ApiKeyQuery"} == set(on["components"]["securitySchemes"])
    assert on["security"] and on["paths"][DOC]["get"]["security"] == []
    off_client = await make_client(api_key_authentication=False, database=str(tmp_path / "off.json"))
    off = await (await off_client.get(DOC)).json()
    assert off["security"] == []
    assert all(op.get("security") == [] for item in off["paths"].values() for op in item.values())


async def test_head_on_every_get_route_answers_as_get_without_a_body(api):
    resp = await api.post("/api/v2/stats/", json={"type": "risk", "anr": "00000000-0000-0000-0000-000000000001",
                                                  "data": 1}, headers=key(api.cases))
    stat = await resp.json()
    values = {"{id}": stat["id"], "{name}": "CASES", "{anr}": "00000000-0000-0000-0000-000000000001"}
    gets = [path for method, path in app_operations(api.app) if method == "GET"]
    assert len(gets) >= 10
    for path in gets:
        for placeholder, value in values.items():
            path = path.replace(placeholder, value)
        query = {"type": "risk"} if path == "/api/v1/stats/" else {}
        for headers in ({**key(api.admin), "User-Agent": "MONARC/2.13.1"}, {}):  # allowed, and refused
            got = await api.get(path, params=query, headers=headers)
            body = await got.read()
            head = await api.head(path, params=query, headers=headers)
            assert head.status == got.status, (path, head.status, got.status)
            assert head.headers["Content-Type"] == got.headers["Content-Type"], path
            # the same body would be sent (an error object names the method it answers); a streamed
            # answer (the export) announces no length, and neither does its HEAD
            if "Content-Length" in got.headers:
                assert int(head.headers["Content-Length"]) == len(body.replace(b'"action":"GET"', b'"action":"HEAD"'))
            else:
                assert got.headers["Transfer-Encoding"] == "chunked" and "Content-Length" not in head.headers, path
            assert await head.read() == b"", path
