"""Logging setup: structured ``key=value`` text or JSON lines; credentials masked."""

from __future__ import annotations

import json
import logging
import re
import sys
from typing import Final, TypeGuard

_CRED_RE: Final = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s:]+:[^/@\s]+@", re.IGNORECASE)


def mask_credentials(text: str) -> str:
    """``https://user:secret@host/x`` -> ``https://***:***@host/x``."""
    if "://" not in text:  # the pattern needs one; most lines have none (~20 µs saved a line)
        return text
    return _CRED_RE.sub(r"\g<scheme>***:***@", text)


#: one %-placeholder of a format string (``%s``, ``%d``, ``%.1f``, ``%(name)s``; ``%%`` is text)
_PLACEHOLDER: Final = re.compile(
    r"%(?:\([^)]*\))?[#0 +-]*(?:\*|\d+)?(?:\.(?:\*|\d+))?[diouxXeEfFgGcrsa%]"
)
_EVENT_RE: Final = re.compile(r"[a-z][a-z0-9_]*(?:\.[a-z0-9_]+)*")
_KEY_RE: Final = re.compile(r"[a-z][a-z0-9_]*")
#: the JSON keys every line has; a field of the same name is written with a trailing ``_``
_RESERVED: Final = frozenset({"time", "level", "logger", "msg", "event", "exc"})
_Value = str | int | float | bool | None


def structured_fields(record: logging.LogRecord) -> tuple[str | None, dict[str, _Value]]:
    """The ``event`` and ``key=value`` fields of a structured log call.

    ``log.info("fetch.committed digest=%s bytes=%d", d, n)`` gives ``("fetch.committed",
    {"digest": "sha256:...", "bytes": 123})``. The keys come from the format string and each
    value from its own arguments, so a value may hold spaces; a lone ``%s``/``%d`` of a number,
    boolean or None keeps its JSON type. Anything else in the message is left to ``msg``.
    """
    msg, args = record.msg, record.args
    if not isinstance(msg, str) or isinstance(args, dict):
        return None, {}
    arg_list = list(args or ())
    if not arg_list:  # pre-formatted text: take its tokens as they are (no spaces in values)
        msg = msg.replace("%", "%%")
    event: str | None = None
    fields: dict[str, _Value] = {}
    used = 0
    for n, token in enumerate(msg.split(" ")):
        holders = [m for m in _PLACEHOLDER.finditer(token) if m.group() != "%%"]
        mine = tuple(arg_list[used : used + len(holders)])
        used += len(holders)
        if len(mine) < len(holders):
            return event, fields  # too few arguments: logging reports that itself
        if n == 0 and not holders and _EVENT_RE.fullmatch(token):
            event = token
            continue
        key, sep, raw = token.partition("=")
        if not sep or not _KEY_RE.fullmatch(key):
            continue
        value: _Value
        whole = _PLACEHOLDER.fullmatch(raw)
        if whole and len(mine) == 1 and raw[-1] in "sdi" and _is_plain(mine[0]):
            value = mine[0]
        else:
            try:
                value = mask_credentials(raw % mine)
            except (TypeError, ValueError):
                continue
        fields[f"{key}_" if key in _RESERVED else key] = value
    return event, fields


def _is_plain(value: object) -> TypeGuard[int | float | bool | None]:
    return value is None or isinstance(value, bool | int | float)


class _JSONFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, msg, and the call's event and fields."""

    def format(self, record: logging.LogRecord) -> str:
        event, fields = structured_fields(record)
        out: dict[str, _Value] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": mask_credentials(record.getMessage()),
        }
        if event is not None:
            out["event"] = event
        out.update(fields)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


#: control characters (a newline above all) in a message's values: a client's path, a user name
#: or an upstream's header could otherwise start a line of its own (a forged log line)
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")


def _escaped(match: re.Match[str]) -> str:
    return repr(match.group())[1:-1]  # "\n" -> "\\n", "\x1b" -> "\\x1b"


class _TextFormatter(logging.Formatter):
    """One line per message (a traceback, appended after it, keeps its lines)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = _CONTROL.sub(_escaped, record.message)
        return super().formatMessage(record)

    def format(self, record: logging.LogRecord) -> str:
        return mask_credentials(super().format(record))


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JSONFormatter())
    else:
        handler.setFormatter(_TextFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
