"""How the page writes sizes, times, digests, platforms and media types."""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final


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
