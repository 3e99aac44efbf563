"""``regproxy gc`` and ``regproxy fsck``: offline maintenance of the store (regproxy.maintenance)."""

from __future__ import annotations

import argparse

from regproxy.cli.common import SubParsers
from regproxy.config import Config


def add_parsers(sub: SubParsers, common: argparse.ArgumentParser) -> None:
    gcp = sub.add_parser(
        "gc", parents=[common], help="remove unreferenced blobs, expired uploads, stray files"
    )
    gcp.add_argument("--dry-run", action="store_true", help="print what would go, remove nothing")
    gcp.set_defaults(run=_gc)
    fsck = sub.add_parser(
        "fsck", parents=[common], help="re-hash every blob; quarantine damage (exit 1 when found)"
    )
    fsck.set_defaults(run=_fsck)


def _gc(config: Config, args: argparse.Namespace) -> int:
    from regproxy import maintenance

    print("\n".join(maintenance.gc(config, dry_run=args.dry_run).lines()))
    return 0


def _fsck(config: Config, args: argparse.Namespace) -> int:
    from regproxy import maintenance

    found = maintenance.fsck(config)
    print("\n".join(found.lines()))
    return 1 if found.damaged else 0
