"""Shared fixtures: an app on a real database file, organizations, a real server process."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import statsd

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def db_path(tmp_path):
    return str(tmp_path / "statsd.json")


@pytest.fixture
def make_client(aiohttp_client, db_path):
    """make_client(**config) -> a test client on a fresh app (rate limiting off unless given)."""
    async def make(**settings):
        settings.setdefault("database", db_path)
        settings.setdefault("rate_limit", "")
        config = statsd.Config(**settings)
        config.validate()
        return await aiohttp_client(statsd.create_app(config))
    return make


async def new_org(client, name, admin=False, token=None):
    """Create an organization through the app's real store; return its token."""
    store = client.app[statsd.STORE_KEY]
    doc, token = statsd.new_organization(store, name, token, admin)
    await store.commit([("organizations", doc["name"], doc)])
    return token


def key(token):
    return {"X-API-KEY": token}


async def whole_list(api, path, token=None):
    """Every record of a list route on one page, as the key (by default the admin's) sees it."""
    resp = await api.get(path, params={"_limit": "1000"}, headers=key(token or api.admin))
    assert resp.status == 200
    body = await resp.json()
    assert body["has_more"] is False
    return body["data"]


@pytest.fixture
async def api(make_client):
    """A client with an admin organization and two ordinary ones (CASES, OTHER)."""
    client = await make_client()
    client.admin = await new_org(client, "admin", admin=True)
    client.cases = await new_org(client, "CASES")
    client.other = await new_org(client, "OTHER")
    return client


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PortTaken(RuntimeError):
    """The port picked for a server was taken by another process."""


class ServerProcess:
    """`python statsd.py serve` as a real process on loopback."""

    def __init__(self, database, env=None, args=()):
        self.database = str(database)
        self._port = free_port()
        self.port_fixed = False
        self.env = {**os.environ, "STATSD_RATE_LIMIT": "", **(env or {})}
        self.args = list(args)
        self.proc = None

    @property
    def port(self):
        return self._port

    @port.setter
    def port(self, value):
        """A port set by a test is kept: a retry on another port would miss what it tests."""
        self._port, self.port_fixed = value, True

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout=20):
        """Start and wait until this process answers; another free port if the one picked was
        taken meanwhile (free_port cannot reserve it), unless a test chose the port."""
        for attempt in range(3):
            try:
                return self._start(timeout)
            except PortTaken:
                self.kill()
                if self.port_fixed or attempt == 2:
                    raise
                self._port = free_port()

    def _start(self, timeout):
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "statsd.py"), "serve", "--database", self.database,
             "--port", str(self.port), *self.args],
            env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                error = self.proc.stderr.read().decode()
                if "address already in use" in error:
                    raise PortTaken(error)
                raise RuntimeError(f"server exited: {error}")
            try:
                urllib.request.urlopen(self.url + "/", timeout=1).read()
            except OSError:
                time.sleep(0.05)
                continue
            if self._holds_lock():
                return self
            raise PortTaken(f"another process answers on port {self.port}")
        raise RuntimeError("server did not answer in time")

    def _holds_lock(self):
        """Whether the answering server is this process (its pid is in DATABASE.lock)."""
        try:
            with open(self.database + ".lock") as f:
                return f.read().strip() == str(self.proc.pid)
        except OSError:
            return False

    def kill(self, sig=signal.SIGKILL, timeout=20):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout)
        return self.proc.returncode

    def stop(self):
        return self.kill(signal.SIGTERM)


@pytest.fixture
def server(tmp_path):
    """server(env=..., args=...) -> a started ServerProcess; all are killed at teardown."""
    started = []

    def start(database=None, **kwargs):
        proc = ServerProcess(database or tmp_path / "statsd.json", **kwargs).start()
        started.append(proc)
        return proc
    yield start
    for proc in started:
        proc.kill()


def cli(*args, env=None, cwd=None, timeout=60):
    """Run `python statsd.py ARGS`; return the CompletedProcess."""
    return subprocess.run([sys.executable, str(ROOT / "statsd.py"), *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, cwd=cwd, timeout=timeout)


ERROR_CLASSES = {400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound",
                 405: "MethodNotAllowed", 409: "Conflict", 413: "RequestEntityTooLarge",
                 415: "UnsupportedMediaType", 426: "UpgradeRequired", 429: "TooManyRequests",
                 500: "InternalServerError", 503: "ServiceUnavailable", 507: "InsufficientStorage"}


async def assert_error_object(resp, status, target):
    """Assert `resp` is the JSON error object of issue 2 with `status`; return its body."""
    assert resp.status == status, f"{resp.status}: {await resp.text()}"
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert isinstance(body, dict)
    assert body["status"] == "failed"
    assert body["action"] == resp.method
    assert body["target"] == target
    assert body["status_code"] == status
    assert isinstance(body["error"], str) and body["error"]
    assert body["exception_msg"] == body["error"]
    assert body["exception_cls"] == ERROR_CLASSES[status]  # written out here, not taken from statsd
    assert "Traceback" not in body["error"]
    return body
