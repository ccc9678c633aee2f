"""The standalone executable (PyInstaller, one-file), as a user on an offline host runs it.

Skipped unless STATSD_BINARY names a built binary (`make binary-test` builds
one and runs this file), so `make test` stays fast.

The binary is copied alone into an empty folder and run with nothing of
this project's Python around it: PATH=/usr/bin:/bin, no PYTHONPATH, no
virtual environment, HOME and TMPDIR in fresh empty folders, the working
directory elsewhere. The server listens on loopback only; when the host
allows unprivileged namespaces (`unshare -rn`), one more test runs it in a
network namespace that has nothing but loopback. Only subprocess and
urllib drive it; the database it leaves is read with plain TinyDB.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BINARY = os.environ.get("STATSD_BINARY")

pytestmark = pytest.mark.skipif(not BINARY, reason="set STATSD_BINARY to a built binary (make binary-test)")

RATE_LIMIT = 50  # per minute: small enough to reach 429 in a test
NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def source_version() -> str:
    match = re.search(r'^__version__ = "([^"]+)"', (ROOT / "statsd.py").read_text(), re.MULTILINE)
    return match.group(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Box:
    """A binary alone in bin/, run from work/ with HOME=home/ and TMPDIR=tmp/."""

    def __init__(self, root: Path, binary: str):
        self.root = root
        for name in ("bin", "work", "home", "tmp"):
            (root / name).mkdir(parents=True, exist_ok=True)
        self.bin_dir, self.work, self.home, self.tmp = (root / n for n in ("bin", "work", "home", "tmp"))
        self.exe = self.bin_dir / "statsd"
        if not self.exe.exists():
            shutil.copyfile(binary, self.exe)
            self.exe.chmod(0o755)
        # Nothing of this test's Python: no PYTHONPATH, no venv, no STATSD_*, no proxies.
        self.env = {"PATH": "/usr/bin:/bin", "HOME": str(self.home), "TMPDIR": str(self.tmp),
                    "LANG": "C.UTF-8"}

    def run(self, *args, check=True, timeout=60) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(self.exe), *args], cwd=self.work, env=self.env, check=False,
                              capture_output=True, text=True, timeout=timeout)
        if check:
            assert proc.returncode == 0, f"statsd {' '.join(args)} -> {proc.returncode}\n{proc.stderr}"
        return proc

    def write_config(self, port: int) -> None:
        (self.work / "statsd.toml").write_text(
            f'host = "127.0.0.1"\nport = {port}\nrate_limit = "{RATE_LIMIT}/minute"\n')

    def create_org(self, name: str, *flags: str) -> str:
        out = self.run("create-organization", name, *flags).stdout
        token = out.strip().splitlines()[-1]
        assert len(token) >= 16 and " " not in token, out
        return token

    def serve(self) -> Server:
        return Server(self)


class Server:
    """`statsd serve` from the box's working directory (config from ./statsd.toml)."""

    def __init__(self, box: Box):
        self.box = box
        port = int(re.search(r"port = (\d+)", (box.work / "statsd.toml").read_text()).group(1))
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(box.root / "serve.log", "ab")  # noqa: SIM115 (closed by stop/kill)
        self.started = time.monotonic()
        self.proc = subprocess.Popen([str(box.exe), "serve"], cwd=box.work, env=box.env,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        self.wait_ready()

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"statsd serve exited with {self.proc.returncode}:\n{self.output()}")
            try:
                with NO_PROXY_OPENER.open(self.url + "/", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.05)
        self.proc.kill()
        pytest.fail(f"statsd serve did not answer within {timeout}s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        return (self.box.root / "serve.log").read_text(errors="replace")

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int:
        """Signal the process we started (the one-file bootloader, which forwards it)."""
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self.log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def call(method: str, url: str, body=None, token: str | None = None):
    """-> (status, headers, decoded JSON body or None)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if token is not None:
        request.add_header("X-API-KEY", token)
    try:
        with NO_PROXY_OPENER.open(request, timeout=30) as r:
            status, headers, raw = r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        status, headers, raw = e.code, e.headers, e.read()
    return status, headers, (json.loads(raw) if raw else None)


def assert_rate_headers(headers, remaining: int | None = None) -> None:
    assert headers["X-Rate-Limit-Limit"] == str(RATE_LIMIT)
    left = int(headers["X-Rate-Limit-Remaining"])
    assert 0 <= left < RATE_LIMIT
    if remaining is not None:
        assert left == remaining
    reset = int(headers["X-Rate-Limit-Reset"])  # an absolute UTC epoch second
    assert time.time() - 5 <= reset <= time.time() + 65


def assert_error(body, status: int) -> None:
    assert isinstance(body, dict), body
    assert body["status_code"] == status and body["status"] == "failed"
    assert isinstance(body["error"], str) and body["error"]
    assert {"action", "target", "exception_msg", "exception_cls"} <= set(body)


def assert_left_nothing_behind(box: Box) -> None:
    """Nothing beside the binary, in HOME, or in the temp folder (the one-file _MEI dir is gone)."""
    assert sorted(p.name for p in box.bin_dir.iterdir()) == ["statsd"]
    assert list(box.home.iterdir()) == []
    assert list(box.tmp.iterdir()) == []


@pytest.fixture(scope="module")
def binary():
    path = Path(BINARY)
    assert path.is_file() and os.access(path, os.X_OK), f"STATSD_BINARY={BINARY} is not an executable file"
    return str(path)


@pytest.fixture
def box(tmp_path, binary):
    return Box(tmp_path, binary)


def test_version_and_help(box):
    assert box.run("--version").stdout.strip() == f"statsd {source_version()}"
    help_text = box.run("--help").stdout
    for command in ("serve", "create-organization", "list-organizations", "delete-organization"):
        assert command in help_text
    assert "--port" in box.run("serve", "--help").stdout
    bad = box.run("no-such-command", check=False)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
    assert_left_nothing_behind(box)


def test_organization_commands(box):
    token = box.create_org("acme", "--admin")
    given = box.create_org("beta", "--token", "0123456789abcdef-given")
    assert given == "0123456789abcdef-given"
    duplicate = box.run("create-organization", "acme", check=False)
    assert duplicate.returncode != 0 and "acme" in duplicate.stderr
    listing = box.run("list-organizations").stdout
    assert "acme" in listing and "beta" in listing and token not in listing
    box.run("delete-organization", "beta")
    assert "beta" not in box.run("list-organizations").stdout
    assert (box.work / "statsd.json").exists()
    assert_left_nothing_behind(box)


def test_serve_end_to_end(box):
    from tinydb import TinyDB

    box.write_config(free_port())
    admin = box.create_org("acme", "--admin")
    other = box.create_org("other")
    server = box.serve()
    try:
        api = server.url + "/api/v2"

        status, headers, body = call("POST", api + "/stats/", token=admin,
                                     body={"type": "risk", "anr": 1, "year": 2026, "month": 1,
                                           "data": {"total": {"current": 5}}})
        assert status == 201, body
        assert body["organization"] == "acme" and re.fullmatch(r"[0-9a-f]{24}", body["id"])
        assert headers["Location"].endswith(f"/api/v2/stats/{body['id']}/")
        assert_rate_headers(headers, remaining=RATE_LIMIT - 1)
        first = body["id"]

        status, headers, body = call("POST", api + "/stats", token=other,
                                     body=[{"type": "vulnerability", "data": [1, 2]},
                                           {"type": "threat", "data": None}])
        assert status == 201, body
        assert [s["organization"] for s in body["data"]] == ["other", "other"]
        assert_rate_headers(headers, remaining=RATE_LIMIT - 2)  # same client, same endpoint
        created = {first, *(s["id"] for s in body["data"])}

        status, headers, body = call("GET", api + "/stats/?_limit=10", token=admin)
        assert status == 200 and body["has_more"] is False
        assert {s["id"] for s in body["data"]} == created
        assert_rate_headers(headers, remaining=RATE_LIMIT - 1)  # a different endpoint

        status, _, body = call("GET", api + "/stats/?type=threat", token=other)
        assert status == 200 and [s["type"] for s in body["data"]] == ["threat"]
        status, _, body = call("GET", api + f"/stats/{first}/", token=admin)
        assert status == 200 and body["data"] == {"total": {"current": 5}}
        status, _, body = call("GET", api + f"/stats/{first}/", token=other)
        assert status == 404
        assert_error(body, 404)

        # Errors: a JSON error object, rate-limit headers included.
        status, headers, body = call("GET", api + "/stats/", token=None)
        assert status == 401
        assert_error(body, 401)
        assert body["error"] == "Unauthorized"
        assert_rate_headers(headers)
        status, headers, body = call("GET", api + "/stats/?_limit=-1", token=admin)
        assert status == 400 and "_limit" in body["error"]
        assert_error(body, 400)

        # Over the limit: 429 with Retry-After, and the handler does not run.
        for _ in range(RATE_LIMIT):
            status, headers, body = call("GET", api + "/stats/", token=admin)
            if status == 429:
                break
        assert status == 429
        assert_error(body, 429)
        assert int(headers["Retry-After"]) >= 0
        assert_rate_headers(headers, remaining=0)

        assert server.stop(signal.SIGTERM) == 0, server.output()
    finally:
        server.kill()

    # The stopped server left a database plain TinyDB reads, and nothing else anywhere.
    db = TinyDB(str(box.work / "statsd.json"))
    try:
        orgs = {d["name"]: d for d in db.table("organizations").all()}
        stats = db.table("stats").all()
    finally:
        db.close()
    assert set(orgs) == {"acme", "other"} and orgs["acme"]["is_admin"] is True
    assert admin not in json.dumps(orgs) and other not in json.dumps(orgs)  # hashes only
    assert {s["id"] for s in stats} == created
    assert {s["organization"] for s in stats} == {"acme", "other"}
    assert_left_nothing_behind(box)

    # A second run of the same binary on the same folders is not tripped by the first.
    server = box.serve()
    try:
        status, _, body = call("GET", server.url + "/api/v2/stats/", token=admin)
        assert status == 200 and {s["id"] for s in body["data"]} == created
        assert server.stop(signal.SIGINT) == 0, server.output()
    finally:
        server.kill()
    assert_left_nothing_behind(box)


def test_second_server_on_same_database_refused(box):
    box.write_config(free_port())
    box.create_org("acme", "--admin")
    server = box.serve()
    try:
        second = box.run("serve", "--port", str(free_port()), check=False, timeout=60)
        assert second.returncode != 0 and "in use" in second.stderr
        busy = box.run("create-organization", "late", check=False)
        assert busy.returncode != 0 and "in use" in busy.stderr
        assert server.stop() == 0, server.output()
    finally:
        server.kill()
    assert_left_nothing_behind(box)


def test_dashboard_pages_from_the_binary(box):
    """The binary carries the dashboard: templates, stylesheet, pygal and its CSS."""
    box.write_config(free_port())
    token = box.create_org("acme", "--admin")
    server = box.serve()
    try:
        threats = [{"uuid": f"00000000-0000-4000-8000-00000000000{i}", "label1": f"Menace {i}",
                    "label2": f"Threat {i}", "label3": "", "label4": "", "count": i, "maxRisk": 10 * i,
                    "averageRate": f"{i / 2}"} for i in range(1, 8)]
        status, _, body = call("POST", server.url + "/api/v1/stats/", token=token, body=[
            {"anr": "11111111-1111-4111-8111-111111111111", "type": "threat",
             "date": time.strftime("%Y-%m-%d"), "data": threats}])
        assert status == 201, body
        browser = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}  # (curl and scripts get JSON at /)
        with NO_PROXY_OPENER.open(urllib.request.Request(server.url + "/", headers=browser),
                                  timeout=30) as r:  # a browser is sent to log in
            assert r.status == 200 and r.url.startswith(server.url + "/dashboard/login")
            assert "API key" in r.read().decode()
        login = urllib.request.Request(server.url + "/dashboard/login", method="POST",
                                       data=urllib.parse.urlencode({"api_key": token, "next": "/"}).encode(),
                                       headers={"Origin": server.url})
        no_redirect = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())
        try:
            no_redirect.open(login, timeout=30)
            pytest.fail("the login did not redirect")
        except urllib.error.HTTPError as e:
            assert e.code == 303, e.read()
            cookie = e.headers["Set-Cookie"].split(";")[0]
        assert token not in cookie
        pages = {"/": "Overview", "/dashboard/landscape?top=5&by=count": "Top 5 threats",
                 "/dashboard/evolution": "Evolution", "/dashboard/explorer": "Explorer"}
        for path, text in pages.items():
            request = urllib.request.Request(server.url + path,
                                             headers={**browser, "Cookie": cookie, "Accept-Language": "en"})
            with NO_PROXY_OPENER.open(request, timeout=30) as r:
                html = r.read().decode()
                assert r.status == 200 and r.headers["Content-Type"].startswith("text/html"), path
                assert "default-src 'none'" in r.headers["Content-Security-Policy"]
            assert text in html, path
            assert ("<svg" in html) == (path != "/dashboard/explorer"), path
            assert "<script" not in html
        request = urllib.request.Request(server.url + "/dashboard/landscape?top=5",
                                         headers={"Cookie": cookie, "Accept-Language": "en-GB,en;q=0.9"})
        with NO_PROXY_OPENER.open(request, timeout=30) as r:
            html = r.read().decode()
        threats_chart = html.split('data-chart="threats"')[1].split("</figure>")[0]
        assert threats_chart.count('<g class="bar">') == 5 and "Threat 7" in threats_chart
        assert "#chart-" in threats_chart  # pygal's stylesheet, read from its data files, is in the SVG
        with NO_PROXY_OPENER.open(server.url + "/dashboard/static/dashboard.css", timeout=30) as r:
            assert r.status == 200 and "font-family" in r.read().decode()
        assert server.stop() == 0, server.output()
    finally:
        server.kill()
    assert_left_nothing_behind(box)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


# ------------------------------------------------------------ no network ---

def _unshare_works() -> bool:
    unshare = shutil.which("unshare")
    if not unshare or not sys.platform.startswith("linux"):
        return False
    try:
        return subprocess.run([unshare, "-rn", "true"], check=False, capture_output=True,
                              timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _loopback_up() -> None:
    """Bring `lo` up in a fresh network namespace (SIOCGIFFLAGS / SIOCSIFFLAGS)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifreq = struct.pack("16sH22x", b"lo", 0)
        flags = struct.unpack("16sH22x", fcntl.ioctl(s, 0x8913, ifreq))[1]
        fcntl.ioctl(s, 0x8914, struct.pack("16sH22x", b"lo", flags | 0x1))


def netns_driver(root: str) -> None:
    """Run inside `unshare -rn`: the binary on a host with no network but loopback."""
    interfaces = [line.split(":")[0].strip() for line in Path("/proc/net/dev").read_text().splitlines()[2:]]
    assert interfaces == ["lo"], interfaces
    _loopback_up()
    box = Box(Path(root), str(Path(root) / "bin" / "statsd"))
    box.write_config(free_port())
    token = box.create_org("acme", "--admin")
    server = box.serve()
    try:
        status, headers, body = call("POST", server.url + "/api/v2/stats/", token=token,
                                     body={"type": "risk", "data": {"x": 1}})
        assert status == 201, body
        assert_rate_headers(headers)
        assert server.stop() == 0, server.output()
    finally:
        server.kill()
    print("NETNS-OK")


@pytest.mark.skipif(not _unshare_works(), reason="unprivileged network namespaces (unshare -rn) unavailable")
def test_runs_without_network(box):
    result = subprocess.run(["unshare", "-rn", sys.executable, __file__, "--netns-driver", str(box.root)],
                            check=False, capture_output=True, text=True, timeout=180,
                            env={**os.environ, "STATSD_BINARY": str(box.exe)})
    assert result.returncode == 0 and "NETNS-OK" in result.stdout, result.stdout + result.stderr
    assert_left_nothing_behind(box)


def test_binary_is_self_contained(binary):
    """One regular executable file; it links only system libraries, nothing from a venv or pyenv."""
    mode = os.stat(binary).st_mode
    assert stat.S_ISREG(mode) and mode & stat.S_IXUSR
    ldd = shutil.which("ldd")
    if ldd:
        out = subprocess.run([ldd, binary], check=False, capture_output=True, text=True).stdout
        assert "not found" not in out
        assert "python" not in out.lower(), out


if __name__ == "__main__" and sys.argv[1:2] == ["--netns-driver"]:
    netns_driver(sys.argv[2])
