"""The ``http`` limits as handlers see them (HTTP layer): the app's keys for its ``http`` config
and its clocks, its metrics, and every read of a request body within ``http.read_timeout`` and
``http.body_min_rate`` (aiohttp has no deadline for request bodies).

Every read of a request body goes through :func:`read_body` or :func:`body_chunks` here; the
deadlines of responses are regproxy.sendfile's, a connection's (how many, how long one may take
to ask) regproxy.connections'.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Awaitable
from typing import Final, TypeVar

from aiohttp import web

from regproxy.config import HttpConfig
from regproxy.deadline import DEFAULT_TIMING, Pace, Timing, TransferLimits
from regproxy.errors import BodyTimeout
from regproxy.expect import send_continue
from regproxy.metrics import Metrics
from regproxy.web_keys import METRICS_KEY

T = TypeVar("T")
HTTP_KEY: Final = web.AppKey("http", HttpConfig)
#: where the app's clocks come from (a body's pace is judged on it; tests move a fake one)
TIMING_KEY: Final = web.AppKey("timing", Timing)
_DEFAULT: Final = HttpConfig()


def app_metrics(app: web.Application) -> Metrics:
    """The app's metrics (a fresh set for an app made without any, as some tests make)."""
    found = app.get(METRICS_KEY)
    if found is None:
        found = Metrics()
        app[METRICS_KEY] = found
    return found


def http_limits(app: web.Application) -> HttpConfig:
    """The ``http`` section of the config the app was made with (defaults without one)."""
    return app.get(HTTP_KEY) or _DEFAULT


async def read_body(request: web.Request, read: Awaitable[T]) -> T:
    """One read of the request's body (a chunk, a small form) within ``http.read_timeout``;
    a body that stalls is :class:`BodyTimeout` (408, and the connection is closed)."""
    timeout = http_limits(request.app).read_timeout
    await send_continue(request)
    try:
        async with asyncio.timeout(timeout):
            return await read
    except TimeoutError:
        app_metrics(request.app).slow_clients_cut.labels("read").inc()
        raise BodyTimeout(f"no body bytes for {timeout:.0f}s") from None


async def body_chunks(request: web.Request) -> AsyncIterator[bytes]:
    """The request body as it arrives, each chunk within ``http.read_timeout``, and all of it at
    ``http.body_min_rate`` or more averaged over ``http.body_min_rate_window``: a client that
    drips a byte now and then (which the timeout of each read alone would let hold an upload
    session and a connection for ever) is answered 408 once the window shows it."""
    limits = http_limits(request.app)
    pace = Pace(
        TransferLimits(limits.body_min_rate, limits.body_min_rate_window, math.inf),
        request.app.get(TIMING_KEY, DEFAULT_TIMING).now,
        math.inf,
    )
    content = request.content
    await send_continue(request)  # the client may send it now (Expect: 100-continue)
    while True:
        try:
            async with asyncio.timeout(min(limits.read_timeout, pace.time_left())):
                chunk = await content.readany()
        except TimeoutError:
            chunk = None
        if chunk == b"":
            return
        if chunk is not None:
            pace.add(len(chunk))
        short = pace.shortfall()
        if chunk is None or short is not None:
            app_metrics(request.app).slow_clients_cut.labels("read").inc()
            why = short or f"no body bytes for {limits.read_timeout:.0f}s"
            raise BodyTimeout(f"request body stalled: {why}")
        yield chunk
