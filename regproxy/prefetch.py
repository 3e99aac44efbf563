"""Prefetch: pull a known list of images into the store ahead of need, and pin them.

The list is ``prefetch.images`` (plain references or the ``- image: REF`` entries of a cluster
profile's ``pack.content.images``). For each reference the manifest is pulled through (tag TTL as
for any client), an index is walked into every child or only the children whose platform is in
``prefetch.platforms``, every blob (config and layers) is fetched to the end and committed
(through the same single-flight fetcher clients use, so nothing is held in memory), and then the
manifests are pinned so eviction keeps them.

The daemon runs :meth:`Prefetcher.run` in the background: a full pass at start-up and every
``prefetch.interval``; between passes, images that failed are retried with a doubling backoff
(1 s up to 60 s) while the upstream is unreachable. :attr:`Prefetcher.prefetch_done` turns true
once every image has been prefetched once (readiness, ``prefetch.required_for_ready``) and stays
true: what was fetched is local. ``regproxy prefetch`` runs :meth:`Prefetcher.run_until_done`
in-process with a bounded number of attempts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final

from regproxy import pins
from regproxy.config import PrefetchConfig
from regproxy.errors import OCIError, UpstreamError
from regproxy.names import NameResolver, RepoName
from regproxy.oci import Descriptor, Digest, parse_manifest_async

log = logging.getLogger("regproxy.prefetch")

BACKOFF_START: Final = 1.0
BACKOFF_MAX: Final = 60.0
BLOB_CONCURRENCY: Final = 4
MAX_INDEX_DEPTH: Final = 2
#: the architectures whose variant a client assumes when the platform names none
_DEFAULT_VARIANT: Final = {"arm64": "v8", "arm": "v7"}
STATES: Final = ("done", "pending", "failed")


# --- the list of images ------------------------------------------------------------------------
def image_entries(value: Any, where: str = "images") -> list[str]:
    """Plain references or ``{image: REF}`` mappings -> references, in order, without repeats."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise ValueError(f"{where} must be a list of image references")
    out: list[str] = []
    for i, item in enumerate(value):
        if isinstance(item, dict):
            item = item.get("image")
        if not isinstance(item, str) or not item.strip():
            raise ValueError(f"{where}[{i}] must be a reference or {{image: REF}}")
        ref = item.strip()
        if ref not in out:
            out.append(ref)
    return out


def images_from_document(doc: Any) -> list[str]:
    """The images of a YAML document: a list, or ``pack.content.images``, ``content.images``,
    ``prefetch.images`` or ``images`` in a mapping (a cluster profile's pack pasted as it is)."""
    if isinstance(doc, list) or doc is None:
        return image_entries(doc)
    if not isinstance(doc, dict):
        raise ValueError("expected a list of images or a mapping with pack.content.images")
    for path in (("pack", "content", "images"), ("content", "images"), ("prefetch", "images")):
        node: Any = doc
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        if node is not None:
            return image_entries(node, ".".join(path))
    if "images" in doc:
        return image_entries(doc["images"])
    raise ValueError("no pack.content.images, content.images or images list in the document")


# --- platforms ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def parse(cls, text: str) -> Platform:
        parts = text.strip().lower().split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise ValueError(f"platform {text!r} is not os/architecture[/variant]")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else None)

    def matches(self, platform: dict[str, Any] | None) -> bool:
        if not platform:
            return False
        if platform.get("os") != self.os or platform.get("architecture") != self.architecture:
            return False
        if self.variant is None:
            return True
        variant = platform.get("variant") or _DEFAULT_VARIANT.get(self.architecture)
        return bool(variant == self.variant)

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


def select_children(
    children: Iterable[Descriptor], platforms: tuple[Platform, ...]
) -> list[Descriptor]:
    """Every child of an index, or only those whose platform one of ``platforms`` matches."""
    if not platforms:
        return list(children)
    return [c for c in children if any(p.matches(c.platform) for p in platforms)]


# --- results -----------------------------------------------------------------------------------
@dataclass
class ImageResult:
    ref: str
    repo: str = ""
    digest: str = ""
    ok: bool = False
    manifests: int = 0
    blobs: int = 0
    #: bytes this run had to fetch (not already in the store)
    fetched_bytes: int = 0
    #: bytes of every blob of the selected manifests
    total_bytes: int = 0
    upstream: str = ""
    error: str = ""
    seconds: float = 0.0
    pinned: list[str] = field(default_factory=list)
    #: referrers (signatures, SBOMs, attestations) taken along
    referrers: int = 0


@dataclass
class Summary:
    results: list[ImageResult]

    @property
    def failed(self) -> list[ImageResult]:
        return [r for r in self.results if not r.ok]

    @property
    def fetched_bytes(self) -> int:
        return sum(r.fetched_bytes for r in self.results)

    @property
    def total_bytes(self) -> int:
        return sum(r.total_bytes for r in self.results)


# --- the work ----------------------------------------------------------------------------------
class Prefetcher:
    """Prefetch images into a registry (a :class:`regproxy.proxy.ProxyRegistry` normally).

    ``registry`` is duck-typed to what the daemon and the CLI both have: ``get_manifest``,
    ``get_blob``, ``local_blob``, ``mount_blob`` and ``db`` (pinning goes through
    :func:`regproxy.pins.pin_digests`).
    """

    def __init__(
        self,
        registry: Any,
        resolver: NameResolver,
        config: PrefetchConfig,
        *,
        images: Iterable[str] | None = None,
        on_result: Callable[[ImageResult], None] | None = None,
        sleep: Callable[[float], Any] = asyncio.sleep,
    ) -> None:
        self.registry = registry
        self.resolver = resolver
        self.config = config
        self.images = list(images if images is not None else config.images)
        self.platforms = tuple(Platform.parse(p) for p in config.platforms)
        self.on_result = on_result
        self._sleep = sleep
        #: per reference: "done" (last attempt succeeded), "failed", or "pending" (not yet tried)
        self.state: dict[str, str] = dict.fromkeys(self.images, "pending")
        #: True once every image was prefetched at least once (or there is nothing to prefetch);
        #: what ``/readyz`` consults when ``prefetch.required_for_ready`` is true
        self.prefetch_done = not self.images
        self._set_gauge()

    def _set_gauge(self) -> None:
        counts = dict.fromkeys(STATES, 0)
        for s in self.state.values():
            counts[s] += 1
        for s, n in counts.items():
            self.registry.metrics.prefetch_images.labels(s).set(n)

    # one image ------------------------------------------------------------------------------------
    async def prefetch_image(self, ref: str) -> ImageResult:
        res = ImageResult(ref)
        started = time.monotonic()
        try:
            repo, reference = self.resolver.parse_reference(ref)
            res.repo, res.upstream = repo.canonical, repo.host or "local"
            top = await self.registry.get_manifest(repo, reference)
            res.digest = str(top.digest)
            digests = await self._walk(repo, top, res, 0)
            digests += await self._referrers(repo, digests, res)
            await pins.pin_digests(self.registry, repo, digests)
            res.pinned = digests
            res.ok = True
        except asyncio.CancelledError:
            raise
        except (OCIError, TimeoutError, OSError, ValueError) as exc:
            res.error = _describe(exc)
            if isinstance(exc, UpstreamError):
                res.upstream = exc.upstream
        except Exception as exc:  # a bug: logged with its traceback, the image counts as failed
            log.exception("prefetch.crashed ref=%s", ref)
            res.error = _describe(exc)
        res.seconds = time.monotonic() - started
        return res

    async def _referrers(self, repo: RepoName, digests: list[str], res: ImageResult) -> list[str]:
        """``prefetch.referrers``: the image's signatures, SBOMs, attestations (and theirs),
        fetched with their blobs, to be pinned with it (regproxy.referrers)."""
        index = getattr(self.registry, "referrer_index", None)
        if not self.config.referrers or index is None:
            return []
        found = await index.attached(repo, digests, fetch=True)
        res.referrers = len(found)
        return [a.digest for a in found]

    async def _walk(self, repo: RepoName, manifest: Any, res: ImageResult, depth: int) -> list[str]:
        """Fetch what a manifest needs; the digests of every manifest to pin."""
        res.manifests += 1
        parsed = await parse_manifest_async(manifest.body, manifest.media_type)
        digests = [str(manifest.digest)]
        if parsed.is_index:
            if depth >= MAX_INDEX_DEPTH:
                raise ValueError(f"{manifest.digest}: indexes nested deeper than {depth}")
            children = select_children(parsed.manifests, self.platforms)
            if not children:
                wanted = ", ".join(map(str, self.platforms))
                raise ValueError(f"{manifest.digest}: no child matches the platforms {wanted}")
            for child in children:
                got = await self.registry.get_manifest(repo, str(child.digest))
                digests += await self._walk(repo, got, res, depth + 1)
            return digests
        sem = asyncio.Semaphore(BLOB_CONCURRENCY)

        async def one(desc: Descriptor) -> None:
            async with sem:
                await self._blob(repo, desc.digest, res)

        await asyncio.gather(*(one(b) for b in _unique(parsed.blobs)))
        return digests

    async def _blob(self, repo: RepoName, digest: Digest, res: ImageResult) -> None:
        """Make sure a blob is committed in the store under ``repo``; never read it here."""
        blob = await self.registry.get_blob(repo, digest)
        res.blobs += 1
        res.total_bytes += blob.size
        if blob.stream is None:
            return
        await blob.stream.wait_done()
        res.fetched_bytes += blob.size
        self.registry.metrics.prefetch_bytes.inc(blob.size)
        log.debug("prefetch.blob repo=%s digest=%s bytes=%d", repo, digest, blob.size)
        # a transfer that another repository started is indexed under that one: link it here too
        if await self.registry.local_blob(repo, digest) is None:
            await self.registry.mount_blob(repo, digest, None)

    # passes ------------------------------------------------------------------------------------
    async def run_pass(self, refs: Iterable[str]) -> Summary:
        results = []
        for ref in refs:
            res = await self.prefetch_image(ref)
            self._record(res)
            results.append(res)
        return Summary(results)

    def _record(self, res: ImageResult) -> None:
        if res.ok:
            self.state[res.ref] = "done"
            log.info(
                "prefetch.image ref=%s repo=%s digest=%s manifests=%d blobs=%d bytes=%d "
                "referrers=%d fetched_bytes=%d seconds=%.2f",
                res.ref,
                res.repo,
                res.digest,
                res.manifests,
                res.blobs,
                res.total_bytes,
                res.referrers,
                res.fetched_bytes,
                res.seconds,
            )
        else:
            self.state[res.ref] = "failed"
            self.registry.metrics.prefetch_failures.inc()
            log.warning(
                "prefetch.failed ref=%s repo=%s digest=%s upstream=%s error=%s",
                res.ref,
                res.repo or "-",
                res.digest or "-",
                res.upstream or "-",
                res.error,
            )
        self._set_gauge()
        if self.on_result is not None:
            self.on_result(res)

    async def run_until_done(
        self, refs: Iterable[str] | None = None, *, attempts: int | None = None
    ) -> Summary:
        """One pass, then the failed images again with backoff, until none fails or
        ``attempts`` passes were made (None: no limit)."""
        todo = list(self.images if refs is None else refs)
        final: dict[str, ImageResult] = {}
        delay = BACKOFF_START
        attempt = 0
        while todo:
            attempt += 1
            summary = await self.run_pass(todo)
            for r in summary.results:
                final[r.ref] = r
            todo = [r.ref for r in summary.failed]
            if all(s == "done" for s in self.state.values()):
                self.prefetch_done = True
            if not todo or (attempts is not None and attempt >= attempts):
                break
            log.info("prefetch.retry images=%d in=%.0fs attempt=%d", len(todo), delay, attempt + 1)
            await self._sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)
        return Summary(list(final.values()))

    async def run(self) -> None:
        """The daemon's background task: a full pass now and every ``interval``; failed
        images retried with backoff in between."""
        if not self.images:
            return
        while True:
            started = time.monotonic()
            log.info(
                "prefetch.start images=%d platforms=%s",
                len(self.images),
                ",".join(map(str, self.platforms)) or "all",
            )
            try:
                summary = await self._bounded(started)
            except Exception:  # a bug: keep the daemon's prefetch alive, try again later
                log.exception("prefetch.crashed")
                await self._sleep(BACKOFF_MAX)
                continue
            log.info(
                "prefetch.pass images=%d failed=%d bytes=%d fetched_bytes=%d seconds=%.1f",
                len(summary.results),
                len(summary.failed),
                summary.total_bytes,
                summary.fetched_bytes,
                time.monotonic() - started,
            )
            await self._sleep(max(0.0, started + self.config.interval - time.monotonic()))

    async def _bounded(self, started: float) -> Summary:
        """run_until_done, given up (until the next pass) when the interval is over."""
        try:
            return await asyncio.wait_for(self.run_until_done(), self.config.interval)
        except TimeoutError:
            failed = [ref for ref, s in self.state.items() if s != "done"]
            log.warning("prefetch.gave_up images=%d until=next_pass", len(failed))
            return Summary([ImageResult(ref, error="gave up") for ref in failed])


def _unique(descs: Iterable[Descriptor]) -> list[Descriptor]:
    seen: dict[Digest, Descriptor] = {}
    for d in descs:
        seen.setdefault(d.digest, d)
    return list(seen.values())


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())
