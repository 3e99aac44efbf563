"""Access control: who may read and who may change what this host holds.

Users come from an htpasswd file (bcrypt lines, as ``htpasswd -B`` writes them: ``$2y$...``) and
from ``auth.users`` in the config (hashes only). The file is read again when it changes (its
mtime, size or inode), so an operator adds a user without a restart.

The rules, for ``/v2``, ``/metrics``, ``/admin`` and ``/ui`` (everything else is open):

- **reads** (GET/HEAD of manifests, blobs, tags, referrers, the catalog, ``/metrics``) are open
  while ``auth.anonymous_pull`` is true (the default), and need a login when it is false;
- **``GET /v2/``** (the ping clients send before anything else) asks anyone without credentials to
  log in whenever users are configured: a client that has credentials only sends them after such
  a challenge (skopeo decides there, once, whether it will authenticate), and a client without
  any still pulls, because the content routes themselves stay open;
- **changes** (POST/PATCH/PUT/DELETE, upload sessions even by GET, everything under ``/admin``)
  need a login of a user allowed to change content (every configured user, for now:
  :func:`may_change_content`);
- **no users configured at all**: the registry is open as before, and start-up says so loudly.
  With ``anonymous_pull: false`` and no users, everything is refused (nobody can log in);
- **the web page** (``/ui``, except its login form and static files) needs a session made by
  its login form (:data:`UI_SESSIONS_KEY`, kept by ``regproxy.ui``); its JSON routes also take
  Basic credentials for a GET, for scripts. With no users configured at all it is open to read,
  marked :data:`UI_OPEN_MODE`, and changes nothing (the page says why);
- **peers** are not trusted by their ``Regproxy-Peer`` header: that header only makes a request
  local-only. A peer logs in like anybody else (``peers.username``/``password``, sent as Basic
  when challenged).

A wrong password is answered after :data:`FAILURE_DELAY` (an ``asyncio.sleep``: the loop goes on
serving), counted in ``regproxy_login_failures_total`` and logged with the user name and the
remote address, never the password. At most :data:`MAX_DELAYED` refusals wait out that delay at
once; beyond, a refusal is answered at once (the budget below still counts it), so the delay
cannot be used to pile up waiting requests. bcrypt is slow on purpose, so it runs on a small thread
pool of its own (guesses cannot starve the executor that the store uses), at most
:data:`MAX_CHECKS` distinct checks queued or running (beyond: ``429``), and a success is remembered
for :data:`CACHE_TTL` so a pulling containerd does not pay bcrypt per request. The cache holds no
password: its keys are HMAC-SHA256 digests under a key made at start-up, over the user, the
password tried and the stored hash (so a changed or removed user stops matching at once).

Each client address has a budget of refused logins (``auth.login_failures_per_minute``, see
:mod:`regproxy.login_budget`): once spent, every login from it (registry, web page, its JSON) is
``429 TOOMANYREQUESTS`` with ``Retry-After`` until the window frees a slot, even with the right
password, counted in ``regproxy_login_throttled_total``. A password longer than
:data:`MAX_PASSWORD_BYTES` bytes is refused, never truncated: bcrypt would read only its first 72
bytes, so any suffix would do.

:func:`check_login` is the one check; the web page calls it for its own login form.
"""

from __future__ import annotations

import asyncio
import binascii
import hashlib
import hmac
import logging
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from typing import Final, Protocol
from urllib.parse import urlencode

import bcrypt
from aiohttp import BasicAuth, hdrs, web

from regproxy.config import AuthConfig
from regproxy.deadline import DEFAULT_TIMING
from regproxy.errors import Denied, OCIError, TooManyRequests, Unauthorized
from regproxy.login_budget import LoginBudget, client_key
from regproxy.metrics import Metrics
from regproxy.request_limits import TIMING_KEY, app_metrics
from regproxy.web_errors import error_response
from regproxy.web_keys import notes

log = logging.getLogger("regproxy.auth")

#: how long a wrong password waits for its answer (blunts guessing; the loop is not blocked)
FAILURE_DELAY: Final = 1.0
#: how long a successful (user, password) is believed without running bcrypt again
CACHE_TTL: Final = 300.0
CACHE_SIZE: Final = 1024
#: the htpasswd file is stat()ed at most this often
RELOAD_CHECK_SECONDS: Final = 1.0
#: bcrypt reads the first 72 bytes of a password and ignores the rest: a longer one is refused
MAX_PASSWORD_BYTES: Final = 72
#: distinct password checks queued or running on the bcrypt threads, for all clients together
MAX_CHECKS: Final = 64
#: refusals waiting out FAILURE_DELAY at once; beyond, refusals are answered without the delay
MAX_DELAYED: Final = 256
BCRYPT_PREFIXES: Final = ("$2y$", "$2b$", "$2a$")
BCRYPT_THREADS: Final = 2
#: the paths this module guards; the rest (/, /healthz, the web page) decide for themselves
GUARDED: Final = ("/v2", "/metrics", "/admin")
_GUARDED_UNDER: Final = tuple(p + "/" for p in GUARDED)
#: administrative endpoints (bundle import, ...): a login of a user who may change content, always
ADMIN_PREFIX: Final = "/admin"
#: the web page (regproxy.ui): a session (or Basic, for its JSON reads); the login form and the
#: static files are open
UI_PREFIX: Final = "/ui"
UI_OPEN: Final = ("/ui/login", "/ui/static/")
UI_API_PREFIX: Final = "/ui/api/"
READ_METHODS: Final = frozenset({"GET", "HEAD"})
#: verified when the user is unknown, so an unknown name costs as much as a wrong password
_DUMMY_HASH: Final = bcrypt.hashpw(b"regproxy-no-such-user", bcrypt.gensalt(rounds=5))

FileSignature = tuple[int, int, int]  # st_mtime_ns, st_size, st_ino


def parse_htpasswd(text: str, source: str = "htpasswd") -> dict[str, bytes]:
    """``user:hash`` lines -> {user: bcrypt hash}; blank lines and ``#`` comments are skipped.

    Lines that are not bcrypt (``{SHA}``, ``$apr1$``, crypt) are skipped with a warning that
    names the user and the line but shows no hash.
    """
    users: dict[str, bytes] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        if not sep or not user:
            log.warning("auth.htpasswd_bad_line file=%s line=%d", source, lineno)
            continue
        if not hashed.startswith(BCRYPT_PREFIXES):
            log.warning(
                "auth.htpasswd_not_bcrypt file=%s line=%d user=%r (make it with htpasswd -B)",
                source,
                lineno,
                user,
            )
            continue
        if user in users:
            log.warning("auth.htpasswd_duplicate file=%s line=%d user=%r", source, lineno, user)
        users[user] = hashed.encode("ascii", "replace")
    return users


def verify_password(password: str, hashed: bytes) -> bool:
    """Blocking bcrypt check (``$2y$``, ``$2b$``, ``$2a$``); a malformed hash never matches, and
    neither does a password longer than bcrypt reads (:data:`MAX_PASSWORD_BYTES`)."""
    secret = password.encode("utf-8")
    if len(secret) > MAX_PASSWORD_BYTES:
        return False
    try:
        return bcrypt.checkpw(secret, hashed)
    except ValueError:
        return False


class UserDB:
    """The configured users, the htpasswd file's reloads, and the bcrypt checks with their cache."""

    def __init__(
        self,
        config: AuthConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        failure_delay: float = FAILURE_DELAY,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        metrics: Metrics | None = None,
    ) -> None:
        self.metrics = metrics if metrics is not None else Metrics()
        self.config = config
        self.failure_delay = failure_delay
        self._clock = clock
        self._sleep = sleep
        self._config_users = {u: h.encode("ascii", "replace") for u, h in config.users.items()}
        self._file_users: dict[str, bytes] = {}
        self._file_sig: FileSignature | None = None
        self._file_error: str | None = None
        self._next_check = 0.0
        self._users: dict[str, bytes] = dict(self._config_users)
        self._key = secrets.token_bytes(32)
        self._cache: OrderedDict[bytes, float] = OrderedDict()
        self._inflight: dict[bytes, asyncio.Future[bool]] = {}
        self._pool: ThreadPoolExecutor | None = None
        self.budget = LoginBudget(config.login_failures_per_minute, clock=clock)
        self._delayed = 0

    # --- who exists ------------------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        """Access control is on when any source of users is configured (even an empty file)."""
        return bool(self.config.htpasswd or self.config.users)

    @property
    def anonymous_read(self) -> bool:
        return self.config.anonymous_pull

    def users(self) -> Mapping[str, bytes]:
        return self._users

    def may_change_content(self, user: str) -> bool:
        """Push, delete, pin: every configured user, for now."""
        return user in self._users

    def reload_if_changed(self) -> bool:
        """Blocking: read the htpasswd file again if it changed; True when the users changed."""
        path = self.config.htpasswd
        if not path:
            return False
        try:
            st = os.stat(path)
            sig: FileSignature | None = (st.st_mtime_ns, st.st_size, st.st_ino)
            if sig == self._file_sig:
                return False
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError as exc:
            if self._file_error != exc.strerror:
                log.error("auth.htpasswd_unreadable file=%s error=%s", path, exc.strerror)
            self._file_error = exc.strerror
            sig, text = None, ""
            if self._file_sig is None and not self._file_users:
                return False
        else:
            self._file_error = None
        self._file_sig = sig
        self._file_users = parse_htpasswd(text, path)
        both = set(self._file_users) & set(self._config_users)
        if both:
            log.warning("auth.user_twice users=%s (the htpasswd file wins)", sorted(both))
        self._users = {**self._config_users, **self._file_users}
        self._cache.clear()
        log.info("auth.htpasswd_loaded file=%s users=%d", path, len(self._file_users))
        return True

    async def refresh(self) -> None:
        """Look at the htpasswd file again if it was not looked at lately (off the loop)."""
        if not self.config.htpasswd or self._clock() < self._next_check:
            return
        self._next_check = self._clock() + RELOAD_CHECK_SECONDS
        await asyncio.get_running_loop().run_in_executor(None, self.reload_if_changed)

    # --- passwords -------------------------------------------------------------------------------
    def _cache_key(self, user: str, password: str, hashed: bytes) -> bytes:
        msg = b"\0".join((user.encode("utf-8"), password.encode("utf-8"), hashed))
        return hmac.new(self._key, msg, hashlib.sha256).digest()

    def _cached(self, key: bytes) -> bool:
        expires = self._cache.get(key)
        if expires is None:
            return False
        if self._clock() >= expires:
            del self._cache[key]
            return False
        return True

    def _remember(self, key: bytes) -> None:
        self._cache[key] = self._clock() + CACHE_TTL
        self._cache.move_to_end(key)
        while len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)

    async def verify(self, user: str, password: str, *, client: str | None = None) -> bool:
        """True if the password is the user's; bcrypt runs off the loop, once per attempt at a
        time (concurrent requests with the same credentials share one check). With ``client``,
        a new check is admitted by that client's budget and its outcome counted there; raises
        :class:`TooManyRequests` when the budget or the bcrypt queue is full."""
        await self.refresh()
        known = self._users.get(user)
        hashed = known if known is not None else _DUMMY_HASH
        key = self._cache_key(user, password, hashed)
        if known is not None and self._cached(key):
            return True
        fut = self._inflight.get(key)
        if fut is None:
            fut = self._start_check(key, password, hashed, known is not None, client)
        ok = await asyncio.shield(fut) and known is not None
        if ok:
            self._remember(key)
        return ok

    def _start_check(
        self, key: bytes, password: str, hashed: bytes, known: bool, client: str | None
    ) -> asyncio.Future[bool]:
        if len(self._inflight) >= MAX_CHECKS:
            self.metrics.login_throttled.labels("busy").inc()
            raise TooManyRequests("too many logins are being checked", retry_after=1)
        if client is not None and (wait := self.budget.admit(client)) is not None:
            raise self._throttled(client, wait)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(BCRYPT_THREADS, thread_name_prefix="regproxy-bcrypt")
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self._pool, verify_password, password, hashed)
        self._inflight[key] = fut

        def done(f: asyncio.Future[bool]) -> None:
            self._inflight.pop(key, None)
            if client is not None:
                right = not f.cancelled() and f.exception() is None and f.result() and known
                self.budget.finish(client, failed=not right)

        fut.add_done_callback(done)
        return fut

    def _throttled(self, client: str, wait: int) -> TooManyRequests:
        self.metrics.login_throttled.labels("budget").inc()
        return TooManyRequests(
            f"too many failed logins from {client}: try again in {wait}s", retry_after=wait
        )

    async def login(self, user: str, password: str, *, remote: str | None, via: str) -> bool:
        """:meth:`verify` within the client's budget, and for a refusal: the count, the log
        line, the delay. Raises :class:`TooManyRequests` (with ``retry_after``) when the
        client's budget is spent, whatever the password."""
        client = client_key(remote)
        wait = self.budget.spent(client)
        if wait is not None:
            raise self._throttled(client, wait)
        too_long = len(password.encode("utf-8")) > MAX_PASSWORD_BYTES
        if too_long:
            self.budget.refused(client)
        elif await self.verify(user, password, client=client):
            return True
        self.metrics.login_failed()
        known = user in self._users
        reason = "unknown user" if not known else "wrong password"
        log.warning(
            "auth.login_failed user=%r remote=%s via=%s reason=%s",
            user,
            remote or "-",
            via,
            f"password longer than {MAX_PASSWORD_BYTES} bytes" if too_long else reason,
        )
        if self._delayed < MAX_DELAYED:
            self._delayed += 1
            try:
                await self._sleep(self.failure_delay)
            finally:
                self._delayed -= 1
        return False

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


USERS_KEY: Final = web.AppKey("users", UserDB)
#: the user a request logged in as, for its handler (each request runs in a task of its own)
USER: Final[ContextVar[str | None]] = ContextVar("regproxy_user", default=None)


def _logged_in(request: web.Request, user: str) -> None:
    """The request's user: for handlers (USER) and for its access-log line (notes)."""
    USER.set(user)
    notes(request)["user"] = user


# --- for the web page (and anything else that logs people in) ------------------------------------
async def check_login(
    app: web.Application, user: str, password: str, *, remote: str | None = None
) -> bool:
    """The one login check: True for a configured user's right password. A refusal is counted,
    logged without the password, and answered only after :data:`FAILURE_DELAY`. Raises
    :class:`~regproxy.errors.TooManyRequests` (``retry_after``) while the client's budget of
    refused logins is spent."""
    return await app[USERS_KEY].login(user, password, remote=remote, via="ui")


def may_change_content(app: web.Application, user: str) -> bool:
    """Whether a logged-in user may push, delete, pin or upload (every configured user, for now)."""
    return app[USERS_KEY].may_change_content(user)


class SessionSource(Protocol):
    """The web page's sessions (regproxy.ui), as this module sees them."""

    def user_for(self, request: web.Request) -> str | None:
        """The user of the request's valid session cookie, or None."""


UI_SESSIONS_KEY: Final[web.AppKey[SessionSource]] = web.AppKey("ui_sessions")
#: set on a /ui request when no user is configured (the registry is open): read-only page
UI_OPEN_MODE: Final = "regproxy_ui_open"


# --- the middleware ------------------------------------------------------------------------------
def _ui_needs(path: str) -> str | None:
    if path != UI_PREFIX and not path.startswith(UI_PREFIX + "/"):
        return None
    if path in UI_OPEN or any(path.startswith(p) for p in UI_OPEN if p.endswith("/")):
        return None
    return "ui"


async def _ui_guard(
    request: web.Request,
    db: UserDB,
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> web.StreamResponse:
    """/ui: a session; or Basic credentials for a GET of the JSON routes (scripts); or, with no
    users configured at all, the read-only open page. Pages send the browser to the login form,
    JSON routes answer 401 (without a Basic challenge: no browser password dialog)."""
    sessions = request.app.get(UI_SESSIONS_KEY)
    user = sessions.user_for(request) if sessions is not None else None
    api = request.path.startswith(UI_API_PREFIX)
    if user is None and api and request.method in READ_METHODS:
        creds = _credentials(request)
        if creds is not None:
            try:
                ok = await db.login(creds[0], creds[1], remote=request.remote, via="ui-api")
            except TooManyRequests as exc:
                return web.json_response(
                    {"error": str(exc.detail)}, status=429, headers=retry_after(exc)
                )
            if not ok:
                return web.json_response({"error": "wrong user name or password"}, status=401)
            user = creds[0]
    if user is not None:
        _logged_in(request, user)
        return await handler(request)
    await db.refresh()
    if not db.enabled and db.anonymous_read:
        request[UI_OPEN_MODE] = True  # the page says so, and refuses every change
        return await handler(request)
    if api or request.method not in READ_METHODS:
        return web.json_response({"error": "log in first"}, status=401)
    target = request.path_qs if request.path_qs.startswith(UI_PREFIX) else UI_PREFIX + "/"
    raise web.HTTPSeeOther(f"{UI_PREFIX}/login?{urlencode({'next': target})}")


def needs(path: str, method: str, db: UserDB) -> str | None:
    """None (open), "ping", "read", "write" or "ui" for a request under this module's guard
    (by its decoded path and method; regproxy.fastpath asks it too, before answering)."""
    if path == UI_PREFIX or path.startswith(UI_PREFIX + "/"):
        return _ui_needs(path)
    if not (path.startswith(_GUARDED_UNDER) or path in GUARDED):
        return None
    if not db.enabled and db.anonymous_read:
        return None  # no users at all: open, as before (start-up warned)
    if path.startswith(ADMIN_PREFIX + "/") or path == ADMIN_PREFIX:
        return "write"
    if method not in READ_METHODS or "/blobs/uploads/" in path:
        return "write"
    if path in ("/v2", "/v2/"):
        return "ping"
    return "read"


def _credentials(request: web.Request) -> tuple[str, str] | None:
    header = request.headers.get(hdrs.AUTHORIZATION)
    if not header:
        return None
    try:
        creds = BasicAuth.decode(header, encoding="utf-8")
    except (ValueError, binascii.Error, UnicodeDecodeError):
        return None  # not Basic, or garbled: treated as no credentials (and challenged)
    if not creds.login and not creds.password:
        return None  # some clients send an empty Basic pair when they have nothing
    return creds.login, creds.password


def retry_after(exc: TooManyRequests) -> dict[str, str]:
    """The ``Retry-After`` header of a refusal (RFC 9110 10.2.3: seconds)."""
    return {hdrs.RETRY_AFTER: str(exc.retry_after or 1)}


def challenge(request: web.Request, detail: str) -> web.Response:
    """401 with the OCI error body and the Basic challenge clients answer."""
    realm = request.app[USERS_KEY].config.realm.replace("\\", "\\\\").replace('"', '\\"')
    return _refuse(request, Unauthorized(detail), {hdrs.WWW_AUTHENTICATE: f'Basic realm="{realm}"'})


def _refuse(request: web.Request, exc: OCIError, headers: Mapping[str, str]) -> web.Response:
    notes(request)["error"] = exc.code
    resp = error_response(exc, request)
    resp.headers.update(headers)
    return resp


@web.middleware
async def auth_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    db = request.app[USERS_KEY]
    need = needs(request.path, request.method, db)
    if need is None:
        return await handler(request)
    if need == "ui":
        return await _ui_guard(request, db, handler)
    creds = _credentials(request)
    if creds is not None:
        user, password = creds
        try:
            ok = await db.login(user, password, remote=request.remote, via="registry")
        except TooManyRequests as exc:
            return _refuse(request, exc, retry_after(exc))
        if not ok:
            return challenge(request, "wrong user name or password")
        _logged_in(request, user)
        if need == "write" and not db.may_change_content(user):
            return _refuse(request, Denied(f"{user!r} may not change content"), {})
        return await handler(request)
    if need == "read" and db.anonymous_read:
        return await handler(request)
    if need == "ping" and db.anonymous_read and not db.enabled:
        return await handler(request)
    return challenge(request, "log in to " + ("change content" if need == "write" else "read"))


async def _users_ctx(app: web.Application) -> AsyncIterator[None]:
    db = app[USERS_KEY]
    await asyncio.get_running_loop().run_in_executor(None, db.reload_if_changed)
    if not db.enabled and db.anonymous_read:
        log.warning(
            "auth.open no users are configured (auth.htpasswd, auth.users): anyone who reaches "
            "this port may push, delete and import"
        )
    elif not db.users():
        log.error(
            "auth.no_users nobody can log in: %s",
            "every push and delete is refused"
            if db.anonymous_read
            else "every /v2 request is refused (auth.anonymous_pull is false)",
        )
    else:
        log.info(
            "auth.on users=%d anonymous_pull=%s realm=%s",
            len(db.users()),
            db.anonymous_read,
            db.config.realm,
        )
    yield
    db.close()


def setup(app: web.Application, config: AuthConfig) -> None:
    """Install the users and the middleware (before the app is frozen, after the error
    middleware, so a crash in here is still rendered as an OCI error)."""
    timing = app.get(TIMING_KEY, DEFAULT_TIMING)  # the refusal's delay and the budget's clock
    app[USERS_KEY] = UserDB(config, clock=timing.now, sleep=timing.sleep, metrics=app_metrics(app))
    app.middlewares.append(auth_middleware)
    app.cleanup_ctx.append(_users_ctx)


__all__: list[str] = [
    "UI_OPEN_MODE",
    "UI_SESSIONS_KEY",
    "USER",
    "USERS_KEY",
    "SessionSource",
    "UserDB",
    "auth_middleware",
    "check_login",
    "may_change_content",
    "needs",
    "parse_htpasswd",
    "retry_after",
    "setup",
    "verify_password",
]
