"""The floor under regproxy's per-request cost: a bare aiohttp + uvloop server (what regproxy is
built on) that answers every GET with the same bytes and headers a manifest gets, and nothing
else: no routing beyond one route, no middleware, no auth, no metrics, no log.

    python -m benchmarks.floor_server --port 8080 --body manifest.json --digest sha256:...

bench_serve --floor runs it beside the two servers: whatever regproxy does per request comes on
top of this, so this server's req/s over the peer's is the most any aiohttp-based server can
reach on the same machine.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import uvloop
from aiohttp import web


def app_for(body: bytes, digest: str, media_type: str) -> web.Application:
    headers = {
        "Docker-Distribution-API-Version": "registry/2.0",
        "Docker-Content-Digest": digest,
        "Content-Type": media_type,
        "ETag": f'"{digest}"',
    }

    async def answer(request: web.Request) -> web.Response:
        return web.Response(body=body, headers=headers)

    app = web.Application()
    app.router.add_route("GET", "/v2/{path:.+}", answer)
    return app


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--body", type=Path, required=True)
    p.add_argument("--digest", required=True)
    p.add_argument("--media-type", default="application/vnd.oci.image.manifest.v1+json")
    args = p.parse_args(argv)
    app = app_for(args.body.read_bytes(), args.digest, args.media_type)
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
