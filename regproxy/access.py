"""The access log and the request metrics: one line per request, after its body was sent."""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from regproxy import metrics
from regproxy.web_keys import NOTES_KEY

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


class AccessLogger(AbstractAccessLogger):
    """One line per request, and the request metrics (after the body was sent).

    aiohttp calls it for every request: the metrics are always kept; the line is written when
    the ``regproxy.access`` logger is enabled for INFO (``log.access``). ``bytes=`` is the body
    (a 64 MiB blob logs 67108864); ``error=client_gone`` marks a client that hung up mid-answer,
    ``error=client_stalled`` one that took nothing for ``http.write_timeout``.
    """

    _children: dict[tuple[str, str, int], tuple[Any, Any]] = {}  # noqa: RUF012 - a cache

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        notes: dict[str, str] = request.get(NOTES_KEY) or {}
        route = notes.get("route") or ("base" if request.path.startswith("/v2") else "other")
        key = (route, request.method, response.status)
        children = self._children.get(key)
        if children is None:  # labels() is slow; a route/method/status set is small
            children = (
                metrics.REQUESTS.labels(route, request.method, str(response.status)),
                metrics.REQUEST_SECONDS.labels(route),
            )
            if len(self._children) < 4096:
                self._children[key] = children
        children[0].inc()
        children[1].observe(time)
        if not self.logger.isEnabledFor(logging.INFO):
            return
        self.logger.info(
            "request method=%s path=%s repo=%s status=%d bytes=%d duration_ms=%.1f cache=%s "
            "upstream=%s error=%s user=%s remote=%s peer=%s",
            request.method,
            request.path,
            notes.get("repo", "-"),
            response.status,
            body_bytes(request, response),
            time * 1000,
            notes.get("cache", "-"),
            notes.get("upstream", "-"),
            notes.get("error", "-"),
            notes.get("user", "-"),
            request.remote,
            notes.get("peer", "-"),
        )
