"""Upstream auth in one place (STYLE rule 7): challenges, credentials and the token cache.

- ``WWW-Authenticate`` is RFC 7235: ``scheme param="value", param=token`` (quoted values may
  hold commas and backslash escapes), e.g. Docker Hub's
  ``Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="..."``.
- Token responses follow https://distribution.github.io/distribution/spec/auth/token/ :
  ``token`` or ``access_token``, ``expires_in`` (default 60 s), ``issued_at``.

Nothing here does I/O except :meth:`Credentials.from_config` reading an ``auth_file`` and the
fetch callable that :meth:`TokenCache.get` is given.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from regproxy.config import UpstreamConfig
from regproxy.errors import ConfigError

_TOKEN68_OR_SCHEME: Final = re.compile(r"\s*([!#$%&'*+.^_`|~0-9A-Za-z-]+)\s*")
_PARAM: Final = re.compile(
    r"""\s*([!#$%&'*+.^_`|~0-9A-Za-z-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^,\s]*)\s*,?""",
    re.DOTALL,
)
_ESCAPE: Final = re.compile(r"\\(.)", re.DOTALL)


def parse_www_authenticate(header: str) -> tuple[str, dict[str, str]]:
    """The first challenge of a ``WWW-Authenticate`` header: (lower-case scheme, params).

    Parameter names are lower-cased; values are unquoted. An empty or unparsable header
    gives ``("", {})``.
    """
    m = _TOKEN68_OR_SCHEME.match(header)
    if not m:
        return "", {}
    scheme = m.group(1).lower()
    params: dict[str, str] = {}
    pos = m.end()
    while pos < len(header):
        p = _PARAM.match(header, pos)
        if not p or p.end() == pos:
            break
        name, value = p.group(1).lower(), p.group(2)
        if value.startswith('"') and value.endswith('"') and len(value) >= 2:
            value = _ESCAPE.sub(r"\1", value[1:-1])
        params.setdefault(name, value)
        pos = p.end()
    return scheme, params


# --- credentials -------------------------------------------------------------------------------
_DOCKER_HUB: Final = frozenset(
    {"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}
)


def normalize_registry_host(key: str) -> str:
    """``https://index.docker.io/v1/`` -> ``docker.io``; ``https://host:5000/x`` -> ``host:5000``."""
    host = key.strip()
    if "://" in host:
        host = host.split("://", 1)[1]
    host = host.split("/", 1)[0].lower()
    return "docker.io" if host in _DOCKER_HUB else host


@dataclass(frozen=True, slots=True)
class Credentials:
    username: str
    password: str = field(repr=False)

    def basic(self) -> str:
        """The value of an ``Authorization`` header."""
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")

    @classmethod
    def from_config(cls, cfg: UpstreamConfig, host: str) -> Credentials | None:
        """``username``/``password`` of the entry, else the host's entry in its ``auth_file``."""
        if cfg.username and cfg.password:
            return cls(cfg.username, cfg.password)
        if cfg.auth_file:
            return cls.from_auth_file(cfg.auth_file, host, key=f"upstreams.{cfg.pattern}.auth_file")
        return None

    @classmethod
    def from_auth_file(cls, path: str, host: str, *, key: str = "auth_file") -> Credentials | None:
        """The entry for ``host`` in a Docker ``config.json`` (``{"auths": {...}}``), or None.

        An entry has ``auth`` (base64 of ``user:password``) or ``username`` and ``password``.
        A file that cannot be read or parsed raises :class:`ConfigError`; a host it does not
        list gives None.
        """
        try:
            with open(path, encoding="utf-8") as f:
                doc: Any = json.load(f)
        except OSError as exc:
            raise ConfigError(key, f"cannot read {path!r}: {exc.strerror or exc}") from None
        except ValueError:
            raise ConfigError(key, f"{path!r} is not valid JSON") from None
        auths = doc.get("auths") if isinstance(doc, dict) else None
        if not isinstance(auths, dict):
            raise ConfigError(key, f'{path!r} has no "auths" object (Docker config.json format)')
        want = normalize_registry_host(host)
        for name, entry in auths.items():
            if not isinstance(name, str) or normalize_registry_host(name) != want:
                continue
            if isinstance(entry, dict):
                return _entry_credentials(entry, key, name)
        return None


def _entry_credentials(entry: Mapping[str, Any], key: str, name: str) -> Credentials | None:
    auth = entry.get("auth")
    if isinstance(auth, str) and auth:
        try:
            decoded = base64.b64decode(auth, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise ConfigError(key, f"the auth of {name!r} is not base64 of user:password") from None
        user, sep, password = decoded.partition(":")
        if not sep or not user:
            raise ConfigError(key, f"the auth of {name!r} is not base64 of user:password")
        return Credentials(user, password)
    name_, secret = entry.get("username"), entry.get("password")
    if isinstance(name_, str) and name_ and isinstance(secret, str):
        return Credentials(name_, secret)
    return None


# --- tokens ------------------------------------------------------------------------------------
TokenKey = tuple[str, str, str]  # (realm, service, scope)
DEFAULT_EXPIRES_IN: Final = 60.0
DEFAULT_THRESHOLD: Final = 10.0
#: a token is fetched again after a day at the latest, whatever its ``expires_in`` says
MAX_EXPIRES_IN: Final = 86400.0
#: what a token may hold (RFC 6750's b64token and every JWT fit; no space, control or non-ASCII)
_HEADER_SAFE: Final = re.compile(r"[\x21-\x7e]+")
#: tokens kept per upstream base: scopes are per repository, and clients name repositories
MAX_TOKENS: Final = 1024


@dataclass(frozen=True, slots=True)
class Token:
    value: str = field(repr=False)
    expires_at: float  # on the cache's clock, threshold already taken off


class TokenCache:
    """Bearer tokens of one upstream client, keyed by (realm, service, scope).

    A token is used until ``issued + expires_in - threshold`` (issued = when it arrived, on the
    cache's clock, so a skewed upstream clock does not matter; the threshold is at most half the
    lifetime, so short-lived tokens are still used). However many requests need a token at once,
    one fetch runs per key: the others wait on its lock and find the token when they get it.
    At most ``max_tokens`` tokens are kept, least recently used first out.
    """

    def __init__(
        self,
        *,
        threshold: float = DEFAULT_THRESHOLD,
        clock: Callable[[], float] = time.monotonic,
        max_tokens: int = MAX_TOKENS,
    ) -> None:
        self._threshold = threshold
        self._clock = clock
        self._max = max_tokens
        self._tokens: OrderedDict[TokenKey, Token] = OrderedDict()
        self._locks: dict[TokenKey, asyncio.Lock] = {}
        #: token fetches done (tests and logs)
        self.fetches = 0

    def peek(self, key: TokenKey) -> str | None:
        """The cached token if it is still fresh."""
        tok = self._tokens.get(key)
        if tok is None or self._clock() >= tok.expires_at:
            return None
        self._tokens.move_to_end(key)
        return tok.value

    def __len__(self) -> int:
        return len(self._tokens)

    def invalidate(self, key: TokenKey, value: str | None = None) -> None:
        """Forget the token (only if it is still ``value``, so a fresh one survives a stale 401)."""
        tok = self._tokens.get(key)
        if tok is not None and (value is None or tok.value == value):
            del self._tokens[key]

    async def get(self, key: TokenKey, fetch: Callable[[], Awaitable[Mapping[str, Any]]]) -> str:
        """A fresh token for key; ``fetch`` returns the token endpoint's JSON and runs at most
        once at a time per key."""
        value = self.peek(key)
        if value is not None:
            return value
        lock = self._locks.setdefault(key, asyncio.Lock())
        try:
            async with lock:
                value = self.peek(key)  # someone else may have fetched it while we waited
                if value is not None:
                    return value
                doc = await fetch()
                self.fetches += 1
                tok = self._token_from(doc)
                self._tokens[key] = tok
                self._tokens.move_to_end(key)
                while len(self._tokens) > self._max:
                    self._tokens.popitem(last=False)
                return tok.value
        finally:
            if not lock.locked() and self._locks.get(key) is lock:
                del self._locks[key]  # nobody holds it: a later fetch makes a new one

    def _token_from(self, doc: Mapping[str, Any]) -> Token:
        value = doc.get("token") or doc.get("access_token")
        if not isinstance(value, str) or not value:
            raise ValueError("the token response has neither token nor access_token")
        if not _HEADER_SAFE.fullmatch(value):
            # it goes into an Authorization header: a CR, LF, NUL, space or non-ASCII byte
            # would be refused there (or split the header)
            raise ValueError("the token is not printable ASCII")
        expires_in = doc.get("expires_in")
        lifetime = (
            float(min(expires_in, MAX_EXPIRES_IN))  # min first: float(10**400) overflows
            if isinstance(expires_in, int | float)
            and not isinstance(expires_in, bool)
            and expires_in > 0
            else DEFAULT_EXPIRES_IN
        )
        margin = min(self._threshold, lifetime / 2)
        return Token(value, self._clock() + lifetime - margin)
