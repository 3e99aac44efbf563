"""The registry's cached lookups, bounded, with one invalidation API.

What the hot path of a warm cache reads without a thread hop: which repository holds which blob
(and its size), manifest rows by digest, tags, and the bodies of small immutable objects
(manifests, small blobs).

A tag is believed for :data:`TAG_CACHE_SECONDS` after it was read, or after the index was last
confirmed unchanged by any other process (:meth:`LookupCache.confirm_tags`, from SQLite's
``data_version``, see :meth:`regproxy.registry.LocalRegistry.confirm_lookups`): another process
(``regproxy import``, ``gc``) may move one, and this process forgets each of its own changes.

A lookup reads the index on another thread; a change (a delete, an eviction) may land while it
is out. So a lookup takes a :meth:`LookupCache.ticket` before it reads, and its answer is cached
only if no :meth:`LookupCache.forget` since named its key (or all of its kind): a deleted row is
never cached again by a lookup that started before the delete. The last forgets are remembered
for that (:data:`FORGETS_KEPT`, :data:`FORGOTTEN_KEYS_KEPT`); a lookup out across more of them
is not cached. (Each eviction batch forgets what it removed: were any forget enough to refuse
every lookup out, the first lookups of a warming cache would keep being thrown away during an
eviction.)

Bounds and what they hold (about 0.85 KB of memory per manifest a client asks for by digest and
by tag, plus its body: 10,000 such manifests with 2 KB bodies take ~28 MB; each digest and media
type string is kept once, however many caches hold it): 50,000 manifest rows by digest, 50,000
tags, 200,000 blob links, 100,000 small bodies up to 32 MiB in all.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from sys import intern
from typing import Final, Generic, TypeVar

from regproxy.index import ManifestRow

K = TypeVar("K")
V = TypeVar("V")

SMALL_CACHE_BYTES: Final = 32 * 1024 * 1024
#: how long a cached tag is believed (another process, import or gc, may move it)
TAG_CACHE_SECONDS: Final = 1.0
#: how often the daemon confirms that no other process changed the index (within the above)
TAG_CONFIRM_SECONDS: Final = TAG_CACHE_SECONDS / 2
#: the last forgets remembered, with the keys they named (a lookup's answer is refused only if
#: one of them since its ticket named its key), and the keys they may name in all
FORGETS_KEPT: Final = 64
FORGOTTEN_KEYS_KEPT: Final = 4_000  # <1 MB: ~8 eviction batches of ~500 keys, a second or two

Key = tuple[str, str]


class LRU(Generic[K, V]):
    """Least recently used entries go first, above ``max_entries`` or ``max_weight`` (the sum
    of ``weigh(value)``, when both are given). Values are kept as they are (no wrapper per
    entry: a cache of 100,000 entries holds 100,000 objects fewer)."""

    def __init__(
        self, max_entries: int, max_weight: int = 0, weigh: Callable[[V], int] | None = None
    ) -> None:
        self._d: OrderedDict[K, V] = OrderedDict()
        self.max_entries = max_entries
        self.max_weight = max_weight if weigh is not None else 0
        self._weigh = weigh
        self.weight = 0

    def get(self, key: K) -> V | None:
        value = self._d.get(key)
        if value is None:
            return None
        self._d.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        self.pop(key)
        self._d[key] = value
        if self._weigh is not None:
            self.weight += self._weigh(value)
        while len(self._d) > self.max_entries or (
            self.max_weight and self.weight > self.max_weight
        ):
            _, old = self._d.popitem(last=False)
            if self._weigh is not None:
                self.weight -= self._weigh(old)

    def pop(self, key: K) -> None:
        value = self._d.pop(key, None)
        if value is not None and self._weigh is not None:
            self.weight -= self._weigh(value)

    def drop_where(self, pred: Callable[[K], bool]) -> None:
        for key in [k for k in self._d if pred(k)]:
            self.pop(key)

    def clear(self) -> None:
        self._d.clear()
        self.weight = 0

    def __len__(self) -> int:
        return len(self._d)


@dataclass(slots=True)
class _Forget:
    """One :meth:`LookupCache.forget`: its generation and what it named."""

    generation: int
    links: frozenset[Key] = frozenset()
    manifests: frozenset[Key] = frozenset()
    tags: frozenset[Key] = frozenset()
    tags_of: frozenset[str] = frozenset()
    all_tags: bool = False
    everything: bool = False
    size: int = field(init=False)

    def __post_init__(self) -> None:
        self.size = len(self.links) + len(self.manifests) + len(self.tags) + len(self.tags_of)

    def names(self, kind: str, key: Key) -> bool:
        """Whether this forget dropped ``key`` of ``kind`` (link, manifest, tag)."""
        if self.everything:
            return True
        if kind == "tag":
            return self.all_tags or key in self.tags or key[0] in self.tags_of
        return key in (self.links if kind == "link" else self.manifests)


#: a cached manifest row: a plain tuple of strings, numbers and None (the annotations as a tuple
#: of pairs). CPython leaves such a tuple out of the garbage collector's walks once a
#: collection has seen it (never a subclass such as ManifestRow itself, nor a dict): with
#: 100,000 rows cached, each full collection, which pauses the event loop and every thread,
#: would walk 100,000 objects more (tens of milliseconds)
Packed = tuple[
    str, str, int, "str | None", "str | None", "tuple[tuple[str, str], ...] | None", float
]


def _pack(row: ManifestRow) -> Packed:
    """The row with its digest and media type as the one copy of each string that all cached
    lookups share (each read from the index, or parsed from a request, is a copy of its own:
    ~200 bytes a manifest by digest and by tag, its body and its request paths)."""
    ann = tuple(row.annotations.items()) if row.annotations is not None else None
    return (
        intern(row.digest),
        intern(row.media_type),
        row.size,
        row.artifact_type,
        row.subject,
        ann,
        row.checked,
    )


def _unpack(packed: Packed) -> ManifestRow:
    digest, media_type, size, artifact_type, subject, ann, checked = packed
    annotations = dict(ann) if ann is not None else None
    return ManifestRow(digest, media_type, size, artifact_type, subject, annotations, checked)


class LookupCache:
    """Blob links, manifest rows, tags and small bodies; :meth:`forget` is the one way out."""

    def __init__(self) -> None:
        self._bodies: LRU[str, bytes] = LRU(100_000, SMALL_CACHE_BYTES, len)
        self._links: LRU[tuple[str, str], int] = LRU(200_000)
        self._manifests: LRU[tuple[str, str], Packed] = LRU(50_000)
        self._tags: LRU[tuple[str, str], tuple[Packed, float]] = LRU(50_000)
        #: moves on every forget: an answer read before one that named its key is not cached
        self._generation = 0
        #: the last forgets (oldest first), and the generation from which on all are there
        self._forgets: deque[_Forget] = deque()
        self._forgotten_keys = 0
        self._kept_from = 0
        #: when (monotonic) the index was last confirmed unchanged by other processes since
        #: ``_chain_start``: every tag cached since that start was current then (-inf: never)
        self._tags_confirmed = float("-inf")
        self._chain_start = float("inf")

    def ticket(self) -> int:
        """Take before reading the index; hand to the ``put_*`` of what was read."""
        return self._generation

    def _current(self, ticket: int | None, kind: str, key: Key) -> bool:
        """Whether an answer for ``key`` read after ``ticket`` was taken is still current: no
        forget since then named it (None: the caller wrote it itself)."""
        if ticket is None or ticket == self._generation:
            return True
        if ticket < self._kept_from:
            return False  # forgets since then are no longer all known
        for f in reversed(self._forgets):
            if f.generation <= ticket:
                break
            if f.names(kind, key):
                return False
        return True

    # --- reads ---------------------------------------------------------------------------------
    def link(self, repo: str, digest: str) -> int | None:
        """The size of a blob this repository holds, if cached."""
        return self._links.get((repo, digest))

    def manifest(self, repo: str, digest: str) -> ManifestRow | None:
        packed = self._manifests.get((repo, digest))
        return _unpack(packed) if packed is not None else None

    def tag(self, repo: str, tag: str, now: float) -> ManifestRow | None:
        """The tag's row if it was looked up less than :data:`TAG_CACHE_SECONDS` ago, or
        looked up since the confirmations' start and the index confirmed unchanged by other
        processes less than that ago."""
        cached = self._tags.get((repo, tag))
        if cached is None:
            return None
        packed, read = cached
        if now - read < TAG_CACHE_SECONDS:
            return _unpack(packed)
        if read >= self._chain_start and now - self._tags_confirmed < TAG_CACHE_SECONDS:
            return _unpack(packed)
        return None

    def body(self, digest: str) -> bytes | None:
        return self._bodies.get(digest)

    # --- fills ---------------------------------------------------------------------------------
    def put_link(self, repo: str, digest: str, size: int, ticket: int | None = None) -> None:
        """``ticket`` None: the caller just wrote the row itself (a commit), so it is current."""
        if self._current(ticket, "link", (repo, digest)):
            self._links.put((repo, digest), size)

    def put_manifest(self, repo: str, digest: str, row: ManifestRow, ticket: int) -> None:
        if self._current(ticket, "manifest", (repo, digest)):
            self._manifests.put((intern(repo), intern(digest)), _pack(row))

    def put_tag(self, repo: str, tag: str, row: ManifestRow, now: float, ticket: int) -> None:
        if self._current(ticket, "tag", (repo, tag)):
            self._tags.put((intern(repo), tag), (_pack(row), now))

    def put_body(self, digest: str, body: bytes) -> None:
        """Bodies are immutable (named by their digest): no ticket needed."""
        self._bodies.put(intern(digest), body)

    def restart_tags(self, at: float) -> None:
        """Confirmations start over (monotonic ``at``, taken after the index's version was
        read): only tags looked up from then on are vouched for by :meth:`confirm_tags`."""
        self._chain_start = at
        self._tags_confirmed = float("-inf")

    def confirm_tags(self, since: float) -> None:
        """No other process changed the index since the last check (back to the last
        :meth:`restart_tags`); ``since`` (monotonic) was taken before this check: every tag
        looked up since the restart is current as of then."""
        self._tags_confirmed = max(self._tags_confirmed, since)

    # --- the one invalidation API --------------------------------------------------------------
    def forget(
        self,
        *,
        links: Iterable[tuple[str, str]] = (),
        manifests: Iterable[tuple[str, str]] = (),
        tags: Iterable[tuple[str, str]] = (),
        tags_of: Iterable[str] = (),
        bodies: Iterable[str] = (),
        all_tags: bool = False,
        everything: bool = False,
    ) -> None:
        """Drop cached lookups, each by its key: (repo, blob) links, (repo, digest) manifest
        rows, (repo, tag) tags, every tag of some repositories, bodies by digest; every tag
        (``all_tags``), or ``everything`` (another process changed the index). Lookups of
        these keys already out are not cached when they come back."""
        named = _Forget(
            self._generation + 1,
            frozenset(links),
            frozenset(manifests),
            frozenset(tags),
            frozenset(tags_of),
            all_tags,
            everything,
        )
        self._remember(named)
        links, manifests, tags, repos = named.links, named.manifests, named.tags, named.tags_of
        if everything or all_tags:
            self._tags.clear()
        if everything:
            for cache in (self._bodies, self._links, self._manifests):
                cache.clear()
            return
        for key in links:
            self._links.pop(key)
        for key in manifests:
            self._manifests.pop(key)
        for key in tags:
            self._tags.pop(key)
        if repos:
            self._tags.drop_where(lambda k: k[0] in repos)
        for digest in bodies:
            self._bodies.pop(digest)

    def _remember(self, forget: _Forget) -> None:
        """Count a forget and keep what it named, within the bounds (the oldest go first)."""
        self._generation = forget.generation
        self._forgets.append(forget)
        self._forgotten_keys += forget.size
        while len(self._forgets) > FORGETS_KEPT or self._forgotten_keys > FORGOTTEN_KEYS_KEPT:
            gone = self._forgets.popleft()
            self._forgotten_keys -= gone.size
            self._kept_from = gone.generation
