"""Parsers of config values: booleans, durations (``30s``), sizes (``10GiB``, ``80%``), lists,
counts, rates, host patterns. Each takes the raw YAML (or environment) value and returns the typed
value or raises ValueError saying what is allowed; :mod:`regproxy.config` names the key."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final


# --- value parsers -----------------------------------------------------------------------------
def boolean(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
        return v.lower() in ("true", "yes", "on", "1")
    raise ValueError("must be true or false")


def string(v: Any) -> str:
    if isinstance(v, str) and v:
        return v
    if isinstance(v, int | float) and not isinstance(v, bool):
        return str(v)
    raise ValueError("must be a non-empty string")


def optional_string(v: Any) -> str | None:
    return None if v is None or v == "" else string(v)


_DURATION_RE: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS: Final = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parse_duration(v: Any) -> float:
    if isinstance(v, int | float) and not isinstance(v, bool) and v >= 0:
        return float(v)
    m = _DURATION_RE.match(str(v)) if isinstance(v, str) else None
    if not m:
        raise ValueError("must be a duration such as 30s, 5m, 24h or a number of seconds")
    return float(m.group(1)) * _UNITS[m.group(2)]


#: sizes are byte counts of a disk: an int64 at most
MAX_SIZE: Final = float(2**63)
_SIZE_RE: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]i?B?|B)?\s*$", re.IGNORECASE)


def parse_size(v: Any) -> int:
    if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
        return v
    m = _SIZE_RE.match(str(v)) if isinstance(v, str) else None
    if not m:
        raise ValueError("must be a size such as 500MiB, 200GB or a number of bytes")
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = "BKMGTP".index(unit[0])
    n = float(m.group(1)) * base**power  # inf for a number past float's range
    if not n < MAX_SIZE:
        raise ValueError("is larger than any disk (at most 8 EiB)")
    return int(n)


@dataclass(frozen=True, slots=True)
class SizeLimit:
    """A byte count, or a fraction of the store's filesystem (``80%``). 0 means no limit."""

    bytes: int = 0
    fraction: float = 0.0

    def resolve(self, filesystem_bytes: int) -> int:
        return self.bytes or int(self.fraction * filesystem_bytes)

    def __bool__(self) -> bool:
        return bool(self.bytes or self.fraction)


def size_limit(v: Any) -> SizeLimit:
    if v is None or v == 0 or v == "0":
        return SizeLimit()
    if isinstance(v, str) and v.strip().endswith("%"):
        try:
            pct = float(v.strip()[:-1])
        except ValueError:
            pct = -1
        if not 0 < pct <= 100:
            raise ValueError("a percentage must be between 0 and 100, e.g. 80%")
        return SizeLimit(fraction=pct / 100)
    return SizeLimit(bytes=parse_size(v))


def str_list(v: Any) -> tuple[str, ...]:
    if v is None:
        return ()
    if isinstance(v, str):
        return tuple(s.strip() for s in v.split(",") if s.strip())
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return tuple(v)
    raise ValueError("must be a list of strings")


def positive_count(v: Any) -> int:
    n = count(v)
    if n < 1:
        raise ValueError("must be at least 1")
    return n


def timeout(v: Any) -> float:
    seconds = parse_duration(v)
    if seconds <= 0:
        raise ValueError("must be a duration above 0, e.g. 10s")
    return seconds


def listen(v: Any) -> tuple[str, int]:
    text = string(v)
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "0.0.0.0", text
    host = host.strip("[]") or "0.0.0.0"
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("must be HOST:PORT with a port 0-65535, e.g. 0.0.0.0:30003")
    return host, int(port)


def log_level(v: Any) -> str:
    s = string(v).upper()
    if s not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError("must be one of debug, info, warning, error")
    return s


def log_format(v: Any) -> str:
    s = string(v).lower()
    if s not in ("text", "json"):
        raise ValueError("must be text or json")
    return s


def users(v: Any) -> dict[str, str]:
    if v is None:
        return {}
    if not isinstance(v, dict) or not all(
        isinstance(k, str) and isinstance(h, str) for k, h in v.items()
    ):
        raise ValueError("must map user names to bcrypt hashes")
    for user, h in v.items():
        if not h.startswith(("$2y$", "$2b$", "$2a$")):
            raise ValueError(f"the hash of {user!r} is not bcrypt ($2y$...): store hashes only")
    return dict(v)


def count(v: Any) -> int:
    if isinstance(v, str) and v.strip().isdigit():
        v = int(v)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise ValueError("must be a whole number, 0 or more")
    return v


def count_up_to(most: int) -> Callable[[Any], int]:
    """A :func:`count` of at most ``most`` (threads, loops: each costs memory and a stack)."""

    def check(v: Any) -> int:
        n = count(v)
        if n > most:
            raise ValueError(f"must be at most {most}")
        return n

    return check


def images(v: Any) -> tuple[str, ...]:
    """Plain references, or the ``- image: REF`` entries of a pack's content.images."""
    if v is None:
        return ()
    if not isinstance(v, list):
        raise ValueError("must be a list of image references")
    out = []
    for item in v:
        if isinstance(item, dict) and isinstance(item.get("image"), str):
            out.append(item["image"])
        elif isinstance(item, str):
            out.append(item)
        else:
            raise ValueError("each entry must be a reference or {image: REF}")
    return tuple(out)


_TARGET_RE: Final = re.compile(
    r"^(\*\.)?[a-z0-9]([a-z0-9.-]*[a-z0-9])?(:\d{1,5})?$|^\[[0-9a-f:.]+\](:\d{1,5})?$"
)


def _target_pattern(v: str) -> str:
    """An ``allow_redirect_to`` entry: ``host``, ``host:port``, ``*.domain[:port]``, ``[v6]:port``."""
    t = v.strip().lower()
    if not _TARGET_RE.match(t):
        raise ValueError(f"has {v!r}: each entry is host, host:port, *.domain or *.domain:port")
    return t


def rate(v: Any) -> float:
    """Bytes per second: ``1KiB/s``, ``512KB/s``, a number; 0 turns the check off."""
    text = v.strip().removesuffix("/s") if isinstance(v, str) else v
    try:
        return float(parse_size(text))
    except ValueError:
        raise ValueError("must be a rate such as 1KiB/s, 100KB/s or bytes per second") from None


def per_second(v: Any) -> float:
    text = v.strip().removesuffix("/s") if isinstance(v, str) else v
    try:
        rate = float(text)
    except (TypeError, ValueError):
        rate = -1.0
    if isinstance(v, bool) or not rate >= 0:
        raise ValueError("must be a number of requests per second, 0 for no limit")
    return rate


def positive(v: Any) -> int:
    n = count(v)
    if n < 1:
        raise ValueError("must be a whole number, 1 or more")
    return n


def targets(v: Any) -> tuple[str, ...]:
    return tuple(_target_pattern(t) for t in str_list(v))
