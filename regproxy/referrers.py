"""Referrers (signatures, SBOMs, attestations): what points at a manifest, pulled through.

``GET /v2/<name>/referrers/<digest>`` is answered with an OCI index that merges:

1. **local**: manifests of the repository whose ``subject`` is the digest, the entries of the
   referrers tag schema's index (tag ``<alg>-<hex>``) and cosign's ``<alg>-<hex>.sig`` /
   ``.att`` / ``.sbom`` tags held here (pushed, imported or fetched before);
2. **upstream** (upstream names, sync on): its referrers API; when it has none (404, as
   distribution 2.8 answers) the tag schema instead: the ``<alg>-<hex>`` index and cosign's
   tags, fetched through the registry like any tag (``tag_ttl``, stale when the upstream is
   down, stored: so they are local from then on and travel with prefetch, pin and export);
3. **peers** when no upstream may answer (sync off, local-only names): each peer's local answer.

The upstream (or peers) part is cached per repository and subject for ``tag_ttl`` and served
stale when they cannot answer; the referrer manifests and their blobs are fetched on demand like
any content. ``artifactType`` filtering happens here, after the merge.

Spec: https://github.com/opencontainers/distribution-spec/blob/main/spec.md#listing-referrers
and #referrers-tag-schema (``<alg>`` cut to 32 characters, the hex to 64).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from regproxy.async_index import AsyncIndex
from regproxy.config import Config
from regproxy.errors import ManifestUnknown, OCIError, TagInvalid, UpstreamError
from regproxy.flights import SingleFlights
from regproxy.index import Index, ManifestRow
from regproxy.names import RepoName
from regproxy.oci import (
    OCI_INDEX,
    Descriptor,
    Digest,
    JSONInvalid,
    load_json,
    parse_manifest,
    parse_manifest_async,
    validate_tag,
)
from regproxy.peers import Peers
from regproxy.registry import Blob, Manifest
from regproxy.upstream import UpstreamClient

log = logging.getLogger("regproxy.referrers")

MAX_REFERRERS: Final = 1000
#: travel: referrers of referrers this deep, this many per image, this many blobs each
MAX_DEPTH: Final = 3
MAX_ATTACHED: Final = 256
MAX_ATTACHED_BLOBS: Final = 64
CACHE_ENTRIES: Final = 10_000
#: cosign's tags beside the image, and the artifact type each stands for
COSIGN_SUFFIXES: Final = {
    ".sig": "application/vnd.dev.cosign.simplesigning.v1+json",
    ".att": "application/vnd.dsse.envelope.v1+json",
    ".sbom": "application/vnd.dev.cosign.sbom",
}
#: upstream errors that mean "this one tag is unusable", not "the upstream is unreachable"
_CONTENT_ERRORS: Final = frozenset({"digest_mismatch", "error", "4xx"})


def fallback_tag(digest: Digest) -> str:
    """The referrers tag schema's tag for a subject: ``<alg>-<hex>``, cut to 32 and 64."""
    alg = "".join(c if c.isalnum() or c in "._-" else "-" for c in digest.algorithm)
    return f"{alg[:32]}-{digest.hex[:64]}"


def cosign_tags(digest: Digest) -> list[str]:
    """cosign's ``sha256-<hex>.sig`` / ``.att`` / ``.sbom`` for a subject (valid tags only)."""
    out = []
    for suffix in COSIGN_SUFFIXES:
        tag = f"{digest.algorithm}-{digest.hex}{suffix}"
        try:
            out.append(validate_tag(tag))
        except TagInvalid:
            continue
    return out


def cosign_descriptor(tag: str, media_type: str, digest: Digest, body: bytes) -> Descriptor:
    """A cosign tag's manifest as a referrer: its artifact type from the suffix (an SBOM's
    from its layer, e.g. ``text/spdx+json``)."""
    suffix = "." + tag.rsplit(".", 1)[-1]
    artifact = COSIGN_SUFFIXES.get(suffix, "")
    if suffix == ".sbom":
        try:
            doc = load_json(body)
        except JSONInvalid:
            doc = None
        layers = doc.get("layers") if isinstance(doc, dict) else None  # an index has none
        kinds = (
            {la.get("mediaType") for la in layers if isinstance(la, dict)}
            if isinstance(layers, list)
            else set()
        )
        if len(kinds) == 1 and isinstance(next(iter(kinds)), str):
            artifact = str(next(iter(kinds)))
    return Descriptor(media_type, digest, len(body), artifact or None)


def kind_of(desc: Descriptor) -> str:
    """signature | attestation | sbom | other, from a referrer's artifact type (the web page)."""
    art = (desc.artifact_type or "").lower()
    predicate = (desc.annotations or {}).get("dev.sigstore.bundle.predicateType")
    if art in (COSIGN_SUFFIXES[".sig"], "application/vnd.dev.cosign.artifact.sig.v1+json"):
        return "signature"
    if art.startswith("application/vnd.dev.sigstore.bundle"):
        if predicate in (None, "https://sigstore.dev/cosign/sign/v1"):
            return "signature"
        return "sbom" if "spdx" in predicate or "cyclonedx" in predicate else "attestation"
    if any(word in art for word in ("spdx", "cyclonedx", "sbom", "syft")):
        return "sbom"
    if "dsse" in art or "in-toto" in art or "attestation" in art or "provenance" in art:
        return "attestation"
    return "other"


def descriptors_of_index(body: bytes, where: str) -> list[Descriptor]:
    """The manifests of a referrers index (an upstream's answer or a tag schema index)."""
    try:
        parsed = parse_manifest(body, OCI_INDEX)
    except OCIError as exc:
        log.warning("referrers.bad_index where=%s error=%s", where, exc)
        return []
    if not parsed.is_index:
        log.warning("referrers.bad_index where=%s error=not an index", where)
        return []
    return list(parsed.manifests[:MAX_REFERRERS])


def merge(*groups: list[Descriptor]) -> list[Descriptor]:
    seen: set[Digest] = set()
    out: list[Descriptor] = []
    for group in groups:
        for d in group:
            if d.digest not in seen and len(out) < MAX_REFERRERS:
                seen.add(d.digest)
                out.append(d)
    return out


class Host(Protocol):
    """What referrers need of the registry that composes them (regproxy.proxy.ProxyRegistry)."""

    config: Config
    db: AsyncIndex

    def upstream(self, repo: RepoName) -> UpstreamClient | None: ...

    def active_peers(self) -> Peers | None: ...

    async def get_manifest(self, repo: RepoName, reference: str) -> Manifest: ...

    async def local_manifest(
        self, repo: RepoName, reference: str
    ) -> tuple[ManifestRow, float] | None: ...

    async def manifest_body(self, repo: RepoName, row: ManifestRow) -> Manifest: ...

    async def get_blob(self, repo: RepoName, digest: Digest) -> Blob: ...

    async def local_blob(self, repo: RepoName, digest: Digest) -> Blob | None: ...

    async def mount_blob(self, repo: RepoName, digest: Digest, source: RepoName | None) -> bool: ...


@dataclass(frozen=True, slots=True)
class Attached:
    """A referrer that travels with its subject (prefetch, pin, export)."""

    subject: str
    digest: str
    media_type: str
    #: cosign's tag for it (``sha256-<hex>.sig``), which must travel as that tag
    tag: str | None = None


@dataclass(frozen=True, slots=True)
class _Entry:
    descs: tuple[Descriptor, ...]
    at: float


class Referrers:
    """The referrers of a manifest in one repository: local, plus upstream's or the peers'."""

    def __init__(self, registry: Host, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.registry = registry
        self.clock = clock
        self._cache: dict[tuple[str, str], _Entry] = {}
        self._flights = SingleFlights("referrers")

    async def lookup(
        self, repo: RepoName, subject: Digest, artifact_type: str | None = None
    ) -> list[Descriptor]:
        remote = await self._remote(repo, subject)
        local = await self.local(repo, subject)
        merged = merge(remote, local)
        if artifact_type:
            merged = [d for d in merged if d.artifact_type == artifact_type]
        return merged

    # --- local ---------------------------------------------------------------------------------
    async def local(self, repo: RepoName, subject: Digest) -> list[Descriptor]:
        """What this host holds: subject manifests, the tag schema index, cosign's tags."""
        reg = self.registry
        rows = await reg.db.read(Index.referrers, repo.canonical, str(subject))
        out = [
            Descriptor(r.media_type, Digest.parse(r.digest), r.size, r.artifact_type, r.annotations)
            for r in rows[:MAX_REFERRERS]
        ]
        for tag in (fallback_tag(subject), *cosign_tags(subject)):
            found = await reg.local_manifest(repo, tag)
            if found is None:
                continue
            try:
                m = await reg.manifest_body(repo, found[0])
            except OCIError:
                continue
            if tag == fallback_tag(subject):
                out += descriptors_of_index(m.body, f"{repo}:{tag}")
            else:
                out.append(cosign_descriptor(tag, m.media_type, m.digest, m.body))
        return merge(out)

    # --- upstream or peers, cached ---------------------------------------------------------------
    async def _remote(self, repo: RepoName, subject: Digest) -> list[Descriptor]:
        reg = self.registry
        client = reg.upstream(repo)
        peers = reg.active_peers() if client is None else None
        if client is None and peers is None:
            return []
        key = (repo.canonical, str(subject))
        cached = self._cache.get(key)
        now = self.clock()
        if cached is not None and now - cached.at < reg.config.tag_ttl:
            return list(cached.descs)
        label = client.name if client is not None else "peers"
        try:
            if client is not None:
                descs = await self._single(key, lambda: self._from_upstream(repo, subject))
            else:
                descs = await self._single(key, lambda: self._from_peers(repo, subject))
        except (UpstreamError, TimeoutError) as exc:
            log.warning(
                "referrers.upstream_failed repo=%s digest=%s upstream=%s stale=%s error=%s",
                repo,
                subject,
                label,
                cached is not None,
                exc,
            )
            return list(cached.descs) if cached is not None else []
        if len(self._cache) >= CACHE_ENTRIES:
            self._cache.clear()
        self._cache[key] = _Entry(tuple(descs), self.clock())
        return descs

    async def _single(
        self, key: tuple[str, str], make: Callable[[], Awaitable[list[Descriptor]]]
    ) -> list[Descriptor]:
        """One fill per key at a time, detached from the first requester (regproxy.flights)."""
        return await self._flights.run(key, make)

    async def _from_upstream(self, repo: RepoName, subject: Digest) -> list[Descriptor]:
        client = self.registry.upstream(repo)
        assert client is not None
        try:
            body = await client.get_referrers(repo.path, subject)
        except UpstreamError as exc:
            if exc.kind != "4xx":
                raise
            body = None  # 400/405/406: a registry without the API, as a 404 says
        if body is not None:
            # cosign's legacy .sig/.att/.sbom tags have no subject: the API never lists them
            descs = merge(
                descriptors_of_index(body, f"{client.name}/{repo.path}@{subject}"),
                await self._tag_schema(repo, subject, index=False),
            )
            log.info(
                "referrers.fetched repo=%s digest=%s upstream=%s api=referrers count=%d",
                repo,
                subject,
                client.name,
                len(descs),
            )
            return descs
        descs = await self._tag_schema(repo, subject)
        log.info(
            "referrers.fetched repo=%s digest=%s upstream=%s api=tags count=%d",
            repo,
            subject,
            client.name,
            len(descs),
        )
        return descs

    async def _tag_schema(
        self, repo: RepoName, subject: Digest, *, index: bool = True
    ) -> list[Descriptor]:
        """The ``<alg>-<hex>`` index (``index``) and cosign's tags, each through the registry (a
        tag like any other: fetched, stored, re-checked after tag_ttl, stale when the upstream
        is down)."""
        index_tag = fallback_tag(subject)
        tags = [index_tag, *cosign_tags(subject)] if index else cosign_tags(subject)
        results = await asyncio.gather(
            *(self.registry.get_manifest(repo, t) for t in tags), return_exceptions=True
        )
        out: list[Descriptor] = []
        for tag, got in zip(tags, results, strict=True):
            if isinstance(got, ManifestUnknown):
                continue
            if isinstance(got, UpstreamError) and got.kind in _CONTENT_ERRORS:
                log.warning("referrers.tag_unusable repo=%s tag=%s error=%s", repo, tag, got)
                continue
            if isinstance(got, BaseException):
                raise got  # unreachable or worse: the cached answer (if any) is served stale
            if tag == index_tag:
                out += descriptors_of_index(got.body, f"{repo}:{tag}")
            else:
                out.append(cosign_descriptor(tag, got.media_type, got.digest, got.body))
        return merge(out)

    async def _from_peers(self, repo: RepoName, subject: Digest) -> list[Descriptor]:
        peers = self.registry.active_peers()
        if peers is None:
            return []
        groups = [
            descriptors_of_index(body, f"peer {repo}@{subject}")
            for body in await peers.referrers(repo.canonical, subject)
        ]
        return merge(*groups)

    # --- travel: prefetch, pin, export take an image's referrers (and theirs) -------------------
    async def attached(
        self,
        repo: RepoName,
        roots: Sequence[str],
        *,
        fetch: bool,
        depth: int = MAX_DEPTH,
        limit: int = MAX_ATTACHED,
    ) -> list[Attached]:
        """The referrers of ``roots`` and their referrers, ``depth`` levels down.

        ``fetch``: pulled through (referrers lookup, each manifest and its blobs made local);
        otherwise only what the store holds (pins never fetch). A referrer that cannot be
        fetched is logged and left out: the image itself does not fail for it.
        """
        reg = self.registry
        seen = set(roots)
        out: list[Attached] = []
        frontier = list(roots)
        for _ in range(depth):
            following: list[str] = []
            for subject in frontier:
                d = Digest.parse(subject)
                descs = await (self.lookup(repo, d) if fetch else self.local(repo, d))
                tags: dict[str, str] = {}
                for tag in cosign_tags(d):
                    found = await reg.local_manifest(repo, tag)
                    if found is not None:
                        tags[found[0].digest] = tag
                for desc in descs:
                    digest = str(desc.digest)
                    if digest in seen:
                        continue
                    seen.add(digest)
                    if not await self._have(repo, desc, fetch):
                        continue
                    out.append(Attached(subject, digest, desc.media_type, tags.get(digest)))
                    following.append(digest)
                    if len(out) >= limit:
                        log.warning(
                            "referrers.too_many repo=%s roots=%s limit=%d", repo, roots[0], limit
                        )
                        return out
            frontier = following
        return out

    async def _have(self, repo: RepoName, desc: Descriptor, fetch: bool) -> bool:
        """Whether the referrer's manifest (and, when fetching, its blobs) is local now."""
        reg = self.registry
        if not fetch:
            return await reg.local_manifest(repo, str(desc.digest)) is not None
        try:
            m = await reg.get_manifest(repo, str(desc.digest))
            parsed = await parse_manifest_async(m.body, m.media_type)
            for b in parsed.blobs[:MAX_ATTACHED_BLOBS]:
                blob = await reg.get_blob(repo, b.digest)
                if blob.stream is not None:
                    await blob.stream.wait_done()
                    if await reg.local_blob(repo, b.digest) is None:
                        await reg.mount_blob(repo, b.digest, None)
        except (OCIError, TimeoutError) as exc:
            log.warning("referrers.fetch_failed repo=%s digest=%s error=%s", repo, desc.digest, exc)
            return False
        return True

    def forget(self, repo: RepoName, subject: Digest) -> None:
        """Drop the cached remote answer (a referrer was just stored here)."""
        self._cache.pop((repo.canonical, str(subject)), None)
