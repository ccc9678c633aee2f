"""Would a helper process lift the batch POST?  Two bare aiohttp apps (no statsd code) answer a
batch of 5 built by bench/monarc.py's generator (its shape, another seed), and wrk measures each in turn:

- inproc: the handler parses the body and prepares the records (fields, `data` serialized again,
  the threat and vulnerability measures as tuples), as statsd's handler does;
- helper: the handler sends the raw body to a forked helper process over a socket pair, which
  does that work and sends the prepared records back pickled, one call at a time (lock-step).

What matters is the CPU the front process spends per request: it is the one that would still
own the store, so it must get cheaper for statsd's single-writer design to go faster.

    .venv/bin/python bench/ipc_probe.py [ROUNDS]   (default 3; needs wrk, as make bench-monarc)
"""
import asyncio
import os
import pickle
import random
import re
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import datetime as dt

import orjson
from aiohttp import web

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import monarc  # noqa: E402  (the bench's generator and its /proc helpers)

DURATION = 5


def prepare(raw: bytes) -> list:
    """The records of a batch: fields, `data` as JSON bytes, the objects' measures."""
    out = []
    for stat in orjson.loads(raw):
        data = stat.get("data")
        measures = None
        if isinstance(data, list):
            measures = [(i.get("uuid"), i.get("count"), i.get("maxRisk"), i.get("averageRate"))
                        for i in data if isinstance(i, dict)]
        out.append(({"anr": stat.get("anr"), "type": stat.get("type"), "date": stat.get("date")},
                    orjson.dumps(data), measures))
    return out


def helper(sock: socket.socket) -> None:
    """The helper process: length-prefixed bodies in, length-prefixed pickles out."""
    read, write = sock.makefile("rb"), sock.makefile("wb")
    while True:
        head = read.read(4)
        if len(head) < 4:
            os._exit(0)
        answer = pickle.dumps(prepare(read.read(struct.unpack("<I", head)[0])), protocol=5)
        write.write(struct.pack("<I", len(answer)) + answer)
        write.flush()


class HelperClient:
    """One call at a time to the helper, from the event loop."""

    def __init__(self, sock: socket.socket):
        self.sock, self.lock = sock, asyncio.Lock()

    async def start(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(sock=self.sock)

    async def call(self, raw: bytes) -> list:
        async with self.lock:
            self.writer.write(struct.pack("<I", len(raw)) + raw)
            size = struct.unpack("<I", await self.reader.readexactly(4))[0]
            return pickle.loads(await self.reader.readexactly(size))


def serve(mode: str, port: int) -> None:
    async def batch(request: web.Request) -> web.Response:
        raw = await request.read()
        records = await request.app["helper"].call(raw) if mode == "helper" else prepare(raw)
        return web.Response(body=orjson.dumps({"data": [r[0] for r in records], "metadata": {"count": len(records)}}),
                            content_type="application/json")

    async def app() -> web.Application:
        application = web.Application()
        application.router.add_post("/api/v1/stats/", batch)
        if mode == "helper":
            front, back = socket.socketpair()
            if os.fork() == 0:
                front.close()
                helper(back)
            back.close()
            application["helper"] = HelperClient(front)
            await application["helper"].start()
        return application

    web.run_app(app(), host="127.0.0.1", port=port, access_log=None, print=None)


def measure(mode: str, requests_file: str) -> dict:
    port = monarc.free_port()
    server = subprocess.Popen([sys.executable, __file__, "--serve", mode, str(port)])
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        time.sleep(0.5)
        pids = [server.pid] + monarc.children(server.pid)
        before = [monarc.cpu_ticks([p]) for p in pids]
        out = subprocess.run(["wrk", "-t1", "-c16", f"-d{DURATION}s", "-s", os.path.join(HERE, "monarc.lua"),
                              f"http://127.0.0.1:{port}/", "--", requests_file, "-", "-", "0badcafe"],
                             capture_output=True, text=True, check=True).stdout
        used = [monarc.cpu_ticks([p]) - b for p, b in zip(pids, before)]
    finally:
        server.terminate()
        server.wait()
    answered = int(re.search(r"(\d+) requests in", out).group(1))
    if "Non-2xx" in out or "Socket errors" in out:
        raise SystemExit(f"{mode}: wrk saw errors:\n{out}")
    per = 1000 / os.sysconf("SC_CLK_TCK") / answered
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
            "front": used[0] * per, "all": sum(used) * per}


def main() -> None:
    _, catalog, _ = monarc.world(1, 40)
    analysis, rng = monarc.Analysis(random.Random(8), catalog, 40), random.Random(9)
    batch = [{"anr": "@ANR@", "type": kind, "date": dt.date.today().isoformat(), "data": monarc.data_for(kind, rng, analysis)}
             for kind in monarc.TYPES]
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write(f"POST\t/api/v1/stats/\t{orjson.dumps(batch).decode()}\n")
    results = {"inproc": [], "helper": []}
    for _ in range(rounds):  # interleaved: the VM's speed drifts
        for mode in results:
            results[mode].append(measure(mode, f.name))
            print(f"{mode}: {results[mode][-1]}", file=sys.stderr)
    os.unlink(f.name)
    print(f"batch of 5 ({len(orjson.dumps(batch)):,} bytes), wrk -t1 -c16 -d{DURATION}s, median of {rounds} interleaved rounds\n")
    print("| app | req/s | front process CPU ms/request | all processes CPU ms/request |")
    print("|---|---:|---:|---:|")
    for mode, runs in results.items():
        print(f"| {mode} | {statistics.median(r['rps'] for r in runs):,.0f} | "
              f"{statistics.median(r['front'] for r in runs):.3f} | {statistics.median(r['all'] for r in runs):.3f} |")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        serve(sys.argv[2], int(sys.argv[3]))
    else:
        main()
