"""Administrative HTTP endpoints beside the OCI API: bundle upload (import over HTTP).

Everything here changes content, so the access-control middleware asks for a login first.
"""

from __future__ import annotations

import logging
from typing import Final

from aiohttp import web

from regproxy.bundle import BundleError, Importer
from regproxy.errors import OCIError
from regproxy.expect import defer_continue
from regproxy.request_limits import body_chunks
from regproxy.web_errors import error_response
from regproxy.web_keys import POLICY_KEY, REGISTRY_KEY, RESOLVER_KEY

log = logging.getLogger("regproxy.admin")
IMPORT_PATH: Final = "/admin/import"


class BundleInvalid(OCIError):
    code, http_status, message = "BUNDLE_INVALID", 400, "the bundle cannot be imported"


async def import_bundle(request: web.Request) -> web.Response:
    """POST a bundle (OCI archive, gzip/zstd, docker-save tar): streamed to disk, imported,
    answered with the import summary as JSON. ``?name=`` names images the bundle does not.
    Without room above ``storage.min_free`` for the body (its Content-Length, before a byte is
    read) or for a file of the bundle: 507 (:class:`~regproxy.space.NoRoom`, through the error
    middleware), nothing of the bundle committed."""
    importer = Importer(
        request.app[REGISTRY_KEY],
        request.app[RESOLVER_KEY],
        name=request.query.get("name"),
        policy=request.app[POLICY_KEY],
    )
    try:
        importer.check_name()  # before a byte of the body (and its 100 Continue)
        summary = await importer.import_stream(
            body_chunks(request), request.content_length, f"upload from {request.remote}"
        )
    except BundleError as exc:
        log.warning("import.refused remote=%s error=%s", request.remote, exc)
        return error_response(BundleInvalid(str(exc)))
    log.info("import.http remote=%s %s", request.remote, summary)
    return web.json_response(summary.to_json())


def add_routes(app: web.Application) -> None:
    app.router.add_post(IMPORT_PATH, import_bundle, expect_handler=defer_continue)
