"""Server-side sessions of the web page: a random id in a cookie, an absolute expiry, a bound."""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from aiohttp import web

SESSION_COOKIE: Final = "regproxy_session"
LOGIN_COOKIE: Final = "regproxy_login"
SESSION_SECONDS: Final = 12 * 3600.0
MAX_SESSIONS: Final = 10_000


@dataclass(slots=True)
class Session:
    user: str
    csrf: str
    expires: float
    flash: list[str] = field(default_factory=list)


class Sessions:
    """Server-side sessions by random id; bounded (the oldest go first), absolute expiry."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._by_id: OrderedDict[str, Session] = OrderedDict()

    def create(self, user: str) -> tuple[str, Session]:
        sid = secrets.token_urlsafe(32)
        session = Session(user, secrets.token_urlsafe(32), self._clock() + SESSION_SECONDS)
        self._by_id[sid] = session
        while len(self._by_id) > MAX_SESSIONS:
            self._by_id.popitem(last=False)
        return sid, session

    def get(self, sid: str | None) -> Session | None:
        if not sid:
            return None
        session = self._by_id.get(sid)
        if session is None:
            return None
        if self._clock() >= session.expires:
            del self._by_id[sid]
            return None
        return session

    def drop(self, sid: str | None) -> None:
        if sid:
            self._by_id.pop(sid, None)

    def session_for(self, request: web.Request) -> Session | None:
        return self.get(request.cookies.get(SESSION_COOKIE))

    def user_for(self, request: web.Request) -> str | None:
        """For auth's middleware (:class:`auth.SessionSource`)."""
        session = self.session_for(request)
        return session.user if session is not None else None
