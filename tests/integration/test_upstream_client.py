"""UpstreamClient against real registries on 127.0.0.1.

Debian's docker-registry (anonymous, and behind htpasswd Basic auth) for the plain OCI
operations; small aiohttp servers of the tests' own for the Bearer token flow and expiry, the
cross-host blob redirect, mirrors tried in order, pagination and failures.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from regproxy.config import UpstreamConfig
from regproxy.deadline import Timing
from regproxy.errors import BlobUnknown, UpstreamError, UpstreamTimeout
from regproxy.metrics import Metrics
from regproxy.oci import Digest
from regproxy.upstream import BlobStream, ManifestGet, ManifestHead, UpstreamClient
from tests.conftest import needs_registry
from tests.images import OCI_MANIFEST, Image, make_image
from tests.peers import DockerRegistry, free_port, http, make_htpasswd

USER, PASSWORD = "alice", "s3cret-pw-xyz"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def read_all(stream: BlobStream) -> bytes:
    try:
        return b"".join([c async for c in stream.chunks()])
    finally:
        await stream.close()


def error_count(metrics: Metrics, source: str, kind: str) -> float:
    v = metrics.registry.get_sample_value(
        "regproxy_upstream_errors_total", {"source": source, "kind": kind}
    )
    return v or 0.0


# --- docker-registry ---------------------------------------------------------------------------
def push(reg: DockerRegistry, repo: str, tag: str, img: Image, auth: str | None = None) -> None:
    """Monolithic blob uploads, then the manifest, over plain HTTP.

    distribution 2.8 answers a ``POST ?digest=`` with 202 and an upload URL (it does not take
    the body there), so the bytes then go in one ``PUT <location>?digest=``.
    """
    headers = {"Authorization": auth} if auth else {}
    for blob in (img.config, *img.layers):
        status, resp_headers, body = http(
            "POST",
            f"{reg.url}/v2/{repo}/blobs/uploads/?digest={sha(blob)}",
            blob,
            {**headers, "Content-Type": "application/octet-stream"},
        )
        if status == 202:
            location = resp_headers["Location"]
            if location.startswith("/"):
                location = reg.url + location
            sep = "&" if "?" in location else "?"
            status, _, body = http(
                "PUT",
                f"{location}{sep}digest={sha(blob)}",
                blob,
                {**headers, "Content-Type": "application/octet-stream"},
            )
        assert status == 201, (status, body)
    status, _, body = http(
        "PUT",
        f"{reg.url}/v2/{repo}/manifests/{tag}",
        img.manifest,
        {**headers, "Content-Type": OCI_MANIFEST},
    )
    assert status == 201, (status, body)


@dataclass
class Upstream:
    reg: DockerRegistry
    creds: tuple[str, str] | None
    image: Image
    repo: str = "team/app"

    def config(self, **kw: Any) -> UpstreamConfig:
        if self.creds:
            kw.setdefault("username", self.creds[0])
            kw.setdefault("password", self.creds[1])
        return UpstreamConfig(self.reg.hostport, url=self.reg.url, **kw)

    def client(self, **kw: Any) -> UpstreamClient:
        return UpstreamClient(self.reg.hostport, self.config(**kw))


@pytest.fixture(params=["anonymous", "basic"])
def upstream(request, registry_factory, tmp_path) -> Upstream:
    if request.param == "basic":
        reg = registry_factory(htpasswd=make_htpasswd(tmp_path / "htpasswd", USER, PASSWORD))
        creds: tuple[str, str] | None = (USER, PASSWORD)
        auth = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    else:
        reg, creds, auth = registry_factory(), None, None
    img = make_image(layer_sizes=(1024, 600_000))
    push(reg, "team/app", "v1", img, auth)
    push(reg, "team/app", "v2", img, auth)
    push(reg, "team/app", "latest", img, auth)
    return Upstream(reg, creds, img)


@needs_registry
async def test_manifest_by_tag_and_digest(upstream: Upstream, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="regproxy")
    client = upstream.client()
    try:
        want = Digest.parse(upstream.image.digest)
        head = await client.head_manifest(upstream.repo, "v1")
        assert head == ManifestHead(want, OCI_MANIFEST, len(upstream.image.manifest))
        got = await client.get_manifest(upstream.repo, "v1")
        assert got == ManifestGet(upstream.image.manifest, OCI_MANIFEST, want)
        by_digest = await client.get_manifest(upstream.repo, str(want))
        assert by_digest is not None
        assert by_digest.body == upstream.image.manifest
        head2 = await client.head_manifest(upstream.repo, str(want))
        assert head2 is not None
        assert head2.digest == want
    finally:
        await client.close()
    assert "upstream.request" in caplog.text
    assert PASSWORD not in caplog.text
    assert base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode() not in caplog.text


@needs_registry
async def test_open_blob_full_and_with_offset(upstream: Upstream) -> None:
    layer = upstream.image.layers[1]
    digest = Digest.parse(sha(layer))
    client = upstream.client()
    try:
        stream = await client.open_blob(upstream.repo, digest)
        assert (stream.size, stream.offset) == (len(layer), 0)
        assert stream.source == upstream.reg.url
        assert await read_all(stream) == layer

        stream = await client.open_blob(upstream.repo, digest, offset=100_000)
        assert (stream.size, stream.offset) == (len(layer), 100_000)
        assert await read_all(stream) == layer[100_000:]

        async with await client.open_blob(upstream.repo, digest) as early:
            async for _chunk in early.chunks():
                break  # closing a half-read stream is fine
    finally:
        await client.close()


@needs_registry
async def test_list_tags(upstream: Upstream) -> None:
    client = upstream.client()
    try:
        page = await client.list_tags(upstream.repo, 100)
        assert page is not None and not page.more
        assert sorted(page.tags) == ["latest", "v1", "v2"]
        # n and last: the first after "latest", and upstream has more
        page = await client.list_tags(upstream.repo, 1, last="latest")
        assert page is not None and page.tags == ["v1"] and page.more
        assert await client.list_tags("team/nothing", 100) is None
    finally:
        await client.close()


@needs_registry
async def test_not_found(upstream: Upstream) -> None:
    client = upstream.client()
    missing = Digest.parse(sha(b"nobody has this"))
    try:
        assert await client.head_manifest(upstream.repo, "nope") is None
        assert await client.get_manifest(upstream.repo, "nope") is None
        assert await client.get_manifest(upstream.repo, str(missing)) is None
        assert await client.head_manifest("team/other", "v1") is None
        with pytest.raises(BlobUnknown):
            await client.open_blob(upstream.repo, missing)
    finally:
        await client.close()


@needs_registry
async def test_basic_auth_refused(registry_factory, tmp_path, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="regproxy")
    reg = registry_factory(htpasswd=make_htpasswd(tmp_path / "htpasswd", USER, PASSWORD))
    source = reg.hostport
    m = Metrics()
    for cfg in (
        UpstreamConfig(source, url=reg.url, username=USER, password="wrong-password-123"),
        UpstreamConfig(source, url=reg.url),  # no credentials at all
    ):
        client = UpstreamClient(source, cfg, meters=m.upstream_meters)
        try:
            with pytest.raises(UpstreamError) as info:
                await client.head_manifest("team/app", "v1")
            assert info.value.kind == "auth"
            with pytest.raises(UpstreamError) as info:
                await client.open_blob("team/app", Digest.parse(sha(b"x")))
            assert info.value.kind == "auth"
        finally:
            await client.close()
    assert error_count(m, source, "auth") >= 4
    assert "wrong-password-123" not in caplog.text


# --- servers of our own ------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def serve(app: web.Application) -> AsyncIterator[str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


MANIFEST = json.dumps(
    {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": sha(b"{}"),
            "size": 2,
        },
        "layers": [],
    }
).encode()
BLOB = bytes(range(256)) * 4096  # 1 MiB


@dataclass
class TokenRegistry:
    """A registry demanding Bearer tokens from its own token endpoint, and a CDN for blobs."""

    expires_in: int = 300
    tokens_issued: list[str] = field(default_factory=list)
    token_requests: list[dict[str, str]] = field(default_factory=list)
    valid: set[str] = field(default_factory=set)
    registry_requests: list[tuple[str, str, str | None]] = field(default_factory=list)
    cdn_requests: list[dict[str, str]] = field(default_factory=list)
    url: str = ""
    cdn_url: str = ""
    basic: str | None = None  # required Basic credentials at the token endpoint

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/token", self.token)
        app.router.add_route("*", "/v2/{tail:.*}", self.registry)
        return app

    def cdn_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/blob", self.cdn)
        return app

    async def token(self, request: web.Request) -> web.Response:
        self.token_requests.append(
            {**request.query, "auth": request.headers.get("Authorization", "")}
        )
        if self.basic is not None and request.headers.get("Authorization") != self.basic:
            return web.Response(status=401)
        await asyncio.sleep(0.02)  # let concurrent requests pile up
        tok = f"tok-{len(self.tokens_issued)}-secretvalue"
        self.tokens_issued.append(tok)
        self.valid.add(tok)
        key = "token" if len(self.tokens_issued) % 2 else "access_token"
        return web.json_response({key: tok, "expires_in": self.expires_in})

    async def registry(self, request: web.Request) -> web.StreamResponse:
        auth = request.headers.get("Authorization")
        self.registry_requests.append((request.method, request.path, auth))
        tail = request.match_info["tail"]
        repo = tail.split("/manifests/")[0].split("/blobs/")[0].split("/tags/")[0]
        if not auth or auth.removeprefix("Bearer ") not in self.valid:
            return web.Response(
                status=401,
                headers={
                    "WWW-Authenticate": f'Bearer realm="{self.url}/token",service="test-registry",'
                    f'scope="repository:{repo}:pull"'
                },
            )
        if "/manifests/" in tail:
            return web.Response(
                body=MANIFEST if request.method == "GET" else None,
                headers={
                    "Content-Type": OCI_MANIFEST,
                    "Docker-Content-Digest": sha(MANIFEST),
                    "Content-Length": str(len(MANIFEST)),
                },
            )
        if "/blobs/" in tail:
            raise web.HTTPTemporaryRedirect(f"{self.cdn_url}/blob?sig=abc")
        return web.Response(status=404)

    async def cdn(self, request: web.Request) -> web.StreamResponse:
        self.cdn_requests.append(dict(request.headers))
        if "Authorization" in request.headers:
            return web.Response(status=400, text="Authorization leaked to the CDN")
        start = 0
        if rng := request.headers.get("Range"):
            start = int(rng.removeprefix("bytes=").rstrip("-"))
            return web.Response(
                status=206,
                body=BLOB[start:],
                headers={"Content-Range": f"bytes {start}-{len(BLOB) - 1}/{len(BLOB)}"},
            )
        return web.Response(body=BLOB)


@contextlib.asynccontextmanager
async def token_registry(**kw: Any) -> AsyncIterator[TokenRegistry]:
    reg = TokenRegistry(**kw)
    async with serve(reg.app()) as url, serve(reg.cdn_app()) as cdn:
        reg.url, reg.cdn_url = url, cdn
        yield reg


def client_for(url: str, **kw: Any) -> UpstreamClient:
    host = url.removeprefix("http://")
    return UpstreamClient(host, UpstreamConfig(host, url=url, **kw))


async def test_bearer_flow_one_token_for_concurrent_requests(caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="regproxy")
    async with token_registry() as reg:
        client = client_for(reg.url)
        try:
            heads = await asyncio.gather(
                *(client.head_manifest("lib/app", "v1") for _ in range(20))
            )
            assert all(h is not None and h.digest == Digest.parse(sha(MANIFEST)) for h in heads)
            assert len(reg.tokens_issued) == 1
            assert reg.token_requests[0]["scope"] == "repository:lib/app:pull"
            assert reg.token_requests[0]["service"] == "test-registry"
            assert reg.token_requests[0]["auth"] == ""  # anonymous
            # the challenge is known now: the next request carries the token up front
            n = len(reg.registry_requests)
            got = await client.get_manifest("lib/app", "v1")
            assert got is not None and got.body == MANIFEST
            assert len(reg.registry_requests) == n + 1
            # another repository has another scope, so another token
            assert await client.head_manifest("lib/other", "v1") is not None
            assert len(reg.tokens_issued) == 2
            assert reg.token_requests[1]["scope"] == "repository:lib/other:pull"
        finally:
            await client.close()
    for tok in reg.tokens_issued:
        assert tok not in caplog.text


async def test_bearer_token_with_basic_credentials() -> None:
    basic = "Basic " + base64.b64encode(b"bob:tokenpw").decode()
    async with token_registry(basic=basic) as reg:
        # http realm on the registry's own host: credentials may go there
        client = client_for(reg.url, username="bob", password="tokenpw")
        try:
            assert await client.get_manifest("lib/app", "v1") is not None
            assert reg.token_requests[-1]["auth"] == basic
        finally:
            await client.close()
        bad = client_for(reg.url, username="bob", password="nope")
        try:
            with pytest.raises(UpstreamError) as info:
                await bad.head_manifest("lib/app", "v1")
            assert info.value.kind == "auth"
        finally:
            await bad.close()


async def test_token_expiry_and_revocation() -> None:
    now = [1000.0]
    async with token_registry(expires_in=1) as reg:
        host = reg.url.removeprefix("http://")
        timing = Timing(now=lambda: now[0])
        client = UpstreamClient(host, UpstreamConfig(host, url=reg.url), timing=timing)
        try:
            assert await client.head_manifest("lib/app", "v1") is not None
            assert await client.head_manifest("lib/app", "v1") is not None
            assert len(reg.tokens_issued) == 1
            now[0] += 0.6  # past expires_in minus the threshold (capped at half)
            assert await client.head_manifest("lib/app", "v1") is not None
            assert len(reg.tokens_issued) == 2

            reg.expires_in = 300
            now[0] += 0.6
            assert await client.head_manifest("lib/app", "v1") is not None
            assert len(reg.tokens_issued) == 3
            # the server forgets every token: one 401, one new token, one retry, for all
            reg.valid.clear()
            heads = await asyncio.gather(
                *(client.head_manifest("lib/app", "v1") for _ in range(10))
            )
            assert all(h is not None for h in heads)
            assert len(reg.tokens_issued) == 4
        finally:
            await client.close()


async def test_blob_redirect_to_other_host_drops_authorization() -> None:
    async with token_registry() as reg:
        # the CDN is on loopback too: the address guard lets it through only when listed
        client = client_for(reg.url, allow_redirect_to=(reg.cdn_url.removeprefix("http://"),))
        digest = Digest.parse(sha(BLOB))
        try:
            stream = await client.open_blob("lib/app", digest)
            assert stream.size == len(BLOB) and stream.offset == 0
            assert stream.source == reg.url
            assert await read_all(stream) == BLOB
            stream = await client.open_blob("lib/app", digest, offset=1000)
            assert (stream.size, stream.offset) == (len(BLOB), 1000)
            assert await read_all(stream) == BLOB[1000:]
        finally:
            await client.close()
        assert len(reg.cdn_requests) == 2
        assert all("Authorization" not in h for h in reg.cdn_requests)
        assert reg.cdn_requests[1]["Range"] == "bytes=1000-"
        # the registry itself did get the token
        assert any(
            a and a.startswith("Bearer ") for _, p, a in reg.registry_requests if "/blobs/" in p
        )


# --- mirrors -----------------------------------------------------------------------------------
@dataclass
class Simple:
    """A registry without auth that answers with a fixed status (or serves MANIFEST/BLOB)."""

    status: int = 200
    requests: list[tuple[str, str]] = field(default_factory=list)
    tag_pages: list[list[str]] | None = None
    held: asyncio.Event | None = None  # answer nothing until this is set
    truncate: bool = False

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/v2/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.method, request.path_qs))
        if self.held is not None:
            await self.held.wait()
        if self.status != 200:
            return web.Response(status=self.status)
        tail = request.match_info["tail"]
        if tail.endswith("/tags/list") and self.tag_pages is not None:
            page = int(request.query.get("page", "0"))
            headers = {}
            if page + 1 < len(self.tag_pages):
                headers["Link"] = f'</v2/{tail}?page={page + 1}>; rel="next"'
            return web.json_response({"name": "x", "tags": self.tag_pages[page]}, headers=headers)
        if "/manifests/" in tail:
            return web.Response(
                body=MANIFEST,
                headers={"Content-Type": OCI_MANIFEST, "Docker-Content-Digest": sha(MANIFEST)},
            )
        if "/blobs/" in tail:
            if self.truncate:
                resp = web.StreamResponse(headers={"Content-Length": str(len(BLOB))})
                await resp.prepare(request)
                await resp.write(BLOB[: len(BLOB) // 4])
                assert request.transport is not None
                request.transport.close()
                return resp
            return web.Response(body=BLOB)
        return web.Response(status=404)


async def test_mirrors_tried_in_order() -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    missing, broken, good, origin = Simple(404), Simple(503), Simple(), Simple()
    async with (
        serve(missing.app()) as m404,
        serve(broken.app()) as m503,
        serve(good.app()) as m_ok,
        serve(origin.app()) as up,
    ):
        host = "registry.example:5000"
        cfg = UpstreamConfig(host, url=up, mirrors=(dead, m404, m503, m_ok))
        client = UpstreamClient(host, cfg)
        try:
            got = await client.get_manifest("lib/app", "v1")
            assert got is not None and got.body == MANIFEST
            stream = await client.open_blob("lib/app", Digest.parse(sha(BLOB)))
            assert stream.source == m_ok
            assert await read_all(stream) == BLOB
        finally:
            await client.close()
        assert origin.requests == []  # the upstream was never needed
        for s in (missing, broken, good):
            assert [p for _, p in s.requests] == [
                "/v2/lib/app/manifests/v1?ns=registry.example:5000",
                f"/v2/lib/app/blobs/{sha(BLOB)}?ns=registry.example:5000",
            ]


async def test_every_mirror_fails_then_upstream_answers_or_its_error_is_raised() -> None:
    broken, origin = Simple(500), Simple(429)
    async with serve(broken.app()) as m, serve(origin.app()) as up:
        client = client_for(up, mirrors=(m,))
        try:
            with pytest.raises(UpstreamError) as info:
                await client.head_manifest("lib/app", "v1")
            assert info.value.kind == "429"
            origin.status = 503
            with pytest.raises(UpstreamError) as info:
                await client.open_blob("lib/app", Digest.parse(sha(BLOB)))
            assert info.value.kind == "5xx"
            origin.status = 403
            with pytest.raises(UpstreamError) as info:
                await client.list_tags("lib/app", 100)
            assert info.value.kind == "auth"
            origin.status = 400
            with pytest.raises(UpstreamError) as info:
                await client.get_manifest("lib/app", "v1")
            assert info.value.kind == "4xx"
            origin.status = 404  # mirror broken, upstream says 404: that is the answer
            assert await client.get_manifest("lib/app", "v1") is None
            origin.status = 200
            assert await client.head_manifest("lib/app", "v1") is not None
        finally:
            await client.close()
        assert len(broken.requests) == 6


async def test_tags_pagination() -> None:
    pages = [[f"t{p}-{i}" for i in range(3)] for p in range(4)]
    reg = Simple(tag_pages=pages)
    async with serve(reg.app()) as url:
        client = client_for(url)
        try:
            got = await client.list_tags("lib/app", 100)
            assert got is not None and not got.more
            assert got.tags == [t for page in pages for t in page]
            assert len(reg.requests) == 4
            assert "n=100" in reg.requests[0][1]  # n goes upstream
            # five wanted: Link is followed only until they are in hand
            got = await client.list_tags("lib/app", 5)
            assert got is not None and got.more
            assert got.tags == [t for page in pages for t in page][:5]
            assert len(reg.requests) == 6
        finally:
            await client.close()


async def test_timeouts_and_connect_errors() -> None:
    held = asyncio.Event()  # the upstream answers nothing until the test lets it
    async with serve(Simple(held=held).app()) as url:
        client = client_for(url, read_timeout=0.1)
        try:
            with pytest.raises(UpstreamTimeout):
                await client.head_manifest("lib/app", "v1")
        finally:
            held.set()
            await client.close()
    client = client_for(f"http://127.0.0.1:{free_port()}")
    try:
        with pytest.raises(UpstreamError) as info:
            await client.head_manifest("lib/app", "v1")
        assert info.value.kind == "connect"
    finally:
        await client.close()


async def test_body_cut_midway_raises() -> None:
    reg = Simple(truncate=True)
    async with serve(reg.app()) as url:
        client = client_for(url)
        try:
            stream = await client.open_blob("lib/app", Digest.parse(sha(BLOB)))
            assert stream.size == len(BLOB)
            with pytest.raises(UpstreamError) as info:
                await read_all(stream)
            assert info.value.kind == "connect"
        finally:
            await client.close()


async def test_manifest_digest_mismatch_is_refused() -> None:
    reg = Simple()
    async with serve(reg.app()) as url:
        client = client_for(url)
        other = sha(b"something else")
        try:
            with pytest.raises(UpstreamError) as info:
                await client.get_manifest("lib/app", other)
            assert info.value.kind == "digest_mismatch"
        finally:
            await client.close()


@pytest.mark.parametrize(
    ("make_url", "kind"),
    [
        (lambda port: f"http://127.0.0.1:{port}", "denied"),  # not https
        (lambda port: f"https://127.0.0.1:{port}", "denied"),  # loopback literal
        (lambda port: f"https://localhost:{port}", "denied"),  # a name resolving to loopback
        (lambda port: f"https://10.1.2.3:{port}", "denied"),
        (lambda port: f"https://[::1]:{port}", "denied"),
    ],
)
async def test_public_only_refuses_private_hosts(make_url: Callable[[int], str], kind: str) -> None:
    reg = Simple()
    async with serve(reg.app()) as url:
        port = int(url.rsplit(":", 1)[1])
        target = make_url(port)
        host = target.split("://", 1)[1]
        # what the '*' entry gives: the host asked for is dialled as is
        cfg = UpstreamConfig("*", connect_timeout=2)
        client = UpstreamClient(host, cfg, public_only=True)
        if target.startswith("http://"):
            client = UpstreamClient(host, UpstreamConfig("*", url=target), public_only=True)
        try:
            with pytest.raises(UpstreamError) as info:
                await client.head_manifest("lib/app", "v1")
            assert info.value.kind == kind
        finally:
            await client.close()
        assert reg.requests == []


async def test_shared_session_is_used_and_not_closed() -> None:
    reg = Simple()
    async with serve(reg.app()) as url, aiohttp.ClientSession() as session:
        host = url.removeprefix("http://")
        client = UpstreamClient(host, UpstreamConfig(host, url=url), session)
        assert await client.head_manifest("lib/app", "v1") is not None
        await client.close()
        assert not session.closed
        # public-only with a session of the caller's: names are looked up before connecting
        star = UpstreamClient(
            f"localhost:{url.rsplit(':', 1)[1]}", UpstreamConfig("*"), session, public_only=True
        )
        with pytest.raises(UpstreamError) as info:
            await star.head_manifest("lib/app", "v1")
        assert info.value.kind == "denied"
        await star.close()
    assert len(reg.requests) == 1


async def test_base_urls() -> None:
    hub = UpstreamClient("docker.io", UpstreamConfig("docker.io"))
    assert hub.sources == ["https://registry-1.docker.io"]
    mirrored = UpstreamClient(
        "ghcr.io",
        UpstreamConfig("ghcr.io", mirrors=("https://bob:pw-in-url@mirror.site:8443/", "http://m2")),
    )
    assert mirrored.sources == ["https://mirror.site:8443", "http://m2", "https://ghcr.io"]
    assert "pw-in-url" not in repr(mirrored)
    await hub.close()
    await mirrored.close()
