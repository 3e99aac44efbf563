"""The shipped config loads, and documents every key the loader knows."""

from __future__ import annotations

from pathlib import Path

from regproxy.config import _SCHEMA, _UPSTREAM_SCHEMA, load_config

SHIPPED = Path(__file__).resolve().parents[2] / "config" / "regproxy.yaml"


def _leaves(schema: dict, prefix: str = "") -> list[str]:
    out = []
    for key, spec in schema.items():
        if isinstance(spec, dict):
            out += _leaves(spec, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}")
    return out


def test_shipped_config_loads_with_the_public_registries() -> None:
    cfg = load_config(SHIPPED, env={})
    hosts = {u.pattern for u in cfg.upstreams}
    assert {"docker.io", "ghcr.io", "quay.io", "registry.k8s.io", "*.pkg.dev", "nvcr.io"} <= hosts
    assert cfg.listen_port == 30003 and cfg.sync_enable and cfg.project == "spectro-images"


def test_every_key_is_documented() -> None:
    text = SHIPPED.read_text()
    for leaf in _leaves(_SCHEMA) + list(_UPSTREAM_SCHEMA):
        assert leaf.rsplit(".", 1)[-1] + ":" in text, leaf
