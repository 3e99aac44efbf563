"""Pins: manifests that eviction never removes (``repo_manifests.pinned``).

Pushed and imported content is pinned when it is stored, prefetched content when its prefetch
completes; ``regproxy pin|unpin NAME[:TAG|@DIGEST]`` sets it by hand. Pinning a manifest pins
the children of an index that the store holds (``manifest_refs``); unpinning an index unpins
its children unless another pinned index of the repository still lists them. Blobs are kept
through the manifests that list them (eviction's rule, see ``regproxy.evict``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from regproxy.config import Config
from regproxy.errors import ManifestUnknown, OCIError
from regproxy.index import Index, PinRow
from regproxy.names import NameResolver, RepoName
from regproxy.oci import INDEX_TYPES
from regproxy.registry import Registry


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


async def pin(registry: Registry, repo: RepoName, reference: str) -> list[str]:
    """Pin a manifest and its children; the digests pinned (held in the repository)."""
    digest = await resolve(registry, repo, reference)
    digests = await _tree(registry, digest)
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
    for child in (await _tree(registry, digest))[1:]:
        if await registry.db.read(Index.pinned_parents, repo.canonical, child):
            continue
        if await registry.db.write(Index.pin_manifests, repo.canonical, [child], False):
            out.append(child)
    return out


async def list_pins(registry: Registry, repo: RepoName | None = None) -> list[PinnedImage]:
    rows: list[PinRow] = await registry.db.read(Index.list_pins, repo.canonical if repo else None)
    by_key = {(r.repo, r.digest): r for r in rows}
    child_of: dict[tuple[str, str], list[PinRow]] = {}
    listed: set[tuple[str, str]] = set()
    for r in rows:
        if r.media_type not in INDEX_TYPES:
            continue
        kids = [
            by_key[(r.repo, c)]
            for c in await registry.db.read(Index.manifest_children, r.digest)
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


# --- ``regproxy pin | unpin | pins`` -------------------------------------------------------------
def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    for cmd, what in (("pin", "pin"), ("unpin", "unpin")):
        p = sub.add_parser(
            cmd,
            help=f"{what} images in the store (an index with its platforms)",
            description=f"{what.capitalize()} NAME[:TAG|@DIGEST] (an index and its children). "
            "Pinned content is never evicted.",
        )
        p.add_argument("refs", nargs="+", metavar="NAME[:TAG|@DIGEST]")
    p = sub.add_parser("pins", help="list pinned images: repository, tags, digest, size")
    p.add_argument("name", nargs="?", help="only this repository")
    p.add_argument("--json", action="store_true", help="one JSON document")


async def run_cli(config: Config, args: argparse.Namespace) -> int:
    from regproxy.proxy import build_registry

    resolver = NameResolver(config)
    registry = build_registry(config)
    await registry.open(sweep=False)
    try:
        if args.command == "pins":
            repo = resolver.parse_reference(args.name)[0] if args.name else None
            _print_pins(await list_pins(registry, repo), args.json)
            return 0
        failed = 0
        for ref in args.refs:
            try:
                repo, reference = resolver.parse_reference(ref)
                digest = await resolve(registry, repo, reference)
                change = pin if args.command == "pin" else unpin
                done = await change(registry, repo, reference)
            except OCIError as exc:
                print(f"regproxy {args.command}: {ref}: {exc}", file=sys.stderr)
                failed += 1
                continue
            print(f"{args.command}ned {repo.canonical}@{digest} ({len(done)} manifest(s))")
        return 1 if failed else 0
    finally:
        await registry.close()


def _print_pins(images: list[PinnedImage], as_json: bool) -> None:
    if as_json:
        print(json.dumps([i.to_json() for i in images], indent=2))
        return
    rows = [("REPOSITORY", "TAGS", "DIGEST", "SIZE")]
    for i in images:
        kind = f" (index, {len(i.children)} platform(s))" if i.is_index else ""
        rows.append((i.repo, ",".join(i.tags) or "-", i.digest, _human(i.size) + kind))
    widths = [max(len(r[c]) for r in rows) for c in range(3)]
    for r in rows:
        print("  ".join(r[c].ljust(widths[c]) for c in range(3)) + "  " + r[3])
    print(f"{len(images)} pinned image(s)")


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"
