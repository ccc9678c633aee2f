"""The dashboard in a real browser: Debian's Chromium driven by selenium, a real server on loopback.

Needs `chromium` and `chromium-driver` (apt); `.ci/run` installs them. Without them the tests
are skipped, except under CI=true, where they fail. Selenium is pointed at
/usr/bin/chromedriver explicitly, so Selenium Manager never downloads anything.

Screenshots of every page go to a temporary folder; with STATSD_SCREENSHOTS=DIR (e.g.
`STATSD_SCREENSHOTS=docs .venv/bin/pytest tests/test_browser.py`) they are written to DIR too:
that is how docs/dashboard-*.png are made.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
import urllib.request
from datetime import date
from pathlib import Path

import pytest
from conftest import ROOT, ServerProcess, cli

import monarc_data

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
HAVE_BROWSER = os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)
if not HAVE_BROWSER and os.environ.get("CI") != "true":
    pytest.skip("chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)",
                allow_module_level=True)

from selenium import webdriver  # noqa: E402  (after the skip: selenium is a test extra)
from selenium.common.exceptions import NoAlertPresentException, WebDriverException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
ORGANIZATIONS = [("CIRCL", 3, 0), ("City Hospital", 2, 0), ("Ministry of Finance", 4, 0), ("ACME Logistics", 2, 20)]


def post(url, token, body):
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", "X-API-KEY": token})
    with NO_PROXY.open(request, timeout=60) as r:
        assert r.status == 201, r.read()


def create_org(database, name, *flags):
    out = cli("create-organization", name, *flags, "--database", str(database))
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    folder = tmp_path_factory.mktemp("screenshots")
    wanted = os.environ.get("STATSD_SCREENSHOTS")
    return folder, (ROOT / wanted if wanted and not os.path.isabs(wanted) else Path(wanted) if wanted else None)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A server with four organizations' MONARC stats over a year (one silent for 20 days)."""
    folder = tmp_path_factory.mktemp("site")
    database = folder / "statsd.json"
    admin = create_org(database, "CASES", "--admin")
    tokens = {name: create_org(database, name) for name, _, _ in ORGANIZATIONS}
    server = ServerProcess(database).start()
    try:
        for seed, (name, analyses, silent) in enumerate(ORGANIZATIONS):
            _, stats = monarc_data.organization_stats(seed + 10, analyses, date.today(), 365, every=7,
                                                      silent_for=silent)
            for start in range(0, len(stats), 1000):
                post(server.url + "/api/v1/stats/", tokens[name], stats[start:start + 1000])
        server.admin, server.tokens = admin, tokens
        yield server
    finally:
        server.kill()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    downloads = tmp_path_factory.mktemp("downloads")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--hide-scrollbars", "--window-size=1360,900",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}", "--lang=en-US"):
        options.add_argument(flag)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False,
                                              "intl.accept_languages": "en-US,en"})
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    driver.downloads = downloads
    yield driver
    driver.quit()


def screenshot(driver, shots, name):
    """The whole page, into the temporary folder (and STATSD_SCREENSHOTS when set)."""
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1360, min(max(height, 600), 4000))
    path = shots[0] / f"dashboard-{name}.png"
    assert driver.save_screenshot(str(path))
    assert path.stat().st_size > 10_000
    if shots[1] is not None:
        shots[1].mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, shots[1] / path.name)
    driver.set_window_size(1360, 900)


def log_in(driver, url, token):
    driver.get(url + "/")
    assert "/dashboard/login" in driver.current_url
    driver.find_element(By.NAME, "api_key").send_keys(token)
    driver.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
    WebDriverWait(driver, 20).until(lambda d: "/dashboard/login" not in d.current_url)
    assert driver.current_url == url + "/"


def bars(driver, chart):
    return driver.find_elements(By.CSS_SELECTOR, f'figure[data-chart="{chart}"] svg g.bar rect')


def lines(driver, chart):
    return driver.find_elements(By.CSS_SELECTOR, f'figure[data-chart="{chart}"] svg g[class="plot"] > g.series')


def choose(driver, name, value):
    Select(driver.find_element(By.CSS_SELECTOR, f'form.controls select[name="{name}"]')).select_by_value(value)


def replaced(old):
    """A wait condition: the page that held `old` is gone. Chromium may answer a stale element
    with "Node with given id does not belong to the document" rather than as stale: gone too."""
    def gone(_driver):
        try:
            old.is_enabled()
        except WebDriverException:  # StaleElementReferenceException is one of them
            return True
        return False
    return gone


def submit(driver):
    """Send the page's choices and wait for the new page."""
    old = driver.find_element(By.TAG_NAME, "html")
    driver.find_element(By.CSS_SELECTOR, "form.controls button[type=submit]").click()
    WebDriverWait(driver, 20).until(replaced(old))


def follow(driver, element):
    """Click a link and wait for the page it opens."""
    old = driver.find_element(By.TAG_NAME, "html")
    element.click()
    WebDriverWait(driver, 20).until(replaced(old))


def no_csp_violation(driver):
    messages = [entry["message"] for entry in driver.get_log("browser")]
    assert not [m for m in messages if "Content Security Policy" in m or "Refused to" in m], messages


def test_log_in_open_every_page_and_change_the_choices(site, browser, shots):
    url = site.url
    log_in(browser, url, site.admin)
    assert browser.find_element(By.TAG_NAME, "h1").text == "Overview"
    assert len(bars(browser, "stats-by-month")) >= 12 * 5  # five types in every month
    silent = browser.find_elements(By.CSS_SELECTOR, "tr.silent th")
    assert [row.text for row in silent] == ["ACME Logistics"]
    # the stylesheet applied (from the statsd route): the header bar is coloured
    assert browser.find_element(By.CSS_SELECTOR, "header.top").value_of_css_property("background-color") \
        == "rgba(31, 63, 104, 1)"
    screenshot(browser, shots, "overview")

    follow(browser, browser.find_element(By.LINK_TEXT, "Current landscape"))
    assert len(bars(browser, "threats")) == 10 and len(bars(browser, "vulnerabilities")) == 10
    assert len(bars(browser, "risks-informational")) == 6 and len(bars(browser, "risks-operational")) == 6
    screenshot(browser, shots, "landscape")
    for top, by, order in (("5", "count", "lowest"), ("15", "maxRisk", "highest")):
        choose(browser, "top", top)
        choose(browser, "by", by)
        choose(browser, "order", order)
        choose(browser, "period", "365")
        submit(browser)
        assert f"top={top}" in browser.current_url and f"by={by}" in browser.current_url
        assert len(bars(browser, "threats")) == int(top) and len(bars(browser, "vulnerabilities")) == int(top)
        title = browser.find_element(By.CSS_SELECTOR, 'figure[data-chart="threats"] h3').text
        assert title.startswith(f"Top {top} threats") and f"{order} first" in title
    choose(browser, "organization", "City Hospital")
    submit(browser)
    assert "organization=City+Hospital" in browser.current_url and len(bars(browser, "threats")) == 15
    no_csp_violation(browser)

    follow(browser, browser.find_element(By.LINK_TEXT, "Evolution"))
    assert len(lines(browser, "evolution-threats")) == 10 and len(lines(browser, "evolution-risks-operational")) == 6
    screenshot(browser, shots, "evolution")
    choose(browser, "series", "5")
    choose(browser, "months", "6")
    submit(browser)
    assert len(lines(browser, "evolution-threats")) == 5 and len(lines(browser, "evolution-vulnerabilities")) == 5
    labels = browser.find_elements(By.CSS_SELECTOR, 'figure[data-chart="evolution-threats"] g.axis.x text')
    assert len([t for t in labels if t.text]) == 6

    follow(browser, browser.find_element(By.LINK_TEXT, "Explorer"))
    rows = browser.find_elements(By.CSS_SELECTOR, "table.stats tbody tr")
    assert len(rows) == 25
    choose(browser, "type", "risk")
    choose(browser, "_order_by", "-date")
    submit(browser)
    types = [td.text for td in browser.find_elements(By.CSS_SELECTOR, "table.stats tbody tr td:nth-child(5)")]
    assert types == ["risk"] * 25
    dates = [td.text for td in browser.find_elements(By.CSS_SELECTOR, "table.stats tbody tr td:nth-child(6)")]
    assert dates == sorted(dates, reverse=True)
    screenshot(browser, shots, "explorer")
    follow(browser, browser.find_element(By.CSS_SELECTOR, "a[rel=next]"))
    assert "_skip=25" in browser.current_url
    follow(browser, browser.find_element(By.CSS_SELECTOR, "table.stats tbody tr td a"))
    data = json.loads(browser.find_element(By.CSS_SELECTOR, "pre.json").text)
    assert set(data) == {"total", "risks"}
    screenshot(browser, shots, "stat")
    browser.find_element(By.LINK_TEXT, "Its JSON")  # the link to the API
    follow(browser, browser.find_element(By.CSS_SELECTOR, "table.fields a"))  # its organization
    assert browser.find_element(By.TAG_NAME, "h1").text.startswith("Organization ")
    assert len(bars(browser, "stats-by-month")) > 0
    screenshot(browser, shots, "organization")
    no_csp_violation(browser)


def test_download_a_csv(site, browser):
    browser.get(site.url + "/dashboard/landscape?top=5&by=count&period=365")
    if "/dashboard/login" in browser.current_url:
        log_in(browser, site.url, site.admin)
        browser.get(site.url + "/dashboard/landscape?top=5&by=count&period=365")
    for old in browser.downloads.iterdir():
        old.unlink()
    browser.find_element(By.CSS_SELECTOR, 'figure[data-chart="threats"] a.export-csv').click()
    deadline = time.monotonic() + 30
    found = []
    while time.monotonic() < deadline:
        found = [p for p in browser.downloads.iterdir() if p.suffix == ".csv"]
        if found:
            break
        time.sleep(0.1)
    assert found, list(browser.downloads.iterdir())
    with open(found[0], newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["threat", "uuid", "count"] and len(rows) == 6
    shown = [e.get_attribute("textContent") for e in
             browser.find_elements(By.CSS_SELECTOR, 'figure[data-chart="threats"] table.numbers tbody th')]
    assert [r[0] for r in rows[1:]] == shown


def test_log_out(site, browser):
    browser.get(site.url + "/")
    if "/dashboard/login" in browser.current_url:
        log_in(browser, site.url, site.admin)
    follow(browser, browser.find_element(By.CSS_SELECTOR, "header form button"))
    assert "/dashboard/login" in browser.current_url
    browser.get(site.url + "/dashboard/explorer")
    assert "/dashboard/login" in browser.current_url


PAYLOADS = ['</title><script>document.documentElement.dataset.pwned="script"</script>',
            '<svg onload="document.documentElement.dataset.pwned=\'svg\'">',
            '"><img src=x onerror="document.documentElement.dataset.pwned=\'img\'">',
            "<style>body{display:none}</style>", "]]><script>alert(1)</script>",
            '<iframe src="javascript:alert(2)"></iframe>']
EVIL_ORG = '<img src=x onerror="document.documentElement.dataset.pwned=\'org\'"> & <b>bold'


def test_hostile_data_never_runs_and_shows_as_text(tmp_path, browser):
    database = tmp_path / "statsd.json"
    admin = create_org(database, "admin", "--admin")
    token = create_org(database, EVIL_ORG)
    server = ServerProcess(database).start()
    try:
        items = [{"uuid": f"00000000-0000-4000-8000-00000000000{i}", "label1": text, "label2": text, "label3": text,
                  "label4": text, "count": i + 1, "maxRisk": 10 - i, "averageRate": str(1 + i / 4)}
                 for i, text in enumerate(PAYLOADS)]
        anr = "00000000-0000-4000-8000-0000000000cc"
        today = date.today().isoformat()
        post(server.url + "/api/v1/stats/", token, [
            {"anr": anr, "type": "threat", "date": today, "data": items},
            {"anr": anr, "type": "vulnerability", "date": today, "data": items},
            {"anr": anr, "type": "risk", "date": today, "data": {"note": PAYLOADS}}])
        browser.delete_all_cookies()
        log_in(browser, server.url, admin)
        pages = ["/", "/dashboard/landscape?top=15", "/dashboard/evolution?series=20",
                 "/dashboard/explorer?type=risk"]
        for path in pages:
            browser.get(server.url + path)
            with pytest.raises(NoAlertPresentException):
                browser.switch_to.alert.text  # noqa: B018 (no alert opened)
            assert browser.execute_script("return document.documentElement.dataset.pwned") is None, path
            assert browser.execute_script("return document.scripts.length") == 0, path
            assert browser.execute_script("return document.querySelectorAll('img, iframe, b').length") == 0, path
            assert browser.find_element(By.TAG_NAME, "body").is_displayed()
        browser.get(server.url + "/")
        assert EVIL_ORG in browser.find_element(By.CSS_SELECTOR, "table.activity tbody th").text
        browser.get(server.url + "/dashboard/landscape?top=15")
        texts = [e.get_attribute("textContent") for e in
                 browser.find_elements(By.CSS_SELECTOR, 'figure[data-chart="threats"] table.numbers tbody th')]
        assert sorted(texts) == sorted(PAYLOADS)  # the payloads show as text
        svg_text = browser.find_element(By.CSS_SELECTOR, 'figure[data-chart="threats"] svg').get_attribute("textContent")
        assert '<svg onload="document.documentElement' in svg_text
        assert len(bars(browser, "threats")) == len(PAYLOADS)
        browser.get(server.url + "/dashboard/explorer?type=risk")
        follow(browser, browser.find_element(By.CSS_SELECTOR, "table.stats tbody td a"))
        assert json.loads(browser.find_element(By.CSS_SELECTOR, "pre.json").text) == {"note": PAYLOADS}
        assert browser.execute_script("return document.documentElement.dataset.pwned") is None
        no_csp_violation(browser)
        browser.delete_all_cookies()
    finally:
        server.kill()
