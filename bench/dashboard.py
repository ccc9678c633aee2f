"""Server time of each dashboard page at N MONARC-shaped stats (default 100,000).

    .venv/bin/python bench/dashboard.py [--stats 100000] [--repeat 5]

Builds a database of 50 organizations with 4 analyses each, sending the five MONARC stats
per analysis and date (tests/monarc_data.py shapes: threat and vulnerability lists with
labels in four languages, risk levels), serves it in this process, logs in as the admin
and times each page (the median of --repeat requests after one warm-up; the loopback HTTP
round trip is included, about a millisecond), once the background work that follows a start
(packing every record's data) is done. Prints a Markdown table, with the part of
each page's time spent in the functions that give the dashboard its numbers
(processed_stats, period_sums, stat_counts_by_month, organization_activity) and the rest
(selection, charts, templates).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import monarc_data  # noqa: E402
import statsd  # noqa: E402

PAGES = ["/", "/dashboard/landscape", "/dashboard/landscape?period=365&top=15&by=count",
         "/dashboard/landscape?organization=org-07", "/dashboard/evolution", "/dashboard/evolution?months=24",
         "/dashboard/explorer", "/dashboard/explorer?type=risk&_order_by=-date",
         "/dashboard/charts/threats.csv", "/dashboard/organizations/org-07"]


def build(path: str, wanted: int) -> str:
    orgs = 50
    analyses = 4
    dates = max(1, wanted // (orgs * analyses * 5))
    every = max(1, 365 // dates)
    now = statsd.utcnow()
    token = "bench-dashboard-admin-token-0123456789"
    org_docs = {"1": {"name": "admin", "token_sha256": statsd.hash_token(token), "is_admin": True,
                      "created_at": now, "updated_at": now}}
    stat_docs = {}
    ids = statsd.IdGenerator()
    for o in range(orgs):
        name = f"org-{o:02d}"
        org_docs[str(o + 2)] = {"name": name, "token_sha256": statsd.hash_token(f"{name}-token-0123456789"),
                                "is_admin": False, "created_at": now, "updated_at": now}
        _, stats = monarc_data.organization_stats(o, analyses, date.today(), dates * every, every=every)
        for stat in stats:
            doc = statsd.ordered_stat({**stat, **statsd.periods_of(stat["date"]), "organization": name,
                                       "uuid": str(statsd.uuidlib.uuid4()), "id": ids(),
                                       "created_at": now, "updated_at": now})
            stat_docs[str(len(stat_docs) + 1)] = doc
    with open(path, "wb") as f:
        f.write(statsd.dumps({"organizations": org_docs, "stats": stat_docs}))  # data is kept serialized
    return token


BROWSER = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}  # / answers JSON to other clients
SEAMS = ("processed_stats", "period_sums", "stat_counts_by_month", "organization_activity")
IN_SEAMS = [0.0]


def _timed(func):
    if asyncio.iscoroutinefunction(func):
        async def timed_async(*args, **kwargs):
            started = time.perf_counter()
            try:
                return await func(*args, **kwargs)
            finally:
                IN_SEAMS[0] += time.perf_counter() - started
        return timed_async

    def timed(*args, **kwargs):
        started = time.perf_counter()
        try:
            return func(*args, **kwargs)
        finally:
            IN_SEAMS[0] += time.perf_counter() - started
    return timed


async def settled(store) -> None:
    """Wait for the background work that follows a start (every record's data packed), so that
    it does not run beside the pages timed: the pages are timed as a running server serves them."""
    packer = getattr(store, "packer", None)
    if packer is None:
        return
    await packer.pack_waiting()
    while any(doc.get("data").__class__ in packer.PLAIN for doc in store.stats.docs.values()):
        await asyncio.sleep(0.2)  # a chunk the background packer took is still in its thread
    await asyncio.sleep(1.5)  # then it gives the freed memory back


async def measure(path: str, token: str, repeat: int, cold: bool) -> list[tuple[str, float, float]]:
    from aiohttp.test_utils import TestClient, TestServer
    for name in SEAMS:
        setattr(statsd, name, _timed(getattr(statsd, name)))
    config = statsd.Config(database=path, rate_limit="")
    client = TestClient(TestServer(statsd.create_app(config)))
    await client.start_server()
    try:
        store = client.app[statsd.STORE_KEY]
        stats = store.count_stats()
        await store.aggregates.count_all(store.stats.docs)  # the first count after start, not a page's time
        await settled(store)
        origin = str(client.make_url("")).rstrip("/")
        resp = await client.post("/dashboard/login", data={"api_key": token}, headers={"Origin": origin},
                                 allow_redirects=False)
        assert resp.status == 303, await resp.text()
        rows = []
        for page in PAGES:
            times, seams = [], []
            for i in range(repeat + 1):
                IN_SEAMS[0] = 0.0
                if cold:
                    statsd.SVG_CACHE.clear()
                    store.aggregates.answers.clear()  # as after a write
                started = time.perf_counter()
                resp = await client.get(page, allow_redirects=False, headers=BROWSER)
                await resp.read()
                assert resp.status == 200, (page, resp.status)
                if i:
                    times.append((time.perf_counter() - started) * 1000)
                    seams.append(IN_SEAMS[0] * 1000)
            rows.append((page, statistics.median(times), max(times), statistics.median(seams)))
        return stats, rows
    finally:
        await client.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stats", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--cold", action="store_true", help="compute every processor answer and draw every chart"
                        " anew (as after a write that changes their numbers), not from the caches")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "statsd.json")
        started = time.perf_counter()
        token = build(path, args.stats)
        print(f"built {os.path.getsize(path) / 1e6:.0f} MB in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        count, rows = asyncio.run(measure(path, token, args.repeat, args.cold))
    print(f"| page ({count:,} stats, admin{', charts drawn anew' if args.cold else ''}) | median ms | max ms | in the 4 functions | rest |\n"
          "|---|---:|---:|---:|---:|")
    for page, median, most, seams in rows:
        print(f"| `{page}` | {median:,.0f} | {most:,.0f} | {seams:,.0f} | {median - seams:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
