"""``regproxy gc`` and ``regproxy fsck``: offline maintenance of the store (regproxy.maintenance)."""

from __future__ import annotations

import argparse
import contextlib
import os

from regproxy.cli.common import SubParsers, positive_int, run
from regproxy.config import Config


def add_parsers(sub: SubParsers, common: argparse.ArgumentParser) -> None:
    gcp = sub.add_parser(
        "gc", parents=[common], help="remove unreferenced blobs, expired uploads, stray files"
    )
    gcp.add_argument("--dry-run", action="store_true", help="print what would go, remove nothing")
    gcp.set_defaults(run=_gc)
    fsck = sub.add_parser(
        "fsck",
        parents=[common],
        help="re-hash every blob and manifest; report damage (exit 1 when found)",
    )
    fsck.add_argument(
        "--repair",
        action="store_true",
        help="remove damage from the index and move it to quarantine/ (the only mode that changes "
        "anything)",
    )
    fsck.add_argument(
        "--workers", type=positive_int, help="files hashed at once (default: up to 4)"
    )
    fsck.set_defaults(run=_fsck)


def _background() -> None:
    """Maintenance yields the CPU to a daemon beside it (nice 10)."""
    with contextlib.suppress(OSError):
        os.nice(10)


def _gc(config: Config, args: argparse.Namespace) -> int:
    from regproxy import maintenance
    from regproxy.progress import Progress

    _background()
    report = run(maintenance.gc(config, dry_run=args.dry_run, progress=Progress("gc")))
    print("\n".join(report.lines()))
    return 0


def _fsck(config: Config, args: argparse.Namespace) -> int:
    from regproxy import fsck
    from regproxy.progress import Progress

    _background()
    found = run(
        fsck.fsck(config, repair=args.repair, workers=args.workers, progress=Progress("fsck"))
    )
    print("\n".join(found.lines()))
    return 1 if found.damaged or found.drift else 0
