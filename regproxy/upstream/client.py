"""The client of one upstream registry (and its mirrors): the OCI operations regproxy needs.

How a request is sent — connection slots, auth, redirects, the address guard, time limits,
errors — is regproxy.upstream.transport; what answers become is regproxy.upstream.answers.

Base URLs are ``config.mirrors`` in order, then the upstream itself. A mirror that fails in any
way (connect error, timeout, 5xx, 429, auth, 404, bad body) is skipped; the upstream's answer is
final. Mirrors are asked with ``?ns=<host>`` as containerd does, so a mirror that serves several
upstreams (another regproxy) knows which one is meant; registries ignore the parameter.

Spec: https://github.com/opencontainers/distribution-spec/blob/main/spec.md#pulling-manifests
(HEAD/GET manifests, GET blobs with Range, tags/list with ``n``/``last`` and Link pagination).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, Final, TypeVar

import aiohttp
from aiohttp import hdrs
from yarl import URL

from regproxy.config import UpstreamConfig
from regproxy.deadline import DEFAULT_TIMING, Timing
from regproxy.errors import BlobUnknown, UpstreamError
from regproxy.metrics import Metrics, SourceMeters
from regproxy.oci import MANIFEST_ACCEPT, MAX_MANIFEST_BYTES, OCI_INDEX, Digest
from regproxy.upstream.answers import (
    BlobStream,
    ManifestGet,
    ManifestHead,
    TagPage,
    age_header,
    blob_extent,
    body_media_type,
    digest_header,
    media_type,
    tags_of,
)
from regproxy.upstream.auth import Credentials, normalize_registry_host
from regproxy.upstream.guard import AddressGuard
from regproxy.upstream.transport import Base, Transport

log = logging.getLogger("regproxy.upstream")

#: upstream tags are asked for in pages of at most this many ...
TAGS_PAGE: Final = 1000
#: ... each at most this much JSON, and at most this many pages for one answer
MAX_TAGS_PAGE_BYTES: Final = 1024 * 1024
MAX_TAG_PAGES: Final = 20
DOCKER_HUB_URL: Final = "https://registry-1.docker.io"
DOCKER_CONTENT_DIGEST: Final = "Docker-Content-Digest"
_VAGUE_TYPES: Final = frozenset({"", "application/json", "text/plain", "application/octet-stream"})

T = TypeVar("T")


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
        timing: Timing = DEFAULT_TIMING,
        meters: SourceMeters | None = None,
    ) -> None:
        if meters is None:  # counted nowhere the daemon exports (tools, tests)
            meters = Metrics().upstream_meters
        self.name = host
        self.config = config
        self.public_only = public_only
        if config.url:
            upstream_url = config.url_for(host)
        elif normalize_registry_host(host) == "docker.io":
            upstream_url = DOCKER_HUB_URL
        else:
            upstream_url = config.url_for(host)
        mirrors = [
            Base(m, self._mirror_credentials(m), is_mirror=True, clock=timing.now)
            for m in config.mirrors
        ]
        creds = Credentials.from_config(config, host)
        upstream = Base(upstream_url, creds, is_mirror=False, clock=timing.now)
        upstream.label = host
        self._timing = timing
        #: tags that moved upstream but were served stale to keep the reserve, and when last
        self.held_by_reserve = 0
        self.held_by_reserve_at: float | None = None
        self._bases: tuple[Base, ...] = (*mirrors, upstream)
        # every hop is checked; the config names the mirrors and, unless this is the '*'
        # entry (any host a client names), the upstream itself
        named = [b.url for b in mirrors] + ([] if public_only else [upstream.url])
        self.guard = AddressGuard(named, config.allow_redirect_to, https_only=public_only)
        self.transport = Transport(
            host,
            config,
            self.guard,
            session,
            extra_headers=extra_headers,
            timing=timing,
            meters=meters,
        )

    def _mirror_credentials(self, url: str) -> Credentials | None:
        """A mirror's own credentials: from its auth_file entry (userinfo in the URL wins)."""
        if self.config.auth_file:
            host = URL(url).host_port_subcomponent or ""
            return Credentials.from_auth_file(
                self.config.auth_file, host, key=f"upstreams.{self.config.pattern}.auth_file"
            )
        return None

    def __repr__(self) -> str:
        return f"UpstreamClient({self.name!r}, bases={[b.source for b in self._bases]!r})"

    @property
    def sources(self) -> list[str]:
        """Base URLs in the order they are tried (credentials masked)."""
        return [b.source for b in self._bases]

    async def close(self) -> None:
        await self.transport.close()

    def pulls_left(self) -> int | None:
        """What the upstream last said of its rate limit (Docker Hub), or None."""
        upstream = self._bases[-1]
        return upstream.ratelimit[0] if upstream.ratelimit is not None else None

    def below_reserve(self) -> bool:
        """Fewer pulls left than ``ratelimit_reserve``: tags are not re-fetched with GET."""
        left = self.pulls_left()
        return left is not None and left < self.config.ratelimit_reserve

    def keep_reserve(self) -> None:
        """Before a GET of a tag that moved: raise (kind ``ratelimit``, the tag is served
        stale) when it would spend the pulls kept for misses; counted for the web page."""
        if not self.below_reserve():
            return
        self.held_by_reserve += 1
        self.held_by_reserve_at = self._timing.wall()
        raise UpstreamError(
            self.name,
            f"tag moved, but {self.pulls_left()} pulls left is below ratelimit_reserve "
            f"{self.config.ratelimit_reserve}",
            kind="ratelimit",
        )

    def ratelimits(self) -> dict[str, dict[str, Any]]:
        """What each base (mirror, upstream) last said of its rate limit, by its metric label
        (the web page; the same figure as ``regproxy_upstream_ratelimit_remaining``)."""
        out: dict[str, dict[str, Any]] = {}
        for base in self._bases:
            if base.ratelimit is None:
                continue
            remaining, limit = base.ratelimit
            row: dict[str, Any] = {"remaining": remaining, "limit": limit}
            if not base.is_mirror:  # the reserve is kept of the upstream's own pulls
                row["reserve"] = self.config.ratelimit_reserve
                row["below_reserve"] = remaining < self.config.ratelimit_reserve
                row["held_tags"] = self.held_by_reserve
                row["held_at"] = self.held_by_reserve_at
            out[base.label] = row
        return out

    @contextlib.asynccontextmanager
    async def _found(
        self, base: Base, method: str, path: str, tail: str, headers: dict[str, str]
    ) -> AsyncIterator[aiohttp.ClientResponse | None]:
        """The answer to a request that finds something (200) or not (404: None); any other
        status is that status's error."""
        url = self._url(base, f"{path}/{tail}")
        async with self.transport.exchange(base, method, url, path, headers) as resp:
            if resp.status == 404:
                yield None
                return
            if resp.status != 200:
                what = tail.split("/", 1)[0].removesuffix("s")  # manifest, blob
                raise self.transport.status_error(base, resp, f"{method} {what}")
            yield resp

    # --- the public operations -------------------------------------------------------------------
    async def head_manifest(self, path: str, reference: str) -> ManifestHead | None:
        """HEAD a manifest (a tag check that Docker Hub does not count as a pull); None on 404."""

        async def op(base: Base) -> ManifestHead | None:
            headers: dict[str, str] = {hdrs.ACCEPT: MANIFEST_ACCEPT}
            async with self._found(base, "HEAD", path, f"manifests/{reference}", headers) as resp:
                if resp is None:
                    return None
                return ManifestHead(
                    digest_header(resp.headers.get(DOCKER_CONTENT_DIGEST)),
                    media_type(resp.headers.get(hdrs.CONTENT_TYPE)),
                    resp.content_length,
                    age_header(resp.headers.get(hdrs.AGE)),
                )

        return await self._each_base(op, f"{path}:{reference}")

    async def head_blob(self, path: str, digest: Digest) -> int | None:
        """HEAD a blob: its size (-1 when not said), or None on 404."""

        async def op(base: Base) -> int | None:
            async with self._found(base, "HEAD", path, f"blobs/{digest}", {}) as resp:
                if resp is None:
                    return None
                return resp.content_length if resp.content_length is not None else -1

        return await self._each_base(op, f"{path}@{digest}")

    async def get_manifest(self, path: str, reference: str) -> ManifestGet | None:
        """GET a manifest with the full Accept list; the bytes exactly as served. None on 404."""
        want = digest_header(reference) if ":" in reference else None

        async def op(base: Base) -> ManifestGet | None:
            headers: dict[str, str] = {hdrs.ACCEPT: MANIFEST_ACCEPT}
            async with self._found(base, "GET", path, f"manifests/{reference}", headers) as resp:
                if resp is None:
                    return None
                body = await self.transport.read_capped(base, resp, MAX_MANIFEST_BYTES, "manifest")
                header = digest_header(resp.headers.get(DOCKER_CONTENT_DIGEST))
                declared = media_type(resp.headers.get(hdrs.CONTENT_TYPE))
                age = age_header(resp.headers.get(hdrs.AGE))
            expected = want or header
            digest = Digest.of(body, expected.algorithm if expected else "sha256")
            if expected is not None and expected != digest:
                raise self.transport.fail(
                    base,
                    UpstreamError(
                        base.label,
                        f"manifest {path}:{reference} hashes to {digest}, expected {expected}",
                        kind="digest_mismatch",
                    ),
                )
            if declared in _VAGUE_TYPES:
                declared = body_media_type(body) or declared
            return ManifestGet(body, declared, digest, age)

        return await self._each_base(op, f"{path}:{reference}")

    async def open_blob(self, path: str, digest: Digest, offset: int = 0) -> BlobStream:
        """Open a blob (from ``offset`` with a Range request); BlobUnknown on 404.

        The stream holds one of the upstream's connection slots until it is closed.
        """

        async def op(base: Base) -> BlobStream | None:
            url = self._url(base, f"{path}/blobs/{digest}")
            headers: dict[str, str] = {hdrs.RANGE: f"bytes={offset}-"} if offset > 0 else {}
            held = await self.transport.send(base, "GET", url, path, headers)
            resp = held.response
            try:
                if resp.status == 404:
                    held.release()
                    return None
                if resp.status not in (200, 206):
                    raise self.transport.status_error(base, resp, "GET blob")
                try:
                    size, start = blob_extent(resp)
                except ValueError as exc:
                    raise self.transport.fail(base, UpstreamError(base.label, str(exc))) from None
            except BaseException:
                held.close()
                raise
            return BlobStream(
                resp,
                size=size,
                offset=start,
                source=base.source,
                guard=lambda what: self.transport.io_errors(base, what),
                release=held.slot.release,
                read_timeout=self.transport.config.read_timeout,
            )

        stream = await self._each_base(op, f"{path}@{digest}")
        if stream is None:
            raise BlobUnknown(str(digest))
        return stream

    async def list_tags(self, path: str, n: int, last: str | None = None) -> TagPage | None:
        """Up to ``n`` tags after ``last``, and whether upstream has more; None on 404.

        ``n`` and ``last`` go upstream (pages of at most 1000), ``Link: <...>; rel="next"`` is
        followed only while fewer than ``n`` tags are in hand, at most 20 pages of at most 1 MiB
        of JSON each: however large the upstream's list, what is held stays bounded.
        """

        async def op(base: Base) -> TagPage | None:
            query = {"n": str(min(n, TAGS_PAGE))} | ({"last": last} if last else {})
            url: URL | None = self._url(base, f"{path}/tags/list").update_query(query)
            tags: list[str] = []
            seen: set[str] = set()
            pages = 0
            while url is not None and len(tags) < n and pages < MAX_TAG_PAGES:
                pages += 1
                headers: dict[str, str] = {hdrs.ACCEPT: "application/json"}
                async with self.transport.exchange(base, "GET", url, path, headers) as resp:
                    if resp.status == 404:
                        return None if pages == 1 else TagPage(tags, False)
                    if resp.status != 200:
                        raise self.transport.status_error(base, resp, "GET tags/list")
                    body = await self.transport.read_capped(
                        base, resp, MAX_TAGS_PAGE_BYTES, "tags/list"
                    )
                    nxt = resp.links.get("next")
                    link = nxt.get("url") if nxt is not None else None
                try:
                    page = tags_of(body, n + 1 - len(tags), after=last)
                except ValueError as exc:
                    raise self.transport.fail(base, UpstreamError(base.label, str(exc))) from None
                del body
                for tag in page:
                    if tag not in seen:
                        seen.add(tag)
                        tags.append(tag)
                url = link if isinstance(link, URL) else None
                if url is not None and base.is_mirror and "ns" not in url.query:
                    url = url.update_query(ns=self.name)
            if url is not None and len(tags) < n:
                log.warning(
                    "upstream.tags_truncated host=%s path=%s pages=%d", self.name, path, pages
                )
            return TagPage(tags[:n], url is not None or len(tags) > n)

        return await self._each_base(op, path)

    async def get_referrers(self, path: str, digest: Digest) -> bytes | None:
        """The referrers index of a manifest (OCI 1.1 ``/referrers/<digest>``), its bytes as
        served; None when the registry has no referrers API (404, as distribution 2.8)."""

        async def op(base: Base) -> bytes | None:
            url = self._url(base, f"{path}/referrers/{digest}")
            headers: dict[str, str] = {hdrs.ACCEPT: OCI_INDEX}
            async with self.transport.exchange(base, "GET", url, path, headers) as resp:
                if resp.status == 404:
                    return None
                if resp.status != 200:
                    raise self.transport.status_error(base, resp, "GET referrers")
                return await self.transport.read_capped(base, resp, MAX_MANIFEST_BYTES, "referrers")

        return await self._each_base(op, f"{path}@{digest} referrers")

    # --- mirrors, then the upstream --------------------------------------------------------------
    async def _each_base(self, op: Callable[[Base], Awaitable[T | None]], what: str) -> T | None:
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

    def _url(self, base: Base, suffix: str) -> URL:
        url = URL(f"{base.url}/v2/{suffix}", encoded=False)
        return url.update_query(ns=self.name) if base.is_mirror else url
