"""Run the statsd benchmark: statsd vs json-server 0.17.4 vs a bare aiohttp app.

    python bench/bench.py [--sizes 1000,100000] [--duration 10] [--quick]

Expects the files of bench/gen.py in bench/.data/, wrk on the PATH and
json-server in bench/.peer/ (bench/run.sh sees to all three).  Every server
listens on 127.0.0.1 only and is stopped on the way out.  Prints one table
and writes it, with the machine's details, to bench/results.md.
"""
import argparse
import datetime as dt
import http.client
import json
import os
import platform
import py_compile
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DATA = os.path.join(HERE, ".data")
RUN = os.path.join(HERE, ".run")
PIDS = os.path.join(RUN, "pids")  # read by run.sh's EXIT trap, should this script die
JSON_SERVER = os.path.join(HERE, ".peer", "node_modules", ".bin", "json-server")
LUA = os.path.join(HERE, "request.lua")
ORG = "org-07"
V8_MAX_STRING = (1 << 29) - 24  # node 20 cannot hold a longer string: json-server cannot read a longer file

# (name, method, statsd path, json-server path); "{id}" cycles through ids-N.txt.
# json-server 0.17.4 has no _gt, and drops a filter it does not know (so
# data.score_gt=2 would return every stat): data.score_gte=2.01 is the same
# filter there, since scores have two decimals and are all <= 2.
SCENARIOS = [
    ("get by id", "GET", "/api/v2/stats/{id}/", "/stats/{id}"),
    ("type=risk, limit 10", "GET", "/api/v2/stats/?type=risk&_limit=10", "/stats?type=risk&_limit=10"),
    ("org+type+month>=6, limit 10", "GET",
     f"/api/v2/stats/?organization={ORG}&type=risk&month__gte=6&_limit=10",
     f"/stats?organization={ORG}&type=risk&month_gte=6&_limit=10"),
    ("data.score>2 (full scan, 0 hits)", "GET", "/api/v2/stats/?data__score__gt=2", "/stats?data.score_gte=2.01"),
    ("POST 1 stat", "POST", "/api/v2/stats/", "/stats"),
]


# ------------------------------------------------------------ processes ---

class Server:
    """A server process of ours: started in its own session, stopped by pid."""

    def __init__(self, name: str, cmd: list, port: int, env=None):
        self.name, self.port = name, port
        os.makedirs(os.path.join(RUN, "logs"), exist_ok=True)
        self.log_path = os.path.join(RUN, "logs", f"{name}.log")
        self.log = open(self.log_path, "ab")
        self.log.write(f"\n=== {dt.datetime.now().isoformat()} {' '.join(cmd)}\n".encode())
        self.log.flush()
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log,
                                     env=env, cwd=RUN, start_new_session=True)
        with open(PIDS, "a") as f:
            f.write(f"{self.proc.pid}\n")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def cpu_ticks(self) -> int:
        """User + system CPU time used so far, in clock ticks (0 once it has exited)."""
        try:
            with open(f"/proc/{self.proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            return 0

    def wait_idle(self, quiet: float = 0.5, timeout: float = 60) -> None:
        """Wait until it has used no CPU for `quiet` seconds (a backlog wrk left behind is done)."""
        deadline = time.monotonic() + timeout
        last = self.cpu_ticks()
        while time.monotonic() < deadline:
            time.sleep(quiet)
            now = self.cpu_ticks()
            if now == last:
                return
            last = now

    def rss_mb(self):
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            return None

    def wait_ready(self, path: str, headers: dict, timeout: float) -> float:
        """Seconds from exec to the first HTTP answer on `path` (any status)."""
        deadline = self.started + timeout
        while time.perf_counter() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log_path}")
            try:
                status, _ = call(self.port, "GET", path, headers=headers, timeout=5)
                elapsed = time.perf_counter() - self.started
                if status >= 500:
                    raise RuntimeError(f"{self.name} answered {status} on {path}; see {self.log_path}")
                return elapsed
            except OSError:
                time.sleep(0.005)
        self.stop()
        raise RuntimeError(f"{self.name} did not answer within {timeout:.0f} s; see {self.log_path}")

    def stop(self, timeout: float = 120):
        """SIGTERM, then SIGKILL after `timeout` s; returns seconds to exit (None if killed)."""
        took = None
        if self.alive():
            t0 = time.perf_counter()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
                took = time.perf_counter() - t0
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
        return took


SERVERS: list = []


def start(name: str, cmd: list, port: int, env=None) -> Server:
    server = Server(name, cmd, port, env)
    SERVERS.append(server)
    return server


def stop_all() -> None:
    for server in SERVERS:
        if server.alive():
            server.stop(timeout=30)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(port: int, method: str, path: str, body: bytes = None, headers=None, timeout: float = 120):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()



# ------------------------------------------------------------------ wrk ---

UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0, "h": 3600000.0}


def wrk(port: int, method: str, paths: list, body_file: str, key: str, args) -> dict:
    """One wrk run; returns req/s, p50/p99 in ms, and any errors."""
    paths_file = os.path.join(RUN, "paths.txt")
    with open(paths_file, "w") as f:
        f.write("\n".join(paths) + "\n")
    cmd = ["wrk", f"-t{args.threads}", f"-c{args.connections}", f"-d{args.duration}s", "--latency",
           "--timeout", f"{args.wrk_timeout}s", "-s", LUA, f"http://127.0.0.1:{port}{paths[0]}",
           "--", method, paths_file, body_file or "-", key or "-"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.duration + args.wrk_timeout + 30)
    text = out.stdout + out.stderr
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if out.returncode or not m:
        raise RuntimeError(f"wrk failed: {' '.join(cmd)}\n{text}")
    lat = {p: float(v) * UNITS[u] for p, v, u in re.findall(r"^\s+(50|99)%\s+([\d.]+)(\w+)", text, re.M)}
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    return {"rps": float(m.group(1)), "p50": lat.get("50"), "p99": lat.get("99"),
            "requests": int(re.search(r"(\d+) requests in", text).group(1)),
            "non2xx": int(non2xx.group(1)) if non2xx else 0,
            "socket_errors": sum(map(int, sock.groups())) if sock else 0}


# ---------------------------------------------------------------- steps ---

def statsd_cmd(args) -> list:
    if args.statsd:
        return args.statsd.split()
    script = os.path.join(os.path.dirname(sys.executable), "statsd")
    if os.path.exists(script):
        return [script]
    return [sys.executable, os.path.join(ROOT, "statsd.py")]


def statsd_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STATSD_")}
    env["STATSD_RATE_LIMIT"] = ""  # rate limiting off; API keys stay on
    return env


def start_statsd(args, db: str, label: str, ready_path: str, key: str, size: int):
    port = free_port()
    server = start(f"statsd-{label}", statsd_cmd(args) + ["serve", "--database", db, "--host", "127.0.0.1",
                                                          "--port", str(port)], port, statsd_env())
    return server, server.wait_ready(ready_path, {"X-API-KEY": key}, timeout=60 + size / 1000)


def fresh_copy(size: int, kind: str, tag: str = "") -> str:
    """A working copy of a generated database, and no lock or journal beside it."""
    dst = os.path.join(RUN, f"{kind}-{size}{tag}.json")
    remove_copy(dst)
    shutil.copyfile(os.path.join(DATA, f"{kind}-{size}.json"), dst)
    return dst


def remove_copy(path: str) -> None:
    for extra in ("", ".lock", ".journal", ".tmp"):
        if os.path.exists(path + extra):
            os.remove(path + extra)


def check(port: int, method: str, path: str, key: str, body: bytes, want_id: str):
    """One request before wrk: (ok, note).  Lists report how many stats came back."""
    headers = {"X-API-KEY": key} if key else {}
    if body:
        headers["Content-Type"] = "application/json"
    try:
        status, raw = call(port, method, path, body, headers)
    except OSError as e:
        return False, f"{type(e).__name__}"
    if status != (201 if method == "POST" else 200):
        first = raw.decode(errors="replace").strip().splitlines()[:1] or [""]
        return False, f"HTTP {status} ({first[0][:100]})"
    try:
        doc = json.loads(raw)
    except ValueError:
        return False, "not JSON"
    items = doc.get("data", doc) if isinstance(doc, dict) else doc
    if want_id and want_id.encode() not in raw:
        return False, f"HTTP {status} without the id asked for"
    return True, f"{len(items)} stats" if isinstance(items, list) else "1 stat"


def sequential(port: int, method: str, path: str, body: bytes, key: str, count: int) -> float:
    """Median milliseconds of `count` requests sent one after another."""
    times = []
    headers = {"X-API-KEY": key, "Content-Type": "application/json"}
    for _ in range(count):
        t0 = time.perf_counter()
        status, raw = call(port, method, path, body, headers)
        times.append((time.perf_counter() - t0) * 1000)
        if status not in (200, 201):
            raise RuntimeError(f"{method} {path}: HTTP {status}: {raw[:200]!r}")
    return statistics.median(times)


def file_bytes(size: int) -> int:
    return json.load(open(os.path.join(DATA, f"meta-{size}.json")))["bytes"]


def mem_available_mb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return float("inf")


def bench_size(size: int, args, key: str, ceiling: Server, rows: list, extras: dict, notes: list) -> None:
    ids = [line.strip() for line in open(os.path.join(DATA, f"ids-{size}.txt")) if line.strip()]
    one = os.path.join(DATA, "post-one.json")
    one_body = open(one, "rb").read()
    batch_body = open(os.path.join(DATA, "post-batch.json"), "rb").read()
    ready = f"/api/v2/stats/{ids[0]}/"
    ex = extras.setdefault(size, {})

    # Startup: exec to first answered request, on a fresh copy each time.
    times, loads = [], []
    for n in range(args.startup_runs):
        db = fresh_copy(size, "statsd", "-startup")
        server, took = start_statsd(args, db, f"{size}-startup{n}", ready, key, size)
        times.append(took)
        server.stop()
        remove_copy(db)
        logged = re.findall(r"loaded in ([\d.]+) s", open(server.log_path, errors="replace").read())
        if logged:  # statsd's own figure: load and journal replay, without starting Python
            loads.append(float(logged[-1]))
    ex["startup"] = statistics.median(times)
    ex["load"] = statistics.median(loads) if loads else None
    print(f"  statsd startup on {size:,} stats: {', '.join(f'{t:.2f}' for t in times)} s"
          f" (load and replay: {', '.join(f'{t:.2f}' for t in loads) or 'not logged'} s)", flush=True)

    statsd, _ = start_statsd(args, fresh_copy(size, "statsd"), str(size), ready, key, size)
    js = None
    js_file = os.path.join(DATA, f"jsonserver-{size}.json")
    try:
        if os.path.getsize(js_file) > V8_MAX_STRING:
            raise RuntimeError(f"its file ({os.path.getsize(js_file) / 2**20:,.0f} MiB) is longer than the"
                               " longest string node can read (512 MiB)")
        port = free_port()
        js = start(f"json-server-{size}", [JSON_SERVER, "--quiet", "--host", "127.0.0.1", "--port", str(port),
                                           fresh_copy(size, "jsonserver")], port)
        took = js.wait_ready(f"/stats/{ids[0]}", {}, timeout=60 + size / 2000)
        print(f"  json-server up on {size:,} stats in {took:.1f} s", flush=True)
    except RuntimeError as e:
        notes.append(f"{size:,}: json-server not run: {e}")
        print(f"  {notes[-1]}", flush=True)
        js = None

    ex["ceiling"] = {"GET": [], "POST": []}

    for name, method, s_path, j_path in SCENARIOS:
        if method == "POST":  # reads are done: measure memory, then one POST at a time
            ex["rss"] = statsd.rss_mb()
            ex["rss_js"] = js.rss_mb() if js else None
            for server in (statsd, js):  # json-server may still be working off wrk's last requests
                if server:
                    server.wait_idle()
            ex["post_seq"] = sequential(statsd.port, "POST", s_path, one_body, key, args.seq_posts)
        body = one if method == "POST" else None
        # The ceiling runs right before statsd's row, so that both see the machine in the same state.
        ceiling_rps = wrk(ceiling.port, method, ["/api/v2/stats/"], body, None, args)["rps"]
        ex["ceiling"][method].append(ceiling_rps)
        row = {"scenario": name, "size": size, "ceiling": ceiling_rps}
        for target, server, path, k in (("statsd", statsd, s_path, key), ("js", js, j_path, None)):
            if server is None:
                row[target] = None
                continue
            paths = [path.format(id=i) for i in ids] if "{id}" in path else [path]
            ok, what = check(server.port, method, paths[0], k, one_body if body else None,
                             ids[0] if "{id}" in path else None)
            row[target + "_check"] = what
            if not ok:
                row[target] = {"failed": what}
                notes.append(f"{size:,} {name}: {'statsd' if target == 'statsd' else 'json-server'}"
                             f" answered {what}; not run")
                continue
            row[target] = wrk(server.port, method, paths, body, k, args)
        rows.append(row)
        checks = f"statsd: {row.get('statsd_check')}, json-server: {row.get('js_check')}"
        print("  " + " | ".join(fmt_row(row)) + f"   ({checks})", flush=True)
        if row["statsd"] and row["js"] and "failed" not in row["statsd"] and "failed" not in row["js"] \
                and row["statsd_check"] != row["js_check"]:
            notes.append(f"{size:,} {name}: the answers differ ({checks})")

    for server in (statsd, js):  # json-server may still be writing its file for wrk's last POSTs
        if server:
            server.wait_idle()
    ex["batch"] = sequential(statsd.port, "POST", "/api/v2/stats/", batch_body, key, args.batch_runs)
    ex["stop"] = statsd.stop()
    if js:
        js.stop()
    for kind in ("statsd", "jsonserver"):
        remove_copy(os.path.join(RUN, f"{kind}-{size}.json"))
    stop = f"{ex['stop']:.2f} s" if ex["stop"] is not None else "killed after 120 s"
    print(f"  batch of 1,000: {ex['batch']:.0f} ms; statsd RSS {ex['rss']:,.0f} MB; stop after writes {stop}",
          flush=True)


# --------------------------------------------------------------- output ---

def rate(r) -> str:
    if r is None:
        return "n/a"
    if "failed" in r:
        return "fails"
    v = r["rps"]
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


def spread(values: list) -> str:
    if not values:
        return "n/a"
    low, high = min(values), max(values)
    return f"{low:,.0f}" if round(low) == round(high) else f"{low:,.0f}-{high:,.0f}"


def ms(v) -> str:
    if v is None:
        return "n/a"
    return f"{v:.2f}" if v < 10 else f"{v:.1f}" if v < 100 else f"{v:,.0f}"


def ratio(a, b) -> str:
    if not a or not b or "failed" in a or "failed" in b or not b["rps"]:
        return "n/a"
    v = a["rps"] / b["rps"]
    return f"{v:.2g}x" if v < 0.1 else f"{v:.2f}x" if v < 10 else f"{v:,.0f}x"


HEADER = ["scenario", "size", "statsd req/s", "p50 ms", "p99 ms", "json-server req/s", "vs json-server",
          "vs ceiling"]


def fmt_row(row) -> list:
    s, j = row["statsd"], row["js"]
    flag = ""
    for r in (s, j):
        if r and "failed" not in r and (r["non2xx"] or r["socket_errors"]):
            flag = " *"
    return [row["scenario"] + flag, f"{row['size']:,}", rate(s),
            ms(s and s.get("p50")), ms(s and s.get("p99")), rate(j), ratio(s, j),
            ratio(s, {"rps": row["ceiling"]})]


def table(lines: list, markdown: bool) -> str:
    widths = [max(len(str(x[i])) for x in [HEADER] + lines) for i in range(len(HEADER))]
    right = [False] + [True] * (len(HEADER) - 1)

    def fmt(cells):
        out = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)]
        return "| " + " | ".join(out) + " |" if markdown else "  ".join(out)

    if markdown:
        sep = "|" + "|".join("-" * (w + 1) + ":" if r else "-" * (w + 2) for w, r in zip(widths, right)) + "|"
    else:
        sep = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(HEADER), sep] + [fmt(x) for x in lines])


def machine() -> dict:
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break

    def version(cmd):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
            return (out.stdout + out.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "unknown"

    return {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "nproc": os.cpu_count(),
            "cpu": cpu, "python": platform.python_version(), "wrk": version(["wrk", "-v"]).split(" [")[0],
            "node": version(["node", "--version"]), "json-server": version([JSON_SERVER, "--version"])}


def report(rows, extras, notes, args) -> str:
    m = machine()
    sizes = sorted(extras)
    lines = [fmt_row(r) for r in rows]
    out = [f"Benchmark of {m['date']}: {m['nproc']} CPUs ({m['cpu']}), Python {m['python']},"
           f" {m['wrk']}, node {m['node']}, json-server {m['json-server']}.",
           f"`wrk -t{args.threads} -c{args.connections} -d{args.duration}s --latency` per row, one row after"
           f" another on 127.0.0.1; statsd with API keys on and rate limiting off"
           f" (`STATSD_RATE_LIMIT=\"\"`); json-server on the same records. \"vs ceiling\" is statsd's"
           f" req/s over a bare aiohttp app's (bench/ceiling.py), run with the same method just before"
           f" statsd's row.", "",
           table(lines, markdown=True), ""]
    out += ["Ceiling (bench/ceiling.py) req/s, range over the rows: " + "; ".join(
        f"{s:,} run: GET {spread(extras[s]['ceiling']['GET'])}, POST {spread(extras[s]['ceiling']['POST'])}"
        for s in sizes if "ceiling" in extras[s]) + ".", ""]
    if any(r[0].endswith(" *") for r in lines):
        out += ["\\* wrk saw non-2xx answers or socket errors in this row.", ""]
    ex_header = ["size", "DB file MB", "startup s (median)", "load+replay s (median)", "RSS MB after reads (json-server)",
                 "POST 1 ms (sequential median)", "POST 1,000 ms (median)", "stop after writes s"]
    ex_rows = []
    for size in sizes:
        e = extras[size]
        if "startup" not in e:
            continue
        meta = json.load(open(os.path.join(DATA, f"meta-{size}.json")))
        ex_rows.append([f"{size:,}", f"{meta['bytes'] / 1e6:,.0f}", f"{e.get('startup', 0):.2f}",
                        f"{e['load']:.2f}" if e.get("load") is not None else "n/a",
                        f"{e['rss']:,.0f} ({e['rss_js']:,.0f})" if e.get("rss_js") else f"{e.get('rss', 0):,.0f}",
                        ms(e.get("post_seq")), ms(e.get("batch")),
                        f"{e['stop']:.2f}" if e.get("stop") is not None else "killed"])
    widths = [max(len(x[i]) for x in [ex_header] + ex_rows) for i in range(len(ex_header))]
    out += ["statsd alone (startup: exec to first answered GET, median of"
            f" {args.startup_runs}; load+replay: the part of it statsd logs as loading the file and"
            f" replaying the journal, without starting Python and importing; POST 1,000: one list of 1,000 stats, median of {args.batch_runs}):", "",
            "| " + " | ".join(h.ljust(w) for h, w in zip(ex_header, widths)) + " |",
            "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"]
    out += ["| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |" for r in ex_rows]
    if len(sizes) > 1 and all(extras[s].get("post_seq") for s in sizes):
        a = sizes[0]
        out += ["", "POST cost vs " + f"{a:,} stats (ratio of the sequential medians): " + ", ".join(
            f"{b:,}: {extras[b]['post_seq'] / extras[a]['post_seq']:.2f}x" for b in sizes[1:]) + "."]
    out += ["", "Notes:",
            "- The read rows run before any write; the POST rows after, so they add stats to the file.",
            "- json-server 0.17.4 has no `_gt` and ignores filters it does not know (`data.score_gt=2`"
            " would return every stat): its full-scan row uses `data.score_gte=2.01`, the same filter"
            " on these data (scores have two decimals and are all <= 2).",
            "- json-server rewrites its whole file, pretty-printed, on every write; once that text would pass"
            " V8's longest string (about 512 MiB) every write fails with HTTP 500 (RangeError: Invalid string"
            " length), and its POST row says \"fails\"."]
    out += [f"- {n}" for n in notes]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default=os.environ.get("BENCH_SIZES", "1000,100000"))
    p.add_argument("--duration", type=int, default=int(os.environ.get("BENCH_DURATION", 0) or 0) or None,
                   help="seconds per wrk run (default 10, or 2 with --quick)")
    p.add_argument("--quick", action="store_true", default=os.environ.get("BENCH_QUICK", "") not in ("", "0"),
                   help="smoke test: short runs, fewer repeats")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--wrk-timeout", type=int, default=30, help="wrk --timeout, seconds")
    p.add_argument("--statsd", help="command that runs statsd (default: the venv's statsd, or statsd.py)")
    p.add_argument("--out", default=os.path.join(HERE, "results.md"))
    p.add_argument("--token", default=None, help="admin API key (default: the one in meta-N.json)")
    args = p.parse_args(argv)
    args.duration = args.duration or (2 if args.quick else 10)
    args.startup_runs, args.batch_runs, args.seq_posts = (1, 3, 20) if args.quick else (3, 10, 100)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]

    os.makedirs(RUN, exist_ok=True)
    open(PIDS, "w").close()
    if not args.statsd:
        # An installed statsd runs from bytecode; with PYTHONDONTWRITEBYTECODE set (CI, containers)
        # every start would compile statsd.py first, which is not what startup here measures.
        py_compile.compile(os.path.join(ROOT, "statsd.py"), doraise=True)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: sys.exit(128 + 15))
    rows, extras, notes = [], {}, []
    try:
        port = free_port()
        ceiling = start("ceiling", [sys.executable, os.path.join(HERE, "ceiling.py"), str(port)], port)
        ceiling.wait_ready("/", {}, timeout=30)
        for size in sizes:
            meta = json.load(open(os.path.join(DATA, f"meta-{size}.json")))
            key = args.token or meta["admin_token"]
            # Skip a size this machine cannot hold: statsd's RSS per byte of file (measured on the
            # largest size run, else about 4.5), plus one more file's worth for writing it back.
            done = [s for s in extras if extras[s].get("rss")]
            per_byte = 4.5 if not done else extras[max(done)]["rss"] * 2**20 / file_bytes(max(done))
            need = (per_byte + 1) * meta["bytes"] / 2**20
            if need > 0.9 * mem_available_mb():
                notes.append(f"{size:,} stats skipped: statsd would need about {need:,.0f} MB"
                             f" and {mem_available_mb():,.0f} MB are available")
                print(notes[-1], flush=True)
                continue
            print(f"== {size:,} stats ({meta['bytes'] / 1e6:,.0f} MB)", flush=True)
            try:
                bench_size(size, args, key, ceiling, rows, extras, notes)
            except RuntimeError as e:  # e.g. a server that did not come up: report the sizes done
                notes.append(f"{size:,} stats: stopped early: {e}")
                print(notes[-1], flush=True)
            stop_all_but(ceiling)
    finally:
        stop_all()
    text = report(rows, extras, notes, args)
    with open(args.out, "w") as f:
        f.write(text)
    print("\n" + text)
    rel = os.path.relpath(args.out)
    print(f"written to {args.out if rel.startswith('..') else rel}")
    return 0


def stop_all_but(keep: Server) -> None:
    for server in SERVERS:
        if server is not keep and server.alive():
            server.stop(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
