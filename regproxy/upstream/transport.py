"""How one upstream's requests are sent: the only user of ``aiohttp.ClientSession``.

Every request goes through :meth:`Transport.send`, which takes one of the upstream's connection
slots (a fair queue beyond ``max_connections``, regproxy.upstream.slots), adds auth, retries a 401
once after answering its challenge (STYLE rule 7), and follows redirects by hand, each hop
through the address guard (regproxy.upstream.guard), dropping ``Authorization`` when the origin
changes (a blob 307 to a CDN must not carry the registry's token).

Time limits: the TCP/TLS connect gets ``connect_timeout`` (waiting for a slot is not part of
it); the response headers must arrive within ``connect_timeout + read_timeout``; a body keeps
``min_rate`` over ``min_rate_window`` and ends within ``max_transfer_time`` (regproxy.deadline).
:meth:`Transport.io_errors` is the one place where aiohttp exceptions become
:class:`UpstreamError` / :class:`UpstreamTimeout`, :meth:`Transport.status_error` the one place
where upstream statuses do.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import email.utils
import logging
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any, Final

import aiohttp
from aiohttp import hdrs
from yarl import URL

from regproxy import __version__
from regproxy.config import UpstreamConfig
from regproxy.deadline import DEFAULT_TIMING, Pace, Timing, TransferLimits
from regproxy.errors import UpstreamError, UpstreamTimeout, UpstreamTooSlow
from regproxy.log import mask_credentials
from regproxy.metrics import SourceMeters
from regproxy.oci import JSONInvalid, load_json
from regproxy.upstream.answers import header_number
from regproxy.upstream.auth import Credentials, TokenCache, TokenKey, parse_www_authenticate
from regproxy.upstream.guard import AddressGuard, AddressRefused, GuardedResolver
from regproxy.upstream.slots import Slot, Slots

log = logging.getLogger("regproxy.upstream")

#: socket read buffer: a small one makes aiohttp pause the upstream socket while we write
READ_BUFSIZE: Final = 4 * 1024 * 1024
MAX_REDIRECTS: Final = 5
MAX_TOKEN_BYTES: Final = 1024 * 1024
USER_AGENT: Final = f"regproxy/{__version__}"
_REDIRECTS: Final = frozenset({301, 302, 303, 307, 308})
#: the longest a Retry-After holds an upstream
MAX_HOLD: Final = 3600.0


class Base:
    """One base URL (mirror or upstream) and what we learnt of its auth."""

    __slots__ = (
        "basic",
        "bearer",
        "creds",
        "held_until",
        "is_mirror",
        "label",
        "ratelimit",
        "source",
        "tokens",
        "url",
    )

    def __init__(
        self,
        url: str,
        creds: Credentials | None,
        *,
        is_mirror: bool,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        u = URL(url.rstrip("/"))
        if u.user is not None:  # https://user:pass@mirror: credentials of that mirror
            creds = Credentials(u.user, u.password or "")
            u = u.with_user(None)
        self.url = u
        self.source = mask_credentials(str(u))
        self.label = (u.host_port_subcomponent or str(u)) if is_mirror else ""
        self.creds = creds
        self.is_mirror = is_mirror
        self.bearer: tuple[str, str] | None = None  # (realm, service) once challenged
        self.basic = False  # a Basic challenge was seen
        self.tokens = TokenCache(clock=clock)  # token lifetimes on the timing's clock
        #: no request before this (the clock of the transport's timing): a 429/503 Retry-After
        self.held_until = 0.0
        #: (remaining, limit) from the last answer with Docker Hub's rate-limit headers
        self.ratelimit: tuple[int, int | None] | None = None


class Held:
    """A response and the connection slot it holds until released or closed."""

    __slots__ = ("response", "slot")

    def __init__(self, response: aiohttp.ClientResponse, slot: Slot) -> None:
        self.response = response
        self.slot = slot

    def release(self) -> None:
        """Done with it: a body read to the end lets the connection be reused."""
        try:
            self.response.release()
        finally:
            self.slot.release()

    def close(self) -> None:
        """Abandoned half-way: the connection must not go back to the pool."""
        try:
            self.response.close()
        finally:
            self.slot.release()


def _ssl_context(config: UpstreamConfig) -> ssl.SSLContext | bool:
    if not config.tls_verify:
        return False
    if config.ca_file:
        return ssl.create_default_context(cafile=config.ca_file)
    return True


def _scope(repo: str) -> str:
    return f"repository:{repo}:pull"


def retry_after(value: str | None) -> float | None:
    """Seconds a ``Retry-After`` asks for: delta-seconds or an HTTP-date (RFC 9110 10.2.3)."""
    if not value:
        return None
    value = value.strip()
    seconds = header_number(value)
    if seconds is not None:
        return float(seconds)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return (when - datetime.datetime.now(datetime.UTC)).total_seconds()


def _leading_int(value: str | None) -> int | None:
    """``76;w=21600`` -> 76."""
    return header_number((value or "").split(";", 1)[0])


def _refusal_of(exc: BaseException) -> AddressRefused | None:
    """The guard's refusal behind an aiohttp connect error (our resolver raised it)."""
    seen: BaseException | None = exc
    for _ in range(4):
        if seen is None:
            return None
        if isinstance(seen, AddressRefused):
            return seen
        seen = getattr(seen, "os_error", None) or seen.__cause__
    return None


class Transport:
    """Sends one upstream's requests (to any of its bases); see the module docstring."""

    def __init__(
        self,
        name: str,
        config: UpstreamConfig,
        guard: AddressGuard,
        session: aiohttp.ClientSession | None,
        *,
        extra_headers: Mapping[str, str] | None = None,
        timing: Timing = DEFAULT_TIMING,
        meters: SourceMeters,
    ) -> None:
        self.name = name
        self.config = config
        self.guard = guard
        self.timing = timing
        #: where requests are counted: a peer's traffic is never counted as an upstream's
        self.meters = meters
        self.extra_headers = dict(extra_headers or {})
        self.slots = Slots(
            config.max_connections,
            name,
            rate=config.max_requests_per_second,
            timing=timing,
            meters=meters,
        )
        self.limits = TransferLimits(
            config.min_rate, config.min_rate_window, config.max_transfer_time
        )
        self._timeout = aiohttp.ClientTimeout(
            total=None,
            connect=None,  # no limit on waiting for a pooled connection: slots queue requests
            sock_connect=config.connect_timeout,
            sock_read=config.read_timeout,
        )
        #: from sending a request to having its response headers
        self._headers_within = config.connect_timeout + config.read_timeout
        self._own_session = session is None
        #: made on first use, inside the running loop
        self._session: aiohttp.ClientSession | None = session

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                ssl=_ssl_context(self.config),
                limit=0,
                limit_per_host=0,  # the slots limit requests, and queue them fairly
                resolver=GuardedResolver(self.guard),
                ttl_dns_cache=60,
            )
            self._session = aiohttp.ClientSession(
                read_bufsize=READ_BUFSIZE,
                connector=connector,
                timeout=self._timeout,
                auto_decompress=False,  # blob bytes must be exactly what was hashed upstream
                cookie_jar=aiohttp.DummyCookieJar(),
                trust_env=False,
                headers={hdrs.USER_AGENT: USER_AGENT, hdrs.ACCEPT_ENCODING: "identity"},
            )
        return self._session

    async def close(self) -> None:
        if self._own_session and self._session is not None and not self._session.closed:
            await self._session.close()

    # --- a request: slot, auth, redirects ------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def exchange(
        self, base: Base, method: str, url: URL, repo: str, headers: Mapping[str, str]
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """A request whose response is done with when the block ends."""
        held = await self.send(base, method, url, repo, headers)
        try:
            yield held.response
        finally:
            held.release()

    async def send(
        self, base: Base, method: str, url: URL, repo: str, headers: Mapping[str, str]
    ) -> Held:
        """Send in one of the upstream's slots; the caller releases (or closes) what it gets.

        While the base is held by a Retry-After, nothing is sent: an UpstreamError (kind
        ``held``) at once."""
        wait = base.held_until - self.timing.now()
        if wait > 0:
            raise self.fail(
                base,
                UpstreamError(
                    base.label, f"asked to wait {wait:.0f}s more (Retry-After)", kind="held"
                ),
            )
        slot = await self.slots.acquire()
        try:
            return Held(await self._send(base, method, url, repo, headers), slot)
        except BaseException:
            slot.release()
            raise

    async def _send(
        self, base: Base, method: str, url: URL, repo: str, headers: Mapping[str, str]
    ) -> aiohttp.ClientResponse:
        """Send with auth; answer one 401 challenge and retry once; follow redirects by hand."""
        auth = await self._auth_header(base, repo)
        challenged = False
        target = url
        for _ in range(MAX_REDIRECTS + 1):
            same_origin = target.origin() == base.url.origin()
            h = dict(headers)
            if auth is not None and same_origin:
                h[hdrs.AUTHORIZATION] = auth
            resp = await self._raw(base, method, target, h)
            if resp.status == 401 and same_origin and not challenged:
                challenged = True
                challenge = resp.headers.get(hdrs.WWW_AUTHENTICATE, "")
                resp.release()
                new = await self._answer_challenge(base, repo, challenge, auth)
                if new is None:
                    raise self.fail(
                        base,
                        UpstreamError(
                            base.label,
                            f"{method} {target.path}: 401 and no way to authenticate",
                            kind="auth",
                        ),
                    )
                auth = new
                continue
            location = resp.headers.get(hdrs.LOCATION)
            if resp.status in _REDIRECTS and location:
                resp.close()  # a redirect's body is not ours to read
                target = self._redirect_target(base, resp.url, location)
                if resp.status == 303 and method != "HEAD":
                    method = "GET"
                continue
            return resp
        raise self.fail(
            base,
            UpstreamError(base.label, f"{method} {url.path}: more than {MAX_REDIRECTS} redirects"),
        )

    def _redirect_target(self, base: Base, current: URL, location: str) -> URL:
        """Where a ``Location`` leads: an absolute URL, or the upstream's error (a host that no
        IDNA encodes, a port out of range, ``javascript:``...), never a ValueError."""
        try:
            target = current.join(URL(location))
            target.origin()  # ValueError unless absolute
            _ = target.host  # UnicodeError if its IDNA does not decode (xn--)
        except ValueError as exc:  # UnicodeError (IDNA) is one too
            raise self.fail(
                base,
                UpstreamError(
                    base.label, f"redirect to an unusable Location {location[:200]!r}: {exc}"
                ),
            ) from None
        return target

    async def _raw(
        self, base: Base, method: str, url: URL, headers: Mapping[str, str]
    ) -> aiohttp.ClientResponse:
        await self._check_target(base, url)
        started = self.timing.now()
        with self.io_errors(base, f"{method} {url.path}"):
            async with asyncio.timeout(self._headers_within):
                resp = await self._get_session().request(
                    method,
                    url,
                    headers={
                        hdrs.USER_AGENT: USER_AGENT,
                        hdrs.ACCEPT_ENCODING: "identity",
                        **self.extra_headers,
                        **headers,
                    },
                    allow_redirects=False,
                    timeout=self._timeout,
                )
        elapsed = self.timing.now() - started
        self.meters.answered(base.label, elapsed)
        self._note_limits(base, resp)
        log.debug(
            "%s.request host=%s source=%s method=%s path=%s status=%d ms=%.1f",
            self.meters.kind,
            self.name,
            mask_credentials(f"{url.scheme}://{url.host_port_subcomponent}"),
            method,
            url.path,
            resp.status,
            elapsed * 1000,
        )
        return resp

    async def _check_target(self, base: Base, url: URL) -> None:
        """The address guard for one hop, before it is sent.

        IP literals and schemes are checked here; names by our session's resolver on every
        connect, or here with a lookup of our own when the session was given to us (weaker:
        the name could resolve differently later; only peers share a session).
        """
        reason = self.guard.refusal(url)
        if reason is not None:
            raise self._denied(base, f"{url.scheme}://{url.host_port_subcomponent}", reason)
        host = url.host or ""
        port = url.port or 0
        if self._own_session or self.guard.trusted(host, port):
            return
        with self.io_errors(base, f"resolve {host}"):
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM
            )
            self.guard.vet_infos(host, port, (str(i[4][0]) for i in infos))

    def _note_limits(self, base: Base, resp: aiohttp.ClientResponse) -> None:
        """Retry-After on a 429/503 holds the base; Docker Hub's rate-limit headers are kept
        (``ratelimit-remaining: 76;w=21600``) and exported."""
        if resp.status in (429, 503):
            wait = retry_after(resp.headers.get(hdrs.RETRY_AFTER))
            if wait is not None and wait > 0:
                base.held_until = self.timing.now() + min(wait, MAX_HOLD)
                log.warning(
                    "upstream.retry_after host=%s source=%s status=%d seconds=%.0f",
                    self.name,
                    base.source,
                    resp.status,
                    min(wait, MAX_HOLD),
                )
        remaining = _leading_int(resp.headers.get("ratelimit-remaining"))
        if remaining is None:
            return
        limit = _leading_int(resp.headers.get("ratelimit-limit"))
        before = base.ratelimit[0] if base.ratelimit is not None else None
        base.ratelimit = (remaining, limit)
        if self.meters.ratelimit is not None:
            self.meters.ratelimit.labels(base.label).set(remaining)
        reserve = self.config.ratelimit_reserve
        if remaining < reserve and (before is None or before >= reserve):
            log.warning(
                "upstream.ratelimit_low host=%s source=%s remaining=%d limit=%s reserve=%d "
                "ratelimit_source=%s",
                self.name,
                base.source,
                remaining,
                limit,
                reserve,
                resp.headers.get("docker-ratelimit-source", ""),
            )

    def _denied(self, base: Base, target: str, detail: str) -> UpstreamError:
        """A hop the address guard refused: logged, counted (kind=denied), never sent."""
        log.warning(
            "upstream.refused host=%s source=%s target=%s reason=%s",
            self.name,
            base.source,
            mask_credentials(target),
            detail,
        )
        return self.fail(base, UpstreamError(base.label, f"refused: {detail}", kind="denied"))

    # --- errors ----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def io_errors(self, base: Base, what: str) -> Iterator[None]:
        """The one place aiohttp and timeout exceptions become Upstream errors."""
        try:
            yield
        except UpstreamError:
            raise
        except TimeoutError as exc:
            raise self.fail(base, UpstreamTimeout(base.label, f"{what}: timed out")) from exc
        except (aiohttp.ClientError, OSError, UnicodeError) as exc:
            # UnicodeError: a host name IDNA cannot encode (a label over 63 characters, an
            # empty xn--), raised by the resolver's getaddrinfo
            refused = _refusal_of(exc)
            if refused is not None:
                raise self._denied(base, what, str(refused)) from exc
            detail = mask_credentials(str(exc) or type(exc).__name__)
            raise self.fail(
                base, UpstreamError(base.label, f"{what}: {detail}", kind="connect")
            ) from exc

    def fail(self, base: Base, exc: UpstreamError) -> UpstreamError:
        self.meters.failed(base.label, exc.kind)
        log.info(
            "%s.error host=%s source=%s kind=%s detail=%s",
            self.meters.kind,
            self.name,
            base.source,
            exc.kind,
            exc.detail,
        )
        return exc

    def status_error(self, base: Base, resp: aiohttp.ClientResponse, what: str) -> UpstreamError:
        """The one place upstream statuses become errors."""
        status = resp.status
        if status in (401, 403):
            kind = "auth"
        elif status == 429:
            kind = "429"
        elif 400 <= status < 500:
            kind = "4xx"
        elif status >= 500:
            kind = "5xx"
        else:
            kind = "error"
        return self.fail(
            base, UpstreamError(base.label, f"{what} {resp.url.path}: HTTP {status}", kind=kind)
        )

    # --- bodies ----------------------------------------------------------------------------------------
    async def read_capped(
        self, base: Base, resp: aiohttp.ClientResponse, cap: int, what: str
    ) -> bytes:
        """The whole body, at most ``cap`` bytes, at the upstream's minimum rate."""
        if resp.content_length is not None and resp.content_length > cap:
            raise self.fail(base, UpstreamError(base.label, f"{what} larger than {cap} bytes"))
        pace = Pace(self.limits, self.timing.now, self.timing.now() + self.limits.max_time)
        body = bytearray()
        with self.io_errors(base, f"{what} body"):
            while True:
                watchdog = asyncio.timeout(pace.time_left())
                try:
                    async with watchdog:
                        chunk = await resp.content.readany()
                except TimeoutError:
                    if not watchdog.expired():
                        raise  # aiohttp's read timeout: io_errors makes it an UpstreamTimeout
                    stalled = pace.shortfall() or "no progress"
                    raise self.fail(
                        base, UpstreamTooSlow(base.label, f"{what} body: {stalled}")
                    ) from None
                if not chunk:
                    break
                body += chunk
                if len(body) > cap:
                    raise self.fail(
                        base, UpstreamError(base.label, f"{what} larger than {cap} bytes")
                    )
                pace.add(len(chunk))
                why = pace.shortfall()
                if why is not None:
                    raise self.fail(base, UpstreamTooSlow(base.label, f"{what} body: {why}"))
        return bytes(body)

    # --- auth --------------------------------------------------------------------------------------------
    async def _auth_header(self, base: Base, repo: str) -> str | None:
        """What we know this base wants, sent up front so a known challenge costs no 401."""
        if base.bearer is not None:
            realm, service = base.bearer
            return "Bearer " + await self._token(base, (realm, service, _scope(repo)))
        if base.basic and base.creds is not None:
            return base.creds.basic()
        return None

    async def _answer_challenge(
        self, base: Base, repo: str, header: str, used: str | None
    ) -> str | None:
        scheme, params = parse_www_authenticate(header)
        if scheme == "bearer" and params.get("realm"):
            base.bearer = (params["realm"], params.get("service", ""))
            key: TokenKey = (params["realm"], params.get("service", ""), _scope(repo))
            if used is not None and used.startswith("Bearer "):
                base.tokens.invalidate(key, used.removeprefix("Bearer "))
            return "Bearer " + await self._token(base, key)
        if scheme == "basic" and base.creds is not None:
            if used is not None and used.startswith("Basic "):
                return None  # these credentials were refused already
            base.basic = True
            return base.creds.basic()
        return None

    async def _token(self, base: Base, key: TokenKey) -> str:
        try:
            return await base.tokens.get(key, lambda: self._fetch_token(base, key))
        except ValueError as exc:
            raise self.fail(
                base, UpstreamError(base.label, f"token endpoint: {exc}", kind="auth")
            ) from None

    async def _fetch_token(self, base: Base, key: TokenKey) -> Mapping[str, Any]:
        realm, service, scope = key
        url = URL(realm)
        if url.scheme not in ("http", "https") or not url.host:
            raise self.fail(
                base, UpstreamError(base.label, "token realm is not an http(s) URL", kind="auth")
            )
        query: dict[str, str] = {"scope": scope}
        if service:
            query["service"] = service
        url = url.update_query(query)
        headers: dict[str, str] = {hdrs.ACCEPT: "application/json"}
        # credentials go to a realm over TLS, or to the registry's own host
        if base.creds is not None and (url.scheme == "https" or url.host == base.url.host):
            headers[hdrs.AUTHORIZATION] = base.creds.basic()
        resp = await self._raw(base, "GET", url, headers)
        try:
            if resp.status != 200:
                raise self.status_error(base, resp, "token")
            body = await self.read_capped(base, resp, MAX_TOKEN_BYTES, "token")
        finally:
            resp.release()
        try:
            doc = load_json(body)
        except JSONInvalid:
            doc = None
        if not isinstance(doc, dict):
            raise self.fail(
                base,
                UpstreamError(base.label, "token endpoint answered no JSON object", kind="auth"),
            )
        log.debug(
            "upstream.token host=%s realm=%s scope=%s", self.name, url.with_query(None), scope
        )
        return doc


__all__ = ["Base", "Held", "Transport"]
