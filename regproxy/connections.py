"""Client connections: how many may be open, and how long one may take to ask (HTTP layer).

aiohttp's server makes one ``RequestHandler`` protocol per connection. :class:`ConnectionGuard`
is the protocol factory handed to ``loop.create_server`` instead: each connection gets a small
:class:`_Guarded` protocol that passes every event on to the ``RequestHandler`` it makes, and
adds what aiohttp lacks:

- **a connection limit** (``http.max_connections``): above it, a new connection is answered
  ``503`` with ``Retry-After`` and closed, before any handler exists for it; sized by default
  from ``RLIMIT_NOFILE`` so it bites long before descriptors run out. A connection counts from
  its accept: with TLS the loop makes the protocol at the accept and calls ``connection_made``
  only once the handshake is done, so handshakes in progress count too (one that fails drops
  the protocol unseen: its count goes when the protocol is collected);
- **a header timeout** (``http.header_timeout``): a connection that has not sent its first
  request's headers (up to the empty line that ends them) within it is closed. Between requests
  of a kept-alive connection, aiohttp's own ``keepalive_timeout`` closes it when the next
  request's headers do not arrive;
- **a fast lane** (``http.fast_path``, :class:`FastLane`, regproxy.fastpath): while a
  connection's requests are simple GETs it answers from memory, the guard frames them (each
  request head up to its empty line, pipelined ones in order) and writes the lane's answers
  itself. A plain GET or HEAD the lane declines goes to aiohttp whole, and the lane answers
  again once aiohttp answered every request it was given (its access logger says so); any
  other request goes to aiohttp with all that follows, for good. aiohttp thus always gets
  whole requests from a boundary on, and never answers behind an answer still to come. The
  guard keeps aiohttp's keep-alive for a connection aiohttp never answered, and lets aiohttp
  answer a request at least every half ``keepalive_timeout`` on one it did. The lane also
  streams committed blob files (regproxy.fastfile over TLS on the event loop, regproxy.fastsend
  with ``sendfile`` on plain TCP once the transport's buffer is empty): the guard pumps the
  body as the connection takes it and holds the requests behind it until it is out.

Response and body deadlines (``http.write_timeout``, ``http.read_timeout``,
``http.body_min_rate``) belong to the requests themselves: request bodies, see
regproxy.request_limits; responses, regproxy.sendfile.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
import weakref
from collections.abc import Callable
from typing import Final, cast

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from regproxy.config import HttpConfig
from regproxy.lane import FAST_HEAD_MAX, FastLane, LaneBody, Streams, bodiless, partial_head
from regproxy.metrics import Metrics
from regproxy.write_watch import WriteWatch

log = logging.getLogger("regproxy")
RETRY_AFTER_SECONDS: Final = 1
#: a refused connection is kept this long at most, so that the client reads the 503 before the
#: close (closing with its request unread would reset the connection and lose the answer)
LINGER_SECONDS: Final = 1.0
LINGER_MAX: Final = 256


class _ClientFault(logging.Filter):
    """aiohttp logs a request it cannot parse (a header line over 8 KiB, a bad method) at ERROR
    with a traceback: a client's fault, answered 400. Here it is one INFO line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg = "request.malformed remote=%s status=%s error=%.200s"
            remote = record.args[0] if isinstance(record.args, tuple) and record.args else "-"
            record.args = (remote, exc.code, exc.message)
            record.exc_info = record.exc_text = None
        return True


def server_logger() -> logging.Logger:
    """The logger for aiohttp's per-connection protocol (``AppRunner(logger=...)``)."""
    logger = logging.getLogger("regproxy.http")
    if not any(isinstance(f, _ClientFault) for f in logger.filters):
        logger.addFilter(_ClientFault())
    return logger


def _refusal() -> bytes:
    body = json.dumps(
        {
            "errors": [
                {
                    "code": "UNAVAILABLE",
                    "message": "too many connections; retry later",
                    "detail": None,
                }
            ]
        }
    ).encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\n"
        f"Retry-After: {RETRY_AFTER_SECONDS}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body


_REFUSAL: Final = _refusal()


class ConnectionGuard:
    """The protocol factory for the listener: counts connections and sheds them above the limit.

    ``handler_factory`` makes aiohttp's per-connection protocol (``runner.server``).
    """

    def __init__(
        self,
        handler_factory: Callable[[], asyncio.Protocol],
        config: HttpConfig,
        max_connections: int,
        metrics: Metrics,
        fast: FastLane | None = None,
        clock: Callable[[], float] = time.monotonic,
        streams: Streams | None = None,
    ) -> None:
        self.metrics = metrics
        self.streams = streams or Streams()  # the lane's bodies going (a stop waits for them)
        self.handler_factory = handler_factory
        self.fast = fast
        #: the keep-alive clock of the fast lane (monotonic seconds; tests hand in their own)
        self.clock = clock
        self.header_timeout = config.header_timeout
        self.keepalive_timeout = config.keepalive_timeout
        self.max_connections = max_connections
        self.open = 0
        self.lingering = 0
        #: cuts connections whose client takes none of the bytes waiting for it
        self.writes = WriteWatch(
            config.write_timeout, clock, metrics.slow_clients_cut.labels("write").inc
        )

    def __call__(self) -> asyncio.Protocol:
        return _Guarded(self)

    def admit(self) -> bool:
        if self.open >= self.max_connections:
            self.metrics.connections_shed.inc()
            return False
        self.open += 1
        self.metrics.connections_open.set(self.open)
        return True

    def release(self) -> None:
        self.open -= 1
        self.metrics.connections_open.set(self.open)


class _Counted:
    """A connection's place in the guard's count, given back once: when the connection is
    lost, or when its protocol is collected without ever being connected (a TLS handshake that
    failed or timed out)."""

    __slots__ = ("guard", "held")

    def __init__(self, guard: ConnectionGuard) -> None:
        self.guard = guard
        self.held = guard.admit()

    def release(self) -> None:
        if self.held:
            self.held = False
            self.guard.release()


class _Guarded(asyncio.Protocol):
    """One connection: the guard's bookkeeping around aiohttp's protocol for it."""

    __slots__ = (
        "__weakref__",
        "answered_at",
        "begun",
        "body",
        "counted",
        "files",
        "guard",
        "half_closed",
        "handed",
        "held",
        "held_paused",
        "idle",
        "inner",
        "inner_done_at",
        "inner_paused",
        "inner_used",
        "lane",
        "lingers",
        "paused",
        "pending",
        "refused",
        "remote",
        "stalled_mark",
        "stalled_since",
        "tail",
        "timer",
        "transport",
    )

    def __init__(self, guard: ConnectionGuard) -> None:
        self.guard = guard
        self.counted = _Counted(guard)  # at the accept (for TLS: before the handshake)
        weakref.finalize(self, self.counted.release)
        self.inner: asyncio.Protocol | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.tail = b""
        self.transport: asyncio.Transport | None = None
        self.refused = False
        self.lingers = False
        self.begun = False  # a byte of the request line has come
        #: the fast lane answers this connection (until it declines a request, for good)
        self.lane = guard.fast
        self.pending = b""  # the start of a request head the lane waits for the rest of
        self.paused = False  # the transport asked us to stop writing
        self.inner_paused = False  # aiohttp's protocol was told to stop writing
        self.body: LaneBody | None = None  # a response the lane is streaming
        self.held = b""  # what came while it streams (the requests after it)
        self.held_paused = False  # reading paused while more than FAST_HEAD_MAX is held
        self.half_closed = False  # the client shut its side while a body went out
        self.files = ""  # how the lane may stream blob files here ("tls", "plain"; lane.py)
        self.idle: asyncio.TimerHandle | None = None  # keep-alive while the lane answers
        self.answered_at = 0.0
        self.remote: str | None = None
        self.handed = 0  # requests handed to aiohttp while the lane is on, not answered yet
        self.inner_used = False  # aiohttp answered a request (its keep-alive clock runs)
        self.inner_done_at = 0.0
        self.stalled_since: float | None = None
        self.stalled_mark = (0, 0)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream transport (uvloop's is not an asyncio.Transport subclass, only alike)
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        loop = asyncio.get_running_loop()
        if not self.counted.held:
            self.refused = True
            transport.write(_REFUSAL)
            if self.guard.lingering >= LINGER_MAX:
                transport.close()
                return
            self.guard.lingering += 1
            self.lingers = True
            self.timer = loop.call_later(LINGER_SECONDS, transport.close)
            return
        self.timer = loop.call_later(self.guard.header_timeout, self._header_timeout)
        self.guard.writes.add(self)
        sock = transport.get_extra_info("socket")
        if transport.get_extra_info("ssl_object") is not None:
            self.files = "tls"
        elif sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            self.files = "plain"  # (not a TLS relay's socket pair: aiohttp's sendfile there)
        self.inner = self.guard.handler_factory()
        self.inner.connection_made(transport)

    def _header_timeout(self) -> None:
        self.timer = None
        self.guard.metrics.slow_clients_cut.labels("header").inc()
        log.debug("connection.header_timeout remote=%s", self.peer())
        if self.transport is not None:
            self.transport.abort()

    def peer(self) -> object:
        return self.transport.get_extra_info("peername") if self.transport else None

    def data_received(self, data: bytes) -> None:
        if self.refused:
            # what the refused client sent: drop it; it has had its answer, close now
            if self.transport is not None:
                self.transport.close()
            return
        if self.timer is not None:
            # the headers end at the first empty line ("\r\n\r\n", or a bare "\n\n") after
            # the request line; empty lines before it are skipped (as the parser does), so a
            # client cannot stop the clock by sending one first
            seen = self.tail + data
            if not self.begun:
                seen = seen.lstrip(b"\r\n")
                self.begun = bool(seen)
            if b"\n\r\n" in seen or b"\n\n" in seen:
                self.timer.cancel()
                self.timer = None
                self.tail = b""
            else:
                self.tail = seen[-2:]
        if self.body is not None:  # answered in order once the body is out
            self.held += data
            self._bound_held()
            return
        if self.lane is not None:
            data = self._fast(data)
            if not data:
                return
        if self.inner is not None:
            self.inner.data_received(data)

    def _fast(self, data: bytes) -> bytes:
        """Answer the requests the lane takes; what is returned goes to aiohttp.

        A request the lane declines goes to aiohttp whole if it is a plain GET or HEAD (no
        body, nothing about the connection): the lane may answer again once aiohttp has
        answered every such request (:meth:`inner_done`). Until then, later requests go to
        aiohttp too, in order. Anything else goes to aiohttp with all that follows, for good.
        """
        assert self.lane is not None and self.transport is not None
        buf = self.pending + data if self.pending else data
        self.pending = b""
        handed: list[bytes] = []
        answered = False
        while buf:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if partial_head(buf):
                    self.pending = buf  # the rest of the head is on its way
                    buf = b""
                break
            head = buf[:end]
            if self.handed == 0 and self._lane_open():
                files = self.files
                if files == "plain" and self.transport.get_write_buffer_size():
                    files = ""  # sendfile goes around the transport: only once it is empty
                answer = self.lane.answer(head, self._remote(), len(buf) > end + 4, files)
                if answer is not None:
                    answered = True
                    buf = buf[end + 4 :]
                    if not isinstance(answer[0], bytes):
                        go_on = self._stream(answer[0], answer[1])
                        if go_on is None:  # still streaming: what follows waits for it
                            self.held = buf  # (:meth:`wake`)
                            self._bound_held()
                        if not go_on:  # or cut short, or Connection: close
                            return b""
                        continue
                    self.transport.write(answer[0])
                    if answer[1]:  # Connection: close: what follows is not read (as aiohttp)
                        self.transport.close()
                        self.lane = None
                        return b""
                    continue
            if not bodiless(head):
                break
            handed.append(buf[: end + 4])
            self.handed += 1
            buf = buf[end + 4 :]
        if answered:
            self.answered_at = self.guard.clock()
            if self.idle is None and not self.inner_used:
                self._quiet_inner()
                self._arm_idle()
        if buf:  # aiohttp answers this request and all that follow
            self.lane = None
            self.pending = b""
            if self.idle is not None:
                self.idle.cancel()
                self.idle = None
        if handed:
            return b"".join(handed) + buf
        return buf

    def _stream(self, body: LaneBody, close: bool) -> bool | None:
        """Start a body the lane streams: None while it streams, else whether the connection
        goes on (not if the body was cut short, or the client said ``Connection: close``).
        aiohttp's keep-alive clock (it would close a connection it thinks idle) stops; the
        guard's runs instead, from the body's end, until aiohttp answers again."""
        self._quiet_inner()
        self.inner_used = False
        self.body = body
        self.guard.streams.add(self)
        # a client that takes nothing of it is the body's to cut (its own stall timer:
        # ``client_stalled``), not the write watch's too (which ended it ``client_gone``)
        self.guard.writes.discard(self)
        if close:
            self.lane = None  # nothing after it is answered (as aiohttp)
        if not body.pump(self):
            return None
        self._body_over(close)
        return self.lane is not None

    def wake(self) -> None:
        """Pump the body again; once it is over, the requests held behind it go on."""
        body = self.body
        if body is None or not body.pump(self):
            return
        self._body_over(self.lane is None)
        held, self.held = self.held, b""
        if self.held_paused:
            self.held_paused = False
            if self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()
        if held and self.lane is not None:
            held = self._fast(held)
            if held and self.inner is not None:
                self.inner.data_received(held)

    def _bound_held(self) -> None:
        """Stop reading while more than a request head waits behind a body (resumed in
        :meth:`wake`): a client that keeps sending and reads nothing holds no more than that
        and one read."""
        if len(self.held) > FAST_HEAD_MAX and not self.held_paused and self.transport:
            self.held_paused = True
            self.transport.pause_reading()

    def _quiet_inner(self) -> None:
        """Stop aiohttp's keep-alive clock: it runs from the connection's start (aiohttp 3.10+)
        or its last answer, and closes a connection it thinks idle, also in the middle of a
        body the lane sends. The guard's own clock runs from the lane's answers instead
        (:meth:`_arm_idle`); aiohttp starts its clock again after an answer of its own."""
        keep_alive = getattr(self.inner, "keep_alive", None)
        if keep_alive is not None:
            keep_alive(True)  # cancels aiohttp's keep-alive timer

    def _body_over(self, close: bool) -> None:
        body, self.body = self.body, None
        self.guard.streams.discard(self)
        self.guard.writes.add(self)  # what follows on the connection is the watch's again
        assert body is not None and self.transport is not None
        if body.ending.error is not None:  # cut short: the connection is aborted
            self.lane = None
        elif close or self.half_closed:
            self.transport.close()
            self.lane = None
        else:
            self.answered_at = self.guard.clock()
            if self.idle is None:
                self._arm_idle()

    def _lane_open(self) -> bool:
        """Whether the lane may answer the next request: the transport takes more, and
        aiohttp's keep-alive clock (which runs from the last response aiohttp sent, and knows
        nothing of the lane's) is not past half its ``keepalive_timeout``: beyond that, a request
        goes to aiohttp, which restarts it, so aiohttp never closes a connection in use."""
        assert self.transport is not None
        if self.paused or self.transport.is_closing():
            return False
        if not self.inner_used:
            return True
        elapsed = self.guard.clock() - self.inner_done_at
        return elapsed < self.guard.keepalive_timeout / 2

    def inner_done(self, keep_alive: bool) -> None:
        """aiohttp finished a response on this connection (from the access logger)."""
        if self.lane is None:
            return
        if not keep_alive:  # aiohttp closes the connection after it: nothing may follow
            self.lane = None
            return
        self.handed = max(0, self.handed - 1)
        self.inner_used = True
        self.inner_done_at = self.guard.clock()

    def _remote(self) -> str | None:
        """The client's address, as aiohttp's ``request.remote`` says it."""
        if self.remote is None and self.transport is not None:
            peer = self.transport.get_extra_info("peername")
            self.remote = str(peer[0]) if isinstance(peer, list | tuple) else None
        return self.remote

    def _arm_idle(self) -> None:
        due = self.answered_at + self.guard.keepalive_timeout - self.guard.clock()
        self.idle = asyncio.get_running_loop().call_later(max(due, 0.0), self._idle_due)

    def _idle_due(self) -> None:
        """aiohttp's keep-alive for a connection only the lane answered: closed when no
        request was answered for ``keepalive_timeout`` (a half-sent head does not count).
        Once aiohttp answered one, its own keep-alive clock takes over."""
        self.idle = None
        if self.lane is None or self.transport is None or self.inner_used or self.handed:
            return
        if self.body is not None:  # re-armed when the body is out
            return
        if self.guard.clock() < self.answered_at + self.guard.keepalive_timeout:
            self._arm_idle()
            return
        self.transport.close()

    def eof_received(self) -> bool | None:
        if self.body is not None and self.files == "plain":
            # a client may shut its side once its request is sent (SHUT_WR): the body it asked
            # for still goes out whole, then the connection closes (nothing after it is read)
            self.half_closed = True
            return True
        if self.inner is not None:
            return self.inner.eof_received()
        return None

    def pause_writing(self) -> None:
        self.paused = True
        # aiohttp's protocol asserts it is told once per turn (a second pause, or a resume
        # while not paused, raises): it hears a pause only when it runs, a resume only when
        # it was paused, whatever the transport says twice
        if self.inner is not None and not self.inner_paused:
            self.inner_paused = True
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.paused = False
        if self.body is not None:
            self.wake()
        if self.inner is not None and self.inner_paused:
            self.inner_paused = False
            self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.idle is not None:
            self.idle.cancel()
            self.idle = None
        if self.refused:
            if self.lingers:
                self.guard.lingering -= 1
            return
        self.counted.release()
        self.guard.writes.discard(self)
        body, self.body = self.body, None
        if body is not None:
            self.guard.streams.discard(self)
            body.ending.lost()
        inner, self.inner = self.inner, None
        if inner is not None:
            inner.connection_lost(exc)


def request_done(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """aiohttp finished a response (its access logger calls this for every request): the
    connection's guard may answer its next requests in the fast lane again."""
    transport = request.transport
    guarded = transport.get_protocol() if transport is not None else None
    if isinstance(guarded, _Guarded):
        guarded.inner_done(bool(response.keep_alive))
