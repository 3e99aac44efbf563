"""Pins: manifests that eviction never removes (``repo_manifests.pinned``).

Pushed and imported content is pinned when it is stored, prefetched content when its prefetch
completes; ``regproxy pin|unpin NAME[:TAG|@DIGEST]`` sets it by hand. Pinning a manifest pins
the children of an index that the store holds (``manifest_refs``); unpinning an index unpins
its children unless another pinned index of the repository still lists them, and so does
deleting it (:func:`delete`, for the API and the web page). Blobs are kept
through the manifests that list them (eviction's rule, see ``regproxy.evict``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from regproxy.async_index import AsyncIndex
from regproxy.errors import ManifestUnknown
from regproxy.index import Index, PinRow
from regproxy.names import RepoName
from regproxy.oci import INDEX_TYPES, is_digest_reference
from regproxy.proxy import ProxyRegistry
from regproxy.registry import Registry

#: pinned rows read per query
PIN_PAGE: Final = 500


@dataclass
class PinnedImage:
    """A pinned manifest that no other pinned manifest of its repository lists, with the pinned
    children it lists (an index and its platforms)."""

    repo: str
    digest: str
    media_type: str
    tags: list[str]
    #: bytes of the manifest, its blobs, and those of its pinned children
    size: int
    children: list[PinRow] = field(default_factory=list)

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_TYPES

    def to_json(self) -> dict[str, Any]:
        return {
            "repo": self.repo,
            "digest": self.digest,
            "media_type": self.media_type,
            "tags": self.tags,
            "size": self.size,
            "children": [c.digest for c in self.children],
        }


async def resolve(registry: Registry, repo: RepoName, reference: str) -> str:
    """The digest a tag or digest names in the local store (pins never fetch)."""
    found = await registry.local_manifest(repo, reference)
    if found is None:
        raise ManifestUnknown(f"{repo.canonical}:{reference} is not in the store")
    return str(found[0].digest)


async def _tree(registry: Registry, digest: str) -> list[str]:
    """The digest and every manifest under it (an index's children), depth-first."""
    out = [digest]
    for child in await registry.db.read(Index.manifest_children, digest):
        if child not in out:
            out += [d for d in await _tree(registry, child) if d not in out]
    return out


async def pin_digests(registry: Registry, repo: RepoName, digests: Sequence[str]) -> int:
    """Pin these manifests of the repository (prefetch pins what it fetched); rows changed."""
    return await registry.db.write(Index.pin_manifests, repo.canonical, digests, True)


async def _attached(registry: Registry, repo: RepoName, digests: list[str]) -> list[str]:
    """The referrers the store holds for these manifests (and theirs): signatures, SBOMs and
    attestations are pinned and unpinned with their image."""
    if not isinstance(registry, ProxyRegistry):
        return []
    found = await registry.referrer_index.attached(repo, digests, fetch=False)
    return [a.digest for a in found if a.digest not in digests]


async def pin(registry: Registry, repo: RepoName, reference: str) -> list[str]:
    """Pin a manifest, its children and their referrers; the digests pinned."""
    digest = await resolve(registry, repo, reference)
    digests = await _tree(registry, digest)
    digests += await _attached(registry, repo, digests)
    await registry.db.write(Index.pin_manifests, repo.canonical, digests, True)
    held = await registry.db.read(Index.list_pins, repo.canonical)
    pinned = {r.digest for r in held}
    return [d for d in digests if d in pinned]


async def unpin(registry: Registry, repo: RepoName, reference: str) -> list[str]:
    """Unpin a manifest, and its children that no other pinned manifest lists; the digests."""
    digest = await resolve(registry, repo, reference)
    out: list[str] = []
    if await registry.db.write(Index.pin_manifests, repo.canonical, [digest], False):
        out.append(digest)
    tree = await _tree(registry, digest)
    for child in tree[1:] + await _attached(registry, repo, tree):
        if await registry.db.read(Index.pinned_parents, repo.canonical, child):
            continue
        if await registry.db.write(Index.pin_manifests, repo.canonical, [child], False):
            out.append(child)
    return out


async def delete(registry: Registry, repo: RepoName, reference: str) -> list[str]:
    """Delete a tag, or a manifest by digest. A manifest is unpinned first, with the children
    that no other pinned manifest of the repository lists (an index's platforms), so eviction
    can reclaim them; the digests unpinned."""
    out: list[str] = []
    if is_digest_reference(reference) and await registry.local_manifest(repo, reference):
        out = await unpin(registry, repo, reference)
    await registry.delete_manifest(repo, reference)
    return out


async def iter_pins(db: AsyncIndex, repo: RepoName | None = None) -> AsyncIterator[PinnedImage]:
    """Pinned images in (repository, digest) order, read in keyset pages of the index, one
    repository at a time (an index and its children are grouped within a repository). Only
    reads: ``regproxy pins`` calls it on an index opened read-only."""
    after = ("", "")
    pending: list[PinRow] = []  # the rows of one repository
    while True:
        rows = await db.read(
            Index.list_pins, repo.canonical if repo else None, after=after, limit=PIN_PAGE
        )
        for r in rows:
            if pending and r.repo != pending[0].repo:
                for image in await _images(db, pending):
                    yield image
                pending = []
            pending.append(r)
        if len(rows) < PIN_PAGE:
            break
        after = (rows[-1].repo, rows[-1].digest)
    for image in await _images(db, pending):
        yield image


async def list_pins(registry: Registry, repo: RepoName | None = None) -> list[PinnedImage]:
    return [image async for image in iter_pins(registry.db, repo)]


async def _images(db: AsyncIndex, rows: list[PinRow]) -> list[PinnedImage]:
    """The pinned rows of one repository as images: an index with its pinned children."""
    by_key = {(r.repo, r.digest): r for r in rows}
    child_of: dict[tuple[str, str], list[PinRow]] = {}
    listed: set[tuple[str, str]] = set()
    for r in rows:
        if r.media_type not in INDEX_TYPES:
            continue
        kids = [
            by_key[(r.repo, c)]
            for c in await db.read(Index.manifest_children, r.digest)
            if (r.repo, c) in by_key
        ]
        child_of[(r.repo, r.digest)] = kids
        listed.update((k.repo, k.digest) for k in kids)
    out = []
    for r in rows:
        key = (r.repo, r.digest)
        if key in listed and not r.tags:  # a tagged child is an image of its own as well
            continue
        kids = child_of.get(key, [])
        size = r.size + r.blob_bytes + sum(k.size + k.blob_bytes for k in kids)
        out.append(PinnedImage(r.repo, r.digest, r.media_type, r.tags, size, kids))
    return out
