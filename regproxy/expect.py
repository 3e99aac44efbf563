"""``Expect: 100-continue``: the ``100 Continue`` goes out only when the body will be taken.

A client that sends ``Expect: 100-continue`` (curl for a body over 1 MiB; Go's ``net/http``,
under containerd and skopeo, when the caller asks for it) waits for ``100 Continue`` before it
sends the body, so that a request refused from its head costs no upload. aiohttp's default
answers ``100`` as soon as the head is routed, before regproxy looked at anything: a push refused
for room (507), size (413), login (401/403), an unknown session (404) or a bad digest (400)
made the client send the whole body first. Here the routes that take bodies defer it
(:func:`defer_continue`, their ``expect_handler``); the body's first read sends it
(:func:`send_continue`, called by every body reader in :mod:`regproxy.request_limits`); and a
final answer given without it closes the connection (:func:`close_if_body_refused`, on
``on_response_prepare``), since the client never sends the body the request's length announced.

RFC 9110 section 10.1.1: a server that answers with a final status before reading the content
should say whether it closes the connection; a client that gets a final status stops sending.
"""

from __future__ import annotations

from typing import Final

from aiohttp import hdrs, web
from aiohttp.http import HttpVersion11

CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
#: True while the request waits for a ``100 Continue`` not yet sent
WAITING_KEY: Final = web.RequestKey("expect_waiting", bool)


async def defer_continue(request: web.Request) -> None:
    """A route's ``expect_handler``: an HTTP/1.1 ``100-continue`` is remembered, not answered
    (any other expectation is 417, as aiohttp's default)."""
    expect = request.headers.get(hdrs.EXPECT, "")
    if request.version != HttpVersion11:
        return
    if expect.lower() != "100-continue":
        raise web.HTTPExpectationFailed(text=f"Unknown Expect: {expect}")
    request[WAITING_KEY] = True


async def send_continue(request: web.BaseRequest) -> None:
    """Before the first read of a request's body: the ``100 Continue`` it waits for, once."""
    if request.get(WAITING_KEY):
        request[WAITING_KEY] = False
        await request.writer.write(CONTINUE)
        request.writer.output_size = 0  # the access log counts the answer's bytes only


async def close_if_body_refused(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """``on_response_prepare``: a final answer to a request still waiting for ``100`` (a body
    announced, not sent) closes the connection after it."""
    if request.get(WAITING_KEY) and request.body_exists:
        response.force_close()
        # the head is made before this hook runs: it says so itself
        response.headers[hdrs.CONNECTION] = "close"
