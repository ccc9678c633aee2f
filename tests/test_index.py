"""The indexes a new user lands on: /, /api/v2/ and /api/v1/, with links to the rest."""

import re

import pytest
from conftest import assert_error_object, key

import statsd

BROWSER = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8"


async def test_api_v2_with_a_key_answers_an_index_whose_links_work(api):
    for path in ("/api/v2/", "/api/v2"):
        resp = await api.get(path, headers=key(api.cases))
        assert resp.status == 200, await resp.text()
        body = await resp.json()
        assert (body["organization"], body["is_admin"], body["version"]) == ("CASES", False, statsd.__version__)
    links = body["links"]
    base = str(api.make_url(""))
    assert links["dashboard"] == base + "/dashboard/" and links["v1"] == base + "/api/v1/"
    assert links["openapi"] == base + "/api/v2/openapi.json"
    for name in ("api", "stats", "openapi", "v1"):
        resp = await api.get(links[name].removeprefix(base), headers=key(api.cases))
        assert resp.status == 200, name
    assert (await (await api.get("/api/v2/", headers=key(api.admin))).json())["is_admin"] is True
    await assert_error_object(await api.get("/api/v2/"), 401, "/api/v2/")
    await assert_error_object(await api.get("/api/v2/", params={"x": "1"}, headers=key(api.cases)), 400, "/api/v2/")


async def test_api_v1_lists_its_routes_without_a_key(api):
    resp = await api.get("/api/v1/")
    assert resp.status == 200
    routes = (await resp.json())["routes"]
    assert {(r["method"], r["path"]) for r in routes} == {
        ("GET", "/api/v1/stats/"), ("POST", "/api/v1/stats/"), ("GET", "/api/v1/stats/{anr}/"),
        ("DELETE", "/api/v1/stats/{anr}/"), ("GET", "/api/v1/stats/processed/"),
        ("GET", "/api/v1/stats/processed/list/"), ("GET", "/api/v1/client/me/"), ("PATCH", "/api/v1/client/me/")}
    base = str(api.make_url(""))
    assert all(r["url"] == base + r["path"] for r in routes)
    resp = await api.get("/api/v1/stats/processed/list/")  # a link of the index, followed
    assert resp.status == 200


@pytest.mark.parametrize("accept", [BROWSER, "text/html", "application/json;q=0.5, text/html"])
async def test_root_gives_a_browser_a_page_of_links_when_the_dashboard_is_off(make_client, accept):
    client = await make_client(dashboard="off")
    resp = await client.get("/", headers={"Accept": accept})
    assert resp.status == 200 and resp.content_type == "text/html" and resp.charset == "utf-8"
    page = await resp.text()
    assert set(re.findall(r'href="([^"]*)"', page)) == {"/api/v2/", "/api/v2/openapi.json", "/api/v1/"}
    assert "<script" not in page.lower() and f"statsd {statsd.__version__}" in page


@pytest.mark.parametrize("accept", [None, "*/*", "application/json", "text/html;q=0.1, application/json",
                                    "application/*", "text/plain"])
async def test_root_answers_json_to_everything_else(api, accept):
    resp = await api.get("/", headers={"Accept": accept} if accept else {"Accept": ""}, skip_auto_headers=["Accept"])
    assert resp.status == 200 and resp.content_type == "application/json"
    body = await resp.json()
    assert body["service"] == "statsd" and body["links"]["dashboard"].endswith("/dashboard/")
    assert body["links"]["openapi"].endswith("/api/v2/openapi.json")
