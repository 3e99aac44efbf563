"""regproxy in this process: ``create_app`` behind the daemon's own listener (127.0.0.1, port 0).

The listener is ``regproxy.app.open_listener``, as ``serve`` uses it: the connection guard and
the fast lane in front of aiohttp's protocol, so these tests go through the same paths.

:class:`AppDaemon` serves the app from a thread with an event loop of its own, so tests that talk
to a daemon as a client does (plain blocking HTTP, :func:`tests.peers.http`) run against it
unchanged, with no process started. It keeps the parts of :class:`tests.peers.Daemon` those
tests use: ``url``, ``hostport``, ``root``, ``start()``, ``stop()`` (a restart is a new app on the
same store) and ``log()`` (the lines this app's loop logged, formatted as the daemon writes them).

``timing`` is the app's clock (:class:`FakeTime` moves it instead of sleeping past a TTL).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer

from regproxy.access import AccessLogger
from regproxy.app import create_app, open_listener, stop_serving
from regproxy.config import config_from_dict
from regproxy.connections import server_logger
from regproxy.deadline import Timing
from regproxy.fd_limits import default_max_connections
from regproxy.tls import ServerTLS
from regproxy.web_keys import CONFIG_KEY

_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


class FakeTime:
    """A clock that moves only when told: ``timing`` for the app, ``advance(s)`` for the test.

    The wall clock starts at the real time (rows the index stamps itself stay comparable) and
    both clocks move together; ``sleep`` advances the clock instead of waiting."""

    def __init__(self) -> None:
        self.offset = 0.0
        self._mono0 = time.monotonic()

    def now(self) -> float:
        return self._mono0 + self.offset

    def wall(self) -> float:
        return time.time() + self.offset

    async def sleep(self, seconds: float) -> None:
        self.offset += max(seconds, 0.0)
        await asyncio.sleep(0)

    def advance(self, seconds: float) -> None:
        self.offset += seconds

    @property
    def timing(self) -> Timing:
        return Timing(now=self.now, sleep=self.sleep, random=lambda: 0.5, wall=self.wall)


class DaemonServer(TestServer):
    """aiohttp's ``TestServer`` serving as the daemon does. ``TestServer`` turns aiohttp's
    ``handler_cancellation`` on (a client that hangs up cancels its handler); the daemon's
    ``AppRunner`` leaves it off, so there a handler always runs to its end and writes its access
    line and metrics. With it on, about one cold pull in seven lost its access line here."""

    async def _make_runner(self, **kwargs: Any) -> web.AppRunner:
        kwargs["handler_cancellation"] = False
        return web.AppRunner(self.app, **kwargs)


class _ThreadLog(logging.Handler):
    """Keeps the lines logged from one thread (the app's loop)."""

    def __init__(self, thread: int) -> None:
        super().__init__(logging.DEBUG)
        self.thread = thread
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter(_FORMAT))

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.lines.append(self.format(record))


class AppDaemon:
    """regproxy's app served in-process on a loop thread; the interface tests use of a daemon."""

    proc = None  # no process: code that checks for one sees that

    def __init__(
        self, root: Path, config: dict[str, Any] | None = None, timing: Timing | None = None
    ) -> None:
        self.root = root
        self.config = dict(config or {})
        self.timing = timing
        self.port = 0
        self.app: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: tuple[web.AppRunner, asyncio.Server] | None = None
        self._log: _ThreadLog | None = None
        self._lines: list[str] = []
        self._levels: dict[str, int] = {}

    @property
    def url(self) -> str:
        return f"{'https' if self.config.get('tls') else 'http'}://127.0.0.1:{self.port}"

    @property
    def hostport(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _config(self) -> Any:
        raw = dict(self.config)
        if self.port:  # the app knows its own address (peers find themselves in their list)
            raw.setdefault("listen", f"127.0.0.1:{self.port}")
        raw.setdefault("storage", {})
        raw["storage"] = {"root": str(self.root / "store"), **raw["storage"]}
        raw.setdefault("shutdown_timeout", "5s")
        return config_from_dict(raw)

    def start(self) -> AppDaemon:
        config = self._config()
        ready: Future[int] = Future()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._run, args=(config, ready), name="regproxy-app", daemon=True
        )
        self._thread.start()
        self.port = ready.result(timeout=30)
        return self

    def _run(self, config: Any, ready: Future[int]) -> None:
        assert self._loop is not None
        loop = self._loop
        asyncio.set_event_loop(loop)
        self._log = _ThreadLog(threading.get_ident())
        for name in ("regproxy", "regproxy.access"):
            logger = logging.getLogger(name)
            self._levels[name] = logger.level
            logger.setLevel(logging.INFO)
        logging.getLogger("regproxy").addHandler(self._log)
        try:
            app = create_app(config, timing=self.timing) if self.timing else create_app(config)
            self.app = app
            # a port set before start (peers name each other's URLs up front), else port 0
            self._server = loop.run_until_complete(self._listen(app, config))
        except BaseException as exc:
            ready.set_exception(exc)
            self._finish()
            return
        ready.set_result(self._server[1].sockets[0].getsockname()[1])
        loop.run_forever()
        self._finish()

    async def _listen(self, app: Any, config: Any) -> tuple[web.AppRunner, Any]:
        runner = web.AppRunner(
            app,
            access_log_class=AccessLogger,
            access_log=logging.getLogger("regproxy.access"),
            shutdown_timeout=config.shutdown_timeout,
            keepalive_timeout=config.http.keepalive_timeout,
            logger=server_logger(),  # as serve: a request aiohttp cannot parse is one line
            handle_signals=False,
        )
        await runner.setup()
        try:
            limit = config.http.max_connections or default_max_connections(1024)
            tls = ServerTLS.from_config(config.tls)  # tls: {cert, key}: served over TLS
            listener = await open_listener(runner, config, "127.0.0.1", self.port, limit, tls)
        except BaseException:
            await runner.cleanup()
            raise
        return runner, listener

    @staticmethod
    async def _close(server: tuple[web.AppRunner, Any]) -> None:
        runner, listener = server
        await stop_serving(runner, listener, runner.app[CONFIG_KEY].shutdown_timeout)  # as serve

    def _finish(self) -> None:
        assert self._loop is not None
        if self._log is not None:
            logging.getLogger("regproxy").removeHandler(self._log)
            self._lines.extend(self._log.lines)
        for name, level in self._levels.items():
            logging.getLogger(name).setLevel(level)
        self._loop.close()

    def call(self, coro: Any, timeout: float = 30) -> Any:
        """Run a coroutine on the app's loop (to reach its registry) and return its result."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def stop(self) -> int:
        if self._loop is None or self._thread is None:
            return 0
        loop, server = self._loop, self._server
        if server is not None:
            asyncio.run_coroutine_threadsafe(self._close(server), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(30)
        self._loop = self._thread = self._server = None
        return 0

    def log(self) -> str:
        lines = list(self._lines)
        if self._log is not None and self._thread is not None:
            lines += self._log.lines
        return "\n".join(lines) + "\n"
