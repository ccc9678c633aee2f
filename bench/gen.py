"""Generate a deterministic, MONARC-shaped statsd database for the benchmark.

For each size N it writes, into --out (default bench/.data/):

  statsd-N.json      a TinyDB file ({"organizations": {...}, "stats": {...}})
                     that `statsd serve --database` opens as it is
  jsonserver-N.json  the same stat records as {"stats": [...]}, for json-server
  ids-N.txt          100 stat ids spread over the file (for get-by-id)
  meta-N.json        what was generated (seed, counts, sizes), to skip a rerun

and, once: post-one.json (one stat, a POST body) and post-batch.json (a list
of 1,000 stats).  Every stat has data.score <= 2, so `data__score__gt=2`
matches nothing and has to look at every record.

Records are written one by one, so memory stays flat even at 1,000,000.
"""
import argparse
import datetime as dt
import hashlib
import json
import os
import random
import sys
import time
import uuid

try:
    import orjson

    def dumps(obj) -> bytes:
        return orjson.dumps(obj)
except ImportError:  # the bench also runs without the project's deps
    def dumps(obj) -> bytes:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()

VERSION = 1  # bump when the shape of the data changes, to regenerate
ORGS = 50
TYPES = ("risk", "vulnerability", "threat", "cartography", "compliance")
ADMIN_NAME = "bench-admin"
DEFAULT_ADMIN_TOKEN = "bench-admin-token-0123456789abcdef"
START = dt.date(2025, 1, 1)

# Small vocabularies, one per MONARC label language (label1..label4 = fr, en, de, nl).
WORDS = {
    "fr": ["perte", "vol", "erreur", "défaillance", "accès", "données", "matériel", "logiciel",
           "réseau", "personnel", "sauvegarde", "intrusion", "divulgation", "saturation",
           "incendie", "dégât", "des eaux", "d'utilisation", "non autorisé", "du système"],
    "en": ["loss", "theft", "error", "failure", "access", "data", "equipment", "software",
           "network", "staff", "backup", "intrusion", "disclosure", "saturation", "fire",
           "water damage", "of use", "unauthorised", "of the system", "of media"],
    "de": ["Verlust", "Diebstahl", "Fehler", "Ausfall", "Zugriff", "Daten", "Geräte",
           "Software", "Netzwerk", "Personal", "Sicherung", "Eindringen", "Offenlegung",
           "Überlastung", "Brand", "Wasserschaden", "der Nutzung", "unbefugt", "des Systems"],
    "nl": ["verlies", "diefstal", "fout", "storing", "toegang", "gegevens", "apparatuur",
           "software", "netwerk", "personeel", "back-up", "inbraak", "openbaarmaking",
           "verzadiging", "brand", "waterschade", "van gebruik", "onbevoegd", "van het systeem"],
}
LANGS = ("fr", "en", "de", "nl")


def labels(rng: random.Random, words: int) -> dict:
    """label1..label4: the same idea phrased in the four MONARC languages."""
    picks = [rng.randrange(min(map(len, WORDS.values()))) for _ in range(words)]
    out = {}
    for n, lang in enumerate(LANGS, 1):
        text = " ".join(WORDS[lang][p] for p in picks)
        out[f"label{n}"] = text[0].upper() + text[1:]
    return out


def make_uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


class Catalog:
    """The shared MONARC catalogs that threat/vulnerability/compliance stats point into."""

    def __init__(self, rng: random.Random):
        self.threats = [dict(uuid=make_uuid(rng), **labels(rng, rng.randint(2, 4))) for _ in range(80)]
        self.vulnerabilities = [dict(uuid=make_uuid(rng), **labels(rng, rng.randint(3, 5)))
                                for _ in range(150)]
        self.referentials = []
        for r in range(3):
            categories = []
            for c in range(rng.randint(4, 7)):
                controls = [{"code": f"{5 + c}.{k + 1}.{rng.randint(1, 4)}",
                             "measure": labels(rng, rng.randint(3, 5))["label2"]}
                            for k in range(rng.randint(2, 3))]
                categories.append((labels(rng, 2), controls))
            self.referentials.append((make_uuid(rng), labels(rng, 3), categories))


def risk_levels(rng: random.Random, scale: int) -> list:
    return [{"level": level, "value": rng.randint(0, scale)}
            for level in ("Low risks", "Medium risks", "High risks")]


PROFILE = "compact"  # set by --profile


def data_for(kind: str, rng: random.Random, cat: Catalog) -> dict:
    data = full_data_for(kind, rng, cat)
    return compact(kind, data) if PROFILE == "compact" else data


def compact(kind: str, data: dict) -> dict:
    """The same shapes, cut down to what a small analysis sends (~450 bytes a stat in all).

    The issue's reference database is 34 MB for 100,000 stats, about 340 bytes a
    stat, of which the fixed fields (ids, dates, periods) take ~310: its `data`
    was small. The full profile (--profile full) is ~3.5 KB a stat.
    """
    if kind == "risk":
        return {"total": data["total"], "score": data["score"]}
    if kind in ("threat", "vulnerability"):
        return {"items": [{k: item[k] for k in ("uuid", "maxRisk", "count", "averageRate")}
                          for item in data["items"][:1]], "score": data["score"]}
    if kind == "cartography":
        return {"risks": {"current": {"informational": dict(list(data["risks"]["current"]["informational"].items())[:2])}},
                "score": data["score"]}
    return {"items": [{"referential": item["referential"], "value": item["current"][0]["value"]}
                      for item in data["items"][:1]], "score": data["score"]}


def full_data_for(kind: str, rng: random.Random, cat: Catalog) -> dict:
    score = round(rng.uniform(0, 2), 2)  # always <= 2: data__score__gt=2 matches nothing
    if kind == "risk":
        risks = {when: {"informational": risk_levels(rng, 120), "operational": risk_levels(rng, 40)}
                 for when in ("current", "residual")}
        total = {when: {k: sum(x["value"] for x in v) for k, v in risks[when].items()} for when in risks}
        return {"total": total, "risks": risks, "score": score}
    if kind in ("threat", "vulnerability"):
        pool = cat.threats if kind == "threat" else cat.vulnerabilities
        items = []
        for base in rng.sample(pool, rng.randint(10, 30)):
            count = rng.randint(1, 40)
            items.append(dict(base, maxRisk=rng.randint(0, 80), count=count,
                              averageRate=f"{rng.uniform(0, 20):.4f}"))
        return {"items": items, "score": score}
    if kind == "cartography":
        impact, probability = [0, 1, 2, 3, 4], [0, 1, 2, 3, 4]
        likelihood = sorted({t * v for t in range(5) for v in range(1, 5)})

        def grid(columns):
            return {str(i): {str(c): rng.randint(1, 30) for c in rng.sample(columns, rng.randint(1, 4))}
                    for i in rng.sample(impact, rng.randint(2, 5))}

        risks = {when: {"informational": grid(likelihood), "operational": grid(probability)}
                 for when in ("current", "residual")}
        return {"scales": {"impact": impact, "probability": probability, "likelihood": likelihood},
                "risks": risks, "score": score}
    if kind == "compliance":
        items = []
        for ref_uuid, ref_labels, categories in rng.sample(cat.referentials, rng.randint(1, 2)):
            def maturity(cats):
                out = []
                for cat_labels, controls in cats:
                    ctl = [dict(c, value=rng.randint(0, 5)) for c in controls]
                    out.append(dict(cat_labels, controls=ctl,
                                    value=round(sum(c["value"] for c in ctl) / len(ctl), 2)))
                return out
            chosen = categories[:rng.randint(3, len(categories))]
            items.append(dict(ref_labels, referential=ref_uuid,
                              current=maturity(chosen), target=maturity(chosen)))
        return {"items": items, "score": score}
    raise ValueError(kind)


def date_fields(day: dt.date) -> dict:
    return {"day": day.timetuple().tm_yday, "week": day.isocalendar()[1], "month": day.month,
            "quarter": (day.month - 1) // 3 + 1, "year": day.year}


def organizations(rng: random.Random) -> list:
    """(name, anrs) of the 50 organizations; anrs are ints, or uuids for every 5th org."""
    orgs, next_anr = [], 1
    for n in range(1, ORGS + 1):
        count = rng.randint(1, 5)
        if n % 5 == 0:
            anrs = [make_uuid(rng) for _ in range(count)]
        else:
            anrs = list(range(next_anr, next_anr + count))
            next_anr += count
        orgs.append((f"org-{n:02d}", anrs))
    return orgs


def org_docs(rng: random.Random, orgs: list, admin_token: str) -> dict:
    docs, t0 = {}, dt.datetime(2024, 12, 1, 9, 0, 0)
    names = [name for name, _ in orgs] + [ADMIN_NAME]
    for n, name in enumerate(names, 1):
        token = admin_token if name == ADMIN_NAME else f"{name}-{rng.getrandbits(128):032x}"
        stamp = (t0 + dt.timedelta(minutes=n)).strftime("%Y-%m-%dT%H:%M:%S.%f")
        docs[str(n)] = {"name": name, "token_sha256": hashlib.sha256(token.encode()).hexdigest(),
                        "is_admin": name == ADMIN_NAME, "created_at": stamp, "updated_at": stamp}
    return docs


def stats(size: int, rng: random.Random, orgs: list, cat: Catalog):
    """Yield `size` stat docs, in creation order.

    MONARC collects one stat per (anr, type) per day.  The collection days are
    spread over at least one year, so month filters match at every size.
    """
    combos = [(name, anr, kind) for name, anrs in orgs for anr in anrs for kind in TYPES]
    days = -(-size // len(combos))
    span = max(365, days)
    seen = set()
    n = 0
    for k in range(days):
        day = START + dt.timedelta(days=k * span // days)
        moment = dt.datetime.combine(day, dt.time(2, 0))
        for name, anr, kind in combos:
            if n == size:
                return
            while True:
                stat_id = f"{rng.getrandbits(96):024x}"
                if stat_id not in seen:
                    seen.add(stat_id)
                    break
            moment += dt.timedelta(microseconds=rng.randint(1000, 50000))
            stamp = moment.strftime("%Y-%m-%dT%H:%M:%S.%f")
            yield {"id": stat_id, "uuid": make_uuid(rng), "organization": name, "anr": anr,
                   "type": kind, **date_fields(day), "data": data_for(kind, rng, cat),
                   "created_at": stamp, "updated_at": stamp}
            n += 1


def post_body(rng: random.Random, cat: Catalog, kind: str = "risk") -> dict:
    day = START + dt.timedelta(days=rng.randrange(365))
    return {"type": kind, "anr": rng.randint(1, 200), **date_fields(day), "data": data_for(kind, rng, cat)}


def generate(size: int, out: str, seed: int, admin_token: str) -> dict:
    rng = random.Random(seed)
    cat = Catalog(rng)
    orgs = organizations(rng)
    started = time.perf_counter()
    paths = {k: os.path.join(out, f"{k}-{size}.json") for k in ("statsd", "jsonserver")}
    ids, every = [], max(1, size // 100)
    with open(paths["statsd"] + ".tmp", "wb") as tdb, open(paths["jsonserver"] + ".tmp", "wb") as js:
        tdb.write(b'{"organizations":' + dumps(org_docs(rng, orgs, admin_token)) + b',"stats":{')
        js.write(b'{"stats":[')
        for n, doc in enumerate(stats(size, rng, orgs, cat)):
            raw = dumps(doc)
            sep = b"," if n else b""
            tdb.write(sep + b'"%d":' % (n + 1) + raw)
            js.write(sep + raw)
            if n % every == every // 2:
                ids.append(doc["id"])
        tdb.write(b"}}")
        js.write(b"]}")
    for path in paths.values():
        os.replace(path + ".tmp", path)
    with open(os.path.join(out, f"ids-{size}.txt"), "w") as f:
        f.write("\n".join(ids) + "\n")
    meta = {"version": VERSION, "seed": seed, "size": size, "admin_token": admin_token, "profile": PROFILE,
            "organizations": ORGS, "bytes": os.path.getsize(paths["statsd"]),
            "seconds": round(time.perf_counter() - started, 1)}
    with open(os.path.join(out, f"meta-{size}.json"), "w") as f:
        json.dump(meta, f)
    return meta


def is_fresh(size: int, out: str, seed: int, admin_token: str) -> bool:
    try:
        with open(os.path.join(out, f"meta-{size}.json")) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return False
    wanted = {"version": VERSION, "seed": seed, "size": size, "admin_token": admin_token, "profile": PROFILE}
    return all(meta.get(k) == v for k, v in wanted.items()) and all(
        os.path.exists(os.path.join(out, f"{k}-{size}.{ext}"))
        for k, ext in (("statsd", "json"), ("jsonserver", "json"), ("ids", "txt")))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1000,100000", help="comma-separated stat counts")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), ".data"))
    p.add_argument("--seed", type=int, default=20260105)
    p.add_argument("--admin-token", default=os.environ.get("BENCH_ADMIN_TOKEN", DEFAULT_ADMIN_TOKEN))
    p.add_argument("--force", action="store_true", help="regenerate even if the files are there")
    p.add_argument("--profile", choices=("compact", "full"), default=os.environ.get("BENCH_PROFILE", "compact"),
                   help="size of data: compact (~450 B a stat, default) or full (~3.5 KB)")
    args = p.parse_args(argv)
    global PROFILE
    PROFILE = args.profile
    os.makedirs(args.out, exist_ok=True)
    rng = random.Random(args.seed + 1)
    cat = Catalog(rng)
    with open(os.path.join(args.out, "post-one.json"), "wb") as f:
        f.write(dumps(post_body(rng, cat)))
    with open(os.path.join(args.out, "post-batch.json"), "wb") as f:
        f.write(dumps([post_body(rng, cat, TYPES[n % len(TYPES)]) for n in range(1000)]))
    for size in (int(s) for s in args.sizes.split(",") if s.strip()):
        if not args.force and is_fresh(size, args.out, args.seed, args.admin_token):
            print(f"gen: {size} stats: up to date in {args.out}")
            continue
        meta = generate(size, args.out, args.seed, args.admin_token)
        print(f"gen: {size} stats: {meta['bytes'] / 1e6:.1f} MB in {meta['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
