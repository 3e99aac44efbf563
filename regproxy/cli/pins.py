"""``regproxy pin | unpin | pins``: pin images by hand, and list what is pinned."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import AsyncIterator
from typing import Final

from regproxy.cli.common import SubParsers, no_store_yet, run, say_store_made
from regproxy.config import Config
from regproxy.errors import OCIError
from regproxy.names import NameResolver
from regproxy.pins import PinnedImage, iter_pins, pin, resolve, unpin
from regproxy.units import human_bytes

#: images printed with one column alignment
PRINT_BLOCK: Final = 1000


def add_parsers(sub: SubParsers, common: argparse.ArgumentParser) -> None:
    for cmd, what in (("pin", "pin"), ("unpin", "unpin")):
        p = sub.add_parser(
            cmd,
            parents=[common],
            help=f"{what} images in the store (an index with its platforms)",
            description=f"{what.capitalize()} NAME[:TAG|@DIGEST] (an index and its children). "
            "Pinned content is never evicted.",
        )
        p.add_argument("refs", nargs="+", metavar="NAME[:TAG|@DIGEST]")
        p.set_defaults(run=_run)
    p = sub.add_parser(
        "pins", parents=[common], help="list pinned images: repository, tags, digest, size"
    )
    p.add_argument("name", nargs="?", help="only this repository")
    p.add_argument("--json", action="store_true", help="one JSON document")
    p.set_defaults(run=_run)


def _run(config: Config, args: argparse.Namespace) -> int:
    return run(_pins(config, args))


async def _list(config: Config, args: argparse.Namespace) -> int:
    """``regproxy pins`` only reads: the index on readers, nothing created or upgraded."""
    from regproxy.store_open import open_store

    resolver = NameResolver(config)
    repo = resolver.parse_reference(args.name)[0] if args.name else None
    _, db = await open_store(config.storage.root, readonly=True)
    try:
        await _print_pins(iter_pins(db, repo), args.json)
    finally:
        await db.close()
    return 0


async def _pins(config: Config, args: argparse.Namespace) -> int:
    from regproxy.proxy import build_registry

    if args.command == "pins":
        return await _list(config, args)
    resolver = NameResolver(config)
    fresh = no_store_yet(config, args.command)
    registry = build_registry(config)
    await registry.open(sweep=False)
    if fresh:
        say_store_made(config, args.command)
    try:
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


async def _print_pins(images: AsyncIterator[PinnedImage], as_json: bool) -> None:
    """As the index yields them: a JSON array, or a table aligned per block of images."""
    n = 0
    if as_json:
        print("[")
        async for i in images:
            print(("," if n else "") + json.dumps(i.to_json(), indent=2))
            n += 1
        print("]")
        return
    rows = [("REPOSITORY", "TAGS", "DIGEST", "SIZE")]

    def flush() -> None:
        widths = [max(len(r[c]) for r in rows) for c in range(3)]
        for r in rows:
            print("  ".join(r[c].ljust(widths[c]) for c in range(3)) + "  " + r[3])
        rows.clear()

    async for i in images:
        kind = f" (index, {len(i.children)} platform(s))" if i.is_index else ""
        rows.append((i.repo, ",".join(i.tags) or "-", i.digest, human_bytes(i.size) + kind))
        n += 1
        if len(rows) >= PRINT_BLOCK:
            flush()
    if rows:
        flush()
    print(f"{n} pinned image(s)")
