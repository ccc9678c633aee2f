"""The real MONARC workload (issue 11), through HTTP on the real file store.

1. The processors' answers (kept aggregates) equal a recomputation done here from every stat,
   over random writes, deletes, imports, restarts (kill -9 and clean), and a checkpoint.
2. The caps on _order_by, filters and _fields.
3. Ordered pages over more than one sort run equal a slice of a full sort done here.
4. Bounded work: cheap requests complete while the heaviest allowed requests still run.
5. Checkpoints during a large `statsd import`: no ERROR, and the file holds exactly what was imported.
6. v1 GET stats/ (dates, anrs, get_last) for one organization among several.

Every expected answer is computed here, in plain Python, from what the API returns or what the
test sent; nothing is taken from statsd's own code.
"""

import calendar
import hashlib
import http.client
import json
import math
import os
import random
import re
import threading
import uuid
from datetime import date, timedelta
from functools import cmp_to_key
from types import SimpleNamespace

import orjson
import pytest

import statsd
from conftest import ServerProcess, cli, key

MONARC = "MONARC/2.13.1"
STATS = "/api/v2/stats/"
MISSING = object()
MEASURES = ("count", "maxRisk", "averageRate")
STATES = ("current", "residual")
KINDS = ("informational", "operational")
LEVELS = ("Low risks", "Medium risks", "High risks")
NUMERIC = re.compile(r"-?[0-9]+(\.[0-9]+)?([eE][+-]?[0-9]+)?")

TOKENS = {"admin": "workload-admin-key-0001", "CASES": "workload-cases-key-0002",
          "OTHER": "workload-other-key-0003"}
ADMIN = TOKENS["admin"]


# ------------------------------------------------------------------ helpers ---

def new_uuid(rng):
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def org_records():
    return [{"name": name, "token_sha256": hashlib.sha256(token.encode()).hexdigest(), "is_admin": name == "admin"}
            for name, token in TOKENS.items()]


def write_export(path, stats, organizations):
    path.write_bytes(orjson.dumps({"format": "statsd-export", "version": 1, "organizations": organizations,
                                   "stats": stats}))
    return path


def call(port, method, path, token=None, body=None, timeout=300):
    """(status, parsed JSON or None) of one request to a server process, on a connection of its own."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"User-Agent": MONARC}
        if token is not None:
            headers["X-API-KEY"] = token
        data = None
        if body is not None:
            data, headers["Content-Type"] = orjson.dumps(body), "application/json"
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, (orjson.loads(raw) if raw else None)
    finally:
        conn.close()


def ok(port, method, path, token=ADMIN, body=None, status=200):
    got, answer = call(port, method, path, token, body)
    assert got == status, (method, path, got, answer)
    return answer


def all_stats(port, token=ADMIN, fields=None):
    """Every stat the key sees, through /api/v2/stats/ pages, in the list's order."""
    found, skip = [], 0
    extra = f"&_fields={fields}" if fields else ""
    while True:
        body = ok(port, "GET", f"{STATS}?_limit=1000&_skip={skip}{extra}", token)
        found += body["data"]
        skip += 1000
        if not body["has_more"]:
            return found


def record(stat):
    """A stat as answered, without its links (they name the server's port)."""
    return {k: v for k, v in stat.items() if k not in ("link", "links")}


def stat_day(stat):
    """The day a stat counts for: its date, else its year and day of year, else the day it was created."""
    if "date" in stat:
        return stat["date"]
    if isinstance(stat.get("year"), int) and isinstance(stat.get("day"), int):
        try:
            return (date(stat["year"], 1, 1) + timedelta(days=stat["day"] - 1)).isoformat()
        except (ValueError, OverflowError):
            pass
    return stat["created_at"][:10]


def number(value):
    """A JSON number or a numeric string as a float; None for anything else (booleans too)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str) and NUMERIC.fullmatch(value):
        return float(value)
    return None


def mean(values):
    return math.fsum(values) / len(values)


def close(got, want, where):
    assert isinstance(got, (int, float)) and not isinstance(got, bool), (where, got)
    assert math.isclose(got, want, rel_tol=1e-9), (where, got, want)


# ----------------------------------------------------- MONARC-shaped data ---

DAYS = [(date(2024, 3, 1) + timedelta(days=d)).isoformat() for d in range(40)]
THREATS = [str(uuid.UUID(int=0x7A000 + i, version=4)) for i in range(8)]
VULNERABILITIES = [str(uuid.UUID(int=0x5B000 + i, version=4)) for i in range(8)]
ANRS = [str(uuid.UUID(int=0xA0000 + i, version=4)) for i in range(6)]


def labels_of(object_uuid):
    """Each object always carries the same labels, so the answer's labels are known."""
    return {"label1": f"object {object_uuid[:8]}", "label2": f"objet {object_uuid[:8]}", "label3": "",
            "label4": object_uuid[-4:]}


def measure(rng, name):
    r = rng.random()
    if r < 0.05:
        return MISSING
    if r < 0.11:
        return rng.choice(["n/a", "", None, True, False, "NaN", [1], {"v": 1}, "2,5"])
    if name == "averageRate":
        return rng.choice([f"{rng.uniform(0, 5):.2f}", f"{rng.uniform(0, 5):.2f}", round(rng.uniform(0, 5), 2),
                           rng.randint(0, 5), str(rng.randint(0, 5)), "1e0"])
    return rng.choice([rng.randint(0, 25), rng.randint(0, 25), rng.randint(0, 25) + 0.5, str(rng.randint(0, 25))])


def object_item(rng, object_uuid):
    item = {"uuid": object_uuid, **labels_of(object_uuid)}
    for name in MEASURES:
        value = measure(rng, name)
        if value is not MISSING:
            item[name] = value
    return item


def risk_levels(rng):
    levels = []
    for name in LEVELS:
        r = rng.random()
        if r < 0.05:
            continue  # a level left out
        if r < 0.8:
            value = rng.randint(0, 30)
        else:
            value = rng.choice([str(rng.randint(0, 30)), "many", None, 2.5, True])
        levels.append({"level": name, "value": value})
    if rng.random() < 0.35:  # levels under other names count for nothing
        levels.append({"level": rng.choice(["Critical risks", "low risks", "Low", "High risks ", "Medium"]),
                       "value": rng.randint(0, 50)})
    rng.shuffle(levels)
    return levels


def data_for(rng, kind):
    if kind in ("threat", "vulnerability"):
        if rng.random() < 0.03:
            return {"not": "a list"}
        pool = THREATS if kind == "threat" else VULNERABILITIES
        items = [object_item(rng, u) for u in rng.sample(pool, rng.randint(1, 5))]
        if rng.random() < 0.1:
            items.append({"label1": "an item without uuid", "count": 3, "maxRisk": 3, "averageRate": "3"})
        return items
    if kind == "risk":
        if rng.random() < 0.04:
            return {"total": {}}
        risks = {state: {kind_: risk_levels(rng) for kind_ in KINDS} for state in STATES}
        if rng.random() < 0.05:
            risks["residual"]["operational"] = "not a list"
        return {"total": {state: {kind_: 0 for kind_ in KINDS} for state in STATES}, "risks": risks}
    if kind == "cartography":
        return {"scales": {"impact": [0, 1, 2]},
                "risks": {"current": {"informational": {"1": {"2": rng.randint(0, 9)}}}}}
    return [{"referential": new_uuid(rng), "label1": "ISO 27002", "current": [], "target": []}]


KIND_CHOICES = ("threat", "threat", "vulnerability", "vulnerability", "risk", "risk", "cartography", "compliance")


def monarc_stat(rng, v2=False):
    kind = rng.choice(KIND_CHOICES)
    stat = {"anr": rng.choice(ANRS), "type": kind, "date": rng.choice(DAYS), "data": data_for(rng, kind)}
    if v2:
        r = rng.random()
        if r < 0.1:
            del stat["date"]  # dated by its year and day of year
            stat["year"], stat["day"] = 2024, rng.randint(61, 100)
        elif r < 0.15:
            del stat["date"]  # dated by the day it is created
        if rng.random() < 0.1:
            stat["anr"] = rng.randint(1, 4)  # v2 also takes integer analyses
    return stat


# ------------------------------------------- the processors, recomputed ---

def chosen(stats, kind, date_from, date_to, anrs):
    """(day, data) of the stats of a type within the dates (inclusive) and analyses."""
    for stat in stats:
        if stat["type"] != kind:
            continue
        day = stat_day(stat)
        if (date_from and day < date_from) or (date_to and day > date_to):
            continue
        if anrs is not None and stat.get("anr") not in anrs:
            continue
        yield day, stat["data"]


def object_measures(stats, kind, date_from, date_to, anrs):
    """object uuid -> day -> [(count, maxRisk, averageRate)] of the items that have all three measures."""
    found = {}
    for day, data in chosen(stats, kind, date_from, date_to, anrs):
        for item in data if isinstance(data, list) else ():
            if isinstance(item, dict) and "uuid" in item:
                values = [number(item.get(name, MISSING)) for name in MEASURES]
                if None not in values:
                    found.setdefault(item["uuid"], {}).setdefault(day, []).append(values)
    return found


def check_objects(answer, found, where):
    if not found:
        assert answer == [], where
        return
    assert isinstance(answer, list), where
    by_object = {}
    for entry in answer:
        assert entry["object"] not in by_object, (where, "object twice", entry["object"])
        by_object[entry["object"]] = entry
    assert set(by_object) == set(found), where
    for object_uuid, days in found.items():
        entry = by_object[object_uuid]
        here = (*where, object_uuid)
        assert set(entry) == {"object", "labels", "values", "averages"}, here
        assert entry["labels"] == labels_of(object_uuid), here
        assert [v["date"] for v in entry["values"]] == sorted(days), here
        for value in entry["values"]:
            assert set(value) == {"date", *MEASURES}, here
            for i, name in enumerate(MEASURES):
                close(value[name], mean([t[i] for t in days[value["date"]]]), (*here, value["date"], name))
        every = [t for values in days.values() for t in values]
        assert set(entry["averages"]) == set(MEASURES), here
        for i, name in enumerate(MEASURES):
            close(entry["averages"][name], mean([t[i] for t in every]), (*here, "averages", name))


def risk_measures(stats, date_from, date_to, anrs):
    """(state, kind, level) -> day -> [values] of the three named levels with a numeric value."""
    found = {}
    for day, data in chosen(stats, "risk", date_from, date_to, anrs):
        risks = data.get("risks") if isinstance(data, dict) else None
        for state in STATES:
            by_kind = risks.get(state) if isinstance(risks, dict) else None
            for kind in KINDS:
                levels = by_kind.get(kind) if isinstance(by_kind, dict) else None
                for level in levels if isinstance(levels, list) else ():
                    if isinstance(level, dict) and level.get("level") in LEVELS:
                        value = number(level.get("value", MISSING))
                        if value is not None:
                            found.setdefault((state, kind, level["level"]), {}).setdefault(day, []).append(value)
    return found


def check_risk_averages(answer, found, present, where):
    """`present`: whether any risk stat is in the selection (none: the answer is [])."""
    if not present:
        assert answer == [], where
        return
    assert set(answer) == set(STATES), where
    for state in STATES:
        assert set(answer[state]) == set(KINDS), where
        for kind in KINDS:
            assert set(answer[state][kind]) == set(LEVELS), where
            for level in LEVELS:
                days = found.get((state, kind, level), {})
                want = mean([v for values in days.values() for v in values]) if days else 0
                close(answer[state][kind][level], want, (*where, state, kind, level))


def selection(params, name, choices):
    value = params.get(name)
    if not value:
        return set(choices)
    return {part.strip() for part in value.split(",")}


def check_risk_averages_on_date(answer, found, present, params, where):
    if not present:
        assert answer == [], where
        return
    states, kinds = selection(params, "risks_state", STATES), selection(params, "risks_type", KINDS)
    assert set(answer) == states, where
    for state in states:
        assert set(answer[state]) == kinds, where
        for kind in kinds:
            assert set(answer[state][kind]) == set(LEVELS), where
            for level in LEVELS:
                days = found.get((state, kind, level), {})
                got = answer[state][kind][level]
                here = (*where, state, kind, level)
                assert [entry["date"] for entry in got] == sorted(days), here
                for entry in got:
                    assert set(entry) == {"date", "value"}, here
                    close(entry["value"], mean(days[entry["date"]]), (*here, entry["date"]))


RISK_PARAMS = (None, {}, {"risks_type": "informational"}, {"risks_state": "residual"},
               {"risks_type": "operational", "risks_state": "current"}, {"risks_type": "operational, informational"},
               {"risks_type": "", "risks_state": "current,residual"})


def date_ranges(rng):
    lo, hi = sorted(rng.sample(DAYS, 2))
    return [(None, None), (lo, hi), (rng.choice(DAYS), None), (None, rng.choice(DAYS)), (hi, hi),
            (rng.choice(DAYS), rng.choice(DAYS)),  # sometimes from after to: nothing
            ("2031-01-01", None)]


def anr_choices(rng):
    return [None, rng.sample(ANRS, rng.randint(1, 3)), [rng.choice(ANRS), str(uuid.UUID(int=1, version=4))]]


def compare_processors(port, rng, where):
    """Every processor's answer over random dates and analyses equals the recomputation; returns the stats."""
    stats = all_stats(port)
    token = rng.choice(list(TOKENS.values()))
    ranges, anr_lists = date_ranges(rng), anr_choices(rng)
    for date_from, date_to in ranges:
        for anrs in anr_lists:
            base = {**({"date_from": date_from} if date_from else {}), **({"date_to": date_to} if date_to else {}),
                    **({"anrs": anrs} if anrs is not None else {})}
            wanted = set(anrs) if anrs is not None else None
            here = (*where, date_from, date_to, tuple(anrs or ()))
            for kind in ("threat", "vulnerability"):
                processor = f"{kind}_average_on_date"
                body = ok(port, "GET", "/api/v1/stats/processed/", token,
                          {"type": kind, "processor": processor, **base})
                assert (body["type"], body["processor"]) == (kind, processor)
                check_objects(body["data"], object_measures(stats, kind, date_from, date_to, wanted),
                              (*here, processor))
            found = risk_measures(stats, date_from, date_to, wanted)
            present = any(True for _ in chosen(stats, "risk", date_from, date_to, wanted))
            body = ok(port, "GET", "/api/v1/stats/processed/", token,
                      {"type": "risk", "processor": "risk_averages", **base})
            check_risk_averages(body["data"], found, present, (*here, "risk_averages"))
            params = rng.choice(RISK_PARAMS)
            body = ok(port, "GET", "/api/v1/stats/processed/", token,
                      {"type": "risk", "processor": "risk_averages_on_date", **base,
                       **({"processor_params": params} if params is not None else {})})
            check_risk_averages_on_date(body["data"], found, present, params or {},
                                        (*here, "risk_averages_on_date", str(params)))
    return stats


# -------------------------------------- 1. aggregates equal a recomputation ---

def random_writes(port, rng, current):
    """POSTs (v1 batch, v2 single and list), PATCH, PUT and DELETE (v2 by id, v1 by analysis)."""
    orgs = list(TOKENS)
    for _ in range(2):
        owner = rng.choice(orgs)
        items = [monarc_stat(rng) for _ in range(rng.randint(6, 14))]
        answer = ok(port, "POST", "/api/v1/stats/", TOKENS[owner], items, status=201)
        assert answer["metadata"]["count"] == str(len(items))
    for _ in range(3):
        ok(port, "POST", STATS, TOKENS[rng.choice(orgs)], monarc_stat(rng, v2=True), status=201)
    items = [monarc_stat(rng, v2=True) for _ in range(rng.randint(5, 10))]
    ok(port, "POST", STATS, TOKENS[rng.choice(orgs)], items, status=201)
    targets = rng.sample(current, min(len(current), 14))
    for stat in targets[:6]:  # PATCH: new data, new date, or both, or another type
        change = rng.choice(["data", "date", "both", "type"])
        body = {}
        if change in ("data", "both"):
            body["data"] = data_for(rng, stat["type"]) if stat["type"] in KIND_CHOICES else {"n": 1}
        if change in ("date", "both"):
            body["date"] = rng.choice(DAYS)
        if change == "type":
            body["type"] = rng.choice(KIND_CHOICES)
            body["data"] = data_for(rng, body["type"])
        owner = stat.get("organization")
        ok(port, "PATCH", f"{STATS}{stat['id']}/", TOKENS[owner] if owner and rng.random() < 0.5 else ADMIN, body)
    for stat in targets[6:9]:  # PUT: everything replaced
        body = monarc_stat(rng, v2=True)
        ok(port, "PUT", f"{STATS}{stat['id']}/", ADMIN, body)
    for stat in targets[9:]:
        ok(port, "DELETE", f"{STATS}{stat['id']}/", ADMIN, status=204)
    if rng.random() < 0.6:
        ok(port, "DELETE", f"/api/v1/stats/{rng.choice(ANRS)}", TOKENS[rng.choice(orgs)], status=204)


def checkpoint_writes(port, rng, database):
    """~10 MB of stats through HTTP: the journal outgrows Store.MIN_CHECKPOINT_BYTES and a checkpoint
    runs while more writes land; returns once the database file holds the snapshot."""
    assert os.path.getsize(database) < statsd.Store.MIN_CHECKPOINT_BYTES
    padding = "p" * 8000
    for _ in range(12):
        batch = [{"anr": rng.choice(ANRS), "type": "compliance", "date": rng.choice(DAYS),
                  "data": [{"referential": new_uuid(rng), "label1": padding}]} for _ in range(100)]
        ok(port, "POST", STATS, TOKENS[rng.choice(list(TOKENS))], batch, status=201)
    writes = 0
    folding = database + ".journal.folding"
    while os.path.getsize(database) < statsd.Store.MIN_CHECKPOINT_BYTES or os.path.exists(folding):
        ok(port, "POST", "/api/v1/stats/", TOKENS["CASES"], [monarc_stat(rng) for _ in range(3)], status=201)
        writes += 1
        assert writes < 500, "no checkpoint was written"
    for _ in range(3):  # and some more, in the fresh journal only
        ok(port, "POST", "/api/v1/stats/", TOKENS["OTHER"], [monarc_stat(rng) for _ in range(4)], status=201)


def import_file(rng, path, current):
    """An export file of new stats and of stats already stored (same uuid, other data: kept as they are)."""
    stats = []
    for _ in range(rng.randint(10, 16)):
        stat = {"uuid": new_uuid(rng), **monarc_stat(rng, v2=True)}
        if rng.random() < 0.9:
            stat["organization"] = rng.choice(list(TOKENS))
        stats.append(stat)
    again = rng.sample(current, min(2, len(current)))
    for old in again:
        stats.append({"uuid": old["uuid"], "type": "threat", "date": DAYS[0],
                      "data": [object_item(rng, THREATS[0])], "organization": "admin"})
    write_export(path, stats, org_records())
    return [s["uuid"] for s in stats[:len(stats) - len(again)]]


ROUNDS = [  # how each round ends: the stop, then an offline import or not, and whether it checkpoints
    {"stop": "kill", "import": False, "checkpoint": False},
    {"stop": "term", "import": True, "checkpoint": False},
    {"stop": "kill", "import": False, "checkpoint": True},
    {"stop": "kill", "import": True, "checkpoint": False},
    {"stop": "term", "import": False, "checkpoint": False},
]


def test_processors_equal_a_recomputation_through_writes_imports_restarts_and_a_checkpoint(tmp_path, server):
    rng = random.Random(11)
    database = str(tmp_path / "statsd.json")
    seed = [{"uuid": new_uuid(rng), "organization": rng.choice(list(TOKENS)), **monarc_stat(rng, v2=True)}
            for _ in range(40)]
    result = cli("import", str(write_export(tmp_path / "seed.json", seed, org_records())), "--database", database)
    assert result.returncode == 0, result.stderr
    proc = server(database)
    current = compare_processors(proc.port, rng, ("seed",))
    assert len(current) == len(seed)
    for number_, plan in enumerate(ROUNDS):
        where = (f"round {number_}", str(plan))
        random_writes(proc.port, rng, current)
        if plan["checkpoint"]:
            checkpoint_writes(proc.port, rng, database)
        current = compare_processors(proc.port, rng, (*where, "live"))
        before = {s["id"]: record(s) for s in current}
        if plan["stop"] == "kill":
            assert os.path.getsize(database + ".journal") > 0  # the restart must replay it
            proc.kill()
        else:
            assert proc.stop() == 0
        new = []
        if plan["import"]:
            new = import_file(rng, tmp_path / f"import{number_}.json", current)
            result = cli("import", str(tmp_path / f"import{number_}.json"), "--database", database)
            assert result.returncode == 0, result.stderr
        proc = server(database)
        current = compare_processors(proc.port, rng, (*where, "restarted"))
        after = {s["id"]: record(s) for s in current}
        assert {i: s for i, s in after.items() if i in before} == before  # every write survived, imports kept them
        assert sorted(s["uuid"] for i, s in after.items() if i not in before) == sorted(new)
    assert len(current) > 1000  # the checkpoint's stats are there


# ------------------------------------------------ sorting, as the API defines it ---

def rank(value):
    """missing < null < bool < number < string < other (arrays, objects)."""
    if value is MISSING:
        return 0
    if value is None:
        return 1
    if isinstance(value, bool):
        return 2
    if isinstance(value, (int, float)):
        return 3
    if isinstance(value, str):
        return 4
    return 5


def compare_values(a, b):
    ra, rb = rank(a), rank(b)
    if ra != rb:
        return -1 if ra < rb else 1
    if ra < 2:
        return 0
    if ra == 5:  # arrays and objects compare by their JSON text (keys sorted)
        a, b = (orjson.dumps(v, option=orjson.OPT_SORT_KEYS).decode() for v in (a, b))
    return (a > b) - (a < b)


def value_at(stat, path):
    value = stat.get(path[0], MISSING)
    for part in path[1:]:
        if isinstance(value, dict):
            value = value.get(part, MISSING)
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return MISSING
        if value is MISSING:
            return MISSING
    return value


def sorted_as_asked(stats, order_by):
    """`stats` ordered by an _order_by value, each key descending with "-", ties by id ascending."""
    spec = [(tuple(part.lstrip("-").split("__")), part.startswith("-")) for part in order_by.split(",")]

    def compare(s1, s2):
        for path, descending in spec:
            c = compare_values(value_at(s1, path), value_at(s2, path))
            if c:
                return -c if descending else c
        return (s1["id"] > s2["id"]) - (s1["id"] < s2["id"])
    return sorted(stats, key=cmp_to_key(compare))


SCALARS = (None, True, False, 0, 1, 2, 2.0, -3, 2.5, -0.5, 10 ** 15, -(10 ** 15), "", "a", "ab", "abc", "b", "B",
           "2", "é", "\U0001F600", [0], [1, 2], [], {}, {"k": 1}, {"k": "a"})


def odd_value(rng):
    return MISSING if rng.random() < 0.15 else rng.choice(SCALARS)


def odd_stat(rng, day_pool):
    """A v2 stat with mixed types everywhere the order can look."""
    r = rng.random()
    if r < 0.75:
        data = {name: v for name in ("x", "y", "s") if (v := odd_value(rng)) is not MISSING}
    elif r < 0.93:
        data = [{name: v for name in ("count", "maxRisk") if (v := odd_value(rng)) is not MISSING}
                for _ in range(rng.randint(0, 2))]
    else:
        data = rng.choice([5, "text", None, 1.5, True])
    stat = {"type": rng.choice(["risk", "threat", "vulnerability", "cartography", "compliance", "Risk"]),
            "data": data}
    r = rng.random()
    if r < 0.6:
        stat["anr"] = rng.choice(ANRS[:3])
    elif r < 0.85:
        stat["anr"] = rng.randint(1, 3)
    if rng.random() < 0.8:
        stat["date"] = rng.choice(day_pool)
    else:
        stat["year"] = rng.choice([2023, 2024])
    return stat


async def post_stats(api, token, stats):
    created = []
    for start in range(0, len(stats), 1000):
        resp = await api.post(STATS, json=stats[start:start + 1000], headers=key(token))
        assert resp.status == 201, await resp.text()
        created += (await resp.json())["data"]
    return created


async def fetch_all(api, token):
    found, skip = [], 0
    while True:
        resp = await api.get(STATS, params={"_limit": "1000", "_skip": str(skip)}, headers=key(token))
        assert resp.status == 200, await resp.text()
        body = await resp.json()
        found += body["data"]
        skip += 1000
        if not body["has_more"]:
            return found


async def odd_site(make_client, tmp_path, rng, imported, posted):
    """(client, every stat as the admin lists them) of a database of odd stats: `imported` by
    `statsd import` with ids in an order other than the file's (so ties by id are not ties by
    creation), then `posted` through HTTP by the three organizations."""
    days = DAYS[:12]
    stats = []
    for _ in range(imported):
        stat = {"uuid": new_uuid(rng), "id": f"{rng.getrandbits(96):024x}", "organization": rng.choice(list(TOKENS)),
                **odd_stat(rng, days)}
        stats.append(stat)
    database = str(tmp_path / "odd.json")
    result = cli("import", str(write_export(tmp_path / "odd-seed.json", stats, org_records())), "--database", database)
    assert result.returncode == 0, result.stderr
    client = await make_client(database=database)
    for i, token in enumerate(TOKENS.values()):
        await post_stats(client, token, [odd_stat(rng, days) for _ in range(posted // 3 + (i < posted % 3))])
    stats = await fetch_all(client, ADMIN)
    assert len(stats) == imported + posted
    assert [s["id"] for s in stats] != sorted(s["id"] for s in stats)
    return client, stats


async def error_of(resp, status=400):
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert body["status_code"] == status and body["exception_cls"] == "BadRequest" and body["target"] == "stats"
    assert "Traceback" not in body["error"]
    return body["error"]


# ------------------------------------------------------------------ 2. the caps ---

async def test_order_by_filters_and_fields_are_capped_with_clear_400s(make_client, tmp_path):
    rng = random.Random(2)
    api, stats = await odd_site(make_client, tmp_path, rng, 120, 120)
    headers = key(ADMIN)

    for order_by in ("type,type", "type,-type", "-type,type", "data__x,anr,-data__x", "anr,date,anr"):
        resp = await api.get(STATS, params={"_order_by": order_by}, headers=headers)
        assert "more than once" in await error_of(resp), order_by
    resp = await api.get(STATS, params={"_order_by": "type,anr,date,-year,data__x"}, headers=headers)
    message = await error_of(resp)
    assert "_order_by" in message and "4" in message

    order_by = "-type,data__x,-anr,date"
    resp = await api.get(STATS, params={"_order_by": order_by, "_limit": "1000"}, headers=headers)
    assert resp.status == 200, await resp.text()
    got = [s["id"] for s in (await resp.json())["data"]]
    assert got == [s["id"] for s in sorted_as_asked(stats, order_by)]
    order_by = "-data__s,year,data__0__count,-organization"
    resp = await api.get(STATS, params={"_order_by": order_by, "_limit": "1000"}, headers=headers)
    assert resp.status == 200, await resp.text()
    assert [s["id"] for s in (await resp.json())["data"]] == [s["id"] for s in sorted_as_asked(stats, order_by)]

    twenty = {"type__ne": "cartography", "date__gte": DAYS[2], "date__lte": DAYS[9], "data__x__exists": "true",
              "organization__ne": "OTHER", **{f"data__k{i}__exists": "false" for i in range(15)}}
    assert len(twenty) == 20
    resp = await api.get(STATS, params={**twenty, "_limit": "1000"}, headers=headers)
    assert resp.status == 200, await resp.text()
    want = [s["id"] for s in stats if s["type"] != "cartography" and DAYS[2] <= s.get("date", "") <= DAYS[9]
            and isinstance(s["data"], dict) and "x" in s["data"] and s.get("organization") != "OTHER"]
    assert 0 < len(want) < len(stats)
    assert [s["id"] for s in (await resp.json())["data"]] == want
    resp = await api.get(STATS, params={**twenty, "data__k99__exists": "false"}, headers=headers)
    assert "filters" in await error_of(resp)

    names = ",".join((["type", "anr", "date", "data"] * 9)[:33])
    resp = await api.get(STATS, params={"_fields": names}, headers=headers)
    assert "_fields" in await error_of(resp)
    resp = await api.get(STATS, params={"_fields": ",".join((["type", "anr", "data", "type"] * 8)[:32]),
                                        "_limit": "1000"}, headers=headers)
    assert resp.status == 200, await resp.text()
    pairs_seen = []
    body = json.loads(await resp.text(), object_pairs_hook=lambda pairs: pairs_seen.append(pairs) or dict(pairs))
    for pairs in pairs_seen:  # each object of the answer names each field once
        names_ = [name for name, _ in pairs]
        assert len(names_) == len(set(names_)), names_
    by_id = {s["id"]: s for s in stats}
    assert len(body["data"]) == len(stats)
    for item in body["data"]:
        stat = by_id[item["id"]]
        assert item == {name: stat[name] for name in ("id", "type", "anr", "data") if name in stat}


# ---------------------------------------------------------- 3. ordered pages ---

ORDER_FIELDS = ("type", "anr", "date", "organization", "year", "uuid", "created_at", "data", "data__x", "data__y",
                "data__s", "data__0__count", "data__0__maxRisk", "data__1__count")


async def test_ordered_pages_equal_a_slice_of_a_full_sort(make_client, tmp_path):
    rng = random.Random(3)
    count = 5000  # more than one sort run (statsd.RUN)
    assert count > statsd.RUN
    api, stats = await odd_site(make_client, tmp_path, rng, 3000, count - 3000)
    checks = [("-data__s,data__x,-anr,type", 4090, 20), ("data,-data__0__count", 0, 1000),
              ("type,-data__y", 4990, 30), ("-created_at,-uuid", 0, 5)]
    for _ in range(8):
        fields = rng.sample(ORDER_FIELDS, rng.randint(1, 4))
        order_by = ",".join(("-" if rng.random() < 0.5 else "") + f for f in fields)
        checks.append((order_by, rng.randint(0, count + 100), rng.choice([0, 1, 7, 100, 1000, rng.randint(1, 1000)])))
    for order_by, skip, limit in checks:
        resp = await api.get(STATS, params={"_order_by": order_by, "_skip": str(skip), "_limit": str(limit)},
                             headers=key(ADMIN))
        assert resp.status == 200, await resp.text()
        body = await resp.json()
        want = sorted_as_asked(stats, order_by)
        assert [s["id"] for s in body["data"]] == [s["id"] for s in want[skip:skip + limit]], (order_by, skip, limit)
        assert body["has_more"] == (skip + limit < count), (order_by, skip, limit)
    # with a filter too, seen by an ordinary key (its own stats only)
    order_by = "-data__x,date,-type"
    resp = await api.get(STATS, params={"_order_by": order_by, "type__ne": "risk", "_skip": "50", "_limit": "900"},
                         headers=key(TOKENS["CASES"]))
    assert resp.status == 200
    mine = [s for s in stats if s.get("organization") == "CASES" and s["type"] != "risk"]
    assert [s["id"] for s in (await resp.json())["data"]] == [s["id"] for s in sorted_as_asked(mine, order_by)[50:950]]


# ---------------------------------------- 4 and 5. a large imported database ---

def big_stat(rng, objects):
    kind = rng.choice(("threat", "vulnerability"))
    items = [{"uuid": u, "label1": rng.choice(("Theft", "Fire", "Flood")), "label2": "", "label3": "", "label4": "",
              "count": rng.randint(0, 9), "maxRisk": rng.randint(0, 20), "averageRate": f"{rng.uniform(0, 5):.2f}"}
             for u in rng.sample(objects[kind], 2)]
    return {"uuid": new_uuid(rng), "organization": rng.choice(list(TOKENS)), "anr": new_uuid(rng), "type": kind,
            "date": (date(2024, 1, 1) + timedelta(days=rng.randint(0, 365))).isoformat(), "data": items}


@pytest.fixture(scope="module")
def big_site(tmp_path_factory):
    """30,000 MONARC-shaped stats loaded by `statsd import`, watching for the checkpoints it runs."""
    folder = tmp_path_factory.mktemp("big")
    rng = random.Random(4)
    objects = {"threat": [new_uuid(rng) for _ in range(40)], "vulnerability": [new_uuid(rng) for _ in range(40)]}
    stats = [big_stat(rng, objects) for _ in range(30000)]
    export = write_export(folder / "seed.json", stats, org_records())
    database = str(folder / "statsd.json")
    folding, done, seen = database + ".journal.folding", threading.Event(), []

    def watch():
        while not done.is_set():
            if os.path.exists(folding) and not seen:
                seen.append(True)
            done.wait(0.001)
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        result = cli("import", str(export), "--database", database, timeout=600)
    finally:
        done.set()
        watcher.join()
    return SimpleNamespace(database=database, export=export, stats=stats, result=result, checkpointed=bool(seen))


def test_an_import_that_checkpoints_logs_no_error_and_the_file_holds_every_stat(big_site, tmp_path):
    result = big_site.result
    assert result.returncode == 0, result.stderr
    assert "30000 stat(s)" in result.stdout
    assert os.path.getsize(big_site.export) > 1.5 * statsd.Store.MIN_CHECKPOINT_BYTES
    assert big_site.checkpointed, "no checkpoint ran during the import"
    assert not [line for line in result.stderr.splitlines() if "ERROR" in line or "CRITICAL" in line], result.stderr
    proc = ServerProcess(big_site.database).start(timeout=120)
    try:
        uuids = [s["uuid"] for s in all_stats(proc.port, fields="uuid")]
    finally:
        assert proc.stop() == 0
    assert len(uuids) == len(big_site.stats)
    assert set(uuids) == {s["uuid"] for s in big_site.stats}
    exported = cli("export", "--database", big_site.database, "--output", str(tmp_path / "out.json"))
    assert exported.returncode == 0, exported.stderr
    document = orjson.loads((tmp_path / "out.json").read_bytes())
    assert {o["name"] for o in document["organizations"]} == set(TOKENS)
    fields = ("organization", "anr", "type", "date", "data")
    assert {s["uuid"]: [s.get(f) for f in fields] for s in document["stats"]} == \
        {s["uuid"]: [s[f] for f in fields] for s in big_site.stats}


def test_cheap_requests_complete_while_the_heaviest_requests_run(big_site):
    assert big_site.result.returncode == 0, big_site.result.stderr
    proc = ServerProcess(big_site.database).start(timeout=120)
    try:
        anrs = [s["anr"] for s in big_site.stats[:1500]]
        heavy = [
            ("GET", f"{STATS}?data__0__count__gt=3&_order_by=-data__0__count,type,-anr,date&_skip=5000&_limit=1000",
             None),
            ("GET", f"{STATS}?_order_by=-data__1__maxRisk,data__0__averageRate,-organization,uuid&_skip=12000"
                    "&_limit=1000", None),
            ("GET", f"{STATS}?data__1__label1__icontains=f&_order_by=data__1__uuid,-date,anr,-uuid&_skip=2000"
                    "&_limit=1000", None),
            ("GET", "/api/v1/stats/processed/", {"type": "threat", "processor": "threat_average_on_date",
                                                 "anrs": anrs}),
        ]
        done, lock, sent, results = [], threading.Lock(), [threading.Event() for _ in heavy], {}

        def run_heavy(i, method, path, body):
            """One connection sending its heavy request twice, back to back."""
            conn = http.client.HTTPConnection("127.0.0.1", proc.port, timeout=300)
            headers = {"X-API-KEY": ADMIN, "User-Agent": MONARC}
            data = orjson.dumps(body) if body is not None else None
            if data:
                headers["Content-Type"] = "application/json"
            try:
                for repeat in range(2):
                    conn.request(method, path, body=data, headers=headers)
                    sent[i].set()
                    resp = conn.getresponse()
                    results[i, repeat] = (resp.status, orjson.loads(resp.read()))
                    with lock:
                        done.append(("heavy", i))
            finally:
                sent[i].set()
                conn.close()

        threads = [threading.Thread(target=run_heavy, args=(i, *h)) for i, h in enumerate(heavy)]
        for thread in threads:
            thread.start()
        for event in sent:
            event.wait(60)
        cheap, conn = [], http.client.HTTPConnection("127.0.0.1", proc.port, timeout=300)
        try:
            for i in range(20):  # sequential, on one connection, as a client checking the service
                conn.request("GET", "/api/v1/client/me", headers={"X-API-KEY": TOKENS["CASES"], "User-Agent": MONARC})
                resp = conn.getresponse()
                cheap.append((resp.status, orjson.loads(resp.read())))
                with lock:
                    done.append(("cheap", i))
        finally:
            conn.close()
        for thread in threads:
            thread.join(300)
    finally:
        proc.kill()
    assert all(status == 200 and body["name"] == "CASES" for status, body in cheap), cheap
    assert sorted(results) == [(i, r) for i in range(4) for r in range(2)], sorted(results)
    assert all(status == 200 for status, _ in results.values()), results
    for repeat in range(2):
        first = [item["data"][0]["count"] for item in results[0, repeat][1]["data"]]
        assert len(first) == 1000 and first == sorted(first, reverse=True) and first[-1] > 3
        assert results[3, repeat][1]["data"]
    last_heavy = max(i for i, (kind, _) in enumerate(done) if kind == "heavy")
    last_cheap = max(i for i, (kind, _) in enumerate(done) if kind == "cheap")
    assert last_cheap < last_heavy, done


# ------------------------------------------------------------ 6. v1 lists ---

def months_before(day, months):
    year, month = divmod(day.year * 12 + day.month - 1 - months, 12)
    return date(year, month + 1, min(day.day, calendar.monthrange(year, month + 1)[1]))


async def test_v1_lists_of_one_organization_among_several(api):
    rng = random.Random(6)
    today = date.today()
    window_start = months_before(today, 3)
    special = [today, today + timedelta(days=1), window_start, window_start - timedelta(days=1)]
    days = sorted({*(today - timedelta(days=rng.randint(-5, 200)) for _ in range(25)), *special})
    shared = str(uuid.UUID(int=0x5AAED, version=4))
    anrs = {"CASES": [str(uuid.UUID(int=0xCA0 + i, version=4)) for i in range(3)] + [shared],
            "OTHER": [str(uuid.UUID(int=0x070 + i, version=4)) for i in range(2)] + [shared],
            "admin": [str(uuid.UUID(int=0xAD0 + i, version=4)) for i in range(2)]}
    tokens = {"admin": api.admin, "CASES": api.cases, "OTHER": api.other}
    for _ in range(4):  # batches: stats of one batch share their creation time
        for org, token in tokens.items():
            items = []
            for _ in range(rng.randint(5, 15)):
                kind = rng.choice(("risk", "threat", "vulnerability"))
                items.append({"anr": rng.choice(anrs[org]), "type": kind,
                              "date": rng.choice(days).isoformat(), "data": data_for(rng, kind)})
            for anr in rng.sample(anrs[org], 2):  # ties on the latest dates, in this batch and across batches
                items.append({"anr": anr, "type": "risk", "date": days[-1].isoformat(), "data": data_for(rng, "risk")})
            resp = await api.post("/api/v1/stats/", json=items, headers={**key(token), "User-Agent": MONARC})
            assert resp.status == 201, await resp.text()
    stats = await fetch_all(api, api.admin)
    for stat in rng.sample(stats, 10):  # moved to other dates
        resp = await api.patch(f"{STATS}{stat['id']}/", json={"date": rng.choice(days).isoformat()},
                               headers=key(api.admin))
        assert resp.status == 200
    for stat in rng.sample(stats, 6):
        resp = await api.delete(f"{STATS}{stat['id']}/", headers=key(api.admin))
        assert resp.status == 204
    stats = await fetch_all(api, api.admin)  # in creation order
    position = {s["id"]: i for i, s in enumerate(stats)}

    def v1_view(s):
        return {"uuid": s["uuid"], "anr": s["anr"], "type": s["type"], "date": s["date"], "data": s["data"]}

    def expected(org, kind, date_from=None, date_to=None, anr_list=None, last=False):
        seen = [s for s in stats if s["type"] == kind and (org == "admin" or s["organization"] == org)
                and (anr_list is None or s["anr"] in anr_list)]
        if last:
            latest = {}
            for s in seen:
                mark = (s["date"], s["created_at"], position[s["id"]])
                if s["anr"] not in latest or mark > latest[s["anr"]][0]:
                    latest[s["anr"]] = (mark, s)
            return [s for _, s in latest.values()]
        low = date_from or window_start.isoformat()
        high = date_to or today.isoformat()
        return [s for s in seen if low <= s["date"] <= high]

    checked = 0
    for org, token in tokens.items():
        for kind in ("risk", "threat"):
            inner = rng.sample(days, 2)
            lo, hi = min(inner).isoformat(), max(inner).isoformat()
            picks = [None, rng.sample(anrs[org], 2), [shared, anrs["OTHER" if org == "CASES" else "CASES"][0]]]
            cases = [{}, {"date_from": lo}, {"date_to": hi}, {"date_from": lo, "date_to": hi},
                     {"date_from": days[0].isoformat(), "date_to": days[-1].isoformat()},
                     {"date_from": hi, "date_to": lo}, {"get_last": True}]
            for params in cases:
                for anr_list in picks:
                    body = {"type": kind, **params, **({"anrs": anr_list} if anr_list is not None else {})}
                    resp = await api.get("/api/v1/stats/", json=body, headers={**key(token), "User-Agent": MONARC})
                    assert resp.status == 200, await resp.text()
                    answer = await resp.json()
                    want = expected(org, kind, params.get("date_from"), params.get("date_to"),
                                    set(anr_list) if anr_list is not None else None, bool(params.get("get_last")))
                    where = (org, body)
                    assert answer["metadata"]["count"] == str(len(want)), where
                    assert sorted(answer["data"], key=lambda s: s["uuid"]) == \
                        sorted(map(v1_view, want), key=lambda s: s["uuid"]), where
                    checked += bool(want)
    assert checked > 60
