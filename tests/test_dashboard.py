"""The dashboard (issue 12) over HTTP: pages, numbers, exports, access rules, sessions, limits."""

from __future__ import annotations

import csv
import io
import re
import time
from datetime import date, timedelta
from html.parser import HTMLParser
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
from conftest import key, new_org

import monarc_data
import statsd

V1 = "/api/v1/stats/"
PROCESSED = "/api/v1/stats/processed/"
PAGES = ["/", "/dashboard/landscape", "/dashboard/evolution", "/dashboard/explorer"]
AGGREGATED = ["/", "/dashboard/landscape", "/dashboard/evolution", "/dashboard/charts/threats.csv",
              "/dashboard/charts/risks-operational.svg", "/dashboard/charts/stats-by-month.csv",
              "/dashboard/charts/evolution-threats.csv"]
TODAY = date.today()


def origin(client) -> dict:
    return {"Origin": str(client.make_url("")).rstrip("/")}


async def post_v1(client, token, stats):
    for start in range(0, len(stats), 1000):
        resp = await client.post(V1, json=stats[start:start + 1000], headers=key(token))
        assert resp.status == 201, await resp.text()


async def login(client, token, status=303):
    resp = await client.post("/dashboard/login", data={"api_key": token, "next": "/"}, headers=origin(client),
                             allow_redirects=False)
    assert resp.status == status, await resp.text()
    return resp


@pytest.fixture
async def dash(make_client):
    """Two ordinary organizations with MONARC stats over 13 months, an admin, one logged-in session each."""
    client = await make_client()
    client.admin = await new_org(client, "admin", admin=True)
    client.cases = await new_org(client, "CASES")
    client.other = await new_org(client, "OTHER")
    client.anrs = {}
    for seed, (name, token) in enumerate((("CASES", client.cases), ("OTHER", client.other))):
        anrs, stats = monarc_data.organization_stats(seed, 2, TODAY, 400, every=9)
        client.anrs[name] = anrs
        await post_v1(client, token, stats)
    return client


BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"  # what Chromium sends


async def page(client, path, status=200, **kwargs):
    kwargs["headers"] = {"Accept": BROWSER_ACCEPT, **kwargs.get("headers", {})}
    resp = await client.get(path, allow_redirects=False, **kwargs)
    text = await resp.text()
    assert resp.status == status, f"{path}: {resp.status} {text[:500]}"
    return resp, text


def chart_html(html: str, name: str) -> str:
    return html.split(f'data-chart="{name}"', 1)[1].split("</figure>", 1)[0]


class _Elements(HTMLParser):
    def __init__(self):
        super().__init__()
        self.found = []

    def handle_starttag(self, tag, attrs):
        self.found.append((tag, attrs))


def assert_inert(html: str, where: str) -> None:
    """No element that runs or loads anything: no script, no event handler, no javascript: URL."""
    parser = _Elements()
    parser.feed(html)
    for tag, attrs in parser.found:
        assert tag not in ("script", "img", "iframe", "object", "embed", "image", "use", "base", "meta") \
            or (tag == "meta" and all(name in ("charset", "name", "content") for name, _ in attrs)), (where, tag)
        for name, value in attrs:
            assert not name.startswith("on"), (where, tag, name)
            assert not (value or "").strip().lower().startswith("javascript:"), (where, tag, name)


def csv_rows(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text)))


async def processed(client, token, **params):
    params = {k: v for k, v in params.items() if v is not None}
    resp = await client.get(PROCESSED, params=params, headers=key(token))
    assert resp.status == 200, await resp.text()
    return (await resp.json())["data"]


def cell(value) -> str:
    """A number as the CSV export writes it (floats in full precision)."""
    return repr(value) if isinstance(value, float) else str(value)


def ranked(items, by, order, top):
    return sorted(items, key=lambda i: (i["averages"][by], i["object"]), reverse=order == "highest")[:top]


# ------------------------------------------------------------------ pages ---

async def test_every_page_answers_html_with_its_charts_and_a_csp(dash):
    await login(dash, dash.admin)
    stat_id = (await (await dash.get("/api/v2/stats/?_limit=1", headers=key(dash.admin))).json())["data"][0]["id"]
    expected = {
        "/": ["Overview", "Organizations and analyses", "CASES", "OTHER", 'data-chart="stats-by-month"',
              "database file", "journal", "last checkpoint", statsd.__version__],
        "/dashboard/landscape": ["Current landscape", 'data-chart="threats"', 'data-chart="vulnerabilities"',
                                 'data-chart="risks-informational"', 'data-chart="risks-operational"'],
        "/dashboard/evolution": ["Evolution", 'data-chart="evolution-threats"', 'data-chart="evolution-vulnerabilities"',
                                 'data-chart="evolution-risks-informational"',
                                 'data-chart="evolution-risks-operational"'],
        "/dashboard/explorer": ["Explorer", "/dashboard/stats/", "next"],
        f"/dashboard/stats/{stat_id}": [stat_id, f"/api/v2/stats/{stat_id}/", '<pre class="json">'],
        "/dashboard/organizations/CASES": ["Organization CASES", "/api/v2/organizations/CASES/",
                                           'data-chart="stats-by-month"', dash.anrs["CASES"][0]],
        "/dashboard/login": ["Log in", 'name="api_key"'],
    }
    for path, needles in expected.items():
        resp, html = await page(dash, path)
        assert resp.content_type == "text/html"
        csp = resp.headers["Content-Security-Policy"]
        assert "default-src 'none'" in csp and "script-src" not in csp and "'unsafe-inline'" not in csp
        nonce = re.search(r"'nonce-([^']+)'", csp).group(1)
        for needle in needles:
            assert needle in html, (path, needle)
        assert "<script" not in html and "javascript:" not in html
        assert re.findall(r"<style[^>]*>", html) == [f'<style type="text/css" nonce="{nonce}">'] * html.count("<style")
        assert_inert(html, path)
        assert resp.headers["X-Frame-Options"] == "DENY" and resp.headers["X-Content-Type-Options"] == "nosniff"
        assert re.findall(r"""(?:href|src)=["'](https?:)?//""", html) == []  # nothing from another host
    css = await dash.get("/dashboard/static/dashboard.css")
    assert css.status == 200 and css.content_type == "text/css" and "Content-Security-Policy" in css.headers
    assert "url(" not in await css.text() and "@import" not in await css.text()


async def test_nonces_differ_per_response(dash):
    await login(dash, dash.admin)
    nonces = {(await dash.get("/dashboard/landscape")).headers["Content-Security-Policy"] for _ in range(3)}
    assert len(nonces) == 3


async def test_json_index_stays_at_root_for_json_clients(dash):
    resp = await dash.get("/", headers={"Accept": "application/json"})
    assert resp.status == 200 and (await resp.json())["service"] == "statsd"


async def test_bad_choices_are_html_errors(dash):
    await login(dash, dash.admin)
    for path in ("/dashboard/landscape?top=7", "/dashboard/landscape?by=nope", "/dashboard/landscape?period=12",
                 "/dashboard/landscape?date_from=2024-02-30", "/dashboard/landscape?anr=nope",
                 "/dashboard/landscape?colour=red", "/dashboard/evolution?months=3", "/dashboard/evolution?series=50",
                 "/dashboard/explorer?month=x", "/dashboard/explorer?_limit=-1", "/dashboard/explorer?nofield=1",
                 "/dashboard/charts/threats.csv?top=99", "/dashboard/landscape?date_from=2025-02-01&date_to=2025-01-01"):
        resp, html = await page(dash, path, 400)
        assert resp.content_type == "text/html" and "Content-Security-Policy" in resp.headers
        assert "Traceback" not in html
    await page(dash, "/dashboard/landscape?organization=NOPE", 404)
    await page(dash, "/dashboard/charts/nope.csv", 404)
    await page(dash, "/dashboard/charts/threats.png", 404)
    await page(dash, "/dashboard/stats/ffffffffffffffffffffffff", 404)
    await page(dash, "/dashboard/organizations/NOPE", 404)


# ---------------------------------------------------------------- numbers ---

@pytest.mark.parametrize("by", ["averageRate", "count", "maxRisk"])
@pytest.mark.parametrize("order", ["highest", "lowest"])
async def test_top_charts_are_the_v1_processor_numbers(dash, by, order):
    await login(dash, dash.admin)
    date_from = (TODAY - timedelta(days=90)).isoformat()
    for kind, chart in (("threat", "threats"), ("vulnerability", "vulnerabilities")):
        for top in (5, 10, 15):
            query = f"period=90&top={top}&by={by}&order={order}"
            _, text = await page(dash, f"/dashboard/charts/{chart}.csv?{query}", headers={"Accept-Language": "en"})
            rows = csv_rows(text)
            assert rows[0] == [kind, "uuid", by]
            want = ranked(await processed(dash, dash.admin, type=kind, processor=f"{kind}_average_on_date",
                                          date_from=date_from, date_to=TODAY.isoformat()), by, order, top)
            assert len(want) == top
            assert [r[1] for r in rows[1:]] == [item["object"] for item in want]
            assert [float(r[2]) for r in rows[1:]] == [item["averages"][by] for item in want]
            assert [r[0] for r in rows[1:]] == [item["labels"]["label2"] for item in want]
            _, html = await page(dash, f"/dashboard/landscape?{query}")
            assert chart_html(html, chart).count('<g class="bar">') == top


async def test_risk_charts_are_the_v1_processor_numbers_for_each_selection(dash):
    await login(dash, dash.admin)
    cases_anr = dash.anrs["CASES"][1]
    selections = [({"period": "30"}, {"date_from": (TODAY - timedelta(days=30)).isoformat()}),
                  ({"period": "365", "organization": "OTHER"},
                   {"date_from": (TODAY - timedelta(days=365)).isoformat(), "organization": "OTHER"}),
                  ({"period": "custom", "date_from": "2020-01-01", "anr": cases_anr},
                   {"date_from": "2020-01-01", "anrs": cases_anr}),
                  ({"date_to": (TODAY - timedelta(days=100)).isoformat()},
                   {"date_to": (TODAY - timedelta(days=100)).isoformat()})]
    for choices, v1 in selections:
        v1.setdefault("date_to", TODAY.isoformat() if choices.get("period", "custom") != "custom" else None)
        want = await processed(dash, dash.admin, type="risk", processor="risk_averages", **v1)
        assert want
        for risk_kind in ("informational", "operational"):
            _, text = await page(dash, f"/dashboard/charts/risks-{risk_kind}.csv?{urlencode(choices)}")
            rows = csv_rows(text)
            assert rows[0] == ["level", "current", "residual"]
            assert [r[0] for r in rows[1:]] == ["Low", "Medium", "High"]
            for row, level in zip(rows[1:], statsd.RISK_LEVELS):
                assert [float(row[1]), float(row[2])] == [want["current"][risk_kind][level],
                                                          want["residual"][risk_kind][level]]
            _, html = await page(dash, f"/dashboard/landscape?{urlencode(choices)}")
            assert chart_html(html, f"risks-{risk_kind}").count('<g class="bar">') == 6
        # the chart's JSON link is that v1 call
        link = re.search(r'href="([^"]+)" class="export-json"', chart_html(html, "risks-operational")).group(1)
        link = link.replace("&amp;", "&")
        resp = await dash.get(link, headers=key(dash.admin))
        assert (await resp.json())["data"] == want


async def test_evolution_lines_are_the_v1_processor_numbers_month_by_month(dash):
    await login(dash, dash.admin)
    months = statsd.evolution_months(statsd.Selection(months=6))
    _, text = await page(dash, "/dashboard/charts/evolution-threats.csv?months=6&series=5&by=maxRisk")
    rows = csv_rows(text)
    whole = await processed(dash, dash.admin, type="threat", processor="threat_average_on_date",
                            date_from=months[0][1], date_to=months[-1][2])
    chosen = ranked(whole, "maxRisk", "highest", 5)
    assert rows[0] == ["month"] + [item["labels"]["label1"] for item in chosen]  # no Accept-Language: label1
    assert [r[0] for r in rows[1:]] == [m for m, _, _ in months]
    for row, (_, first, last) in zip(rows[1:], months):
        month = {i["object"]: i["averages"]["maxRisk"] for i in await processed(
            dash, dash.admin, type="threat", processor="threat_average_on_date", date_from=first, date_to=last)}
        assert row[1:] == [cell(month[i["object"]]) if i["object"] in month else "" for i in chosen]
    _, text = await page(dash, "/dashboard/charts/evolution-risks-operational.csv?months=6&organization=CASES")
    rows = csv_rows(text)
    assert rows[0] == ["month"] + [f"{lvl} {state}" for state in ("current", "residual") for lvl in ("Low", "Medium", "High")]
    for row, (_, first, last) in zip(rows[1:], months):
        want = await processed(dash, dash.admin, type="risk", processor="risk_averages", date_from=first,
                               date_to=last, organization="CASES")
        assert row[1:] == [cell(want[s]["operational"][lvl]) if want else ""
                           for s in ("current", "residual") for lvl in statsd.RISK_LEVELS]
    _, html = await page(dash, "/dashboard/evolution?series=5")
    assert len(re.findall(r'<g class="series serie-\d+ color-\d+">', chart_html(html, "evolution-threats"))) >= 5


async def test_every_evolution_chart_is_the_v1_processors_for_each_kind_measure_and_selection(dash):
    """The evolution charts read the kept sums once for all their months: each point must still be
    the processor's answer for that month alone, and the series the top ones over the window."""
    await login(dash, dash.admin)
    cases_anr = dash.anrs["CASES"][0]
    empty_month = statsd.evolution_months(statsd.Selection(months=24))[2]  # before the fixture's 13 months
    await post_v1(dash, dash.cases, [{"anr": cases_anr, "type": "risk", "date": empty_month[1], "data": {}}])
    selections = [({}, {}), ({"organization": "OTHER"}, {"organization": "OTHER"}),
                  ({"anr": cases_anr}, {"anrs": cases_anr})]
    for choices, v1 in selections:
        for months in (6, 24):
            spans = statsd.evolution_months(statsd.Selection(months=months))
            for kind, plural in (("threat", "threats"), ("vulnerability", "vulnerabilities")):
                processor = f"{kind}_average_on_date"
                whole = await processed(dash, dash.admin, type=kind, processor=processor, date_from=spans[0][1],
                                        date_to=spans[-1][2], **v1)
                per_month = [await processed(dash, dash.admin, type=kind, processor=processor, date_from=first,
                                             date_to=last, **v1) for _, first, last in spans]
                for by, order in (("averageRate", "highest"), ("count", "lowest"), ("maxRisk", "highest")):
                    query = urlencode({**choices, "months": months, "by": by, "order": order, "series": 20})
                    _, text = await page(dash, f"/dashboard/charts/evolution-{plural}.csv?{query}")
                    rows = csv_rows(text)
                    chosen = ranked(whole, by, order, 20)
                    assert chosen and rows[0] == ["month"] + [item["labels"]["label1"] for item in chosen]
                    assert [r[0] for r in rows[1:]] == [m for m, _, _ in spans]
                    for row, answer in zip(rows[1:], per_month):
                        month = {i["object"]: i["averages"][by] for i in answer}
                        assert row[1:] == [cell(month[i["object"]]) if i["object"] in month else "" for i in chosen]
            for risk_kind in ("informational", "operational"):
                query = urlencode({**choices, "months": months})
                _, text = await page(dash, f"/dashboard/charts/evolution-risks-{risk_kind}.csv?{query}")
                rows = csv_rows(text)
                assert len(rows) == months + 1
                for row, (_, first, last) in zip(rows[1:], spans):
                    want = await processed(dash, dash.admin, type="risk", processor="risk_averages",
                                           date_from=first, date_to=last, **v1)
                    assert row[1:] == [cell(want[s][risk_kind][lvl]) if want else ""
                                       for s in ("current", "residual") for lvl in statsd.RISK_LEVELS]
                if months == 24 and "organization" not in choices:  # a month with a stat but no risk levels: 0s
                    assert rows[3][1:] == ["0"] * 6
                if months == 24:
                    assert rows[1][1:] == [""] * 6  # a month with no stat


async def test_stats_by_month_counts_the_stats_of_each_type(dash):
    await login(dash, dash.admin)
    every = []
    for skip in range(0, 10_000, 1000):
        body = await (await dash.get(f"/api/v2/stats/?_limit=1000&_skip={skip}", headers=key(dash.admin))).json()
        every += body["data"]
        if not body["has_more"]:
            break
    months = [m for m, _, _ in statsd.evolution_months(statsd.Selection(months=12))]
    for params, owner in (("", None), ("?organization=OTHER", "OTHER")):
        _, text = await page(dash, "/dashboard/charts/stats-by-month.csv" + params)
        rows = csv_rows(text)
        assert rows[0] == ["month", "cartography", "compliance", "risk", "threat", "vulnerability"]
        for row in rows[1:]:
            for kind, value in zip(rows[0][1:], row[1:]):
                want = sum(1 for s in every if s["type"] == kind and s["date"][:7] == row[0]
                           and owner in (None, s["organization"]))
                assert int(value) == want
        assert [r[0] for r in rows[1:]] == months and sum(int(v) for r in rows[1:] for v in r[1:]) > 0


async def test_labels_follow_the_browser_language(dash):
    await login(dash, dash.admin)
    items = await processed(dash, dash.admin, type="threat", processor="threat_average_on_date")
    by_uuid = {i["object"]: i["labels"] for i in items}
    for accept, label in (("fr-FR,fr;q=0.9,en;q=0.5", "label1"), ("en-GB", "label2"), ("de", "label3"),
                          ("nl-BE;q=0.8, it;q=0.9", "label4"), ("it, pt", "label1"), ("", "label1"),
                          ("en;q=0.1, de;q=0.5", "label3")):
        _, text = await page(dash, "/dashboard/charts/threats.csv?period=365&top=15",
                             headers={"Accept-Language": accept})
        for row in csv_rows(text)[1:]:
            assert row[0] == by_uuid[row[1]][label], accept


async def test_a_missing_label_falls_back_to_the_first_present(make_client):
    client = await make_client(api_key_authentication=False)
    items = [{"uuid": "00000000-0000-4000-8000-000000000001", "label1": "", "label2": None, "label3": "Nur deutsch",
              "label4": "Alleen nl", "count": 1, "maxRisk": 2, "averageRate": "3"}]
    stats = [{"anr": "00000000-0000-4000-8000-0000000000aa", "type": "threat", "date": TODAY.isoformat(),
              "data": items}]
    assert (await client.post(V1, json=stats)).status == 201
    _, text = await page(client, "/dashboard/charts/threats.csv", headers={"Accept-Language": "en, fr"})
    assert csv_rows(text)[1][0] == "Nur deutsch"
    _, text = await page(client, "/dashboard/charts/threats.csv", headers={"Accept-Language": "nl"})
    assert csv_rows(text)[1][0] == "Alleen nl"


async def test_svg_exports_are_self_contained(dash):
    await login(dash, dash.admin)
    for name in statsd.CHARTS:
        resp, svg = await page(dash, f"/dashboard/charts/{name}.svg")
        assert resp.content_type == "image/svg+xml"
        assert resp.headers["Content-Disposition"].startswith("attachment")
        assert "script-src" not in resp.headers["Content-Security-Policy"]
        assert svg.startswith("<?xml") and "<svg" in svg and "<script" not in svg and "<!--" not in svg
        urls = set(re.findall(r"https?://[^\s\"'<>)]+", svg))
        assert urls <= {"http://www.w3.org/2000/svg", "http://www.w3.org/1999/xlink"}, (name, urls)
        assert not re.search(r"(?:href|src)\s*=", svg) and "@import" not in svg and "url(" not in svg
        csv_resp, _ = await page(dash, f"/dashboard/charts/{name}.csv")
        assert csv_resp.content_type == "text/csv"


# ------------------------------------------------------------ explorer ---

async def test_explorer_takes_the_v2_query_parameters(dash):
    await login(dash, dash.admin)
    _, html = await page(dash, "/dashboard/explorer?type=risk&organization=CASES&_limit=10&_order_by=-date")
    ids = re.findall(r'href="/dashboard/stats/([0-9a-f]{24})"', html)
    api = await (await dash.get("/api/v2/stats/?type=risk&organization=CASES&_limit=10&_order_by=-date",
                                headers=key(dash.admin))).json()
    assert ids == [s["id"] for s in api["data"]] and len(ids) == 10
    assert '/api/v2/stats/?type=risk&amp;organization=CASES&amp;_limit=10&amp;_order_by=-date' in html
    following = re.search(r'rel="next" href="([^"]+)"', html).group(1).replace("&amp;", "&")
    assert parse_qs(urlsplit(following).query)["_skip"] == ["10"]
    _, html = await page(dash, following)
    api = await (await dash.get("/api/v2/stats/?type=risk&organization=CASES&_limit=10&_order_by=-date&_skip=10",
                                headers=key(dash.admin))).json()
    assert re.findall(r'href="/dashboard/stats/([0-9a-f]{24})"', html) == [s["id"] for s in api["data"]]
    assert 'rel="prev"' in html
    # a filter inside data, and empty form fields are no filter
    _, html = await page(dash, "/dashboard/explorer?data__total__current__operational__gt=60&type=&anr=")
    api = await (await dash.get("/api/v2/stats/?data__total__current__operational__gt=60&_limit=25",
                                headers=key(dash.admin))).json()
    assert re.findall(r'href="/dashboard/stats/([0-9a-f]{24})"', html) == [s["id"] for s in api["data"]]
    assert 'name="data__total__current__operational__gt" value="60"' in html  # kept when the form is sent again


# -------------------------------------------------------------- access ---

async def test_key_mode_sends_every_page_to_the_login(dash):
    for path in PAGES + AGGREGATED + ["/dashboard/stats/x", "/dashboard/organizations/CASES"]:
        resp, _ = await page(dash, path, 303)
        location = resp.headers["Location"]
        assert location.startswith("/dashboard/login?next=")
        assert parse_qs(urlsplit(location).query)["next"] == [path]
        assert "Content-Security-Policy" in resp.headers


async def test_the_api_never_takes_the_session_cookie(dash):
    await login(dash, dash.admin)
    assert (await dash.get("/dashboard/explorer")).status == 200
    for path in ("/api/v2/stats/", "/api/v2/organizations/", "/api/v1/stats/?type=risk", "/api/v1/client/me"):
        resp = await dash.get(path)
        assert resp.status == 401, path
    resp = await dash.post("/api/v2/stats/", json={"type": "risk", "data": {}}, headers=origin(dash))
    assert resp.status == 401


async def test_ordinary_organizations_see_only_their_own(dash):
    await login(dash, dash.cases)
    _, html = await page(dash, "/")
    assert "CASES" in html and "OTHER" not in html
    _, html = await page(dash, "/dashboard/explorer?_limit=100")
    assert "OTHER" not in html and html.count('href="/dashboard/organizations/CASES"') >= 100
    _, html = await page(dash, "/dashboard/explorer?organization=OTHER")
    assert "No stat matches" in html
    other_stat = (await (await dash.get("/api/v2/stats/?_limit=1", headers=key(dash.other))).json())["data"][0]["id"]
    await page(dash, f"/dashboard/stats/{other_stat}", 404)
    await page(dash, "/dashboard/organizations/OTHER", 404)
    await page(dash, "/dashboard/organizations/CASES")
    await page(dash, "/dashboard/landscape?organization=OTHER", 403)
    await page(dash, "/dashboard/charts/threats.csv?organization=OTHER", 403)
    await page(dash, "/dashboard/landscape?organization=CASES")
    # its numbers are its own: the v1 processors for organization=CASES
    _, text = await page(dash, "/dashboard/charts/threats.csv?period=365&top=15&by=count")
    want = ranked(await processed(dash, dash.cases, type="threat", processor="threat_average_on_date",
                                  organization="CASES", date_from=(TODAY - timedelta(days=365)).isoformat(),
                                  date_to=TODAY.isoformat()), "count", "highest", 15)
    assert [(r[1], float(r[2])) for r in csv_rows(text)[1:]] == [(i["object"], i["averages"]["count"]) for i in want]
    everyone = ranked(await processed(dash, dash.cases, type="threat", processor="threat_average_on_date",
                                      date_from=(TODAY - timedelta(days=365)).isoformat(), date_to=TODAY.isoformat()),
                      "count", "highest", 15)
    assert [i["averages"]["count"] for i in everyone] != [i["averages"]["count"] for i in want]
    _, text = await page(dash, "/dashboard/charts/stats-by-month.csv")
    total = sum(int(v) for row in csv_rows(text)[1:] for v in row[1:])
    cases = (await (await dash.get("/api/v2/stats/?_limit=1000", headers=key(dash.cases))).json())["data"]
    months = statsd.evolution_months(statsd.Selection(months=12))
    assert total == sum(1 for s in cases if s["date"] >= months[0][1])
    # v1: an ordinary organization may name only itself
    resp = await dash.get(PROCESSED, params={"type": "risk", "processor": "risk_averages", "organization": "OTHER"},
                          headers=key(dash.cases))
    assert resp.status == 403


async def test_public_mode_opens_the_aggregated_pages_only(make_client):
    client = await make_client(dashboard="public")
    client.admin = await new_org(client, "admin", admin=True)
    token = await new_org(client, "SECRET-ORG")
    anrs, stats = monarc_data.organization_stats(3, 1, TODAY, 60, every=10)
    await post_v1(client, token, stats)
    for path in AGGREGATED + ["/dashboard/landscape?top=5"]:
        _, text = await page(client, path)
        assert "SECRET-ORG" not in text and anrs[0] not in text, path
    for path in ("/dashboard/explorer", f"/dashboard/explorer?anr={anrs[0]}", "/dashboard/organizations/SECRET-ORG",
                 "/dashboard/stats/x"):
        resp, _ = await page(client, path, 303)
        assert resp.headers["Location"].startswith("/dashboard/login")
    await page(client, "/dashboard/landscape?organization=SECRET-ORG", 403)
    await page(client, f"/dashboard/landscape?anr={anrs[0]}", 403)
    _, html = await page(client, "/")
    assert "Log in" in html and "Organizations and analyses" not in html
    await login(client, token)
    _, html = await page(client, "/")
    assert "SECRET-ORG" in html and "Organizations and analyses" in html
    await page(client, "/dashboard/explorer")


async def test_off_mode_has_no_dashboard(make_client):
    client = await make_client(dashboard="off")
    token = await new_org(client, "admin", admin=True)
    resp = await client.get("/")
    assert resp.status == 200 and (await resp.json())["service"] == "statsd"
    for path in PAGES[1:] + ["/dashboard/login", "/dashboard/static/dashboard.css", "/dashboard/charts/threats.csv"]:
        assert (await client.get(path, headers=key(token))).status == 404, path
    assert (await client.post("/dashboard/login", data={"api_key": token}, headers=origin(client))).status == 404


async def test_without_authentication_everything_is_open(make_client):
    client = await make_client(api_key_authentication=False)
    anrs, stats = monarc_data.organization_stats(5, 1, TODAY, 30, every=10)
    assert (await client.post(V1, json=stats)).status == 201
    for path in PAGES + AGGREGATED:
        await page(client, path)
    _, html = await page(client, "/dashboard/explorer")
    stat_id = re.search(r'href="/dashboard/stats/([0-9a-f]{24})"', html).group(1)
    await page(client, f"/dashboard/stats/{stat_id}")
    _, html = await page(client, "/")
    assert "authentication off" in html and "no organization" in html
    resp, _ = await page(client, "/dashboard/login", 303)


@pytest.mark.parametrize("mode", ["key", "public"])
async def test_dashboard_config_from_file_and_environment(tmp_path, mode):
    path = tmp_path / "statsd.toml"
    path.write_text(f'dashboard = "{mode}"\n')
    assert statsd.Config.load(str(path), environ={}).dashboard == mode
    assert statsd.Config.load(None, environ={"STATSD_DASHBOARD": "off"}).dashboard == "off"
    with pytest.raises(statsd.ConfigError, match="dashboard"):
        statsd.Config.load(None, environ={"STATSD_DASHBOARD": "open"})


# ------------------------------------------------------------ sessions ---

async def test_the_cookie_is_a_random_session_id_with_strict_flags(dash):
    resp = await login(dash, dash.admin)
    cookie = resp.headers["Set-Cookie"]
    value = re.match(r"statsd_session=([^;]+);", cookie).group(1)
    assert dash.admin not in cookie and statsd.hash_token(dash.admin) not in cookie and len(value) >= 40
    flags = {part.strip().split("=")[0].lower(): part.strip() for part in cookie.split(";")[1:]}
    assert "httponly" in flags and flags["samesite"] == "SameSite=Strict" and flags["path"] == "Path=/"
    assert "secure" not in flags  # plain http
    assert int(flags["max-age"].split("=")[1]) == 8 * 3600
    second = re.match(r"statsd_session=([^;]+);", (await login(dash, dash.admin)).headers["Set-Cookie"]).group(1)
    assert second != value


async def test_the_cookie_is_secure_behind_https(make_client):
    client = await make_client(trusted_proxies=["127.0.0.1"])
    token = await new_org(client, "admin", admin=True)
    headers = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "stats.example.org",
               "Origin": "https://stats.example.org"}
    resp = await client.post("/dashboard/login", data={"api_key": token}, headers=headers, allow_redirects=False)
    assert resp.status == 303
    assert "Secure" in [part.strip() for part in resp.headers["Set-Cookie"].split(";")]
    # the Origin must be the one the browser saw (https), not the proxy's hop
    resp = await client.post("/dashboard/login", data={"api_key": token}, allow_redirects=False,
                             headers={**headers, "Origin": str(client.make_url("")).rstrip("/")})
    assert resp.status == 403


async def test_login_refuses_other_origins_and_bad_keys(dash):
    for headers in ({"Origin": "http://evil.example"}, {"Referer": "http://evil.example/page"}, {},
                    {"Origin": "null"}):
        resp = await dash.post("/dashboard/login", data={"api_key": dash.admin}, headers=headers,
                               allow_redirects=False)
        assert resp.status == 403 and "Set-Cookie" not in resp.headers, headers
    resp = await dash.post("/dashboard/login", data={"api_key": dash.admin},
                           headers={"Referer": str(dash.make_url("/dashboard/login"))}, allow_redirects=False)
    assert resp.status == 303
    resp = await login(dash, "not-a-key-of-anyone", status=401)
    assert "Set-Cookie" not in resp.headers and "belongs to no organization" in await resp.text()
    resp = await login(dash, "", status=401)


async def test_login_goes_back_only_to_this_site(dash):
    for target, expected in (("/dashboard/evolution?months=6", "/dashboard/evolution?months=6"),
                             ("//evil.example/", "/"), ("https://evil.example/", "/"), ("/\\evil.example", "/"),
                             ("", "/")):
        resp = await dash.post("/dashboard/login", data={"api_key": dash.admin, "next": target},
                               headers=origin(dash), allow_redirects=False)
        assert resp.headers["Location"] == expected, target


async def test_logout_ends_the_session(dash):
    resp = await login(dash, dash.admin)
    sid = re.match(r"statsd_session=([^;]+);", resp.headers["Set-Cookie"]).group(1)
    await page(dash, "/dashboard/explorer")
    resp = await dash.post("/dashboard/logout", headers={"Origin": "http://evil.example"}, allow_redirects=False)
    assert resp.status == 403
    await page(dash, "/dashboard/explorer")
    resp = await dash.post("/dashboard/logout", headers=origin(dash), allow_redirects=False)
    assert resp.status == 303 and "statsd_session=" in resp.headers["Set-Cookie"]
    await page(dash, "/dashboard/explorer", 303)
    dash.session.cookie_jar.clear()
    await page(dash, "/dashboard/explorer", 303, headers={"Cookie": f"statsd_session={sid}"})  # the old id is dead


async def test_sessions_expire(dash):
    await login(dash, dash.admin)
    await page(dash, "/dashboard/explorer")
    sessions = dash.app[statsd.SESSIONS_KEY]
    for session in sessions.by_id.values():
        session.expires = time.time() - 1  # as if 8 hours went by
    await page(dash, "/dashboard/explorer", 303)
    assert not sessions.by_id


async def test_rotating_or_deleting_the_key_ends_its_sessions(dash):
    await login(dash, dash.cases)
    await page(dash, "/dashboard/explorer")
    resp = await dash.patch("/api/v2/organizations/CASES/", json={"token": "a-rotated-token-0123456789"},
                            headers=key(dash.admin))
    assert resp.status == 200
    await page(dash, "/dashboard/explorer", 303)
    await login(dash, dash.cases, status=401)
    await login(dash, "a-rotated-token-0123456789")
    await page(dash, "/dashboard/explorer")
    # a demoted admin is demoted at once; a deleted organization's session ends
    await login(dash, dash.admin)
    _, html = await page(dash, "/")
    assert "OTHER" in html
    other_admin = await new_org(dash, "second-admin", admin=True)
    assert (await dash.patch("/api/v2/organizations/admin/", json={"is_admin": False},
                             headers=key(other_admin))).status == 200
    _, html = await page(dash, "/")
    assert "OTHER" not in html
    assert (await dash.delete("/api/v2/organizations/admin/", headers=key(other_admin))).status == 204
    await page(dash, "/", 303)


async def test_login_attempts_have_their_own_stricter_limit(dash):
    for _ in range(10):
        await login(dash, "wrong-key-0123456789", status=401)
    resp = await login(dash, dash.admin, status=429)  # even the right key, until the window frees
    assert int(resp.headers["Retry-After"]) >= 1 and "Set-Cookie" not in resp.headers
    assert "too many login attempts" in await resp.text()


async def test_dashboard_requests_count_against_the_rate_limit(make_client):
    client = await make_client(rate_limit="3/minute", api_key_authentication=False)
    for remaining in ("2", "1", "0"):
        resp = await client.get("/dashboard/landscape")
        assert resp.status == 200 and resp.headers["X-Rate-Limit-Remaining"] == remaining
    resp = await client.get("/dashboard/landscape")
    assert resp.status == 429 and "Retry-After" in resp.headers
    assert (await client.get("/dashboard/evolution")).status == 200  # another endpoint, another counter


# ------------------------------------------------------------ hostile data ---

HOSTILE = ['</title><script>document.title="pwned"</script>', '<svg onload=alert(1)>', '"><img src=x onerror=alert(1)>',
           "<style>body{display:none}</style>", "]]><script>alert(2)</script><![CDATA[", "=cmd|' /C calc'!A0",
           "&lt;already escaped&gt;", "<a href=javascript:alert(3)>x</a>"]


async def test_hostile_labels_and_names_are_escaped_everywhere(make_client):
    client = await make_client()
    admin = await new_org(client, "admin", admin=True)
    evil_name = "<img src=x onerror=alert(9)> & <svg onload=alert(8)>"
    token = await new_org(client, evil_name)
    items = [{"uuid": f"00000000-0000-4000-8000-00000000000{i}", "label1": text, "label2": text, "label3": text,
              "label4": text, "count": i + 1, "maxRisk": 3, "averageRate": "1.5"} for i, text in enumerate(HOSTILE)]
    anr = "00000000-0000-4000-8000-0000000000bb"
    await post_v1(client, token, [{"anr": anr, "type": "threat", "date": TODAY.isoformat(), "data": items},
                                  {"anr": anr, "type": "vulnerability", "date": TODAY.isoformat(), "data": items},
                                  {"anr": anr, "type": "risk", "date": TODAY.isoformat(), "data": {"x": HOSTILE}}])
    await login(client, admin)
    stat_id = (await (await client.get("/api/v2/stats/?type=risk", headers=key(admin))).json())["data"][0]["id"]
    paths = ["/", "/dashboard/landscape?top=15", "/dashboard/evolution?series=20", "/dashboard/explorer",
             f"/dashboard/stats/{stat_id}", "/dashboard/organizations/" + statsd.quote(evil_name, safe="")]
    for path in paths:
        _, html = await page(client, path)
        for text in HOSTILE + [evil_name]:
            assert text not in html or not re.search("[<>\"]", text), (path, text)
        assert "<script" not in html and "<img" not in html and "<svg onload" not in html
        assert_inert(html, path)
    _, html = await page(client, "/dashboard/landscape?top=15")
    assert "&lt;svg onload=alert(1)&gt;" in html and "&lt;img src=x onerror=alert(9)&gt; &amp; &lt;svg" in html
    for name in ("threats", "evolution-threats"):
        _, svg = await page(client, f"/dashboard/charts/{name}.svg?top=15" if name == "threats"
                            else f"/dashboard/charts/{name}.svg?series=20")
        assert "<script" not in svg and "<img" not in svg and "&lt;svg onload=alert(1)&gt;" in svg
        _, text = await page(client, f"/dashboard/charts/{name}.csv?top=15" if name == "threats"
                             else f"/dashboard/charts/{name}.csv?series=20")
        cells = {cell for row in csv_rows(text) for cell in row}
        assert "'=cmd|' /C calc'!A0" in cells and "=cmd|' /C calc'!A0" not in cells  # no formula for a spreadsheet
