"""The HTTP client of one upstream registry (and its mirrors): the only user of ClientSession.

Every request goes through :meth:`UpstreamClient._send`, which adds auth, retries a 401 once
after answering its challenge (STYLE rule 7), follows redirects by hand (dropping
``Authorization`` when the origin changes: a blob 307 to a CDN must not carry the registry's
token) and times the response headers. :meth:`UpstreamClient._io_errors` is the one place where
aiohttp exceptions become :class:`UpstreamError` / :class:`UpstreamTimeout`, and
:meth:`UpstreamClient._status_error` the one place where upstream statuses do.

Base URLs are ``config.mirrors`` in order, then the upstream itself. A mirror that fails in any
way (connect error, timeout, 5xx, 429, auth, 404, bad body) is skipped; the upstream's answer is
final. Mirrors are asked with ``?ns=<host>`` as containerd does, so a mirror that serves several
upstreams (another regproxy) knows which one is meant; registries ignore the parameter.

Spec: https://github.com/opencontainers/distribution-spec/blob/main/spec.md#pulling-manifests
(HEAD/GET manifests, GET blobs with Range, tags/list with Link pagination).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import aiohttp
from aiohttp import hdrs
from yarl import URL

from regproxy import __version__, metrics
from regproxy.config import UpstreamConfig
from regproxy.errors import BlobUnknown, DigestInvalid, UpstreamError, UpstreamTimeout
from regproxy.log import mask_credentials
from regproxy.oci import MANIFEST_ACCEPT, MAX_MANIFEST_BYTES, OCI_INDEX, Digest
from regproxy.upstream.auth import (
    Credentials,
    TokenCache,
    TokenKey,
    normalize_registry_host,
    parse_www_authenticate,
)
from regproxy.upstream.guard import AddressGuard, AddressRefused, GuardedResolver

log = logging.getLogger("regproxy.upstream")

CHUNK_SIZE: Final = 1024 * 1024
#: socket read buffer: a small one makes aiohttp pause the upstream socket while we write
READ_BUFSIZE: Final = 4 * 1024 * 1024
MAX_REDIRECTS: Final = 5
MAX_TAG_PAGES: Final = 50
MAX_TOKEN_BYTES: Final = 1024 * 1024
MAX_TAGS_PAGE_BYTES: Final = 16 * 1024 * 1024
LIMIT_PER_HOST: Final = 16
DOCKER_HUB_URL: Final = "https://registry-1.docker.io"
USER_AGENT: Final = f"regproxy/{__version__}"
DOCKER_CONTENT_DIGEST: Final = "Docker-Content-Digest"
_REDIRECTS: Final = frozenset({301, 302, 303, 307, 308})
_CONTENT_RANGE_RE: Final = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$")

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ManifestHead:
    digest: Digest | None
    media_type: str
    size: int | None


@dataclass(frozen=True, slots=True)
class ManifestGet:
    body: bytes
    media_type: str
    #: of the body, with the algorithm of the reference or the header (sha256 otherwise)
    digest: Digest


class BlobStream:
    """An open upstream blob response. ``await close()`` it (or use ``async with``)."""

    def __init__(
        self,
        response: aiohttp.ClientResponse,
        *,
        size: int,
        offset: int,
        source: str,
        guard: Callable[[str], contextlib.AbstractContextManager[None]],
    ) -> None:
        self._response = response
        self._guard = guard
        #: total blob size
        self.size = size
        #: where this body starts in the blob (0 when the server ignored our Range)
        self.offset = offset
        #: the base URL that answered (a mirror or the upstream), credentials masked
        self.source = source

    async def chunks(self) -> AsyncIterator[bytes]:
        """Body chunks of up to 256 KiB; a cut or stalled body raises UpstreamError/Timeout."""
        with self._guard("blob body"):
            async for chunk in self._response.content.iter_chunked(CHUNK_SIZE):
                yield chunk

    async def close(self) -> None:
        if self._response.content.at_eof():
            self._response.release()  # read to the end: the connection may be reused
        else:
            self._response.close()  # a half-read body must not go back to the pool

    async def __aenter__(self) -> BlobStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class _Base:
    """One base URL (mirror or upstream) and what we learnt of its auth."""

    __slots__ = ("basic", "bearer", "creds", "is_mirror", "label", "source", "tokens", "url")

    def __init__(self, url: str, creds: Credentials | None, *, is_mirror: bool) -> None:
        u = URL(url.rstrip("/"))
        if u.user is not None:  # https://user:pass@mirror: credentials of that mirror
            creds = Credentials(u.user, u.password or "")
            u = u.with_user(None)
        self.url = u
        self.source = mask_credentials(str(u))
        self.label = (u.host_port_subcomponent or str(u)) if is_mirror else ""
        self.creds = creds
        self.is_mirror = is_mirror
        self.bearer: tuple[str, str] | None = None  # (realm, service) once challenged
        self.basic = False  # a Basic challenge was seen
        self.tokens = TokenCache()


def _ssl_context(config: UpstreamConfig) -> ssl.SSLContext | bool:
    if not config.tls_verify:
        return False
    if config.ca_file:
        return ssl.create_default_context(cafile=config.ca_file)
    return True


def _media_type(value: str | None) -> str:
    return (value or "").split(";", 1)[0].strip()


def _digest_header(value: str | None) -> Digest | None:
    if not value:
        return None
    try:
        return Digest.parse(value.strip())
    except DigestInvalid:
        return None


class UpstreamClient:
    """Talks to one upstream registry host, through its mirrors first."""

    def __init__(
        self,
        host: str,
        config: UpstreamConfig,
        session: aiohttp.ClientSession | None = None,
        *,
        public_only: bool = False,
        extra_headers: Mapping[str, str] | None = None,
    ) -> None:
        self.name = host
        self.config = config
        self.public_only = public_only
        if config.url:
            upstream_url = config.url_for(host)
        elif normalize_registry_host(host) == "docker.io":
            upstream_url = DOCKER_HUB_URL
        else:
            upstream_url = config.url_for(host)
        mirrors = [_Base(m, self._mirror_credentials(m), is_mirror=True) for m in config.mirrors]
        upstream = _Base(upstream_url, Credentials.from_config(config, host), is_mirror=False)
        upstream.label = host
        self._bases: tuple[_Base, ...] = (*mirrors, upstream)
        # every hop is checked; the config names the mirrors and, unless this is the '*'
        # entry (any host a client names), the upstream itself
        named = [b.url for b in mirrors] + ([] if public_only else [upstream.url])
        self.guard = AddressGuard(named, config.allow_redirect_to, https_only=public_only)
        #: sent with every request (peers mark their requests with these)
        self.extra_headers = dict(extra_headers or {})
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=config.connect_timeout, sock_read=config.read_timeout
        )
        self._own_session = session is None
        #: made on first use, inside the running loop
        self._session: aiohttp.ClientSession | None = session

    def _mirror_credentials(self, url: str) -> Credentials | None:
        """A mirror's own credentials: from its auth_file entry (userinfo in the URL wins)."""
        if self.config.auth_file:
            host = URL(url).host_port_subcomponent or ""
            return Credentials.from_auth_file(
                self.config.auth_file, host, key=f"upstreams.{self.config.pattern}.auth_file"
            )
        return None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = self._make_session()
        return self._session

    def _make_session(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            ssl=_ssl_context(self.config),
            limit=0,
            limit_per_host=LIMIT_PER_HOST,
            resolver=GuardedResolver(self.guard),
            ttl_dns_cache=60,
        )
        return aiohttp.ClientSession(
            read_bufsize=READ_BUFSIZE,
            connector=connector,
            timeout=self._timeout,
            auto_decompress=False,  # blob bytes must be exactly what was hashed upstream
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
            headers={hdrs.USER_AGENT: USER_AGENT, hdrs.ACCEPT_ENCODING: "identity"},
        )

    def __repr__(self) -> str:
        return f"UpstreamClient({self.name!r}, bases={[b.source for b in self._bases]!r})"

    @property
    def sources(self) -> list[str]:
        """Base URLs in the order they are tried (credentials masked)."""
        return [b.source for b in self._bases]

    async def close(self) -> None:
        if self._own_session and self._session is not None and not self._session.closed:
            await self._session.close()

    # --- the public operations -------------------------------------------------------------------
    async def head_manifest(self, path: str, reference: str) -> ManifestHead | None:
        """HEAD a manifest (a tag check that Docker Hub does not count as a pull); None on 404."""

        async def op(base: _Base) -> ManifestHead | None:
            url = self._url(base, f"{path}/manifests/{reference}")
            resp = await self._send(base, "HEAD", url, path, {hdrs.ACCEPT: MANIFEST_ACCEPT})
            try:
                if resp.status == 404:
                    return None
                if resp.status != 200:
                    raise self._status_error(base, resp, "HEAD manifest")
                return ManifestHead(
                    _digest_header(resp.headers.get(DOCKER_CONTENT_DIGEST)),
                    _media_type(resp.headers.get(hdrs.CONTENT_TYPE)),
                    resp.content_length,
                )
            finally:
                resp.release()

        return await self._each_base(op, f"{path}:{reference}")

    async def head_blob(self, path: str, digest: Digest) -> int | None:
        """HEAD a blob: its size, or None on 404."""

        async def op(base: _Base) -> int | None:
            url = self._url(base, f"{path}/blobs/{digest}")
            resp = await self._send(base, "HEAD", url, path, {})
            try:
                if resp.status == 404:
                    return None
                if resp.status != 200:
                    raise self._status_error(base, resp, "HEAD blob")
                return resp.content_length if resp.content_length is not None else -1
            finally:
                resp.release()

        return await self._each_base(op, f"{path}@{digest}")

    async def get_manifest(self, path: str, reference: str) -> ManifestGet | None:
        """GET a manifest with the full Accept list; the bytes exactly as served. None on 404."""
        want = _digest_header(reference) if ":" in reference else None

        async def op(base: _Base) -> ManifestGet | None:
            url = self._url(base, f"{path}/manifests/{reference}")
            resp = await self._send(base, "GET", url, path, {hdrs.ACCEPT: MANIFEST_ACCEPT})
            try:
                if resp.status == 404:
                    return None
                if resp.status != 200:
                    raise self._status_error(base, resp, "GET manifest")
                body = await self._read_capped(base, resp, MAX_MANIFEST_BYTES, "manifest")
                header = _digest_header(resp.headers.get(DOCKER_CONTENT_DIGEST))
                expected = want or header
                digest = Digest.of(body, expected.algorithm if expected else "sha256")
                if expected is not None and expected != digest:
                    raise self._fail(
                        base,
                        UpstreamError(
                            base.label,
                            f"manifest {path}:{reference} hashes to {digest}, expected {expected}",
                            kind="digest_mismatch",
                        ),
                    )
                media_type = _media_type(resp.headers.get(hdrs.CONTENT_TYPE))
                if media_type in ("", "application/json", "text/plain", "application/octet-stream"):
                    media_type = _body_media_type(body) or media_type
                return ManifestGet(body, media_type, digest)
            finally:
                resp.release()

        return await self._each_base(op, f"{path}:{reference}")

    async def open_blob(self, path: str, digest: Digest, offset: int = 0) -> BlobStream:
        """Open a blob (from ``offset`` with a Range request); BlobUnknown on 404."""

        async def op(base: _Base) -> BlobStream | None:
            url = self._url(base, f"{path}/blobs/{digest}")
            headers: dict[str, str] = {hdrs.RANGE: f"bytes={offset}-"} if offset > 0 else {}
            resp = await self._send(base, "GET", url, path, headers)
            handed_over = False
            try:
                if resp.status == 404:
                    return None
                if resp.status not in (200, 206):
                    raise self._status_error(base, resp, "GET blob")
                size, start = self._blob_extent(base, resp)
                stream = BlobStream(
                    resp,
                    size=size,
                    offset=start,
                    source=base.source,
                    guard=lambda what: self._io_errors(base, what),
                )
                handed_over = True
                return stream
            finally:
                if not handed_over:
                    resp.close()

        stream = await self._each_base(op, f"{path}@{digest}")
        if stream is None:
            raise BlobUnknown(str(digest))
        return stream

    async def list_tags(self, path: str) -> list[str] | None:
        """Every tag, following ``Link: <...>; rel="next"`` (at most 50 pages); None on 404."""

        async def op(base: _Base) -> list[str] | None:
            url: URL | None = self._url(base, f"{path}/tags/list")
            tags: list[str] = []
            seen: set[str] = set()
            pages = 0
            while url is not None and pages < MAX_TAG_PAGES:
                pages += 1
                resp = await self._send(base, "GET", url, path, {hdrs.ACCEPT: "application/json"})
                try:
                    if resp.status == 404:
                        return None if pages == 1 else tags
                    if resp.status != 200:
                        raise self._status_error(base, resp, "GET tags/list")
                    body = await self._read_capped(base, resp, MAX_TAGS_PAGE_BYTES, "tags/list")
                    nxt = resp.links.get("next")
                    next_url = nxt.get("url") if nxt is not None else None
                finally:
                    resp.release()
                for tag in _tags_of(body, base, self._fail):
                    if tag not in seen:
                        seen.add(tag)
                        tags.append(tag)
                url = next_url if isinstance(next_url, URL) else None
                if url is not None and base.is_mirror and "ns" not in url.query:
                    url = url.update_query(ns=self.name)
            if url is not None:
                log.warning(
                    "upstream.tags_truncated host=%s path=%s pages=%d", self.name, path, pages
                )
            return tags

        return await self._each_base(op, path)

    async def get_referrers(self, path: str, digest: Digest) -> bytes | None:
        """The referrers index of a manifest (OCI 1.1 ``/referrers/<digest>``), its bytes as
        served; None when the registry has no referrers API (404, as distribution 2.8)."""

        async def op(base: _Base) -> bytes | None:
            url = self._url(base, f"{path}/referrers/{digest}")
            resp = await self._send(base, "GET", url, path, {hdrs.ACCEPT: OCI_INDEX})
            try:
                if resp.status == 404:
                    return None
                if resp.status != 200:
                    raise self._status_error(base, resp, "GET referrers")
                return await self._read_capped(base, resp, MAX_MANIFEST_BYTES, "referrers")
            finally:
                resp.release()

        return await self._each_base(op, f"{path}@{digest} referrers")

    # --- mirrors, then the upstream --------------------------------------------------------------
    async def _each_base(self, op: Callable[[_Base], Awaitable[T | None]], what: str) -> T | None:
        for base in self._bases:
            try:
                result = await op(base)
            except UpstreamError as exc:
                if not base.is_mirror:
                    raise
                log.warning(
                    "upstream.mirror_failed host=%s mirror=%s what=%s kind=%s error=%s",
                    self.name,
                    base.source,
                    what,
                    exc.kind,
                    exc.detail,
                )
                continue
            if result is None and base.is_mirror:
                log.info(
                    "upstream.mirror_miss host=%s mirror=%s what=%s", self.name, base.source, what
                )
                continue
            return result
        return None  # pragma: no cover - the upstream is always the last base

    # --- one request: auth, redirects, timing ------------------------------------------------------
    def _url(self, base: _Base, suffix: str) -> URL:
        url = URL(f"{base.url}/v2/{suffix}", encoded=False)
        return url.update_query(ns=self.name) if base.is_mirror else url

    async def _send(
        self, base: _Base, method: str, url: URL, repo: str, headers: Mapping[str, str]
    ) -> aiohttp.ClientResponse:
        """Send with auth; answer one 401 challenge and retry once; follow redirects by hand."""
        auth = await self._auth_header(base, repo)
        challenged = False
        target = url
        for _ in range(MAX_REDIRECTS + 1):
            same_origin = target.origin() == base.url.origin()
            h = dict(headers)
            if auth is not None and same_origin:
                h[hdrs.AUTHORIZATION] = auth
            resp = await self._raw(base, method, target, h)
            if resp.status == 401 and same_origin and not challenged:
                challenged = True
                challenge = resp.headers.get(hdrs.WWW_AUTHENTICATE, "")
                resp.release()
                new = await self._answer_challenge(base, repo, challenge, auth)
                if new is None:
                    raise self._fail(
                        base,
                        UpstreamError(
                            base.label,
                            f"{method} {target.path}: 401 and no way to authenticate",
                            kind="auth",
                        ),
                    )
                auth = new
                continue
            location = resp.headers.get(hdrs.LOCATION)
            if resp.status in _REDIRECTS and location:
                resp.release()
                target = resp.url.join(URL(location))
                if resp.status == 303 and method != "HEAD":
                    method = "GET"
                continue
            return resp
        raise self._fail(
            base,
            UpstreamError(base.label, f"{method} {url.path}: more than {MAX_REDIRECTS} redirects"),
        )

    async def _raw(
        self, base: _Base, method: str, url: URL, headers: Mapping[str, str]
    ) -> aiohttp.ClientResponse:
        await self._check_target(base, url)
        started = time.monotonic()
        with self._io_errors(base, f"{method} {url.path}"):
            resp = await self._get_session().request(
                method,
                url,
                headers={
                    hdrs.USER_AGENT: USER_AGENT,
                    hdrs.ACCEPT_ENCODING: "identity",
                    **self.extra_headers,
                    **headers,
                },
                allow_redirects=False,
                timeout=self._timeout,
            )
        elapsed = time.monotonic() - started
        metrics.UPSTREAM_SECONDS.labels(base.label).observe(elapsed)
        log.debug(
            "upstream.request host=%s source=%s method=%s path=%s status=%d ms=%.1f",
            self.name,
            mask_credentials(f"{url.scheme}://{url.host_port_subcomponent}"),
            method,
            url.path,
            resp.status,
            elapsed * 1000,
        )
        return resp

    async def _check_target(self, base: _Base, url: URL) -> None:
        """The address guard (regproxy.upstream.guard) for one hop, before it is sent.

        IP literals and schemes are checked here; names by our session's resolver on every
        connect, or here with a lookup of our own when the session was given to us (weaker:
        the name could resolve differently later; only peers share a session).
        """
        reason = self.guard.refusal(url)
        if reason is not None:
            raise self._denied(base, f"{url.scheme}://{url.host_port_subcomponent}", reason)
        host = url.host or ""
        port = url.port or 0
        if self._own_session or self.guard.trusted(host, port):
            return
        with self._io_errors(base, f"resolve {host}"):
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM
            )
            self.guard.vet_infos(host, port, (str(i[4][0]) for i in infos))

    def _denied(self, base: _Base, target: str, detail: str) -> UpstreamError:
        """A hop the address guard refused: logged, counted (kind=denied), never sent."""
        log.warning(
            "upstream.refused host=%s source=%s target=%s reason=%s",
            self.name,
            base.source,
            mask_credentials(target),
            detail,
        )
        return self._fail(base, UpstreamError(base.label, f"refused: {detail}", kind="denied"))

    @contextlib.contextmanager
    def _io_errors(self, base: _Base, what: str) -> Iterator[None]:
        """The one place aiohttp and timeout exceptions become Upstream errors."""
        try:
            yield
        except UpstreamError:
            raise
        except TimeoutError as exc:
            raise self._fail(base, UpstreamTimeout(base.label, f"{what}: timed out")) from exc
        except (aiohttp.ClientError, OSError) as exc:
            refused = _refusal_of(exc)
            if refused is not None:
                raise self._denied(base, what, str(refused)) from exc
            detail = mask_credentials(str(exc) or type(exc).__name__)
            raise self._fail(
                base, UpstreamError(base.label, f"{what}: {detail}", kind="connect")
            ) from exc

    def _fail(self, base: _Base, exc: UpstreamError) -> UpstreamError:
        metrics.UPSTREAM_ERRORS.labels(base.label, exc.kind).inc()
        log.info(
            "upstream.error host=%s source=%s kind=%s detail=%s",
            self.name,
            base.source,
            exc.kind,
            exc.detail,
        )
        return exc

    def _status_error(self, base: _Base, resp: aiohttp.ClientResponse, what: str) -> UpstreamError:
        """The one place upstream statuses become errors."""
        status = resp.status
        if status in (401, 403):
            kind = "auth"
        elif status == 429:
            kind = "429"
        elif 400 <= status < 500:
            kind = "4xx"
        elif status >= 500:
            kind = "5xx"
        else:
            kind = "error"
        return self._fail(
            base, UpstreamError(base.label, f"{what} {resp.url.path}: HTTP {status}", kind=kind)
        )

    async def _read_capped(
        self, base: _Base, resp: aiohttp.ClientResponse, cap: int, what: str
    ) -> bytes:
        if resp.content_length is not None and resp.content_length > cap:
            raise self._fail(base, UpstreamError(base.label, f"{what} larger than {cap} bytes"))
        with self._io_errors(base, f"{what} body"):
            body = await resp.content.read(cap + 1)
            while len(body) <= cap and not resp.content.at_eof():
                more = await resp.content.read(cap + 1 - len(body))
                if not more:
                    break
                body += more
        if len(body) > cap:
            raise self._fail(base, UpstreamError(base.label, f"{what} larger than {cap} bytes"))
        return body

    def _blob_extent(self, base: _Base, resp: aiohttp.ClientResponse) -> tuple[int, int]:
        """(total size, offset of this body) from Content-Range (206) or Content-Length (200)."""
        if resp.status == 206:
            m = _CONTENT_RANGE_RE.match(resp.headers.get(hdrs.CONTENT_RANGE, ""))
            if m and m.group(3) != "*":
                return int(m.group(3)), int(m.group(1))
            raise self._fail(base, UpstreamError(base.label, "206 without a usable Content-Range"))
        if resp.content_length is None:
            raise self._fail(
                base, UpstreamError(base.label, "blob response without Content-Length")
            )
        return resp.content_length, 0

    # --- auth -------------------------------------------------------------------------------------
    async def _auth_header(self, base: _Base, repo: str) -> str | None:
        """What we know this base wants, sent up front so a known challenge costs no 401."""
        if base.bearer is not None:
            realm, service = base.bearer
            return "Bearer " + await self._token(base, (realm, service, _scope(repo)))
        if base.basic and base.creds is not None:
            return base.creds.basic()
        return None

    async def _answer_challenge(
        self, base: _Base, repo: str, header: str, used: str | None
    ) -> str | None:
        scheme, params = parse_www_authenticate(header)
        if scheme == "bearer" and params.get("realm"):
            base.bearer = (params["realm"], params.get("service", ""))
            key: TokenKey = (params["realm"], params.get("service", ""), _scope(repo))
            if used is not None and used.startswith("Bearer "):
                base.tokens.invalidate(key, used.removeprefix("Bearer "))
            return "Bearer " + await self._token(base, key)
        if scheme == "basic" and base.creds is not None:
            if used is not None and used.startswith("Basic "):
                return None  # these credentials were refused already
            base.basic = True
            return base.creds.basic()
        return None

    async def _token(self, base: _Base, key: TokenKey) -> str:
        try:
            return await base.tokens.get(key, lambda: self._fetch_token(base, key))
        except ValueError as exc:
            raise self._fail(
                base, UpstreamError(base.label, f"token endpoint: {exc}", kind="auth")
            ) from None

    async def _fetch_token(self, base: _Base, key: TokenKey) -> Mapping[str, Any]:
        realm, service, scope = key
        url = URL(realm)
        if url.scheme not in ("http", "https") or not url.host:
            raise self._fail(
                base, UpstreamError(base.label, "token realm is not an http(s) URL", kind="auth")
            )
        query: dict[str, str] = {"scope": scope}
        if service:
            query["service"] = service
        url = url.update_query(query)
        headers: dict[str, str] = {hdrs.ACCEPT: "application/json"}
        # credentials go to a realm over TLS, or to the registry's own host
        if base.creds is not None and (url.scheme == "https" or url.host == base.url.host):
            headers[hdrs.AUTHORIZATION] = base.creds.basic()
        resp = await self._raw(base, "GET", url, headers)
        try:
            if resp.status != 200:
                raise self._status_error(base, resp, "token")
            body = await self._read_capped(base, resp, MAX_TOKEN_BYTES, "token")
        finally:
            resp.release()
        try:
            doc = json.loads(body)
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            raise self._fail(
                base,
                UpstreamError(base.label, "token endpoint answered no JSON object", kind="auth"),
            )
        log.debug(
            "upstream.token host=%s realm=%s scope=%s", self.name, url.with_query(None), scope
        )
        return doc


def _refusal_of(exc: BaseException) -> AddressRefused | None:
    """The guard's refusal behind an aiohttp connect error (our resolver raised it)."""
    seen: BaseException | None = exc
    for _ in range(4):
        if seen is None:
            return None
        if isinstance(seen, AddressRefused):
            return seen
        seen = getattr(seen, "os_error", None) or seen.__cause__
    return None


def _scope(repo: str) -> str:
    return f"repository:{repo}:pull"


def _body_media_type(body: bytes) -> str:
    try:
        doc = json.loads(body)
    except ValueError:
        return ""
    mt = doc.get("mediaType") if isinstance(doc, dict) else None
    return mt if isinstance(mt, str) else ""


def _tags_of(
    body: bytes, base: _Base, fail: Callable[[_Base, UpstreamError], UpstreamError]
) -> list[str]:
    try:
        doc = json.loads(body)
    except ValueError:
        raise fail(base, UpstreamError(base.label, "tags/list is not JSON")) from None
    tags = doc.get("tags") if isinstance(doc, dict) else None
    if tags is None:
        return []
    if not isinstance(tags, list):
        raise fail(base, UpstreamError(base.label, "tags/list has no tags array"))
    return [t for t in tags if isinstance(t, str)]
