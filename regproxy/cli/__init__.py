"""The ``regproxy`` command line: parse, load the config, run one command, return its exit code.

Exit codes: 0 ok, 1 a missing config file or a command's own failure (a full or read-only disk,
a damaged index: one line on stderr, the traceback only at debug level), 2 an invalid config or
invalid arguments, a store or an index of a newer release, or (for a command that only reads) of an older
one or none at all, 130 interrupted. ``--config`` is accepted before and after the command
(``regproxy --config F serve`` and ``regproxy serve --config F``). Each command lives in a
module of this package with ``add_parsers(sub, common)``, which sets ``run(config, args) -> int``.
"""

from __future__ import annotations

import argparse
import logging
import sys

from regproxy import __version__
from regproxy.cli import bundles, checks, containerd, pins, prefetch, serve, store
from regproxy.cli.common import Command
from regproxy.config import load_config
from regproxy.errors import ConfigError, ConfigMissing, OCIError, RegproxyError
from regproxy.log import flush_lines, setup_logging
from regproxy.schema import IndexDatabaseError, IndexMissing, IndexVersionError
from regproxy.store import StoreLayoutError

#: every module that adds commands, in the order ``--help`` lists them
log = logging.getLogger("regproxy")
_COMMANDS = (serve, checks, containerd, bundles, prefetch, pins, store)
_CONFIG_HELP = "YAML config file (default: built-in defaults); before or after the command"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="regproxy", description="node-local OCI registry cache")
    p.add_argument("--version", action="version", version=f"regproxy {__version__}")
    p.add_argument("--config", "-c", help=_CONFIG_HELP)
    # the same option after the command: SUPPRESS keeps a value given before it
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", "-c", default=argparse.SUPPRESS, help=_CONFIG_HELP)
    sub = p.add_subparsers(dest="command", required=True)
    for module in _COMMANDS:
        module.add_parsers(sub, common)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigMissing as exc:
        print(f"regproxy: {exc}", file=sys.stderr)
        return 1
    except ConfigError as exc:
        print(f"regproxy: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log.level, config.log.format)
    command: Command = args.run
    try:
        try:
            return command(config, args)
        finally:
            flush_lines()  # the access lines that wait go out before any last word below
    except (IndexVersionError, IndexMissing, StoreLayoutError) as exc:
        # a store (its layout, its index) from a newer release; a command that only reads (plain fsck, gc --dry-run,
        # pins) on an older one or on none: one line, no traceback
        print(f"regproxy: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"regproxy {args.command}: interrupted", file=sys.stderr)
        return 130
    except (RegproxyError, OSError, IndexDatabaseError) as exc:
        # what the disk, the index or the store may do to any command (full, read-only, gone,
        # damaged): one line naming it; the traceback only at debug level
        log.debug("%s.failed", args.command, exc_info=True)
        print(f"regproxy {args.command}: {_what(exc)}", file=sys.stderr)
        return 1


def _what(exc: BaseException) -> str:
    if isinstance(exc, OCIError) and exc.detail:
        return str(exc.detail)
    if isinstance(exc, IndexDatabaseError):
        return f"the metadata index failed: {exc}"
    return str(exc) or type(exc).__name__
