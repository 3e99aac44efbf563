"""``regproxy`` command line: serve | check-config. Exit 0 ok, 1 missing config, 2 bad config."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from regproxy import __version__, bundle_cli, pins, prefetch
from regproxy.config import Config, load_config
from regproxy.errors import ConfigError, ConfigMissing
from regproxy.log import setup_logging
from regproxy.schema import IndexVersionError

log = logging.getLogger("regproxy")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when importable (it is a dependency), else asyncio's default loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a hard dependency
        return None
    return uvloop.new_event_loop


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(coro)


async def _serve(config: Config) -> None:
    from regproxy.app import install_signal_handlers, serve
    from regproxy.systemd import Notifier
    from regproxy.tls import reload_all

    stop = asyncio.Event()
    notifier = Notifier.from_env()

    def reload() -> None:
        log.info("reload.signal what=tls certificate")
        notifier.reloading()
        reload_all()
        notifier.reloaded()

    install_signal_handlers(stop, reload)
    notifier.stop_on(stop)
    try:
        await serve(config, stop, on_ready=notifier.ready)
    finally:
        await notifier.close()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="regproxy", description="node-local OCI registry cache")
    p.add_argument("--version", action="version", version=f"regproxy {__version__}")
    p.add_argument("--config", "-c", help="YAML config file (default: built-in defaults)")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run the registry daemon")
    sub.add_parser("check-config", help="validate the config and print the effective values")
    cc = sub.add_parser(
        "containerd-config",
        help="write containerd hosts.toml files that make regproxy the first host",
    )
    cc.add_argument("--dir", default="/etc/containerd/certs.d", help="containerd config_path")
    cc.add_argument("--default", action="store_true", help="also write _default (every registry)")
    cc.add_argument("--url", help="regproxy as containerd reaches it (default: from listen, tls)")
    cc.add_argument("--ca", help="CA file containerd trusts for an https --url")
    cc.add_argument("--dry-run", action="store_true", help="print what would change, write nothing")
    bundle_cli.add_parsers(sub)
    prefetch.add_parser(sub)
    pins.add_parsers(sub)
    gcp = sub.add_parser("gc", help="remove unreferenced blobs, expired uploads, stray files")
    gcp.add_argument("--dry-run", action="store_true", help="print what would go, remove nothing")
    sub.add_parser("fsck", help="re-hash every blob; quarantine damage (exit 1 when found)")
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
    try:
        return _command(config, args)
    except IndexVersionError as exc:  # a store from a newer release: one line, no traceback
        print(f"regproxy: {exc}", file=sys.stderr)
        return 2


def _command(config: Config, args: argparse.Namespace) -> int:
    if args.command == "check-config":
        print(config)
        print(f"policy: enforce {', '.join(config.policy.enforce)}")
        for i, rule in enumerate(config.policy.rules, 1):
            print(f"  rule {i}: {rule}")
        return 0
    if args.command == "import":
        return int(run(bundle_cli.run_import(config, args.paths, args.name)))
    if args.command == "export":
        return int(run(bundle_cli.run_export(config, args.names, args.output, args.platform)))
    if args.command == "prefetch":
        return int(run(prefetch.run_cli(config, args)))
    if args.command in ("pin", "unpin", "pins"):
        return int(run(pins.run_cli(config, args)))
    if args.command == "containerd-config":
        from regproxy import containerd

        try:
            return containerd.run(
                config,
                args.dir,
                args.url,
                default=args.default,
                ca=args.ca,
                dry_run=args.dry_run,
                out=sys.stdout,
            )
        except OSError as exc:
            print(f"regproxy: containerd-config: {exc}", file=sys.stderr)
            return 1
    if args.command in ("gc", "fsck"):
        from regproxy import maintenance

        if args.command == "gc":
            print("\n".join(maintenance.gc(config, dry_run=args.dry_run).lines()))
            return 0
        found = maintenance.fsck(config)
        print("\n".join(found.lines()))
        return 1 if found.damaged else 0
    if args.command == "serve":
        try:
            run(_serve(config))
        except OSError as exc:
            log.error("serve.failed error=%s", exc)
            return 1
        except ConfigError as exc:
            print(f"regproxy: {exc}", file=sys.stderr)
            return 2
        return 0
    return 2
