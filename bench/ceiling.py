"""The ceiling: the simplest aiohttp app, so statsd's numbers can be read
against what aiohttp itself does on this machine.

    python bench/ceiling.py PORT     (listens on 127.0.0.1 only)

Any GET answers a small JSON body; any POST reads its body and answers 201.
"""
import sys

from aiohttp import web

BODY = b'{"data": {"id": "0123456789abcdef01234567", "type": "risk", "score": 1.5}}'


async def get(request: web.Request) -> web.Response:
    return web.Response(body=BODY, content_type="application/json")


async def post(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(status=201, body=BODY, content_type="application/json")


def main() -> None:
    app = web.Application(client_max_size=16 * 1024 * 1024)
    app.router.add_get("/{tail:.*}", get)
    app.router.add_post("/{tail:.*}", post)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)


if __name__ == "__main__":
    main()
