"""OCI errors rendered once (``{"errors": [...]}``), and the middleware that renders them.

Every HTTP module answers a refusal through :func:`error_response`; an exception that is not an
:class:`~regproxy.errors.OCIError` becomes a 500 with a logged traceback, never a leaked aiohttp page.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Final

from aiohttp import web

from regproxy.errors import BodyTimeout, OCIError, RangeNotSatisfiable, StorageFull, Unsupported
from regproxy.headers import API_VERSION
from regproxy.web_keys import notes

log = logging.getLogger("regproxy.api")
#: the access-log status of a request whose client hung up before its answer (nginx's 499)
CLIENT_CLOSED: Final = 499


class InternalError(OCIError):
    code, http_status, message = "UNKNOWN", 500, "internal server error"


class NotFound(OCIError):
    code, http_status, message = "NOT_FOUND", 404, "no such endpoint"


def error_response(exc: OCIError, request: web.Request | None = None) -> web.Response:
    headers = dict(API_VERSION)
    if isinstance(exc, RangeNotSatisfiable):
        if exc.size is not None:
            headers["Content-Range"] = f"bytes */{exc.size}"
        else:
            headers["Range"] = f"0-{max(exc.offset - 1, 0)}"
    body = json.dumps({"errors": [exc.to_json()]}).encode()
    resp = web.Response(
        status=exc.http_status, body=body, content_type="application/json", headers=headers
    )
    if isinstance(exc, BodyTimeout):
        resp.force_close()  # the rest of a stalled body is not waited for
    elif isinstance(exc, StorageFull) and request is not None and _body_unread(request):
        # refused before (the rest of) its body was read: the client may still be sending it,
        # so the connection is not kept for another request (``Connection: close``); aiohttp
        # still reads and drops what comes for its lingering time, so the client reads this
        # answer before the connection closes, not a reset
        resp.force_close()
    return resp


def _body_unread(request: web.Request) -> bool:
    return request.body_exists and not request.content.is_eof()


@web.middleware
async def error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except OCIError as exc:
        notes(request)["error"] = exc.code
        if exc.http_status >= 500:
            log.warning("request.failed path=%s error=%s", request.path, exc)
        return error_response(exc, request)
    except web.HTTPException as exc:
        if exc.status == 404 and request.path.startswith("/v2"):
            return error_response(NotFound(request.path))
        if exc.status == 405 and request.path.startswith("/v2"):
            return error_response(Unsupported(f"{request.method} {request.path}"))
        raise
    except asyncio.CancelledError:
        raise
    except ConnectionError:
        if request.transport is not None and not request.transport.is_closing():
            raise
        # the client hung up (mid-body, or before its answer): its access line says so
        notes(request)["error"] = "client_gone"
        return web.Response(status=CLIENT_CLOSED)
    except Exception:
        log.exception("request.crashed method=%s path=%s", request.method, request.path)
        notes(request)["error"] = "internal"
        return error_response(InternalError("internal error; see the regproxy log"))
