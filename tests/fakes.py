"""A small upstream registry of the tests' own, for faults a real registry will not produce:
a connection cut mid-blob, wrong bytes, slowness, 429/503, expiring tokens. It counts every
TCP connection and request it sees."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

OCI_INDEX = "application/vnd.oci.image.index.v1+json"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Clock:
    """A monotonic clock that moves only when a test sets ``now``."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class BlobFault:
    cut_at: int | None = None  # close the connection after this many bytes (once per request)
    cuts: int = 1  # how many requests get cut
    corrupt: bool = False  # flip one byte in the middle
    delay: float = 0.0  # seconds between chunks
    honor_range: bool = True
    #: a Range answer (206) that starts this many bytes after the byte asked for
    range_shift: int = 0
    step: int = 64 * 1024  # chunk size (1 with a delay: a dripping upstream)
    status: int | None = None  # answer with this status instead (429, 503, 500) ...
    statuses: int = 1  # ... this many times, then serve the blob
    retry_after: str | None = None  # Retry-After of those answers
    #: send this many bytes, then wait for ``gate`` before the rest (a transfer held midway)
    hold_at: int | None = None
    gate: asyncio.Event | None = None
    #: set once the held bytes went out
    holding: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class FakeUpstream:
    blobs: dict[str, bytes] = field(default_factory=dict)
    manifests: dict[tuple[str, str], tuple[bytes, str]] = field(default_factory=dict)
    blob_faults: dict[str, BlobFault] = field(default_factory=dict)
    manifest_status: int | None = None  # answer every manifest request with this status
    #: digest -> Location: blob GETs (and HEADs) answered with a 307 there
    blob_redirects: dict[str, str] = field(default_factory=dict)
    #: answers tags/list instead of the default handler (request, repository)
    tags_handler: Callable[[web.Request, str], Awaitable[web.StreamResponse]] | None = None
    #: manifest requests wait for this before they are answered (set it to let them through)
    manifest_gate: asyncio.Event | None = None
    #: set whenever a manifest request arrives
    manifest_arrived: asyncio.Event = field(default_factory=asyncio.Event)
    #: extra headers on every manifest answer (rate-limit headers, Retry-After)
    manifest_headers: dict[str, str] = field(default_factory=dict)
    token_ttl: float | None = None  # require Bearer tokens living this long
    referrers_api: bool = (
        False  # answer /referrers/<digest> (OCI 1.1); else 404 as distribution 2.8
    )
    connections: int = 0
    requests: Counter[str] = field(default_factory=Counter)
    token_requests: int = 0
    port: int = 0
    _runner: web.AppRunner | None = None
    _server: asyncio.AbstractServer | None = None
    _tokens: dict[str, float] = field(default_factory=dict)

    @property
    def hostport(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.hostport}"

    def add_blob(self, data: bytes) -> str:
        d = digest_of(data)
        self.blobs[d] = data
        return d

    def add_manifest(self, repo: str, tag: str, body: bytes, media_type: str) -> str:
        d = digest_of(body)
        self.manifests[(repo, tag)] = (body, media_type)
        self.manifests[(repo, d)] = (body, media_type)
        return d

    def count(self, method: str, fragment: str) -> int:
        """Requests seen with this method ("" for any) whose path holds ``fragment``."""
        return sum(
            n
            for k, n in self.requests.items()
            if (k.startswith(method + " ") if method else True) and fragment in k
        )

    async def start(self) -> FakeUpstream:
        app = web.Application()
        app.router.add_route("*", "/token", self._token)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_route("*", "/v2/", self._base)
        app.router.add_route("*", "/v2/{path:.*}", self._dispatch)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        loop = asyncio.get_running_loop()
        handler = self._runner.server
        assert handler is not None

        def factory() -> Any:
            self.connections += 1
            return handler()

        self._server = await loop.create_server(factory, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        if self._runner is not None:
            await self._runner.cleanup()

    # --- handlers -----------------------------------------------------------------------------
    def _authorized(self, request: web.Request) -> bool:
        if self.token_ttl is None:
            return True
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer "):
            return False
        exp = self._tokens.get(auth[7:])
        return exp is not None and exp > time.monotonic()

    def _challenge(self, scope: str) -> web.Response:
        return web.Response(
            status=401,
            headers={
                "WWW-Authenticate": f'Bearer realm="{self.url}/token",service="fake",scope="{scope}"'
            },
        )

    async def _token(self, request: web.Request) -> web.Response:
        self.token_requests += 1
        tok = f"tok{self.token_requests}"
        assert self.token_ttl is not None
        self._tokens[tok] = time.monotonic() + self.token_ttl
        return web.json_response({"token": tok, "expires_in": int(self.token_ttl)})

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _base(self, request: web.Request) -> web.Response:
        self.requests[f"{request.method} /v2/"] += 1
        if not self._authorized(request):
            return self._challenge("")
        return web.json_response({})

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        path = request.match_info["path"]
        self.requests[f"{request.method} /v2/{path}"] += 1
        m = re.match(r"^(.+)/(manifests|blobs)/([^/]+)$", path)
        if m is None:
            rf = re.match(r"^(.+)/referrers/([^/]+)$", path)
            if rf and self.referrers_api:
                return self._referrers(rf.group(1), rf.group(2))
            tl = re.match(r"^(.+)/tags/list$", path)
            if tl and self.tags_handler is not None:
                return await self.tags_handler(request, tl.group(1))
            if tl and any(r == tl.group(1) for r, _ in self.manifests):
                tags = sorted({t for (r, t) in self.manifests if r == tl.group(1) and ":" not in t})
                return web.json_response({"name": tl.group(1), "tags": tags})
            return web.json_response({"errors": [{"code": "NAME_UNKNOWN"}]}, status=404)
        repo, kind, ref = m.groups()
        if not self._authorized(request):
            return self._challenge(f"repository:{repo}:pull")
        if kind == "manifests":
            self.manifest_arrived.set()
            if self.manifest_gate is not None:
                await self.manifest_gate.wait()
            if self.manifest_status is not None:
                return web.Response(status=self.manifest_status, headers=self.manifest_headers)
            item = self.manifests.get((repo, ref))
            if item is None:
                return web.json_response({"errors": [{"code": "MANIFEST_UNKNOWN"}]}, status=404)
            body, mt = item
            headers = {
                "Docker-Content-Digest": digest_of(body),
                "Content-Type": mt,
                **self.manifest_headers,
            }
            if request.method == "HEAD":
                headers["Content-Length"] = str(len(body))
                return web.Response(headers=headers)
            return web.Response(body=body, headers=headers)
        if ref in self.blob_redirects:
            raise web.HTTPTemporaryRedirect(self.blob_redirects[ref])
        data = self.blobs.get(ref)
        if data is None:
            return web.json_response({"errors": [{"code": "BLOB_UNKNOWN"}]}, status=404)
        return await self._serve_blob(request, ref, data)

    def _referrers(self, repo: str, subject: str) -> web.Response:
        found = []
        for (r, ref), (body, mt) in self.manifests.items():
            if r != repo or ref != digest_of(body):
                continue
            doc = json.loads(body)
            if (doc.get("subject") or {}).get("digest") != subject:
                continue
            desc = {"mediaType": mt, "digest": ref, "size": len(body)}
            art = doc.get("artifactType") or doc.get("config", {}).get("mediaType")
            if art:
                desc["artifactType"] = art
            if doc.get("annotations"):
                desc["annotations"] = doc["annotations"]
            found.append(desc)
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": found}
        return web.Response(body=json.dumps(index).encode(), content_type=OCI_INDEX)

    async def _serve_blob(self, request: web.Request, ref: str, data: bytes) -> web.StreamResponse:
        fault = self.blob_faults.get(ref, BlobFault())
        if fault.status is not None and fault.statuses > 0:
            fault.statuses -= 1
            extra = {"Retry-After": fault.retry_after} if fault.retry_after else {}
            return web.json_response(
                {"errors": [{"code": "UNAVAILABLE"}]}, status=fault.status, headers=extra
            )
        start = 0
        rng = request.headers.get("Range")
        status = 200
        headers = {"Docker-Content-Digest": ref, "Content-Type": "application/octet-stream"}
        if rng and fault.honor_range:
            start = int(rng.split("=")[1].split("-")[0]) + fault.range_shift
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        if fault.corrupt:
            mid = len(body) // 2
            body = body[:mid] + bytes([body[mid] ^ 0xFF]) + body[mid + 1 :]
        resp = web.StreamResponse(status=status, headers=headers)
        resp.content_length = len(body)
        await resp.prepare(request)
        if request.method == "HEAD":
            return resp
        cut = None
        hold = fault.hold_at if fault.gate is not None else None
        if fault.cut_at is not None and fault.cuts > 0:
            fault.cuts -= 1
            cut = max(fault.cut_at - start, 0)
        sent = 0
        step = fault.step
        while sent < len(body):
            chunk = body[sent : sent + step]
            if hold is not None and sent + len(chunk) > hold:  # before a cut at the same byte
                await resp.write(chunk[: hold - sent])
                sent = hold
                fault.holding.set()
                assert fault.gate is not None
                await fault.gate.wait()
                hold = None
                continue
            if cut is not None and sent + len(chunk) > cut:
                await resp.write(chunk[: cut - sent])
                assert request.transport is not None
                request.transport.close()
                return resp
            await resp.write(chunk)
            sent += len(chunk)
            if fault.delay:
                await asyncio.sleep(fault.delay)
        await resp.write_eof()
        return resp
