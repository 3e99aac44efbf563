"""The access log and the request metrics: one line per request, after its body was sent."""

from __future__ import annotations

import logging
import weakref
from collections.abc import Mapping
from typing import Any, Final

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from regproxy.connections import request_done
from regproxy.log import access_line
from regproxy.metrics import Metrics
from regproxy.web_keys import METRICS_KEY, NOTES_KEY

#: statuses whose responses carry no body (RFC 9110 6.4.1)
_NO_BODY = frozenset({204, 304})


def body_bytes(request: web.BaseRequest, response: web.StreamResponse) -> int:
    """The body bytes the response sent (not its headers).

    A response that sends its body around aiohttp's writer (sendfile) or may be cut short says
    how much it sent in the request's notes; a plain ``web.Response`` sent its whole body.
    """
    notes: dict[str, str] = request.get(NOTES_KEY) or {}
    sent = notes.get("body_bytes")
    if sent is not None:
        return int(sent)
    if request.method == "HEAD" or response.status in _NO_BODY or response.status < 200:
        return 0
    if isinstance(response, web.Response):
        body = response.body
        if isinstance(body, bytes | bytearray):
            return len(body)
    length = response.content_length
    if length is not None:
        return length
    return response.body_length  # a stream of unknown length: what went out, headers included


def _app_of(request: web.BaseRequest) -> web.Application | None:
    """The app that answered; None for a request aiohttp answered itself (one it could not
    parse has no route, and ``Request.app`` asserts that there is one)."""
    try:
        return request.app  # type: ignore[attr-defined,no-any-return]
    except (AttributeError, AssertionError):
        return None


class AccessLogger(AbstractAccessLogger):
    """One line per request, and the request metrics (after the body was sent).

    aiohttp calls it for every request: the metrics are always kept; the line is written when
    the ``regproxy.access`` logger is enabled for INFO (``log.access``). ``bytes=`` is the body
    (a 64 MiB blob logs 67108864); ``error=client_gone`` marks a client that hung up mid-answer,
    ``error=client_stalled`` one that took nothing for ``http.write_timeout``.
    """

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        request_done(request, response)  # the fast lane may take the connection's next ones
        notes: dict[str, str] = request.get(NOTES_KEY) or {}
        route = notes.get("route") or ("base" if request.path.startswith("/v2") else "other")
        app = _app_of(request)
        metrics = app.get(METRICS_KEY) if app is not None else None
        if metrics is not None:
            count_request(metrics, route, request.method, response.status, time)
        if not self.logger.isEnabledFor(logging.INFO):
            return
        written = write_line(
            self.logger,
            request.method,
            request.path,
            response.status,
            body_bytes(request, response),
            time,
            notes,
            request.remote,
        )
        if not written and metrics is not None:
            metrics.access_lines_dropped.inc()


#: each app's labelled children by (route, method, status): labels() is slow, the set small
_CHILDREN: weakref.WeakKeyDictionary[Metrics, dict[tuple[str, str, int], tuple[Any, Any]]] = (
    weakref.WeakKeyDictionary()
)


def count_request(metrics: Metrics, route: str, method: str, status: int, seconds: float) -> None:
    """A request answered: counted by route, method and status, and its time observed."""
    cached = _CHILDREN.get(metrics)
    if cached is None:
        cached = _CHILDREN.setdefault(metrics, {})
    key = (route, method, status)
    children = cached.get(key)
    if children is None:
        children = (
            metrics.requests.labels(route, method, str(status)),
            metrics.request_seconds.labels(route),
        )
        if len(cached) < 4096:
            cached[key] = children
    children[0].inc()
    children[1].observe(seconds)


#: the access line (README: "Access log"); its text and fields do not change
ACCESS_FORMAT: Final = (
    "request method=%s path=%s repo=%s status=%d bytes=%d duration_ms=%.1f cache=%s "
    "upstream=%s error=%s user=%s remote=%s peer=%s"
)


def write_line(
    logger: logging.Logger,
    method: str,
    path: str,
    status: int,
    sent: int,
    seconds: float,
    notes: Mapping[str, str],
    remote: str | None,
) -> bool:
    """The request's access line (the caller checked that ``logger`` is enabled for INFO);
    False when it was dropped because stderr is stalled (``regproxy.log.LineHandler``)."""
    args = (
        method,
        path,
        notes.get("repo", "-"),
        status,
        sent,
        seconds * 1000,
        notes.get("cache", "-"),
        notes.get("upstream", "-"),
        notes.get("error", "-"),
        notes.get("user", "-"),
        remote,
        notes.get("peer", "-"),
    )
    return access_line(logger, ACCESS_FORMAT, args)
