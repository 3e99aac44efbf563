"""The page's state and what every handler shares: rendering, JSON, paging, the guard for changes."""

from __future__ import annotations

import contextlib
import functools
import hmac
import importlib.resources
import logging
import time
from collections.abc import Mapping
from typing import Any, Final
from urllib.parse import quote

import jinja2
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from multidict import MultiDictProxy

from regproxy import auth
from regproxy.config import Config
from regproxy.errors import OCIError
from regproxy.health import Health
from regproxy.names import RepoName
from regproxy.prefetch import Prefetcher
from regproxy.registry import Registry
from regproxy.request_limits import read_body
from regproxy.ui.format import (
    ago,
    duration,
    iso,
    isoz,
    kind,
    plural,
    short_digest,
)
from regproxy.ui.history import History
from regproxy.ui.sessions import Session, Sessions
from regproxy.units import human_bytes
from regproxy.web_keys import REGISTRY_KEY, RESOLVER_KEY

log = logging.getLogger("regproxy.ui")


PREFIX: Final = "/ui"
PAGE_SIZE: Final = 50
MAX_PAGE_SIZE: Final = 500
CSP: Final = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


def make_env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("regproxy.ui", "templates"),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        bytes=human_bytes,
        ago=ago,
        iso=iso,
        isoz=isoz,
        short=short_digest,
        kind=kind,
        q=quote,
        plural=plural,
        duration=duration,
    )
    return env


def load_static() -> dict[str, tuple[bytes, str]]:
    types = {".css": "text/css", ".js": "text/javascript", ".svg": "image/svg+xml"}
    out = {}
    root = importlib.resources.files("regproxy.ui") / "static"
    for item in root.iterdir():
        suffix = "." + item.name.rsplit(".", 1)[-1]
        if item.is_file() and suffix in types:
            out[item.name] = (item.read_bytes(), types[suffix])
    return out


# --- state -------------------------------------------------------------------------------------------
class UI:
    def __init__(
        self,
        config: Config,
        health: Health,
        *,
        instance: str = "",
        prefetch: Prefetcher | None = None,
    ) -> None:
        self.config = config
        self.health = health
        self.instance = instance
        self.prefetch = prefetch
        self.started = time.time()
        self.sessions = Sessions()
        #: the app's metrics (the registry counts into them)
        self.metrics = health.registry.metrics
        self.history = History(self.metrics)
        self.env = make_env()
        self.static = load_static()


UI_KEY: Final = web.AppKey("ui", UI)


def ui_of(request: web.Request) -> UI:
    return request.app[UI_KEY]


def registry_of(request: web.Request) -> Registry:
    return request.app[REGISTRY_KEY]


def session_of(request: web.Request) -> Session | None:
    return ui_of(request).sessions.session_for(request)


def user_of(request: web.Request) -> str | None:
    return auth.USER.get()


def is_open_mode(request: web.Request) -> bool:
    return bool(request.get(auth.UI_OPEN_MODE))


def can_change(request: web.Request) -> bool:
    user = user_of(request)
    return (
        user is not None
        and session_of(request) is not None
        and auth.may_change_content(request.app, user)
    )


def secure_headers(resp: web.StreamResponse) -> web.StreamResponse:
    resp.headers["Content-Security-Policy"] = CSP
    resp.headers["X-Content-Type-Options"] = "nosniff"
    resp.headers["Referrer-Policy"] = "same-origin"
    resp.headers["X-Frame-Options"] = "DENY"
    resp.headers.setdefault("Cache-Control", "no-store")
    return resp


def render(request: web.Request, template: str, status: int = 200, **ctx: Any) -> web.Response:
    ui = ui_of(request)
    session = session_of(request)
    flash: list[str] = []
    if session is not None and session.flash:
        flash, session.flash = session.flash, []
    body = ui.env.get_template(template).render(
        user=user_of(request),
        csrf=session.csrf if session is not None else "",
        open_mode=is_open_mode(request),
        can_change=can_change(request),
        flash=flash,
        path=request.path,
        prefix=PREFIX,
        project=ui.config.project,
        **ctx,
    )
    resp = web.Response(text=body, status=status, content_type="text/html", charset="utf-8")
    secure_headers(resp)
    return resp


def json_response(data: Any, status: int = 200) -> web.Response:
    resp = web.json_response(data, status=status)
    secure_headers(resp)
    return resp


def page_args(request: web.Request) -> tuple[int, int]:
    try:
        page = max(1, int(request.query.get("page", "1")))
    except ValueError:
        page = 1
    try:
        per = int(request.query.get("per_page", str(PAGE_SIZE)))
    except ValueError:
        per = PAGE_SIZE
    return page, min(MAX_PAGE_SIZE, max(1, per))


def resolve(request: web.Request, name: str) -> RepoName:
    """A repository by any name the registry accepts, and by its upstream host with a port
    (``127.0.0.1:5000/team/web``, as the containerd mirror's ``?ns=`` names it)."""
    resolver = request.app[RESOLVER_KEY]
    try:
        return resolver.resolve(name)
    except OCIError:
        first, _, rest = name.partition("/")
        if ":" in first and rest:
            with contextlib.suppress(OCIError):
                return resolver.resolve(rest, first)
    raise Refused(f"no repository {name}", 404)


def repo_url(name: str) -> str:
    return f"{PREFIX}/repositories/{quote(name)}"


def manifest_url(name: str, digest: str) -> str:
    return f"{PREFIX}/manifests/{quote(name)}@{digest}"


# --- changes: a session, its CSRF token, a user who may change content --------------------------------
def refused(request: web.Request, why: str, status: int = 403) -> web.Response:
    if wants_json(request):
        return json_response({"error": why}, status=status)
    return render(request, "error.html", status=status, message=why, code=status)


def wants_json(request: web.Request) -> bool:
    return "application/json" in request.headers.get("Accept", "") or request.path.startswith(
        PREFIX + "/api/"
    )


class Refused(Exception):
    def __init__(self, why: str, status: int = 403) -> None:
        super().__init__(why)
        self.why, self.status = why, status


#: what aiohttp raises on a body it cannot read as a form: a bad part header, boundary, charset,
#: Content-Encoding or Content-Transfer-Encoding (a body too large is its own 413)
BAD_FORM: Final = (HttpProcessingError, ValueError, LookupError, RuntimeError, AssertionError)


#: the page's forms (login, logout, pin, unpin, delete) hold a few short fields: a bigger body
#: is refused unread (an anonymous login form could hold the app's client_max_size, 8 MiB, of
#: memory per connection); a browser always sends a form's Content-Length
MAX_FORM_BYTES: Final = 16 * 1024


async def form_of(request: web.Request) -> MultiDictProxy[Any]:
    """The request's form fields; a body that is not a form a browser would send is a 400,
    one larger than :data:`MAX_FORM_BYTES` (or of no declared length) a 413."""
    length = request.content_length
    if request.body_exists and (length is None or length > MAX_FORM_BYTES):
        raise web.HTTPRequestEntityTooLarge(max_size=MAX_FORM_BYTES, actual_size=length or 0)
    try:
        return await read_body(request, request.post())
    except BAD_FORM as exc:
        raise bad_form(request, exc) from None


def bad_form(request: web.Request, exc: Exception) -> Refused:
    log.info("ui.bad_form path=%s remote=%s error=%r", request.path, request.remote, exc)
    return Refused("the form could not be read: the request body is malformed", 400)


def _logged_in(request: web.Request) -> Session:
    if is_open_mode(request):
        raise Refused("no users are configured: the page is read-only (see README, web page)")
    session = session_of(request)
    if session is None:
        raise Refused("log in first", 401)
    return session


def _token_checked(request: web.Request, session: Session, token: str | None) -> None:
    if not token or not hmac.compare_digest(token, session.csrf):
        log.warning(
            "ui.csrf_refused user=%r remote=%s path=%s", session.user, request.remote, request.path
        )
        raise Refused("missing or wrong CSRF token; reload the page", 403)


async def checked(request: web.Request, form: Mapping[str, Any] | None = None) -> Session:
    """The request's session when its CSRF token matches (header or form field)."""
    session = _logged_in(request)
    token = request.headers.get("X-CSRF-Token")
    if token is None and form is not None:
        token = str(form.get("csrf", ""))
    _token_checked(request, session, token)
    return session


async def changer(request: web.Request, form: Mapping[str, Any] | None) -> Session:
    session = await checked(request, form)
    if not auth.may_change_content(request.app, session.user):
        raise Refused(f"{session.user!r} may not change content")
    return session


def may_change(request: web.Request) -> Session:
    """What the request's head shows, before a byte of its body is read: a session whose user
    may change content, and an ``X-CSRF-Token`` that matches if it has one (a token in the
    form is :func:`changer`'s to check, once the form is read)."""
    session = _logged_in(request)
    token = request.headers.get("X-CSRF-Token")
    if token is not None:
        _token_checked(request, session, token)
    if not auth.may_change_content(request.app, session.user):
        raise Refused(f"{session.user!r} may not change content")
    return session


def refusals(handler: Any) -> Any:
    """Answer a page's Refused (a wrapper per UI route, not a middleware every /v2 request
    would pay for)."""

    @functools.wraps(handler)
    async def guarded(request: web.Request) -> web.StreamResponse:
        try:
            resp: web.StreamResponse = await handler(request)
            return resp
        except Refused as exc:
            return refused(request, exc.why, exc.status)

    return guarded
