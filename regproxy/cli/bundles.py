"""``regproxy import`` and ``regproxy export``: bundles in and out, beside a running daemon."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from regproxy.bundle import BundleError, Exporter, Importer, ImportStopped
from regproxy.cli.common import SubParsers, no_store_yet, run, say_store_made
from regproxy.config import Config
from regproxy.errors import OCIError, StorageFull
from regproxy.names import NameResolver
from regproxy.policy import Policy
from regproxy.settling import PutBackFailed, PutBackFull


def add_parsers(sub: SubParsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "import", parents=[common], help="import OCI layouts/archives and docker-save archives"
    )
    p.add_argument("paths", nargs="+", type=Path, help="bundle files or OCI layout directories")
    p.add_argument("--name", help="repository (and tag) for images the bundle does not name")
    p.set_defaults(run=lambda config, args: run(run_import(config, args.paths, args.name)))
    p = sub.add_parser("export", parents=[common], help="write images as an OCI archive")
    p.add_argument("names", nargs="+", help="image references (docker.io/library/nginx:1.25)")
    p.add_argument("-o", "--output", type=Path, required=True, help="the archive to write")
    p.add_argument("--platform", help="only this platform of an index (linux/amd64)")
    p.set_defaults(
        run=lambda config, args: run(run_export(config, args.names, args.output, args.platform))
    )


class _Progress:
    """Bytes, files and rate on one terminal line; silent when stderr is not a terminal."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.started = time.monotonic()
        self.shown = False

    def __call__(self, done: int, files: int) -> None:
        if not sys.stderr.isatty():
            return
        secs = max(time.monotonic() - self.started, 1e-6)
        sys.stderr.write(
            f"\r{self.label}: {done / 2**20:,.0f} MiB, {files} files, {done / 2**20 / secs:,.0f} MiB/s"
        )
        sys.stderr.flush()
        self.shown = True

    def end(self) -> None:
        if self.shown:
            sys.stderr.write("\n")


async def run_import(config: Config, paths: list[Path], name: str | None) -> int:
    from regproxy.proxy import build_registry

    registry = build_registry(config)
    await registry.open(sweep=False)
    failed = 0
    try:
        for path in paths:
            progress = _Progress(str(path))
            try:
                summary = await Importer(
                    registry,
                    NameResolver(config),
                    name=name,
                    progress=progress,
                    policy=Policy(registry),  # policy.enforce: import
                ).import_path(path)
            except (PutBackFull, PutBackFailed) as exc:  # while committing: some of it may be in
                progress.end()
                print(
                    f"regproxy import: {path}: failed: {exc.detail}; what was committed before "
                    "it stays (import the bundle again once the disk takes it)",
                    file=sys.stderr,
                )
                failed += 1
                continue
            except ImportStopped as exc:  # the index filled while committing: some of it is in
                progress.end()
                print(
                    f"regproxy import: {path}: stopped, insufficient storage: {exc.detail} (make "
                    "room and import the bundle again)",
                    file=sys.stderr,
                )
                failed += 1
                continue
            except StorageFull as exc:  # no room above storage.min_free: nothing of it committed
                progress.end()
                print(
                    f"regproxy import: {path}: refused, insufficient storage: {exc.detail}; "
                    "nothing of this bundle was imported (make room and import it again)",
                    file=sys.stderr,
                )
                failed += 1
                continue
            except (BundleError, OCIError) as exc:
                progress.end()
                print(f"regproxy import: {path}: refused: {exc}", file=sys.stderr)
                failed += 1
                continue
            progress.end()
            print(f"{path}: {summary}")
            for image in summary.images:
                print(f"  {image}")
    finally:
        await registry.close()
    return 1 if failed else 0


async def run_export(config: Config, names: list[str], output: Path, platform: str | None) -> int:
    from regproxy.proxy import build_registry

    fresh = no_store_yet(config, "export")
    registry = build_registry(config)
    await registry.open(sweep=False)
    if fresh:
        say_store_made(config, "export")
    try:
        entries = await Exporter(
            registry,
            NameResolver(config),
            platform=platform,
            referrers=registry.referrer_index,  # signatures, SBOMs, attestations travel along
        ).export(names, output)
    except (BundleError, OCIError) as exc:
        print(f"regproxy export: {exc}", file=sys.stderr)
        return 1
    finally:
        await registry.close()
    for e in entries:
        print(f"{e.ref} {e.digest}")
    print(f"wrote {output}")
    return 0
