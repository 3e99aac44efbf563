"""TLS off the event loop: worker threads do the handshake and the record layer.

With TLS on one event loop, encryption and the copies around it run on the thread that also
serves every request, and that thread saturates while the second core idles. Here the event
loop accepts each connection (the connection guard counts it from the accept, as before) and
hands the socket to one of ``tls.workers`` threads, each running an event loop of its own.
The worker does the handshake (within ``http.header_timeout``; until it is done the connection
holds its one descriptor, the socket pair is made after), then relays: what it decrypts
goes to the event loop over one end of an ``AF_UNIX`` socket pair, what comes back is encrypted
and sent to the client. ``SSL_write``/``SSL_read`` run without the GIL, so encryption runs
beside the event loop, and the event loop serves the plain end as it serves plain HTTP (a blob
goes out with ``sendfile``). Plain HTTP never comes here.

What the application sees of a relayed connection is the client's: its address and the
listener's (``peername``, ``sockname``), and the ``sslcontext`` (aiohttp's ``request.secure``
and the URLs it builds say https). Flow control is passed through both ways: a side whose
write buffer is above :data:`HIGH_WATER` stops the reading of the other, so a slow TLS reader
fills the socket pair and the event loop's send waits (``http.write_timeout`` bites there), and
a connection holds a bounded amount of memory. What the socket pair and the TCP buffers take is
no longer seen waiting on the event loop's side (a 4 MiB answer fits; a cut end of the pair is
not read while the client takes nothing), so each worker also watches its clients'
connections as the guard does (regproxy.write_watch): one that takes none of the bytes waiting
for it for ``http.write_timeout`` is aborted, and with it the event loop's side. An end of file
goes on as an end of file; a reset, or an abort on the event loop's side (a response cut short),
as an abort (at once: the worker does not read its end of the pair while the client takes
nothing). The connection's protocol hears of its end once the worker has let the client's
connection go, so it counts against ``http.max_connections`` until then, as without the relay.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Final

from regproxy.accept_loop import Acceptor
from regproxy.write_watch import WriteWatch

log = logging.getLogger("regproxy.tls")

#: a side's write buffer above this stops the reading of the other side
HIGH_WATER: Final = 256 * 1024
#: the event loop's end of a socket pair may hold this much on its way to the worker (the
#: kernel doubles it): a 1 MiB blob goes out in one or two sends instead of five
PAIR_SEND_BUFFER: Final = 512 * 1024
#: descriptors a relayed connection holds beyond a plain one's: the two ends of its pair
PAIR_FDS: Final = 2


class _Pair:
    """One relayed connection, on its worker: the client's TLS transport and the worker's end
    of the socket pair. The worker's :class:`WriteWatch` looks at it as a connection whose
    ``transport`` is the client's."""

    __slots__ = (
        "aborted",
        "let_go",
        "live",
        "loop",
        "lost",
        "main",
        "peername",
        "plain",
        "stalled_mark",
        "stalled_since",
        "tls",
        "transport",
        "waiting",
        "watch",
    )

    def __init__(
        self,
        live: set[_Pair],
        watch: WriteWatch,
        peername: object,
        main: asyncio.AbstractEventLoop,
    ) -> None:
        self.tls: asyncio.Transport | None = None
        self.plain: asyncio.Transport | None = None
        #: the event loop aborted its end (a response cut short): the client gets an abort
        self.aborted = False
        self.live = live  # the worker's relayed connections: this one is in it while up
        self.loop = asyncio.get_running_loop()  # the worker's
        self.lost = 0
        self.watch = watch
        self.peername = peername
        self.transport: asyncio.Transport | None = None  # the client's, for the watch
        self.stalled_since: float | None = None
        self.stalled_mark = (0, 0)
        #: the event loop's, where the guard's protocol hears of the connection's end only
        #: once the worker has let the client's connection go (``let_go``; ``waiting`` until
        #: then: the end it heard of its own side), so the connection counts against
        #: http.max_connections while the worker still flushes to the client or shuts its TLS
        #: down, as it did without the relay; both attributes are the event loop's only
        self.main = main
        self.let_go = False
        self.waiting: Callable[[], None] | None = None

    def up(self, tls: asyncio.Transport) -> None:
        """The handshake is done: relayed, and watched like a plain connection (a client that
        takes none of the bytes waiting for it is cut after ``http.write_timeout``; the event
        loop's side, done or cut, no longer sees this connection's bytes wait)."""
        self.tls = self.transport = tls
        self.live.add(self)
        self.watch.add(self)

    def peer(self) -> object:
        return self.peername

    def gone(self, exc: BaseException | None) -> None:
        """One side's connection was lost: the other ends too; the worker forgets the pair
        once both have gone."""
        self.end(exc)
        self.watch.discard(self)
        self.lost += 1
        if self.lost >= 2:
            self.live.discard(self)
            self.tls = self.plain = self.transport = None  # no cycle left for the collector
            with contextlib.suppress(RuntimeError):  # the event loop is gone
                self.main.call_soon_threadsafe(self._let_go)

    def _let_go(self) -> None:
        """(on the event loop) the worker is done with the client's connection."""
        self.let_go = True
        waiting, self.waiting = self.waiting, None
        if waiting is not None:
            waiting()

    def end(self, exc: BaseException | None) -> None:
        for transport in (self.tls, self.plain):
            if transport is not None and not transport.is_closing():
                if exc is not None or self.aborted:
                    transport.abort()
                else:
                    transport.close()  # after what it holds is sent


def _buffered(transport: Any) -> asyncio.Transport:
    transport.set_write_buffer_limits(high=HIGH_WATER)
    return transport  # type: ignore[no-any-return]


class _PlainSide(asyncio.Protocol):
    """The worker's end of the socket pair: bytes from the event loop, encrypted to the client."""

    __slots__ = ("pair",)

    def __init__(self, pair: _Pair) -> None:
        self.pair = pair

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.pair.plain = _buffered(transport)

    def data_received(self, data: bytes) -> None:
        tls = self.pair.tls
        if tls is not None and not tls.is_closing():
            tls.write(data)

    def eof_received(self) -> bool:
        # the event loop is done with the connection: the client's side closes after what it
        # holds (or at once, when the event loop aborted)
        self.pair.end(None)
        return False

    def pause_writing(self) -> None:
        if self.pair.tls is not None:
            self.pair.tls.pause_reading()

    def resume_writing(self) -> None:
        if self.pair.tls is not None and not self.pair.tls.is_closing():
            self.pair.tls.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.pair.gone(exc)


class _TLSSide(asyncio.Protocol):
    """The client's TLS connection, on the worker: its plaintext goes to the event loop."""

    __slots__ = ("pair",)

    def __init__(self, pair: _Pair) -> None:
        self.pair = pair

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tls = _buffered(transport)
        tls.pause_reading()  # until the socket pair to the event loop is up
        self.pair.up(tls)

    def data_received(self, data: bytes) -> None:
        plain = self.pair.plain
        if plain is not None and not plain.is_closing():
            plain.write(data)

    def eof_received(self) -> None:
        if self.pair.plain is not None and not self.pair.plain.is_closing():
            self.pair.plain.write_eof()  # as a plain connection's end of file

    def pause_writing(self) -> None:
        if self.pair.plain is not None:
            self.pair.plain.pause_reading()

    def resume_writing(self) -> None:
        if self.pair.plain is not None and not self.pair.plain.is_closing():
            self.pair.plain.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.pair.gone(exc)


class _Relayed(asyncio.Transport):
    """The event loop's end of the socket pair, as the application sees it: the client's
    connection (its addresses, the TLS context); everything else is the pair's transport."""

    def __init__(self, inner: Any, extra: dict[str, Any], protocol: asyncio.BaseProtocol) -> None:
        super().__init__(extra)
        self.extra = extra
        self.inner = inner
        self.protocol: asyncio.BaseProtocol | None = protocol
        self.pair: _Pair | None = None

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name in self.extra:
            return self.extra[name]
        return self.inner.get_extra_info(name, default)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self.protocol  # type: ignore[return-value]  # None once closed, as uvloop's

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def write(self, data: Any) -> None:
        self.inner.write(data)

    def writelines(self, list_of_data: Any) -> None:
        self.inner.writelines(list_of_data)

    def write_eof(self) -> None:
        self.inner.write_eof()

    def can_write_eof(self) -> bool:
        return bool(self.inner.can_write_eof())

    def is_closing(self) -> bool:
        return bool(self.inner.is_closing())

    def close(self) -> None:
        self.inner.close()

    def abort(self) -> None:
        pair = self.pair
        if pair is not None:
            pair.aborted = True  # read by the worker when it sees the end of file
            # and the client's side goes now: the worker reads no end of file while the
            # client takes nothing (a response cut for http.write_timeout)
            with contextlib.suppress(RuntimeError):  # the worker is gone
                pair.loop.call_soon_threadsafe(pair.end, None)
        self.inner.abort()

    def pause_reading(self) -> None:
        self.inner.pause_reading()

    def resume_reading(self) -> None:
        self.inner.resume_reading()

    def is_reading(self) -> bool:
        return bool(self.inner.is_reading())

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.inner.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return int(self.inner.get_write_buffer_size())

    def get_write_buffer_limits(self) -> tuple[int, int]:
        limits = self.inner.get_write_buffer_limits()
        return int(limits[0]), int(limits[1])


class _Plain(asyncio.Protocol):
    """The event loop's end of the socket pair: events go on to the connection's protocol
    (the guard's), which is handed the :class:`_Relayed` transport."""

    __slots__ = ("extra", "inner", "pair", "relayed")

    def __init__(self, inner: asyncio.Protocol, extra: dict[str, Any], pair: _Pair) -> None:
        self.inner = inner
        self.extra = extra
        self.pair = pair
        self.relayed: _Relayed | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        relayed = self.relayed = _Relayed(transport, self.extra, self.inner)
        relayed.pair = self.pair
        self.inner.connection_made(relayed)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        # the guard's protocol hears of it once the worker has let the client go (see _Pair)
        if self.pair.let_go:
            self._lost(exc)
        else:
            self.pair.waiting = lambda: self._lost(exc)

    def _lost(self, exc: Exception | None) -> None:
        self.inner.connection_lost(exc)
        if self.relayed is not None:  # as uvloop's transports: no protocol once closed
            self.relayed.protocol = None
            self.relayed.pair = None
            self.relayed = None


class _Worker:
    """One thread with an event loop of its own: handshakes and record layers."""

    def __init__(
        self,
        name: str,
        loop_factory: Callable[[], asyncio.AbstractEventLoop],
        watch: WriteWatch,
    ) -> None:
        self.loop = loop_factory()
        self.pairs: set[_Pair] = set()
        self.watch = watch  # used on this worker's loop only
        self.tasks: set[asyncio.Task[None]] = set()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            self.loop.close()

    def take(self, conn: socket.socket, handshake: Callable[[_Worker], Any]) -> None:
        """(on the worker) a connection to relay: ``handshake`` is its coroutine."""
        task = self.loop.create_task(handshake(self))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _halt(self) -> None:
        self.watch.close()
        for task in list(self.tasks):
            task.cancel()
        for pair in list(self.pairs):
            pair.aborted = True
            pair.end(None)
        self.loop.call_soon(self.loop.stop)  # after the aborts' callbacks

    def stop(self, timeout: float) -> None:
        if self.thread.is_alive():
            with contextlib.suppress(RuntimeError):  # its loop stopped already
                self.loop.call_soon_threadsafe(self._halt)
            self.thread.join(timeout)
        if self.thread.is_alive():
            log.warning("tls.worker_stuck name=%s", self.thread.name)


class TLSRelay:
    """A TLS listener whose connections are relayed by worker threads (see the module).

    ``context`` is called for each new connection (the certificate in force: SIGHUP swaps
    it); ``protocol_factory`` is the listener's (the connection guard), called on the event
    loop at each accept."""

    def __init__(
        self,
        context: Callable[[], ssl.SSLContext],
        protocol_factory: Callable[[], asyncio.Protocol],
        *,
        workers: int,
        handshake_timeout: float,
        write_timeout: float,
        on_write_cut: Callable[[], None] = lambda: None,
        on_handshake_failed: Callable[[Any, BaseException], object] = lambda *_: None,
        loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None,
    ) -> None:
        """``on_handshake_failed``: told (on a worker) of each handshake that did not end, with
        the client's address (regproxy.tls_failures)."""
        self.context = context
        self.on_handshake_failed = on_handshake_failed
        self.protocol_factory = protocol_factory
        self.handshake_timeout = handshake_timeout
        self.loop = asyncio.get_running_loop()
        make = loop_factory or _same_kind(self.loop)
        self.workers = [
            _Worker(
                f"regproxy-tls-{i}",
                make,
                WriteWatch(write_timeout, time.monotonic, on_write_cut),
            )
            for i in range(max(1, workers))
        ]
        self._next: Iterator[_Worker] = itertools.cycle(self.workers)
        #: protocols of connections in their handshake, by key (they count from the accept)
        self._pending: dict[int, asyncio.Protocol] = {}
        self._keys = itertools.count()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._acceptor = Acceptor(self._take)
        self.sockets: list[socket.socket] = []
        self._closed = False

    # --- the event loop's side ---------------------------------------------------------------
    def listen(self, host: str, port: int, backlog: int = 1024) -> None:
        self._acceptor.listen(host, port, backlog)
        self.sockets = self._acceptor.sockets

    def _take(self, conn: socket.socket, extra: dict[str, Any]) -> None:
        key = next(self._keys)
        self._pending[key] = self.protocol_factory()  # counted from here
        if not self._hand_over(conn, self._handshake(key, conn, extra)):
            conn.close()  # no worker left
            self._pending.pop(key, None)

    def _hand_over(self, conn: socket.socket, handshake: Callable[[_Worker], Any]) -> bool:
        """Give the connection to the next worker whose loop runs; a worker whose loop ended
        (a bug: it is not stopped before the listener) is said once and passed over."""
        for _ in range(len(self.workers)):
            worker = next(self._next)
            try:
                worker.loop.call_soon_threadsafe(worker.take, conn, handshake)
                return True
            except RuntimeError:  # its loop is closed
                if self._closed:
                    return False
                log.error("tls.worker_gone name=%s", worker.thread.name)
                self.workers.remove(worker)
                self._next = itertools.cycle(self.workers)
                if not self.workers:
                    return False
        return False

    def _failed(self, key: int) -> None:
        # the protocol goes unconnected: the guard gives its place back when it is collected
        self._pending.pop(key, None)

    def _attach(self, key: int, end: socket.socket, extra: dict[str, Any], pair: _Pair) -> None:
        protocol = self._pending.pop(key, None)
        if protocol is None or self._closed:
            pair.aborted = True
            end.close()  # the worker sees the end of file and aborts the client's side
            return
        task = self.loop.create_task(
            self.loop.connect_accepted_socket(lambda: _Plain(protocol, extra, pair), end)
        )
        self._tasks.add(task)
        task.add_done_callback(self._attached)

    def _attached(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("tls.attach_failed error=%s", task.exception())

    # --- the worker's side -------------------------------------------------------------------
    def _handshake(
        self, key: int, conn: socket.socket, extra: dict[str, Any]
    ) -> Callable[[_Worker], Any]:
        context = self.context()
        extra = {**extra, "sslcontext": context}

        async def run(worker: _Worker) -> None:
            loop = worker.loop
            pair = _Pair(worker.pairs, worker.watch, extra["peername"], self.loop)
            ends: tuple[socket.socket, socket.socket] | None = None
            shaken = False
            try:
                # the client's side first (its reading held until the pair is up): a handshake
                # in progress holds one descriptor, as without the relay
                await loop.connect_accepted_socket(
                    lambda: _TLSSide(pair),
                    conn,
                    ssl=context,
                    ssl_handshake_timeout=self.handshake_timeout,
                )
                shaken = True
                ends = socket.socketpair()  # EMFILE under a flood: this connection goes
                ends[1].setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, PAIR_SEND_BUFFER)
                await loop.connect_accepted_socket(lambda: _PlainSide(pair), ends[0])
                if pair.tls is None or pair.tls.is_closing():
                    raise ConnectionResetError("the client left")
                self.loop.call_soon_threadsafe(self._attach, key, ends[1], extra, pair)
            except (Exception, asyncio.CancelledError) as exc:
                if not shaken and not isinstance(exc, asyncio.CancelledError):
                    self.on_handshake_failed(extra["peername"], exc)
                else:
                    log.debug("tls.relay_failed remote=%s error=%r", extra["peername"], exc)
                pair.aborted = True
                pair.end(None)
                worker.pairs.discard(pair)
                worker.watch.discard(pair)
                for sock in (conn, *(ends or ())):
                    sock.close()
                with contextlib.suppress(RuntimeError):  # the event loop is gone
                    self.loop.call_soon_threadsafe(self._failed, key)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                return
            pair.tls.resume_reading()

        return run

    # --- stopping ----------------------------------------------------------------------------
    def close(self) -> None:
        """No new connections (the open ones go on until the event loop closes them)."""
        if self._closed:
            return
        self._closed = True
        self._acceptor.close()
        self._pending.clear()

    def stop(self, timeout: float = 5.0) -> None:
        """Abort what is still relayed and stop the threads (after :meth:`close`)."""
        self.close()
        for worker in self.workers:
            worker.stop(timeout)


def _same_kind(loop: asyncio.AbstractEventLoop) -> Callable[[], asyncio.AbstractEventLoop]:
    """Loops of the event loop's own kind (uvloop's, in the daemon)."""
    return type(loop)
