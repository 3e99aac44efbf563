"""Log in and log out: the login form's double-submit token, the session cookie."""

from __future__ import annotations

import hmac
import logging
import secrets

from aiohttp import web

from regproxy import auth
from regproxy.errors import TooManyRequests
from regproxy.ui.base import (
    PREFIX,
    checked,
    form_of,
    refused,
    render,
    session_of,
    ui_of,
)
from regproxy.ui.sessions import LOGIN_COOKIE, SESSION_COOKIE, SESSION_SECONDS

log = logging.getLogger("regproxy.ui")


# --- login, logout --------------------------------------------------------------------------------
def _cookie(
    resp: web.StreamResponse, request: web.Request, name: str, value: str, max_age: int
) -> None:
    resp.set_cookie(
        name,
        value,
        max_age=max_age,
        path="/",
        httponly=True,
        samesite="Strict",
        secure=ui_of(request).config.tls.enabled,
    )


def _safe_next(target: str | None) -> str:
    if target and target.startswith(PREFIX + "/") and "//" not in target and "\\" not in target:
        return target
    return PREFIX + "/"


async def login_page(request: web.Request) -> web.Response:
    if session_of(request) is not None:
        raise web.HTTPSeeOther(_safe_next(request.query.get("next")))
    token = secrets.token_urlsafe(24)
    resp = render(
        request,
        "login.html",
        login_token=token,
        next=_safe_next(request.query.get("next")),
        error=None,
        users=request.app[auth.USERS_KEY].enabled,
    )
    _cookie(resp, request, LOGIN_COOKIE, token, 3600)
    return resp


async def login_post(request: web.Request) -> web.StreamResponse:
    form = await form_of(request)
    token = str(form.get("login_token", ""))
    cookie = request.cookies.get(LOGIN_COOKIE, "")
    if not token or not cookie or not hmac.compare_digest(token, cookie):
        return refused(request, "the login form expired; load it again")
    user = str(form.get("username", ""))[:256]
    password = str(form.get("password", ""))
    target = _safe_next(str(form.get("next", "")))
    error, status, headers = "Wrong user name or password.", 401, {}
    try:
        ok = bool(user) and await auth.check_login(
            request.app, user, password, remote=request.remote
        )
    except TooManyRequests as exc:  # this address's budget of refused logins is spent
        ok, status, headers = False, 429, auth.retry_after(exc)
        error = f"Too many failed logins from your address: try again in {headers['Retry-After']}s."
    if not ok:
        fresh = secrets.token_urlsafe(24)
        resp = render(
            request,
            "login.html",
            status=status,
            login_token=fresh,
            next=target,
            error=error,
            users=request.app[auth.USERS_KEY].enabled,
            username=user,
        )
        resp.headers.update(headers)
        _cookie(resp, request, LOGIN_COOKIE, fresh, 3600)
        return resp
    ui = ui_of(request)
    ui.sessions.drop(request.cookies.get(SESSION_COOKIE))
    sid, _ = ui.sessions.create(user)
    log.info("ui.login user=%r remote=%s", user, request.remote)
    resp = web.Response(status=303, headers={"Location": target})
    _cookie(resp, request, SESSION_COOKIE, sid, int(SESSION_SECONDS))
    resp.del_cookie(LOGIN_COOKIE, path="/")
    return resp


async def logout_page(request: web.Request) -> web.Response:
    """GET /ui/logout (a link followed, a URL typed): a page with the button that logs out."""
    return render(request, "logout.html")


async def logout(request: web.Request) -> web.StreamResponse:
    session = await checked(request, await form_of(request))
    ui = ui_of(request)
    ui.sessions.drop(request.cookies.get(SESSION_COOKIE))
    log.info("ui.logout user=%r remote=%s", session.user, request.remote)
    resp = web.Response(status=303, headers={"Location": f"{PREFIX}/login"})
    resp.del_cookie(SESSION_COOKIE, path="/")
    return resp
