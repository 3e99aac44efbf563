"""How the page writes sizes, times, digests, platforms and media types."""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final

from regproxy.units import human_bytes


def configured_size(n: int) -> str:
    """A size as an operator writes it in the config: ``100 MB`` for 100,000,000 bytes, ``2 GiB``
    for 2**31 (the units it divides exactly), else as :func:`human_bytes` does."""
    for units, base in (("KiB MiB GiB TiB", 1024), ("KB MB GB TB", 1000)):
        for power, unit in reversed(list(enumerate(units.split(), start=1))):
            if n and n % base**power == 0:
                return f"{n // base**power} {unit}"
    return human_bytes(n)


def plural(n: float, one: str, many: str) -> str:
    return f"{n:g} {one if n == 1 else many}"


def duration(seconds: float) -> str:
    """``3 d 4 h``, ``12 min``, ``40 s``: how long, in its two largest units."""
    s = int(max(0.0, seconds))
    parts = [(s // 86400, "d"), (s % 86400 // 3600, "h"), (s % 3600 // 60, "min"), (s % 60, "s")]
    shown = [f"{n} {unit}" for n, unit in parts if n][:2]
    return " ".join(shown) or "0 s"


def ago(t: float | None, now: float | None = None) -> str:
    if not t:
        return "never"
    d = (time.time() if now is None else now) - t
    if d < 0:
        d = 0
    if d < 60:
        return "just now"
    if d < 3600:
        return f"{int(d // 60)} min ago"
    if d < 86400:
        return f"{int(d // 3600)} h ago"
    return f"{int(d // 86400)} d ago"


def iso(t: float | None) -> str:
    if not t:
        return ""
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def isoz(t: float | None) -> str:
    """Machine-readable time for ``<time datetime>`` (the page's script shows it in local time)."""
    if not t:
        return ""
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def short_digest(d: str | None) -> str:
    if not d:
        return ""
    algo, _, hexa = d.partition(":")
    return f"{algo}:{hexa[:12]}"


def platform_str(p: Mapping[str, Any] | None) -> str:
    if not p:
        return "?"
    s = f"{p.get('os', '?')}/{p.get('architecture', '?')}"
    if p.get("variant"):
        s += f"/{p['variant']}"
    return s


KIND_NAMES: Final = {
    "application/vnd.oci.image.index.v1+json": "OCI index",
    "application/vnd.oci.image.manifest.v1+json": "OCI manifest",
    "application/vnd.docker.distribution.manifest.list.v2+json": "Docker manifest list",
    "application/vnd.docker.distribution.manifest.v2+json": "Docker manifest v2",
}


def kind(media_type: str) -> str:
    return KIND_NAMES.get(media_type, media_type)
