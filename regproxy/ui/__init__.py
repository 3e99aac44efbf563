"""The web page at ``/ui``: log in, see what this host holds, upload a bundle, pin and delete.

Server-side HTML (Jinja2 templates with autoescaping, in ``templates/``), a little CSS and
JavaScript (``static/``, served from memory); every page reads without JavaScript. Everything
ships in the package: no CDN, nothing built at install.

What the page reads: the metadata index (``queries``, on the index thread, paginated), the
metrics, the config and the upstream state of ``health``; a manifest's own bytes by digest for
its platforms and layers. It never lists or scans the blob tree.

Sessions: the login form checks the same users as the registry (:func:`auth.check_login`: wrong
logins are slowed, counted and logged without the password). A session is a random id in a
cookie (``HttpOnly``, ``SameSite=Strict``, ``Path=/``, ``Secure`` under TLS) that maps to a
server-side record with an absolute expiry (:data:`SESSION_SECONDS`); logout drops it. Every
POST carries the session's CSRF token (a hidden field, or ``X-CSRF-Token``); the login form uses
a double-submit token of its own. Changes (upload, pin, unpin, delete) need a session of a user
who may change content; Basic credentials only read the JSON routes.

No users configured at all: the registry is open (auth.py warns at start-up). The page is then
open to read, with a banner saying so, and refuses every change: a page that changes content
without anyone logging in would be one more way in for a cross-site request, and an operator who
wants to change content from the browser should configure a user first.

Layout: ``base`` (state, rendering, the guard for changes), ``sessions``, ``history`` (the
counters over 24 hours), ``charts``, ``format``, ``queries`` (the index, on its thread),
``overview`` and ``views`` (pages and JSON), ``login``, ``actions`` (pin, unpin, delete, upload).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from aiohttp import web

from regproxy import auth
from regproxy.config import Config
from regproxy.expect import defer_continue
from regproxy.health import Health
from regproxy.prefetch import Prefetcher
from regproxy.ui import actions, login, manifest, overview, views
from regproxy.ui.base import PREFIX, UI, UI_KEY, refusals

__all__ = ["PREFIX", "setup"]


async def _history_ctx(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.create_task(app[UI_KEY].history.run(), name="ui-history")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def setup(
    app: web.Application,
    config: Config,
    health: Health,
    *,
    instance: str = "",
    prefetch: Prefetcher | None = None,
) -> None:
    """The page's state, its routes, and its sessions for auth's middleware."""
    ui = UI(config, health, instance=instance, prefetch=prefetch)
    app[UI_KEY] = ui
    app[auth.UI_SESSIONS_KEY] = ui.sessions
    app.cleanup_ctx.append(_history_ctx)
    r = app.router
    r.add_get(PREFIX, refusals(views.to_overview))
    r.add_get(PREFIX + "/", refusals(overview.overview))
    r.add_get(PREFIX + "/login", refusals(login.login_page))
    r.add_post(PREFIX + "/login", refusals(login.login_post))
    r.add_post(PREFIX + "/logout", refusals(login.logout))
    r.add_get(PREFIX + "/projects", refusals(views.projects_page))
    r.add_get(PREFIX + "/repositories", refusals(views.repositories_page))
    r.add_get(PREFIX + "/repositories/{name:.+}", refusals(views.repository_page))
    r.add_get(PREFIX + "/manifests/{ref:.+}", refusals(manifest.manifest_page))
    r.add_get(PREFIX + "/evict", refusals(views.eviction_page))
    r.add_get(PREFIX + "/logout", refusals(login.logout_page))
    r.add_get(PREFIX + "/upload", refusals(actions.upload_page))
    # its 100 Continue waits for the checks of the request's head (regproxy.expect)
    r.add_post(PREFIX + "/upload", refusals(actions.upload_post), expect_handler=defer_continue)
    r.add_post(PREFIX + "/{action:pin|unpin|delete}", refusals(actions.change))
    r.add_get(PREFIX + "/static/{file}", refusals(views.static))
    r.add_get(PREFIX + "/api/overview", refusals(overview.api_overview))
    r.add_get(PREFIX + "/api/projects", refusals(views.api_projects))
    r.add_get(PREFIX + "/api/repositories", refusals(views.api_repositories))
    r.add_get(PREFIX + "/api/repositories/{name:.+}/tags", refusals(views.api_tags))
    r.add_get(PREFIX + "/api/manifests/{ref:.+}", refusals(manifest.api_manifest))
    r.add_get(PREFIX + "/api/evict", refusals(views.api_eviction))
    r.add_get(PREFIX + "/{rest:.*}", refusals(views.not_found))  # last: what no route above is
