"""``regproxy check-config``: load and validate the config, print what it amounts to."""

from __future__ import annotations

import argparse

from regproxy.cli.common import SubParsers
from regproxy.config import Config
from regproxy.units import human_bytes


def add_parsers(sub: SubParsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "check-config",
        parents=[common],
        help="validate the config and print a summary (exit 1 missing, 2 invalid)",
    )
    p.set_defaults(run=_run)


def summary(config: Config) -> str:
    """One line: where it listens and stores, how much, from where, and who may change it."""
    limit = config.storage.max_size
    max_size = (
        "none"
        if not limit
        else f"{limit.fraction:.0%}"
        if limit.fraction
        else human_bytes(limit.bytes)
    )
    auth = "htpasswd" if config.auth.htpasswd else f"{len(config.auth.users)} user(s)"
    upstreams = ",".join(u.pattern for u in config.upstreams) or "none"
    peers = len(config.peers.urls) + (1 if config.peers.dns else 0)
    return (
        f"config ok: listen={config.listen_host}:{config.listen_port} "
        f"store={config.storage.root} max_size={max_size} sync={config.sync_enable} "
        f"project={config.project} upstreams={upstreams} "
        f"default_upstream={config.default_upstream or '-'} peers={peers} "
        f"tls={config.tls.enabled} auth={auth} "
        f"prefetch={len(config.prefetch.images)} log={config.log.level}/{config.log.format}"
    )


def _run(config: Config, args: argparse.Namespace) -> int:
    print(summary(config))
    print(f"policy: enforce {', '.join(config.policy.enforce)}")
    for i, rule in enumerate(config.policy.rules, 1):
        print(f"  rule {i}: {rule}")
    return 0
