"""The real MONARC workload (`make bench-monarc`): statsd beside the upstream service, in one run.

    python bench/monarc.py [--sizes 10000,100000] [--side both|statsd] [--duration 5]

On a fresh machine with only python3 it installs what it needs: Debian's
`wrk` and `postgresql` (apt), and the upstream `statsservice` 0.5.2 sdist with
the pins of bench/statsservice-requirements.txt into its own venv under
bench/.monarc/peer/ (the upstream is AGPL: it runs as a separate process,
nothing of it is imported here).  A second run reuses all of that.

For each size it generates MONARC-shaped stats as the front office builds them
(50 organizations x 4 analyses x 5 types, one collection a day, dates ending
today), loads the same stats and clients into statsd (`statsd import` into a
fresh database) and into the upstream (SQL COPY into its PostgreSQL tables, in
a private cluster under bench/.monarc/pg/ on a loopback port), serves both
(`statsd serve` with rate limiting off; gunicorn with 2 workers) and runs the
front office's calls against each side in turn, with `wrk -t1 -c16` or, for
slow calls, a few sequential requests.  It prints one markdown table per size
and saves it under bench/results/.

Environment: BENCH_SIZES (default 10000,100000), BENCH_MILLION=1 (also 1M),
BENCH_SIDE=statsd (skip the upstream), BENCH_DURATION (wrk seconds, default 5),
BENCH_WRITE_RUNS (wrk runs of the batch POST row, default 3: the median run is reported),
BENCH_ITEMS (threats/vulnerabilities per analysis, default 40), BENCH_ORDER_KEYS (keys of the
hostile `_order_by`, default 20; fewer if statsd refuses that many).
"""
import argparse
import csv
import datetime as dt
import glob
import hashlib
import http.client
import json
import os
import platform
import random
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import time
import uuid

try:
    import orjson

    def dumps(obj) -> bytes:
        return orjson.dumps(obj)
except ImportError:
    def dumps(obj) -> bytes:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WORK = os.path.join(HERE, ".monarc")          # ignored: installs, data, working files
PEER = os.path.join(WORK, "peer")
PG = os.path.join(WORK, "pg")
DATA = os.path.join(WORK, "data")
RUN = os.path.join(WORK, "run")
RESULTS = os.path.join(HERE, "results")       # ignored: the tables of each run
LUA = os.path.join(HERE, "monarc.lua")
REQUIREMENTS = os.path.join(HERE, "statsservice-requirements.txt")
PEER_VERSION = "0.5.2"
PEER_SRC = os.path.join(PEER, f"statsservice-{PEER_VERSION}")
PEER_VENV = os.path.join(PEER, "venv")
USER_AGENT = "MONARC/2.13.1"

VERSION = 1  # of the generated data: bump when its shape changes
ORGS, ANRS_PER_ORG = 50, 4
TYPES = ("risk", "threat", "vulnerability", "cartography", "compliance")
PER_DAY = ORGS * ANRS_PER_ORG * len(TYPES)  # 1,000 stats a collection day
ADMIN_NAME, ADMIN_TOKEN = "bench-admin", "bench-monarc-admin-token-0123456789abcdef"
ORG = "org-07"  # the organization whose front office the scenarios play
LEVELS = ("Low risks", "Medium risks", "High risks")


def log(msg: str) -> None:
    print(msg, flush=True)


def sudo() -> list:
    return [] if os.geteuid() == 0 else ["sudo"]


# ------------------------------------------------------------- install ---

def pg_bin() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return os.path.dirname(found[-1]) if found else None


def install_tools(need_pg: bool) -> None:
    """wrk and (for the upstream) PostgreSQL, from Debian, when missing."""
    missing = [] if shutil.which("wrk") else ["wrk"]
    if need_pg and not pg_bin():
        missing.append("postgresql")
    if not missing:
        return
    log(f"bench-monarc: installing {' '.join(missing)} (apt)")
    subprocess.run(sudo() + ["apt-get", "update", "-qq"], check=True)
    subprocess.run(sudo() + ["apt-get", "-o", "DPkg::Lock::Timeout=900", "install", "-y", "-qq", *missing],
                   check=True, stdout=subprocess.DEVNULL)


def install_peer() -> None:
    """The statsservice sdist, unpacked, and a venv with its pinned requirements."""
    os.makedirs(PEER, exist_ok=True)
    if not os.path.exists(os.path.join(PEER_SRC, "runserver.py")):
        log(f"bench-monarc: downloading the statsservice {PEER_VERSION} sdist")
        dl = os.path.join(PEER, "dl")
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--ignore-requires-python",
                        "--no-binary", "statsservice", f"statsservice=={PEER_VERSION}", "-d", dl], check=True)
        with tarfile.open(os.path.join(dl, f"statsservice-{PEER_VERSION}.tar.gz")) as tar:
            try:
                tar.extractall(PEER, filter="data")
            except TypeError:  # Python before 3.11.4: no extraction filters (the sdist is PyPI's)
                tar.extractall(PEER)
    wanted = hashlib.sha256(open(REQUIREMENTS, "rb").read()).hexdigest()
    marker = os.path.join(PEER_VENV, ".bench-requirements")
    if not os.path.exists(marker) or open(marker).read() != wanted:
        log("bench-monarc: installing the statsservice requirements into bench/.monarc/peer/venv")
        base = getattr(sys, "_base_executable", None) or sys.executable
        subprocess.run([base, "-m", "venv", "--clear", PEER_VENV], check=True)
        subprocess.run([os.path.join(PEER_VENV, "bin", "pip"), "install", "-q", "-r", REQUIREMENTS], check=True)
        with open(marker, "w") as f:
            f.write(wanted)
    os.makedirs(os.path.join(PEER_SRC, "var"), exist_ok=True)


def peer_config(pg_port: int, password: str) -> None:
    """instance/production.py: the shipped production.py.cfg, pointed at our cluster."""
    text = open(os.path.join(PEER_SRC, "instance", "production.py.cfg")).read()
    text = re.sub(r'"password":\s*"[^"]*"', f'"password": "{password}"', text)
    text = re.sub(r'"port":\s*\d+', f'"port": {pg_port}', text)
    text = text.replace('"host": "localhost"', '"host": "127.0.0.1"')
    with open(os.path.join(PEER_SRC, "instance", "production.py"), "w") as f:
        f.write(text)


def peer_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STATS", "FLASK", "PG"))}
    env.update(STATS_CONFIG="production.py", FLASK_APP="runserver.py",
               PATH=os.path.join(PEER_VENV, "bin") + os.pathsep + env.get("PATH", ""))
    return env


# ------------------------------------------------------------ postgres ---

class Postgres:
    """A private PostgreSQL cluster under bench/.monarc/pg, on a loopback port, for this run only."""

    def __init__(self):
        self.bin = pg_bin()
        self.data = os.path.join(PG, "data")
        self.sock = os.path.join(PG, "run")
        self.logfile = os.path.join(PG, "postgres.log")
        pw = os.path.join(WORK, "pg.password")
        if not os.path.exists(pw):
            os.makedirs(WORK, exist_ok=True)
            with open(pw, "w") as f:
                f.write(secrets.token_hex(16))
        self.password = open(pw).read().strip()
        self.port = None

    def as_owner(self, cmd: list) -> list:
        return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd

    def own(self, path: str) -> None:
        if os.geteuid() == 0:
            shutil.chown(path, "postgres", "postgres")

    def init(self) -> None:
        if os.path.exists(os.path.join(self.data, "PG_VERSION")):
            return
        log("bench-monarc: creating a PostgreSQL cluster in bench/.monarc/pg")
        for d in (PG, self.sock):
            os.makedirs(d, exist_ok=True)
            self.own(d)
        pwfile = os.path.join(PG, "pwfile")
        with open(pwfile, "w") as f:
            f.write(self.password + "\n")
        self.own(pwfile)
        try:
            subprocess.run(self.as_owner([os.path.join(self.bin, "initdb"), "-D", self.data, "-U", "postgres",
                                          "--auth-local=scram-sha-256", "--auth-host=scram-sha-256",
                                          f"--pwfile={pwfile}", "-E", "UTF8", "--locale=C.UTF-8"]),
                           check=True, stdout=subprocess.DEVNULL)
        finally:
            os.remove(pwfile)

    def running(self) -> bool:
        return subprocess.run(self.as_owner([os.path.join(self.bin, "pg_ctl"), "-D", self.data, "status"]),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0

    def start(self) -> None:
        if self.running():  # left by a run that was killed
            self.stop()
        self.port = free_port()
        for path in (self.logfile,):
            open(path, "a").close()
            self.own(path)
        subprocess.run(self.as_owner([os.path.join(self.bin, "pg_ctl"), "-D", self.data, "-l", self.logfile, "-w",
                                      "-o", f"-p {self.port} -k {self.sock} -c listen_addresses=127.0.0.1",
                                      "start"]), check=True, stdout=subprocess.DEVNULL)

    def stop(self) -> None:
        subprocess.run(self.as_owner([os.path.join(self.bin, "pg_ctl"), "-D", self.data, "-m", "fast", "-w",
                                      "stop"]), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def psql(self, sql: str, db: str = "statsservice", capture: bool = False) -> str:
        env = dict(os.environ, PGPASSWORD=self.password)
        out = subprocess.run([os.path.join(self.bin, "psql"), "-X", "-q", "-h", "127.0.0.1", "-p", str(self.port),
                              "-U", "postgres", "-d", db, "-v", "ON_ERROR_STOP=1", "-At", "-c", sql],
                             env=env, check=True, capture_output=True, text=True)
        return out.stdout

    def pids(self) -> list:
        """The postmaster and every process it started."""
        try:
            master = int(open(os.path.join(self.data, "postmaster.pid")).readline())
        except (OSError, ValueError):
            return []
        return [master] + children(master)


# ----------------------------------------------------------- generator ---
# MONARC-shaped stats as the front office's collection job builds them: per
# analysis and day, one stat of each of the five types.

WORDS = {
    "fr": ["perte", "vol", "erreur", "défaillance", "accès", "données", "matériel", "logiciel", "réseau",
           "personnel", "sauvegarde", "intrusion", "divulgation", "saturation", "incendie", "dégât",
           "des eaux", "d'utilisation", "non autorisé", "du système"],
    "en": ["loss", "theft", "error", "failure", "access", "data", "equipment", "software", "network", "staff",
           "backup", "intrusion", "disclosure", "saturation", "fire", "water damage", "of use", "unauthorised",
           "of the system", "of media"],
    "de": ["Verlust", "Diebstahl", "Fehler", "Ausfall", "Zugriff", "Daten", "Geräte", "Software", "Netzwerk",
           "Personal", "Sicherung", "Eindringen", "Offenlegung", "Überlastung", "Brand", "Wasserschaden",
           "der Nutzung", "unbefugt", "des Systems", "der Medien"],
    "nl": ["verlies", "diefstal", "fout", "storing", "toegang", "gegevens", "apparatuur", "software", "netwerk",
           "personeel", "back-up", "inbraak", "openbaarmaking", "verzadiging", "brand", "waterschade",
           "van gebruik", "onbevoegd", "van het systeem", "van media"],
}


def labels(rng: random.Random, words: int) -> dict:
    """label1..label4 (fr, en, de, nl): the same words in the four MONARC languages."""
    picks = [rng.randrange(20) for _ in range(words)]
    out = {}
    for n, lang in enumerate(("fr", "en", "de", "nl"), 1):
        text = " ".join(WORDS[lang][p] for p in picks)
        out[f"label{n}"] = text[0].upper() + text[1:]
    return out


def make_uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


class Catalog:
    """The knowledge base the analyses draw from: the same threat recurs across analyses."""

    def __init__(self, rng: random.Random):
        self.threats = [dict(uuid=make_uuid(rng), **labels(rng, rng.randint(1, 2))) for _ in range(100)]
        self.vulnerabilities = [dict(uuid=make_uuid(rng), **labels(rng, 2)) for _ in range(250)]
        self.referentials = []
        for r in range(3):
            categories = []
            for c in range(4):
                controls = [{"code": f"{5 + c}.{k + 1}", "measure": labels(rng, 1)["label2"]} for k in range(2)]
                categories.append((labels(rng, 1), controls))
            self.referentials.append((make_uuid(rng), labels(rng, 1), categories))


class Analysis:
    """One anr: which threats, vulnerabilities and referential it has, kept from day to day."""

    def __init__(self, rng: random.Random, cat: Catalog, items: int):
        spread = max(1, items // 8)
        self.uuid = make_uuid(rng)
        self.threats = rng.sample(cat.threats, min(len(cat.threats), rng.randint(items - spread, items + spread)))
        self.vulns = rng.sample(cat.vulnerabilities,
                                min(len(cat.vulnerabilities), rng.randint(items - spread, items + spread)))
        self.referential = rng.choice(cat.referentials)


def risk_data(rng: random.Random) -> dict:
    risks = {state: {kind: [{"level": level, "value": rng.randint(0, top)} for level in LEVELS]
                     for kind, top in (("informational", 60), ("operational", 20))}
             for state in ("current", "residual")}
    total = {state: {kind: sum(x["value"] for x in levels) for kind, levels in kinds.items()}
             for state, kinds in risks.items()}
    return {"total": total, "risks": risks}


def objects_data(rng: random.Random, objects: list) -> list:
    return [dict(o, maxRisk=rng.randint(0, 80), count=rng.randint(1, 12), averageRate=f"{rng.uniform(0, 20):.2f}")
            for o in objects]


SCALES = {"impact": [0, 1, 2, 3, 4], "probability": [0, 1, 2, 3, 4, 5],
          "likelihood": sorted({i * v for i in range(1, 5) for v in range(1, 6)})}


def cartography_data(rng: random.Random) -> dict:
    def grid(columns):
        return {str(i): {str(c): rng.randint(1, 25) for c in sorted(rng.sample(columns, rng.randint(1, 4)))}
                for i in SCALES["impact"][1:]}
    return {"scales": SCALES, "risks": {state: {"informational": grid(SCALES["likelihood"]),
                                                 "operational": grid(SCALES["probability"])}
                                         for state in ("current", "residual")}}


def compliance_data(rng: random.Random, referential) -> list:
    ref_uuid, ref_labels, categories = referential

    def maturity():
        out = []
        for cat_labels, controls in categories:
            ctl = [dict(c, value=rng.randint(0, 5)) for c in controls]
            out.append(dict(cat_labels, controls=ctl, value=round(sum(c["value"] for c in ctl) / len(ctl), 2)))
        return out
    return [dict(referential=ref_uuid, **ref_labels, current=maturity(), target=maturity())]


def data_for(kind: str, rng: random.Random, anr: Analysis):
    if kind == "risk":
        return risk_data(rng)
    if kind == "threat":
        return objects_data(rng, anr.threats)
    if kind == "vulnerability":
        return objects_data(rng, anr.vulns)
    if kind == "cartography":
        return cartography_data(rng)
    return compliance_data(rng, anr.referential)


def periods(day: dt.date) -> dict:
    return {"day": day.timetuple().tm_yday, "week": day.isocalendar()[1], "month": day.month,
            "quarter": (day.month - 1) // 3 + 1, "year": day.year}


def world(seed: int, items: int):
    """The catalog, the organizations (name, token, analyses), deterministic for a seed."""
    rng = random.Random(seed)
    cat = Catalog(rng)
    orgs = []
    for n in range(1, ORGS + 1):
        name = f"org-{n:02d}"
        orgs.append((name, f"{name}-{rng.getrandbits(128):032x}", [Analysis(rng, cat, items) for _ in range(ANRS_PER_ORG)]))
    return rng, cat, orgs


PART = 200_000  # stats per export file: `statsd import` reads a whole file at once (1M stats: 5 files)


def export_parts(size: int) -> list:
    """The statsd export files of `size` stats: one, or one per PART stats."""
    if size <= PART:
        return [os.path.join(DATA, f"statsd-export-{size}.json")]
    return [os.path.join(DATA, f"statsd-export-{size}.part{k}.json") for k in range(-(-size // PART))]


def data_paths(size: int) -> dict:
    return {**{f"export{k}": path for k, path in enumerate(export_parts(size))},
            "clients": os.path.join(DATA, f"upstream-clients-{size}.csv"),
            "stats": os.path.join(DATA, f"upstream-stats-{size}.csv"),
            "meta": os.path.join(DATA, f"meta-{size}.json")}


def generate(size: int, seed: int, items: int, today: dt.date) -> dict:
    """Write the statsd export and the upstream's COPY files of `size` stats; returns the meta."""
    paths = data_paths(size)
    wanted = {"version": VERSION, "seed": seed, "size": size, "items": items, "today": today.isoformat()}
    try:
        meta = json.load(open(paths["meta"]))
        if all(meta.get(k) == v for k, v in wanted.items()) and all(os.path.exists(p) for p in paths.values()):
            log(f"  data: {size:,} stats up to date in bench/.monarc/data")
            return meta
    except (OSError, ValueError):
        pass
    os.makedirs(DATA, exist_ok=True)
    t0 = time.perf_counter()
    rng, cat, orgs = world(seed, items)
    days = -(-size // PER_DAY)
    first = today - dt.timedelta(days=days - 1)
    stamp0 = dt.datetime(2024, 1, 1, 9, 0)
    clients = [(ADMIN_NAME, ADMIN_TOKEN, True)] + [(name, token, False) for name, token, _ in orgs]
    with open(paths["clients"] + ".tmp", "w", newline="") as f:
        w = csv.writer(f)
        for n, (name, token, admin) in enumerate(clients, 1):
            stamp = (stamp0 + dt.timedelta(minutes=n)).isoformat()
            w.writerow([n, str(uuid.UUID(int=rng.getrandbits(128), version=4)), name, token, 2 if admin else 1,
                        "t", "t", "t", stamp, stamp])
    org_docs = [{"name": name, "token_sha256": hashlib.sha256(token.encode()).hexdigest(), "is_admin": admin,
                 "is_sharing_enabled": True, "created_at": (stamp0 + dt.timedelta(minutes=n)).isoformat(),
                 "updated_at": (stamp0 + dt.timedelta(minutes=n)).isoformat()}
                for n, (name, token, admin) in enumerate(clients, 1)]
    client_id = {name: n for n, (name, _, _) in enumerate(clients, 1)}
    count = 0
    parts = export_parts(size)
    export_head = b'{"format":"statsd-export","version":1,"organizations":' + dumps(org_docs) + b',"stats":['
    with open(paths["stats"] + ".tmp", "w", newline="") as st:
        w = csv.writer(st)
        ex = open(parts[0] + ".tmp", "wb")
        ex.write(export_head)
        for k in range(days):
            day = first + dt.timedelta(days=k)
            moment = dt.datetime.combine(day, dt.time(2, 0))
            for name, _, anrs in orgs:
                for anr in anrs:
                    for kind in TYPES:
                        if count == size:
                            break
                        moment += dt.timedelta(microseconds=rng.randint(1000, 20000))
                        stamp = moment.strftime("%Y-%m-%dT%H:%M:%S.%f")
                        stat_uuid = make_uuid(rng)
                        raw = dumps(data_for(kind, rng, anr))
                        head = dumps({"uuid": stat_uuid, "organization": name, "anr": anr.uuid, "type": kind,
                                      "date": day.isoformat(), **periods(day), "created_at": stamp,
                                      "updated_at": stamp})
                        if count and count % PART == 0:  # (only when there are several parts)
                            ex.write(b"]}\n")
                            ex.close()
                            ex = open(parts[count // PART] + ".tmp", "wb")
                            ex.write(export_head)
                        ex.write((b"," if count % PART else b"") + head[:-1] + b',"data":' + raw + b"}")
                        w.writerow([stat_uuid, anr.uuid, kind, day.isoformat(), raw.decode(), stamp,
                                    client_id[name]])
                        count += 1
        ex.write(b"]}\n")
        ex.close()
    for path in (*parts, paths["clients"], paths["stats"]):
        os.replace(path + ".tmp", path)
    org = next(o for o in orgs if o[0] == ORG)
    meta = dict(wanted, days=days, first=first.isoformat(), bytes=sum(os.path.getsize(path) for path in parts),
                org=ORG, org_token=org[1], org_anrs=[a.uuid for a in org[2]],
                seconds=round(time.perf_counter() - t0, 1))
    # The collection job's batch: five stats, one per type, for a new analysis ("@ANR@"), dated today.
    batch_anr = Analysis(random.Random(seed + 7), cat, items)
    brng = random.Random(seed + 8)
    meta["batch"] = [{"anr": "@ANR@", "type": kind, "date": today.isoformat(), "data": data_for(kind, brng, batch_anr)}
                     for kind in TYPES]
    with open(paths["meta"], "w") as f:
        json.dump(meta, f)
    log(f"  data: generated {size:,} stats over {days} days ({meta['bytes'] / 1e6:,.0f} MB export) in"
        f" {meta['seconds']} s")
    return meta


# ----------------------------------------------------------- processes ---

def children(pid: int) -> list:
    """Every descendant of pid (from /proc)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def rss_mb(pids: list) -> float:
    total = 0
    for pid in pids:
        try:
            for line in open(f"/proc/{pid}/status"):
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def cpu_ticks(pids: list) -> int:
    total = 0
    for pid in pids:
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return total


def mem_available_mb() -> float:
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("inf")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process of ours (own session), plus the pids it counts as its side (gunicorn's workers, postgres)."""

    def __init__(self, name: str, cmd: list, port: int, env: dict, cwd: str, extra_pids=lambda: []):
        self.name, self.port, self.extra_pids = name, port, extra_pids
        os.makedirs(os.path.join(RUN, "logs"), exist_ok=True)
        self.log_path = os.path.join(RUN, "logs", f"{name}.log")
        self.log = open(self.log_path, "ab")
        self.log.write(f"\n=== {dt.datetime.now().isoformat()} {' '.join(cmd)}\n".encode())
        self.log.flush()
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log, env=env,
                                     cwd=cwd, start_new_session=True)
        SERVERS.append(self)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def pids(self) -> list:
        return ([self.proc.pid] + children(self.proc.pid) if self.alive() else []) + self.extra_pids()

    def wait_idle(self, quiet: float = 1.0, timeout: float = 180) -> float:
        """Wait until its side used at most 2 ticks of CPU in `quiet` s (the backlog wrk left is done)."""
        t0 = time.monotonic()
        last = cpu_ticks(self.pids())
        while time.monotonic() - t0 < timeout:
            time.sleep(quiet)
            now = cpu_ticks(self.pids())
            if now - last <= 2:
                return time.monotonic() - t0
            last = now
        log(f"  ({self.name} still busy after {timeout:.0f} s; going on)")
        return time.monotonic() - t0

    def wait_ready(self, path: str, headers: dict, timeout: float) -> float:
        """Seconds from exec to the first answer with status < 500 on `path`."""
        while time.perf_counter() < self.started + timeout:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log_path}")
            try:
                status, _ = call(self.port, "GET", path, headers=headers, timeout=5)
                if status < 500:
                    return time.perf_counter() - self.started
            except OSError:
                pass
            time.sleep(0.01)
        raise RuntimeError(f"{self.name} did not answer within {timeout:.0f} s; see {self.log_path}")

    def stop(self, timeout: float = 60) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if not self.log.closed:
            self.log.close()


SERVERS: list = []


def call(port: int, method: str, path: str, body: bytes = None, headers=None, timeout: float = 300):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


# --------------------------------------------------------------- sides ---

def statsd_cmd() -> list:
    script = os.path.join(os.path.dirname(sys.executable), "statsd")
    return [script] if os.path.exists(script) else [sys.executable, os.path.join(ROOT, "statsd.py")]


def statsd_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STATSD_")}
    env["STATSD_RATE_LIMIT"] = ""  # rate limiting off; API keys stay on
    return env


def compile_statsd() -> None:
    """Write statsd.py's bytecode, as any installation has it (pip compiles at install, the
    binary carries it): under PYTHONDONTWRITEBYTECODE each start would compile 6,000 lines."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", os.path.join(ROOT, "statsd.py")], check=True)


def load_statsd(size: int) -> tuple[str, float]:
    """A fresh statsd database with the export imported; (path, seconds)."""
    db = os.path.join(RUN, f"statsd-{size}.json")
    for extra in ("", ".lock", ".journal", ".tmp", ".push.json"):
        if os.path.exists(db + extra):
            os.remove(db + extra)
    t0 = time.perf_counter()
    for part in export_parts(size):  # (the organizations of each part after the first are kept as they are)
        out = subprocess.run(statsd_cmd() + ["import", part, "--database", db],
                             env=statsd_env(), cwd=RUN, capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(f"statsd import failed ({out.returncode}): {out.stdout}{out.stderr}")
    return db, time.perf_counter() - t0


def start_statsd(db: str, size: int, key: str) -> tuple[Server, float]:
    port = free_port()
    server = Server("statsd", statsd_cmd() + ["serve", "--database", db, "--host", "127.0.0.1", "--port", str(port)],
                    port, statsd_env(), RUN)
    return server, server.wait_ready("/api/v1/client/me", headers(key), timeout=120 + size / 2000)


def load_upstream(pg: Postgres, size: int) -> float:
    """A fresh `statsservice` database (its own flask commands), then COPY of clients and stats; seconds."""
    t0 = time.perf_counter()
    pg.psql("DROP DATABASE IF EXISTS statsservice", db="postgres")
    for command in ("db_create", "db_init"):
        out = subprocess.run([os.path.join(PEER_VENV, "bin", "flask"), command], cwd=PEER_SRC, env=peer_env(),
                             capture_output=True, text=True)
        if out.returncode or "rror" in out.stdout:
            raise RuntimeError(f"flask {command} failed: {out.stdout}{out.stderr}")
    p = data_paths(size)
    pg.psql(f"\\copy client(id, uuid, name, token, role, local, is_sharing_enabled, is_active, created_at, last_seen)"
            f" FROM '{p['clients']}' WITH (FORMAT csv)")
    pg.psql("SELECT setval('client_id_seq', (SELECT max(id) FROM client))")
    pg.psql(f"\\copy stats(uuid, anr, type, date, data, created_at, client_id) FROM '{p['stats']}' WITH (FORMAT csv)")
    pg.psql("VACUUM ANALYZE")
    return time.perf_counter() - t0


def start_upstream(pg: Postgres, key: str, workers: int) -> tuple[Server, float]:
    port = free_port()
    server = Server("upstream", [os.path.join(PEER_VENV, "bin", "gunicorn"), "--workers", str(workers),
                                 "--bind", f"127.0.0.1:{port}", "--timeout", "600", "runserver:application"],
                    port, peer_env(), PEER_SRC, extra_pids=pg.pids)
    return server, server.wait_ready("/api/v1/client/me", headers(key), timeout=120)


def headers(key: str, body: bool = False) -> dict:
    h = {"X-API-KEY": key, "User-Agent": USER_AGENT}
    if body:
        h["Content-Type"] = "application/json"
    return h


# ----------------------------------------------------------- measuring ---

UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0, "h": 3600000.0}


def write_requests(name: str, requests: list) -> str:
    """The request file monarc.lua reads: METHOD<tab>PATH<tab>BODY per line."""
    path = os.path.join(RUN, f"requests-{name}.txt")
    with open(path, "w") as f:
        for method, url, body in requests:
            f.write(f"{method}\t{url}\t{body if body is not None else '-'}\n")
    return path


def wrk(port: int, requests: list, key: str, args, connections=None, duration=None, name="run") -> dict:
    connections = connections or args.connections
    duration = duration or args.duration
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", "--timeout", f"{args.wrk_timeout}s",
           "-s", LUA, f"http://127.0.0.1:{port}{requests[0][1]}", "--", write_requests(name, requests), key,
           USER_AGENT, secrets.token_hex(4)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + args.wrk_timeout + 60)
    text = out.stdout + out.stderr
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if out.returncode or not m:
        raise RuntimeError(f"wrk failed: {' '.join(cmd)}\n{text}")
    lat = {p: float(v) * UNITS[u] for p, v, u in re.findall(r"^\s+(50|99)%\s+([\d.]+)(\w+)", text, re.M)}
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    done = int(re.search(r"(\d+) requests in", text).group(1))
    return {"rps": float(m.group(1)), "p50": lat.get("50"), "p99": lat.get("99"), "requests": done,
            "errors": (int(non2xx.group(1)) if non2xx else 0) + (sum(map(int, sock.groups())) if sock else 0)}


def sequential(port: int, method: str, path: str, body, key: str, least=3, most=20, budget=4.0) -> dict:
    """Requests one after another: at least `least`, then until `most` or `budget` s; median and max.
    Every "@ANR@" in the body (a str) becomes a new UUID each time."""
    times, t0, errors = [], time.perf_counter(), 0
    while len(times) < least or (len(times) < most and time.perf_counter() - t0 < budget):
        sent = body.replace("@ANR@", str(uuid.uuid4())).encode() if body is not None else None
        s = time.perf_counter()
        status, _ = call(port, method, path, sent, headers(key, body is not None))
        times.append((time.perf_counter() - s) * 1000)
        errors += status >= 300
    times.sort()
    p99 = times[min(len(times) - 1, int(round(0.99 * (len(times) - 1))))]
    return {"seq": len(times), "p50": statistics.median(times), "p99": p99, "rps": None, "errors": errors}


def check(port: int, method: str, path: str, body, key: str, want=(200, 201)) -> tuple[bool, str]:
    """One request before measuring: (ok, what came back)."""
    try:
        status, raw = call(port, method, path, body, headers(key, body is not None))
    except OSError as e:
        return False, f"{type(e).__name__}: {e}"
    text = raw.decode(errors="replace")
    if status not in want:
        return False, f"HTTP {status}: {text[:300]}"
    try:
        doc = json.loads(raw)
    except ValueError:
        return False, f"HTTP {status}, not JSON: {text[:200]}"
    if isinstance(doc, dict) and isinstance(doc.get("data"), list):
        return True, f"{len(doc['data'])} items"
    if isinstance(doc, dict) and isinstance(doc.get("data"), dict):
        return True, f"{len(doc['data'])} keys"
    return True, f"HTTP {status}"


# ----------------------------------------------------------- scenarios ---

def scenarios(meta: dict, today: dt.date) -> list:
    """(name, key kind, method, path, body, mode): the front office's calls."""
    def days(n):
        return (today - dt.timedelta(days=n - 1)).isoformat()

    def body(obj):
        return json.dumps(obj, separators=(",", ":"))
    t = today.isoformat()
    batch = body(meta["batch"])
    out = [
        ("collect: GET today's risk stats", "org", "GET", "/api/v1/stats/",
         body({"type": "risk", "date_from": t, "date_to": t}), "wrk"),
        ("collect: batch POST of 5 (new anr)", "org", "POST", "/api/v1/stats/", batch, "wrk"),
    ]
    for kind in ("risk", "threat"):
        for n in (30, 365):
            out.append((f"dashboard: GET stats/ {kind}, {n} days", "org", "GET", "/api/v1/stats/",
                        body({"type": kind, "date_from": days(n), "date_to": t}), "wrk"))
    out.append(("dashboard: GET stats/ risk, get_last", "org", "GET", "/api/v1/stats/",
                body({"type": "risk", "get_last": True}), "wrk"))
    for kind, processor in (("threat", "threat_average_on_date"), ("vulnerability", "vulnerability_average_on_date"),
                            ("risk", "risk_averages"), ("risk", "risk_averages_on_date")):
        out.append((f"processed {processor}, 365 days", "org", "GET", "/api/v1/stats/processed/",
                    body({"type": kind, "processor": processor, "processor_params": {}, "date_from": days(365),
                          "date_to": t}), "seq"))
    out.append(("client/me", "org", "GET", "/api/v1/client/me", None, "wrk"))
    return out


def processor_requests(today: dt.date) -> list:
    t, f = today.isoformat(), (today - dt.timedelta(days=364)).isoformat()
    return [("GET", "/api/v1/stats/processed/",
             json.dumps({"type": kind, "processor": proc, "date_from": f, "date_to": t}, separators=(",", ":")))
            for kind, proc in (("threat", "threat_average_on_date"), ("vulnerability", "vulnerability_average_on_date"),
                               ("risk", "risk_averages"), ("risk", "risk_averages_on_date"))]


def statsd_hostile(server: Server, key: str, today: dt.date, notes: list, size: int) -> list:
    """The most expensive requests statsd's API allows: v2 full scans over data, the longest _order_by it
    accepts, processors."""
    scans = [("GET", "/api/v2/stats/?data__0__count__gt=3", None),
             ("GET", "/api/v2/stats/?type=threat&data__5__averageRate__gt=50", None)]
    order = None
    wanted = args_order_keys()
    for n in sorted({wanted} | {k for k in (10, 5, 4, 3, 2, 1) if k < wanted}, reverse=True):
        keys = ",".join(f"{'-' if k % 2 else ''}data__{k}__count" for k in range(n))
        path = f"/api/v2/stats/?_order_by={keys}&_limit=1"
        t0 = time.perf_counter()
        status, raw = call(server.port, "GET", path, None, headers(key), timeout=600)
        if status == 200:
            order = ("GET", path, None)
            notes.append(f"{size:,} statsd: the hostile load's `_order_by` has {n} keys"
                         f" (data__0__count,-data__1__count,...; answered in {(time.perf_counter() - t0):.1f} s alone)")
            break
        notes.append(f"{size:,} statsd: `_order_by` with {n} keys answered {status}: {raw[:200].decode(errors='replace')}")
    return scans + ([order] if order else []) + processor_requests(today)


def args_order_keys() -> int:
    return int(os.environ.get("BENCH_ORDER_KEYS", "") or 20)


def cheap_under_load(server: Server, key: str, hostile: list, args, name: str) -> dict:
    """client/me, one request after another on one connection, while 8 connections send `hostile`.

    Timed here rather than by wrk, so that a request stuck behind the load counts with its whole wait."""
    lines = write_requests(f"hostile-{name}", hostile)
    cmd = ["wrk", "-t1", "-c8", f"-d{args.hostile_duration + 1}s", "--timeout", "600s", "-s", LUA,
           f"http://127.0.0.1:{server.port}/", "--", lines, key, USER_AGENT, secrets.token_hex(4)]
    load = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    times, errors, censored = [], 0, False
    try:
        time.sleep(1)
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=args.cheap_cap)
        end = time.perf_counter() + args.hostile_duration
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            try:
                conn.request("GET", "/api/v1/client/me", headers=headers(key))
                response = conn.getresponse()
                response.read()
            except TimeoutError:  # still waiting after the cap: counted as the cap, and the run goes on
                times.append(args.cheap_cap * 1000)
                censored = True
                break
            times.append((time.perf_counter() - t0) * 1000)
            errors += response.status != 200
        conn.close()
    finally:
        load.wait(args.hostile_duration + 60)
    times.sort()
    return {"rps": None, "seq": len(times), "p50": statistics.median(times), "censored": censored,
            "cap_ms": args.cheap_cap * 1000,
            "p99": times[min(len(times) - 1, int(round(0.99 * (len(times) - 1))))], "errors": errors}


SLOW_MS = 400  # a call slower than this (one request) is measured sequentially, not with wrk -c16


def measure(server: Server, side: str, size: int, name: str, method: str, path: str, body, key: str, mode: str,
            args, notes: list) -> dict:
    probe_body = body.replace("@ANR@", str(uuid.uuid4())) if body else None
    server.wait_idle()
    t0 = time.perf_counter()
    ok, what = check(server.port, method, path, probe_body.encode() if probe_body else None, key)
    probe = (time.perf_counter() - t0) * 1000
    if not ok:
        notes.append(f"{size:,} {side}: {name}: `{method} {path}` {probe_body or ''} answered {what}")
        log(f"    {side}: {name}: FAILED {what}")
        return {"failed": what}
    if mode == "wrk" and probe < SLOW_MS:
        runs = []
        for run in range(1 if method == "GET" else max(1, args.write_runs)):  # a write row: the median of a few runs
            if run:
                server.wait_idle()
            ticks = cpu_ticks(server.pids())
            r = wrk(server.port, [(method, path, body)], key, args, name=f"{side}-{size}")
            if r["requests"]:  # the side's CPU (every process and thread) over the wrk run, per answer
                r["cpu_ms"] = (cpu_ticks(server.pids()) - ticks) / os.sysconf("SC_CLK_TCK") * 1000 / r["requests"]
            runs.append(r)
        r = sorted(runs, key=lambda run: run["rps"] or 0)[(len(runs) - 1) // 2]  # (of an even count, the lower)
        if len(runs) > 1:
            r["runs_rps"] = [run["rps"] for run in runs]
            errors = [run.get("errors") or 0 for run in runs]
            r["errors"] = sum(errors)  # (every run's: the row's * flag)
            notes.append(f"{size:,} {side}: {name}: {len(runs)} wrk runs, "
                         + ", ".join(f"{v:,.0f}" for v in r["runs_rps"]) + " req/s (the median run is shown)"
                         + ("; errors " + ", ".join(map(str, errors)) if r["errors"] else ""))
        if method == "GET":  # a few sequential ones too, for the ratio when the other side is slow
            server.wait_idle()
            r["seq_p50"] = sequential(server.port, method, path, body, key, least=3, most=20, budget=1.5)["p50"]
    else:
        r = sequential(server.port, method, path, body, key)
        r["seq_p50"] = r["p50"]
    r["answer"] = what
    log(f"    {side}: {name}: {fmt_result(r)} ({what})")
    return r


def run_side(side: str, held: dict, meta: dict, today: dt.date, args, notes: list, size: int, restart=None) -> dict:
    """Reads first, then memory, the hostile load, and the batch POSTs last (they add stats).

    held["server"] is the side's server; `restart` (upstream) replaces it when a backlog of the
    hostile load is left after the cheap request gave up, rather than waiting minutes for it."""
    server = held["server"]
    keys = {"org": meta["org_token"], "admin": ADMIN_TOKEN}
    plan = scenarios(meta, today)
    out = {}
    for name, who, method, path, body, mode in plan:
        if method == "GET":
            out[name] = measure(server, side, size, name, method, path, body, keys[who], mode, args, notes)
    server.wait_idle()
    out["rss"] = rss_mb(server.pids())
    hostile = statsd_hostile(server, keys["admin"], today, notes, size) if side == "statsd" else processor_requests(today)
    server.wait_idle()
    r = cheap_under_load(server, keys["org"], hostile, args, f"{side}-{size}")
    out["cheap under hostile load"] = r
    log(f"    {side}: client/me under 8 connections of the most expensive requests: {fmt_result(r)}")
    if r["censored"]:
        notes.append(f"{size:,} {side}: under the hostile load a `client/me` had no answer after {args.cheap_cap} s"
                     " (counted as that); " + ("the upstream was restarted (gunicorn quick shutdown) rather than"
                                               " left to finish the backlog" if restart else "waited for it to drain"))
    if r["censored"] and restart:
        server.proc.send_signal(signal.SIGQUIT)  # gunicorn: quick shutdown, workers killed
        server.stop()
        server = held["server"] = restart()
    server.wait_idle(timeout=300)
    for name, who, method, path, body, mode in plan:
        if method != "GET":
            out[name] = measure(server, side, size, name, method, path, body, keys[who], mode, args, notes)
    order = [p[0] for p in plan] + ["cheap under hostile load"]
    return {**{k: out[k] for k in order}, **{k: v for k, v in out.items() if k not in order}}


# -------------------------------------------------------------- output ---

def ms(v) -> str:
    if v is None:
        return "n/a"
    return f"{v:.2f}" if v < 10 else f"{v:.1f}" if v < 100 else f"{v:,.0f}"


def rps(r) -> str:
    if r is None:
        return "n/a"
    if "failed" in r:
        return "fails"
    if r.get("rps") is None:
        return f"seq x{r['seq']}"
    v = r["rps"]
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


def ms_of(r, key: str) -> str:
    v = r and r.get(key)
    text = ms(v)
    return "≥" + text if r and r.get("censored") and v is not None and v >= r.get("cap_ms", v) else text


def fmt_result(r) -> str:
    return f"{rps(r)} req/s, p50 {ms_of(r, 'p50')} ms, p99 {ms_of(r, 'p99')} ms" + \
        (f", CPU {r['cpu_ms']:.2f} ms a request" if r.get("cpu_ms") else "") + \
        (f", {r['errors']} errors" if r.get("errors") else "")


def cpu_table(res: dict) -> str:
    """CPU per answered request of the wrk rows, each side's processes summed: what a request costs the
    machine, which moves less than req/s when the two cores are shared with the load tool."""
    s, u = res["statsd"], res.get("upstream") or {}
    rows = []
    for name, a in s.items():
        b = u.get(name) if isinstance(u.get(name), dict) else None
        if isinstance(a, dict) and a.get("cpu_ms"):
            mine, theirs = a["cpu_ms"], b and b.get("cpu_ms")
            other = f"{theirs:.2f} | {theirs / mine:.1f}x" if theirs else "n/a | n/a"
            rows.append(f"| {name} | {mine:.2f} | {other} |")
    if not rows:
        return ""
    return "\n".join(["| CPU ms per answered request (wrk rows) | statsd | upstream | upstream / statsd |",
                      "|---|---:|---:|---:|", *rows])


def ratio(a, b) -> str:
    if not a or not b or "failed" in a or "failed" in b:
        return "n/a"
    tag = ""
    if a.get("rps") and b.get("rps"):
        v = a["rps"] / b["rps"]
    elif a.get("seq_p50") and b.get("seq_p50"):
        v = b["seq_p50"] / a["seq_p50"]
        tag = "" if a.get("rps") is None and b.get("rps") is None else " (seq)"
    else:
        return "n/a"
    return (f"{v:.2g}x" if v < 0.1 else f"{v:.2f}x" if v < 10 else f"{v:,.0f}x") + tag


HEADER = ["scenario", "statsd req/s", "p50 ms", "p99 ms", "upstream req/s", "p50 ms", "p99 ms", "ratio"]


def table(res: dict) -> str:
    s, u = res["statsd"], res.get("upstream") or {}
    names = [k for k in s if isinstance(s[k], dict)] + [k for k in u if isinstance(u[k], dict) and k not in s]
    rows = []
    for name in names:
        a, b = s.get(name), u.get(name)
        flag = " *" if any(r and r.get("errors") for r in (a, b)) else ""
        rows.append([name + flag, rps(a), ms_of(a, "p50"), ms_of(a, "p99"),
                     rps(b) if b else "n/a", ms_of(b, "p50"), ms_of(b, "p99"),
                     ratio(a, b) if name != "cheap under hostile load" else ratio_lat(a, b)])

    def mb(side, key):
        v = side.get(key)
        return f"{v:,.0f}" if v is not None else "n/a"

    def sec(side, key):
        v = side.get(key)
        return f"{v:.2f}" if v is not None else "n/a"
    rows.append(["RSS after load, MB", mb(s, "rss"), "", "", mb(u, "rss"), "", "", ""])
    rows.append(["startup (exec to first answer), s", sec(s, "startup"), "", "", sec(u, "startup"), "", "", ""])
    rows.append(["load (statsd import / COPY), s", sec(s, "load"), "", "", sec(u, "load"), "", "", ""])
    widths = [max(len(r[i]) for r in [HEADER] + rows) for i in range(len(HEADER))]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(HEADER, widths)) + " |",
             "|" + "|".join("-" * (w + 2) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) + " |"
              for r in rows]
    return "\n".join(lines)


def ratio_lat(a, b) -> str:
    """For the cheap request under load: by p99 latency (upstream p99 / statsd p99)."""
    if not a or not b or not a.get("p99") or not b.get("p99") or a.get("censored"):
        return "n/a"
    v = b["p99"] / a["p99"]
    return ("≥" if b.get("censored") else "") + (f"{v:.2g}x" if v < 0.1 else f"{v:.2f}x" if v < 10 else f"{v:,.0f}x")


def machine() -> str:
    cpu = "unknown"
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return f"{os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}"


# ---------------------------------------------------------------- main ---

def bench_size(size: int, args, pg, today: dt.date, notes: list, previous: dict) -> dict:
    log(f"== {size:,} stats")
    # statsd import holds the database it builds plus one export file (PART stats at most) parsed, and
    # the server holds the database: skip what cannot fit, by statsd's RSS per byte of database on the
    # largest size done of 100k or more (else 1.3, as packed at 100k), and 5 bytes per byte of the file.
    done = [r for r in previous.values() if r.get("statsd", {}).get("rss") and r["db_mb"] >= 300]
    largest = max(done, key=lambda r: r["db_mb"], default=None)
    per_byte = max(largest["statsd"]["rss"] / largest["db_mb"] if largest else 0, 1.3)
    stat_mb = (300 + 210 * args.items) / 2**20
    need = per_byte * size * stat_mb + 5 * min(size, PART) * stat_mb
    available = 0.9 * mem_available_mb()
    if need > available:
        raise RuntimeError(f"skipped: statsd would need about {need:,.0f} MB and {available:,.0f} MB are available")
    meta = generate(size, args.seed, args.items, today)
    res = {"meta": meta}
    db, took = load_statsd(size)
    log(f"  statsd: imported in {took:.1f} s ({os.path.getsize(db) / 1e6:,.0f} MB database file)")
    res["db_mb"] = os.path.getsize(db) / 1e6
    compile_statsd()
    server, startup = start_statsd(db, size, meta["org_token"])
    log(f"  statsd: up in {startup:.2f} s")
    try:
        res["statsd"] = run_side("statsd", {"server": server}, meta, today, args, notes, size)
    finally:
        server.stop()
        for extra in ("", ".lock", ".journal", ".tmp"):  # a working copy: the export is kept
            if os.path.exists(db + extra):
                os.remove(db + extra)
    res["statsd"].update(startup=startup, load=took)
    if args.side == "both":
        took = load_upstream(pg, size)
        log(f"  upstream: COPY of {size:,} stats in {took:.1f} s"
            f" ({int(pg.psql('SELECT pg_database_size(current_database())')) / 1e6:,.0f} MB database)")
        server, startup = start_upstream(pg, meta["org_token"], args.workers)
        log(f"  upstream: up in {startup:.2f} s")
        held = {"server": server}
        try:
            res["upstream"] = run_side("upstream", held, meta, today, args, notes, size,
                                       restart=lambda: start_upstream(pg, meta["org_token"], args.workers)[0])
        finally:
            held["server"].stop()
        res["upstream"].update(startup=startup, load=took)
        for name, a in res["statsd"].items():
            b = res["upstream"].get(name)
            if isinstance(a, dict) and isinstance(b, dict) and a.get("answer") and b.get("answer") \
                    and a["answer"] != b["answer"]:
                notes.append(f"{size:,} {name}: the answers differ (statsd: {a['answer']}, upstream: {b['answer']})")
    return res


def report(results: dict, notes: list, args, started: float) -> str:
    out = [f"# bench-monarc: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}", "",
           f"Command: `{' '.join(args.command)}` ({machine()}; took {(time.monotonic() - started) / 60:.1f} min).",
           f"statsd: `statsd serve`, API keys on, `STATSD_RATE_LIMIT=\"\"`. Upstream: statsservice {PEER_VERSION}"
           f" under gunicorn --workers {args.workers}, PostgreSQL {os.path.basename(os.path.dirname(pg_bin() or '/x/?/bin'))}."
           if args.side == "both" else "statsd only (BENCH_SIDE=statsd).",
           f"Rows with req/s: `wrk -t1 -c{args.connections} -d{args.duration}s`; \"seq xN\": N requests one after"
           f" another (calls slower than {SLOW_MS} ms, and the processors), median and slowest. The batch POST"
           f" row: the median of {max(1, args.write_runs)} wrk runs by req/s (all of them in the notes). Ratio: statsd over"
           " upstream by req/s; by median latency of sequential requests where a side was sequential (\"(seq)\":"
           " the other side's sequential median, measured beside its wrk run); by p99 for the cheap request under"
           " hostile load.", ""]
    for size, res in results.items():
        m = res["meta"]
        out += [f"## {size:,} stats ({m['days']} day(s) from {m['first']}, {ORGS} organizations x {ANRS_PER_ORG} analyses"
                f" x 5 types; statsd database file {res['db_mb']:,.0f} MB)", "", table(res), ""]
        cpu = cpu_table(res)
        if cpu:
            out += [cpu, ""]
    out += ["Notes:",
            "- Every request is one the MONARC front office sends (v1, JSON body also on GET, `X-API-KEY`,"
            f" `User-Agent: {USER_AGENT}`), with the key of organization {ORG} (not an admin); the batch"
            " POSTs are for a new analysis each.",
            "- RSS: statsd's server process; upstream: gunicorn master and workers plus every PostgreSQL"
            " process, summed (shared memory counts once per process).",
            "- cheap under hostile load: `client/me`, one request after another on one connection, for"
            f" {args.hostile_duration} s, while 8 connections (wrk -c8) send"
            " the most expensive requests: for statsd v2 full scans over `data`, a long `_order_by` and the"
            " processors; for the upstream its processors. A request still unanswered after"
            f" {args.cheap_cap} s is counted as {args.cheap_cap} s (\"≥\").",
            "- \\* some answers were not 2xx, or wrk saw socket errors (timeouts)."]
    out += [f"- {n}" for n in notes]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sizes = os.environ.get("BENCH_SIZES", "") or "10000,100000"
    if os.environ.get("BENCH_MILLION", "") not in ("", "0"):
        sizes += ",1000000"
    p.add_argument("--sizes", default=sizes)
    p.add_argument("--side", choices=("both", "statsd"), default=os.environ.get("BENCH_SIDE", "") or "both")
    p.add_argument("--duration", type=int, default=int(os.environ.get("BENCH_DURATION", "") or 5))
    p.add_argument("--write-runs", type=int, default=int(os.environ.get("BENCH_WRITE_RUNS", "") or 3),
                   help="wrk runs of the batch POST row, of which the median (by req/s) is reported")
    p.add_argument("--hostile-duration", type=int, default=10)
    p.add_argument("--cheap-cap", type=int, default=int(os.environ.get("BENCH_CHEAP_CAP", "") or 60),
                   help="seconds after which the cheap request under the hostile load is given up")
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--workers", type=int, default=2, help="gunicorn workers of the upstream")
    p.add_argument("--wrk-timeout", type=int, default=30)
    p.add_argument("--items", type=int, default=int(os.environ.get("BENCH_ITEMS", "") or 40))
    p.add_argument("--seed", type=int, default=20261202)
    args = p.parse_args(argv)
    args.command = [os.path.relpath(sys.argv[0])] + sys.argv[1:]
    env_used = [f"{k}={os.environ[k]}" for k in ("BENCH_SIZES", "BENCH_MILLION", "BENCH_SIDE", "BENCH_DURATION",
                                                  "BENCH_ITEMS", "BENCH_ORDER_KEYS") if os.environ.get(k)]
    args.command = env_used + (os.environ["BENCH_COMMAND"].split() if os.environ.get("BENCH_COMMAND") and not argv
                               and len(sys.argv) == 1 else ["python"] + args.command)
    started = time.monotonic()
    for d in (WORK, RUN, RESULTS):
        os.makedirs(d, exist_ok=True)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: sys.exit(128 + 15))
    install_tools(need_pg=args.side == "both")
    pg = None
    if args.side == "both":
        install_peer()
        pg = Postgres()
        pg.init()
    today = dt.date.today()
    results, notes = {}, []
    try:
        if pg:
            pg.start()
            peer_config(pg.port, pg.password)
        for size in (int(s) for s in args.sizes.split(",") if s.strip()):
            try:
                results[size] = bench_size(size, args, pg, today, notes, results)
            except RuntimeError as e:
                notes.append(f"{size:,} stats: stopped: {e}")
                log(notes[-1])
    finally:
        for server in SERVERS:
            server.stop(timeout=30)
        if pg:
            pg.stop()
    text = report(results, notes, args, started)
    path = os.path.join(RESULTS, f"monarc-{dt.datetime.now(dt.timezone.utc).strftime('%Y%m%d-%H%M%S')}.md")
    with open(path, "w") as f:
        f.write(text)
    shutil.copyfile(path, os.path.join(RESULTS, "monarc-latest.md"))
    log("\n" + text + f"\nwritten to {os.path.relpath(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
