"""Logging setup: structured ``key=value`` text or JSON lines; credentials masked."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import queue
import re
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import IO, Final

_CRED_RE: Final = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s:]+:[^/@\s]+@", re.IGNORECASE)
_MASK: Final = r"\g<scheme>***:***@"


def mask_credentials(text: str) -> str:
    """``https://user:secret@host/x`` -> ``https://***:***@host/x``."""
    if "://" not in text:  # the pattern needs one; most lines have none (~20 µs saved a line)
        return text
    return _CRED_RE.sub(_MASK, text)


#: one %-placeholder of a format string (``%s``, ``%d``, ``%.1f``, ``%(name)s``; ``%%`` is text)
_PLACEHOLDER: Final = re.compile(
    r"%(?:\([^)]*\))?[#0 +-]*(?:\*|\d+)?(?:\.(?:\*|\d+))?[diouxXeEfFgGcrsa%]"
)
_EVENT_RE: Final = re.compile(r"[a-z][a-z0-9_]*(?:\.[a-z0-9_]+)*")
_KEY_RE: Final = re.compile(r"[a-z][a-z0-9_]*")
#: the JSON keys every line has; a field of the same name is written with a trailing ``_``
_RESERVED: Final = frozenset({"time", "level", "logger", "msg", "event", "exc"})
_Value = str | int | float | bool | None


#: one step of a format string's plan, for a token: (placeholders, event, key, raw, plain,
#: lone ``%s``)
_Step = tuple[int, str | None, str | None, str, bool, bool]


@functools.lru_cache(maxsize=1024)
def _plan(msg: str) -> tuple[_Step, ...]:
    """What :func:`structured_fields` reads of a format string, worked out once per string
    (they are constants in the code): per space-separated token its number of placeholders,
    the event name (first token only), the key and the raw value, whether the value is one
    lone ``%s``/``%d``/``%i`` (whose plain argument keeps its JSON type), and whether it is
    one lone ``%s`` (whose ``str`` argument is its text as it is)."""
    steps: list[_Step] = []
    for n, token in enumerate(msg.split(" ")):
        holders = sum(1 for m in _PLACEHOLDER.finditer(token) if m.group() != "%%")
        if n == 0 and not holders and _EVENT_RE.fullmatch(token):
            steps.append((0, token, None, "", False, False))
            continue
        key, sep, raw = token.partition("=")
        if not sep or not _KEY_RE.fullmatch(key):
            steps.append((holders, None, None, "", False, False))
            continue
        plain = bool(_PLACEHOLDER.fullmatch(raw)) and holders == 1 and raw[-1] in "sdi"
        name = f"{key}_" if key in _RESERVED else key
        steps.append((holders, None, name, raw, plain, raw == "%s"))
    return tuple(steps)


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
    return _fields(msg, tuple(args or ()))


def _fields(msg: str, args: tuple[object, ...]) -> tuple[str | None, dict[str, _Value]]:
    if not args:  # pre-formatted text: take its tokens as they are (no spaces in values)
        msg = msg.replace("%", "%%")
    event: str | None = None
    fields: dict[str, _Value] = {}
    used, count = 0, len(args)
    for holders, name, key, raw, plain, lone in _plan(msg):
        if used + holders > count:
            return event, fields  # too few arguments: logging reports that itself
        if name is not None:
            event = name
            continue
        if key is None:
            used += holders
            continue
        mine = args[used : used + holders]
        used += holders
        if plain:
            value = mine[0]
            if value is None or isinstance(value, _PLAIN):
                fields[key] = value
                continue
            if lone and type(value) is str:  # "%s" % (text,) is the text
                fields[key] = mask_credentials(value)
                continue
        try:
            fields[key] = mask_credentials(raw % mine)
        except (TypeError, ValueError):
            continue
    return event, fields


_PLAIN: Final = (bool, int, float)


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


TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s %(message)s"
#: access lines waiting for the writer at most (then they are dropped and counted): ~16k lines
PENDING_LIMIT: Final = 4 * 1024 * 1024
#: how long the writer thread lets access lines gather after a write (seconds)
LINGER: Final = 0.01


def _stamp() -> tuple[float, float]:
    """``LogRecord.created`` and ``.msecs`` for now, worked out as this Python's logging does."""
    if sys.version_info >= (3, 13):
        ns = time.time_ns()
        return ns / 1e9, (ns % 1_000_000_000) // 1_000_000 + 0.0
    ct = time.time()
    return ct, int((ct - int(ct)) * 1000) + 0.0


class _Clock:
    """``time.strftime`` of ``localtime`` in one format, done once a second."""

    __slots__ = ("datefmt", "last")

    def __init__(self, datefmt: str) -> None:
        self.datefmt = datefmt
        #: (the second, its text): one tuple, so no thread reads a second with another's text
        self.last: tuple[int, str] = (-1, "")

    def __call__(self, created: float) -> str:
        second, text = self.last
        if int(created) != second:
            text = time.strftime(self.datefmt, time.localtime(created))
            self.last = (int(created), text)
        return text


class LineHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The one handler of :func:`setup_logging`: a record is written when it is logged, as by
    ``logging.StreamHandler``; an access line (:func:`access_line`) is formatted without a
    ``LogRecord`` to the same text and waits for a writer thread, which writes what waits in
    one ``write`` as soon as it runs. Every record written first writes what waits, so lines
    keep their order; ``flush`` (app cleanup, ``logging.shutdown`` at exit) writes it too.
    While the stream takes nothing (journald stalled), up to :data:`PENDING_LIMIT` bytes of
    access lines wait and the next ones are dropped: the event loop never waits on stderr for
    them, and memory stays bounded."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        super().__init__(stream)
        self._render: Callable[[str, str, tuple[object, ...]], str] | None = None
        # both re-entrant, as logging's own handler lock is: a record logged on a thread that
        # holds one (a finalizer the cyclic GC runs there: asyncio's "Task was destroyed but it
        # is pending!") is written, before the chunk in hand, instead of hanging that thread and
        # every thread that logs after it
        self._mutex = threading.RLock()  # the pending lines (nothing that logs runs under it)
        #: held while writing (whole chunks, in order): logging's own handler lock, which
        #: ``handle`` holds around ``emit``, so every thread takes the locks in one order (a
        #: lock of its own, taken by the writer thread before a finalizer's record took this
        #: one, made two threads wait for each other)
        self._io = self.lock or threading.RLock()
        self._pending: list[str] = []
        self._pending_bytes = 0
        self._kick: queue.SimpleQueue[bool] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._awake = False  # the writer thread has lines to write or is lingering
        self._text_clock = _Clock("%Y-%m-%d %H:%M:%S")
        self._json_clock = _Clock("%Y-%m-%dT%H:%M:%S")
        self._json = json.JSONEncoder(default=str)
        #: access lines dropped while the stream was stalled, and lost to a failed write
        self.dropped = 0
        self.linger = LINGER
        self.limit = PENDING_LIMIT

    def setFormatter(self, fmt: logging.Formatter | None) -> None:
        super().setFormatter(fmt)
        self._render = None
        if type(fmt) is _JSONFormatter:
            self._render = self._json_line
        elif type(fmt) is _TextFormatter and fmt._fmt == TEXT_FORMAT and fmt.datefmt is None:
            self._render = self._text_line

    @property
    def renders(self) -> bool:
        """Whether this handler formats an access line itself (its formatter is one of ours)."""
        return self._render is not None and not self.filters and self.level <= logging.INFO

    def _text_line(self, name: str, fmt: str, args: tuple[object, ...]) -> str:
        """What ``_TextFormatter(TEXT_FORMAT).format`` makes of an INFO record, and the newline."""
        created, msecs = _stamp()
        second, text = self._text_clock.last
        if int(created) != second:
            text = self._text_clock(created)
        message = fmt % args if args else fmt
        if not (message.isascii() and message.isprintable()):
            message = _CONTROL.sub(_escaped, message)
        level = logging.getLevelName(logging.INFO)
        line = f"{text},{int(msecs):03d} {level} {name} {message}"
        return (_CRED_RE.sub(_MASK, line) if "://" in line else line) + self.terminator

    def _json_line(self, name: str, fmt: str, args: tuple[object, ...]) -> str:
        """What ``_JSONFormatter.format`` makes of an INFO record, and the newline."""
        created, _ = _stamp()
        event, fields = _fields(fmt, args)
        out: dict[str, _Value] = {
            "time": self._json_clock(created),
            "level": logging.getLevelName(logging.INFO).lower(),
            "logger": name,
            "msg": mask_credentials(fmt % args if args else fmt),
        }
        if event is not None:
            out["event"] = event
        out.update(fields)
        return self._json.encode(out) + self.terminator

    def queue_line(self, name: str, fmt: str, args: tuple[object, ...]) -> bool:
        """An INFO line of logger ``name`` to be written soon; False: dropped (stalled)."""
        assert self._render is not None
        text = self._render(name, fmt, args)
        with self._mutex:
            if self._pending_bytes >= self.limit:
                self.dropped += 1
                return False
            self._pending.append(text)
            self._pending_bytes += len(text)
            kick, self._awake = not self._awake, True
        if kick:
            if self._writer is None:
                self._start_writer()
            self._kick.put(True)
        return True

    def _start_writer(self) -> None:
        writer = threading.Thread(target=self._run, name="regproxy-log", daemon=True)
        with self._mutex:  # made before: nothing is made (no finalizer runs) under the lock
            if self._writer is not None:
                return
            self._writer = writer
        writer.start()

    def _run(self) -> None:
        while self._kick.get():
            # a line after a quiet spell is written at once; the lines of the next ``linger``
            # seconds then go out in one write: one wake-up and one write a batch while
            # requests come quickly, instead of a thread switch per request
            while True:
                with contextlib.suppress(Exception):  # the writer outlives a bad stream
                    self._write_pending()
                time.sleep(self.linger)
                with self._mutex:
                    if not self._pending:
                        self._awake = False
                        break

    def _take(self) -> list[str]:
        fresh: list[str] = []  # made before the lock: no collection (no finalizer) while held
        with self._mutex:
            lines, self._pending, self._pending_bytes = self._pending, fresh, 0
        return lines

    def _write_pending(self, after: str = "") -> None:
        with self._io:
            lines = self._take()
            chunk = "".join(lines) + after
            if not chunk:
                return
            try:
                self.stream.write(chunk)
                self.stream.flush()
            except (OSError, ValueError):
                self.dropped += len(lines)  # lost with the stream
                if after:
                    raise  # a record's own line: emit reports it

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._write_pending(self.format(record) + self.terminator)
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)

    def flush(self) -> None:
        """Write what waits, then flush the stream (a closed or broken one: nothing to do)."""
        with contextlib.suppress(OSError, ValueError):
            self._write_pending()
            super().flush()

    def close(self) -> None:
        self._write_pending()
        if self._writer is not None:
            self._kick.put(False)
        super().close()


def _sink(logger: logging.Logger) -> LineHandler | None:
    """The :class:`LineHandler` an INFO line of ``logger`` goes to and nothing else would see
    (no filter on the logger, no other handler on the way to the root), or None."""
    if logger.filters or logger.disabled or logger.manager.disable >= logging.INFO:
        return None
    node: logging.Logger | None = logger
    while node is not None:
        if node.handlers:
            if node.parent is not None or len(node.handlers) != 1:
                return None
            handler = node.handlers[0]
            return handler if type(handler) is LineHandler and handler.renders else None
        if not node.propagate:
            return None
        node = node.parent
    return None


def access_line(logger: logging.Logger, fmt: str, args: tuple[object, ...]) -> bool:
    """``logger.info(fmt, *args)`` for an access line (the caller checked that ``logger`` is
    enabled for INFO): the same text, at a fraction of the cost when :func:`setup_logging`'s
    handler is the only one that would see it (it then waits for the writer thread, see
    :class:`LineHandler`); False when it was dropped because the stream is stalled."""
    sink = _sink(logger)
    if sink is None or (len(args) == 1 and isinstance(args[0], Mapping)):  # %(key)s: logging's
        logger.info(fmt, *args)
        return True
    return sink.queue_line(logger.name, fmt, args)


def flush_lines() -> None:
    """Write the access lines that wait (on shutdown; ``logging.shutdown`` does it at exit)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, LineHandler):
            handler.flush()


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    handler = LineHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JSONFormatter())
    else:
        handler.setFormatter(_TextFormatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in root.handlers:
        if isinstance(old, LineHandler):
            old.close()  # what waits is written, its writer thread ends
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
