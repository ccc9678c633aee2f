"""Latency of a cheap request while GET /api/v2/export streams 100k MONARC-shaped stats."""
import asyncio, hashlib, json, os, random, subprocess, sys, time, uuid
import tempfile
import aiohttp, orjson
# usage: .venv/bin/python bench/export_probe.py [N]  (needs curl; files go to a temporary folder)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__))); PY = sys.executable
N = int(sys.argv[1]) if len(sys.argv) > 1 else 100000
work = tempfile.mkdtemp(prefix="statsd-export-probe-"); db = f"{work}/db.json"
token = "bench-admin-token-0123456789"
now = "2024-03-05T10:00:00.000000"
orgs = [{"name": "ADMIN", "token_sha256": hashlib.sha256(token.encode()).hexdigest(), "is_admin": True,
         "created_at": now, "updated_at": now}] + [
        {"name": f"org{i}", "token_sha256": hashlib.sha256(f"tok{i}".encode()).hexdigest(), "is_admin": False,
         "created_at": now, "updated_at": now} for i in range(50)]
stats = [{"uuid": str(uuid.uuid4()), "organization": f"org{i % 50}", "anr": str(uuid.uuid4()), "type": "threat",
          "date": "2024-03-05", "data": {str(uuid.uuid4()): {"count": random.randint(1, 9), "maxRisk": random.random() * 20,
          "averageRate": random.random(), "labels": {"label1": "Some threat label" * 2}} for _ in range(12)},
          "created_at": now, "updated_at": now} for i in range(N)]
open(f"{work}/seed.json", "wb").write(orjson.dumps({"format": "statsd-export", "version": 1, "organizations": orgs, "stats": stats}))
subprocess.run([PY, ROOT + "/statsd.py", "import", f"{work}/seed.json", "--database", db], check=True, capture_output=True)
import socket
with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0)); port = sock.getsockname()[1]
srv = subprocess.Popen([PY, ROOT + "/statsd.py", "serve", "--database", db, "--port", str(port)],
                       env={**os.environ, "STATSD_RATE_LIMIT": ""}, stderr=subprocess.PIPE)
base = f"http://127.0.0.1:{port}"

async def main():
    async with aiohttp.ClientSession(headers={"X-API-KEY": token}) as s:
        for _ in range(200):
            try:
                async with s.get(base + "/api/v2/stats/?_limit=1") as r:
                    one = (await r.json())["data"][0]["id"]; break
            except OSError:
                await asyncio.sleep(0.1)
        async def probe(stop, out):
            while not stop.is_set():
                t = time.perf_counter()
                async with s.get(f"{base}/api/v2/stats/{one}/") as r:
                    await r.read()
                out.append((time.perf_counter() - t) * 1000)
        stop = asyncio.Event(); base_lat = []
        task = asyncio.create_task(probe(stop, base_lat)); await asyncio.sleep(2); stop.set(); await task
        stop = asyncio.Event(); lat = []
        task = asyncio.create_task(probe(stop, lat))
        t = time.perf_counter(); size = 0
        proc = await asyncio.create_subprocess_exec("curl", "-s", "-o", "/dev/null", "-w", "%{size_download}",
                                                    "-H", "X-API-KEY: " + token, base + "/api/v2/export",
                                                    stdout=asyncio.subprocess.PIPE)
        size = int((await proc.communicate())[0])
        took = time.perf_counter() - t
        stop.set(); await task
        def q(v, p): v = sorted(v); return v[min(len(v) - 1, int(len(v) * p))]
        print(f"{N} stats: export {size/1e6:.0f} MB in {took:.2f} s")
        print(f"probe idle:        n={len(base_lat)} p50={q(base_lat,.5):.2f} p99={q(base_lat,.99):.2f} max={max(base_lat):.2f} ms")
        print(f"probe during export: n={len(lat)} p50={q(lat,.5):.2f} p99={q(lat,.99):.2f} max={max(lat):.2f} ms")
try:
    asyncio.run(main())
finally:
    srv.terminate(); srv.wait()
    import shutil; shutil.rmtree(work, ignore_errors=True)
