"""``regproxy containerd-config``: write containerd ``hosts.toml`` files that make regproxy the
first host (regproxy.containerd plans and writes them; this module reports what changed)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TextIO

from regproxy import containerd
from regproxy.cli.common import SubParsers
from regproxy.config import Config


def add_parsers(sub: SubParsers, common: argparse.ArgumentParser) -> None:
    cc = sub.add_parser(
        "containerd-config",
        parents=[common],
        help="write containerd hosts.toml files that make regproxy the first host",
    )
    cc.add_argument("--dir", default=containerd.DEFAULT_DIR, help="containerd config_path")
    cc.add_argument("--default", action="store_true", help="also write _default (every registry)")
    cc.add_argument("--url", help="regproxy as containerd reaches it (default: from listen, tls)")
    cc.add_argument("--ca", help="CA file containerd trusts for an https --url")
    cc.add_argument("--dry-run", action="store_true", help="print what would change, write nothing")
    cc.set_defaults(run=_run)


def report(
    changes: list[containerd.Change], skipped: list[str], out: TextIO, *, dry_run: bool
) -> None:
    verb = "would be " if dry_run else ""
    for c in changes:
        if c.action == "unchanged":
            print(f"unchanged  {c.path}", file=out)
        elif c.backup is not None:
            print(f"{verb}replaced {c.path} (previous file kept as {c.backup.name})", file=out)
        else:
            print(f"{verb}created  {c.path}", file=out)
    for pattern in skipped:
        print(
            f"skipped    upstream {pattern!r}: a pattern names no host directory (--default covers it)",
            file=out,
        )
    if not changes:
        print("no concrete upstream hosts configured (use --default for every registry)", file=out)
    elif all(c.action == "unchanged" for c in changes):
        print("nothing changed: every hosts.toml already points at regproxy", file=out)


def _run(config: Config, args: argparse.Namespace) -> int:
    url = args.url or containerd.default_url(config)
    try:
        files, skipped = containerd.plan(config, url, default=args.default, ca=args.ca)
        changes = containerd.apply(files, Path(args.dir), dry_run=args.dry_run)
    except OSError as exc:
        print(f"regproxy: containerd-config: {exc}", file=sys.stderr)
        return 1
    report(changes, skipped, sys.stdout, dry_run=args.dry_run)
    return 0
