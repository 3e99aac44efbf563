"""``regproxy serve``: the daemon, with systemd notification and SIGHUP reloading TLS."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from regproxy.cli.common import SubParsers, run
from regproxy.config import Config
from regproxy.errors import ConfigError

log = logging.getLogger("regproxy")


def add_parsers(sub: SubParsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("serve", parents=[common], help="run the registry daemon")
    p.set_defaults(run=_run)


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


def _run(config: Config, args: argparse.Namespace) -> int:
    try:
        run(_serve(config))
    except OSError as exc:
        log.error("serve.failed error=%s", exc)
        return 1
    except ConfigError as exc:
        print(f"regproxy: {exc}", file=sys.stderr)
        return 2
    return 0
