"""``regproxy prefetch``: pull images into the store now and pin them, beside a running daemon
or not (regproxy.prefetch does the work; this module reads the arguments and reports)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import yaml

from regproxy.cli.common import SubParsers, no_store_yet, positive_int, run, say_store_made
from regproxy.config import Config, PrefetchConfig
from regproxy.errors import OCIError
from regproxy.names import NameResolver
from regproxy.prefetch import (
    ImageResult,
    Platform,
    Prefetcher,
    image_entries,
    images_from_document,
)
from regproxy.units import human_bytes


def add_parsers(sub: SubParsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "prefetch",
        parents=[common],
        help="pull images into the store now and pin them (default: prefetch.images)",
        description="Pull images into the store and pin them, beside a running daemon or not. "
        "Without REF or --from-file, the config's prefetch.images.",
    )
    p.add_argument("refs", nargs="*", metavar="REF", help="image references (nginx:1.25)")
    p.add_argument(
        "--from-file",
        "-f",
        action="append",
        default=[],
        type=Path,
        metavar="FILE",
        help="YAML: a list of references or '- image: REF' entries, or a pack's "
        "pack.content.images (repeatable)",
    )
    p.add_argument(
        "--platform",
        action="append",
        default=None,
        metavar="OS/ARCH[/VARIANT]",
        help="only these platforms of an index (repeatable; default: prefetch.platforms)",
    )
    p.add_argument(
        "--all-platforms", action="store_true", help="every platform, whatever the config says"
    )
    p.add_argument(
        "--attempts",
        type=positive_int,
        default=3,
        help="passes over the images that fail, with backoff between them (default 3)",
    )
    p.set_defaults(run=_run)


def _load_refs(args: argparse.Namespace, config: PrefetchConfig) -> list[str]:
    refs = image_entries(list(args.refs), "REF")
    for path in args.from_file:
        for ref in images_from_document(yaml.safe_load(Path(path).read_text())):
            if ref not in refs:
                refs.append(ref)
    if not args.refs and not args.from_file:
        refs = list(config.images)
    return refs


def _run(config: Config, args: argparse.Namespace) -> int:
    return run(_prefetch(config, args))


async def _prefetch(config: Config, args: argparse.Namespace) -> int:
    """``regproxy prefetch``: exit 0 when every image is in the store and pinned, 1 when some
    failed, 2 for bad arguments."""
    from regproxy.proxy import build_registry

    try:
        refs = _load_refs(args, config.prefetch)
        platforms = config.prefetch.platforms
        if args.platform:
            platforms = tuple(args.platform)
        if args.all_platforms:
            platforms = ()
        pconfig = dataclasses.replace(config.prefetch, images=tuple(refs), platforms=platforms)
        resolver = NameResolver(config)
        for ref in refs:
            resolver.parse_reference(ref)
        for p in platforms:
            Platform.parse(p)
    except (OSError, ValueError, yaml.YAMLError, OCIError) as exc:
        print(f"regproxy prefetch: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    if not refs:
        print("regproxy prefetch: nothing to prefetch (no REF, --from-file or prefetch.images)")
        return 0
    total = len(refs)
    seen: list[str] = []

    def show(res: ImageResult) -> None:
        if res.ref not in seen:
            seen.append(res.ref)
        n = seen.index(res.ref) + 1
        if res.ok:
            print(
                f"[{n}/{total}] ok      {res.ref} {res.digest} manifests={res.manifests} "
                f"blobs={res.blobs} referrers={res.referrers} fetched {human_bytes(res.fetched_bytes)} of "
                f"{human_bytes(res.total_bytes)} in {res.seconds:.1f}s",
                flush=True,
            )
        else:
            print(f"[{n}/{total}] FAILED  {res.ref}: {res.error}", flush=True)

    fresh = no_store_yet(config, "prefetch")
    registry = build_registry(config)
    await registry.open(sweep=False)
    if fresh:
        say_store_made(config, "prefetch")
    try:
        pre = Prefetcher(registry, resolver, pconfig, on_result=show)
        print(
            f"prefetching {total} image(s), platforms: {','.join(platforms) or 'all'}",
            flush=True,
        )
        summary = await pre.run_until_done(attempts=max(1, args.attempts))
    finally:
        await registry.close()
    ok = len(summary.results) - len(summary.failed)
    print(
        f"prefetched {ok} of {total} image(s), {len(summary.failed)} failed; "
        f"{human_bytes(summary.fetched_bytes)} fetched, "
        f"{human_bytes(summary.total_bytes)} in the store and pinned"
    )
    for res in summary.failed:
        print(f"failed: {res.ref}: {res.error}", file=sys.stderr)
    return 1 if summary.failed else 0
