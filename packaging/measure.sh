#!/usr/bin/env bash
# Measure the standalone binary: size, time from exec to first answered
# request, resident memory idle, with an empty database and with 100k stats.
#
#   packaging/measure.sh [BINARY] [RUNS]      # defaults: dist/statsd 5
#   STATSD_MEASURE_STATS=100000 STATSD_MEASURE_VENV=1 packaging/measure.sh
#   STATSD_MEASURE_STATS=0 packaging/measure.sh   # empty database only
#
# STATSD_MEASURE_VENV=1 adds the same figures for `python statsd.py serve`
# from .venv, for comparison. Everything runs in a fresh temporary folder,
# with the binary alone and PATH=/usr/bin:/bin, on a free loopback port.
set -euo pipefail
cd "$(dirname "$0")/.."

BINARY=${1:-dist/statsd}
RUNS=${2:-5}
STATS=${STATSD_MEASURE_STATS:-100000}
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
[ -x "$BINARY" ] || { echo "measure.sh: no binary at $BINARY (run packaging/build.sh)" >&2; exit 1; }

exec "$PY" - "$BINARY" "$RUNS" "$STATS" "${STATSD_MEASURE_VENV:-0}" <<'PYTHON'
import hashlib, json, os, shutil, signal, socket, statistics, subprocess, sys, tempfile, time, uuid
import urllib.request
from pathlib import Path

binary, runs, n_stats, with_venv = os.path.abspath(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
repo = Path.cwd()
TOKEN = "measure-token-0123456789abcdef"
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_db(path, n):
    """A TinyDB file written directly: one admin organization, n stats of ~500 bytes of data."""
    stamp = "2026-01-01T00:00:00.000000"
    orgs = {"1": {"name": "o", "token_sha256": hashlib.sha256(TOKEN.encode()).hexdigest(),
                  "is_admin": True, "created_at": stamp, "updated_at": stamp}}
    stats = {}
    for i in range(1, n + 1):
        data = {"total": {"current": {"operational": i % 97, "strategic": i % 13, "compliance": i % 7},
                          "residual": {"operational": i % 31, "strategic": i % 5, "compliance": i % 3}},
                "risks": [{"uuid": str(uuid.UUID(int=(i * 7 + k) % 2**128)), "level": "high", "value": (i + k) % 25}
                          for k in range(3)],
                "threats": {"average": (i % 100) / 10, "max": i % 20, "labels": ["fire", "flood", "theft"]},
                "scales": {"impact": [0, 1, 2, 3, 4], "threat": [0, 1, 2, 3], "vulnerability": [0, 1, 2, 3, 4, 5]}}
        stats[str(i)] = {"id": f"{i:024x}", "uuid": str(uuid.uuid4()), "organization": "o", "type": "risk",
                         "anr": 1 + i % 10, "year": 2026, "month": 1 + i % 12, "data": data,
                         "created_at": stamp, "updated_at": stamp}
    try:
        import orjson
        raw = orjson.dumps({"organizations": orgs, "stats": stats})
    except ImportError:
        raw = json.dumps({"organizations": orgs, "stats": stats}, separators=(",", ":")).encode()
    Path(path).write_bytes(raw)
    return len(json.dumps(stats["1"]["data"], separators=(",", ":")))


def rss_kb(pid):
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except FileNotFoundError:
        pass
    return 0


def children(pid):
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def get(url, token=None):
    req = urllib.request.Request(url, headers={"X-API-KEY": token} if token else {})
    with opener.open(req, timeout=120) as r:
        return r.status, r.read()


def one_run(cmd, work, env, idle=2.0, query=False):
    port = free_port()
    (work / "statsd.toml").write_text(f'host = "127.0.0.1"\nport = {port}\nrate_limit = "300/15minutes"\n')
    url = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd + ["serve"], cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"server exited {proc.returncode}: {proc.stderr.read().decode()}")
        try:
            if get(url + "/")[0] == 200:
                break
        except OSError:
            time.sleep(0.002)
    startup = time.perf_counter() - t0
    result = {"startup_s": startup}
    if query:
        t = time.perf_counter()
        status, body = get(url + "/api/v2/stats/?_limit=100&month=3&_order_by=-anr", TOKEN)
        assert status == 200, status
        result["query_s"] = time.perf_counter() - t
    time.sleep(idle)
    kids = children(proc.pid)
    result["parent_rss_kb"] = rss_kb(proc.pid)
    result["child_rss_kb"] = sum(rss_kb(k) for k in kids)
    mei = [p for p in Path(env["TMPDIR"]).glob("_MEI*")]
    result["extracted_bytes"] = sum(f.stat().st_size for p in mei for f in p.rglob("*") if f.is_file())
    t = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    result["rc"] = proc.wait(300)
    result["stop_s"] = time.perf_counter() - t
    result["leftover_mei"] = len(list(Path(env["TMPDIR"]).glob("_MEI*")))
    return result


def series(label, cmd, db_file, env_extra, query=False):
    rows = []
    for i in range(runs):
        with tempfile.TemporaryDirectory(prefix="statsd-measure-") as tmp:
            tmp = Path(tmp)
            work, home, tdir = tmp / "work", tmp / "home", tmp / "tmp"
            for d in (work, home, tdir):
                d.mkdir()
            env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "TMPDIR": str(tdir), "LANG": "C.UTF-8", **env_extra}
            if db_file:
                shutil.copyfile(db_file, work / "statsd.json")
            else:
                subprocess.run(cmd + ["create-organization", "o", "--admin", "--token", TOKEN], cwd=work, env=env,
                               check=True, capture_output=True)
            rows.append(one_run(cmd, work, env, query=query))
    med = lambda k: statistics.median(r[k] for r in rows)
    print(f"\n== {label} ({runs} runs)")
    print("  exec -> first answered request: median %.3f s (runs: %s)" % (
        med("startup_s"), ", ".join("%.3f" % r["startup_s"] for r in rows)))
    if query:
        print("  first filtered+sorted list query: median %.3f s" % med("query_s"))
    p, c = med("parent_rss_kb"), med("child_rss_kb")
    if c:
        print(f"  idle VmRSS: server (child) {c / 1024:.1f} MiB + bootloader (parent) {p / 1024:.1f} MiB"
              f" = {(c + p) / 1024:.1f} MiB")
    else:
        print(f"  idle VmRSS: {p / 1024:.1f} MiB (one process)")
    if med("extracted_bytes"):
        print(f"  one-file extraction in TMPDIR while running: {med('extracted_bytes') / 1e6:.1f} MB")
    print("  SIGTERM -> exit: median %.3f s, exit codes %s, _MEI dirs left after exit: %d" % (
        med("stop_s"), sorted({r["rc"] for r in rows}), sum(r["leftover_mei"] for r in rows)))


size = os.path.getsize(binary)
print(f"binary: {binary}")
print(f"size: {size} bytes = {size / 1e6:.1f} MB ({size / 2**20:.1f} MiB)")
print(f"host: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}; python for the venv comparison: {sys.version.split()[0]}")

with tempfile.TemporaryDirectory(prefix="statsd-measure-db-") as dbdir:
    big = Path(dbdir) / "statsd-100k.json"
    t = time.perf_counter()
    data_bytes = make_db(big, n_stats) if n_stats else 0
    n_stats and print(f"generated {n_stats} stats ({data_bytes} bytes of `data` each): {big.stat().st_size / 1e6:.1f} MB"
          f" in {time.perf_counter() - t:.1f} s")

    venv_cmd = [str(repo / ".venv/bin/python"), str(repo / "statsd.py")]
    with tempfile.TemporaryDirectory(prefix="statsd-measure-bin-") as bindir:
        exe = Path(bindir) / "statsd"
        shutil.copyfile(binary, exe)
        exe.chmod(0o755)
        series("binary, empty database (one admin organization)", [str(exe)], None, {})
        if n_stats:
            series(f"binary, {n_stats} stats", [str(exe)], big, {}, query=True)
    if with_venv:
        series("python statsd.py (.venv), empty database", venv_cmd, None, {})
        if n_stats:
            series(f"python statsd.py (.venv), {n_stats} stats", venv_cmd, big, {}, query=True)
PYTHON
