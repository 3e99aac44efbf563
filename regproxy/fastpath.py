"""Manifest and small blob GETs answered from memory, in front of aiohttp's parser
(``http.fast_path``).

A manifest GET or HEAD that the lookup cache answers costs aiohttp ~50 CPU-µs of framework
(request and response objects, a task, routing, middlewares, header encoding) around ~10 of
regproxy's own work. :class:`FastPath` answers such a request from the request head's bytes,
with the exact response the application would send, and declines everything else, which then
goes to aiohttp as before (:class:`regproxy.connections.ConnectionGuard` frames the requests
and hands on a connection's bytes from the first request declined).

It answers only when every step of the application's own path would be a plain success with
no I/O: a strict ``GET``/``HEAD`` head in HTTP/1.1 with none of the headers that change the
answer or the connection (credentials, a body, a ``Connection`` other than ``keep-alive`` or
``close``, ``Expect``, a peer's mark), a path of plain characters that routes to a manifest or
a blob, a name and reference that resolve, anonymous pulls allowed; for a manifest, held and
believed (a digest, a tag confirmed upstream within ``tag_ttl`` or without upstream, see
``ProxyRegistry.cached_manifest``), its body in memory, and the signature policy decided; for a
blob, a ``GET`` without ``Range`` or ``If-None-Match`` of a small blob (up to 64 KiB) this
repository holds, its bytes in memory, or a larger one whose file opens without waiting for
the disk (``cached_open``; a file gone since the lookup does not: aiohttp answers), streamed
over TLS on the event loop by regproxy.fastfile, over plain TCP with ``sendfile`` by
regproxy.fastsend (not over a TLS relay's socket pair). The lookup is counted,
the access recorded (eviction's "in use"), the bytes served counted, and the request counted
and logged as the access logger would (``regproxy.access``), a streamed body's when it ends.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from email.utils import formatdate
from typing import Final, NamedTuple

from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE
from aiohttp.http_parser import SINGLETON_HEADERS

from regproxy.access import count_request, write_line
from regproxy.api import check_reference, route
from regproxy.auth import USERS_KEY, UserDB, needs
from regproxy.cached_open import open_cached
from regproxy.errors import OCIError
from regproxy.fastfile import FileBody
from regproxy.fastsend import SendfileBody
from regproxy.headers import API_VERSION, CONTENT_DIGEST, INSTANCE_HEADER
from regproxy.metrics import Metrics
from regproxy.names import NameResolver, RepoName
from regproxy.oci import Digest
from regproxy.policy import Policy
from regproxy.proxy import ProxyRegistry
from regproxy.request_limits import http_limits
from regproxy.web_keys import INSTANCE_KEY, METRICS_KEY, POLICY_KEY, REGISTRY_KEY, RESOLVER_KEY

log = logging.getLogger("regproxy.api")
_METHODS: Final = frozenset({"GET", "HEAD"})
#: a path of plain characters only: no percent-encoding, query, fragment or backslash
_PATH_RE: Final = re.compile(r"/v2/[A-Za-z0-9._:/-]+\Z", re.ASCII)
_TOKEN_RE: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z", re.ASCII)
_VALUE_RE: Final = re.compile(r"[\x20-\x7e\t]*\Z", re.ASCII)
#: headers that change the answer, the connection or the body: such a request goes to aiohttp
_DECLINED: Final = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "content-length",
        "transfer-encoding",
        "expect",
        "keep-alive",
        # llhttp reads it as Connection (close, upgrade)
        "proxy-connection",
        "upgrade",
        "te",
        "trailer",
        "regproxy-peer",
        INSTANCE_HEADER.lower(),
        # aiohttp refuses the old WebSocket handshake's key (400)
        "sec-websocket-key1",
    }
)
MAX_HEADERS: Final = 64
#: a longer head goes to aiohttp, which refuses a line (name and value) over 8190 bytes:
#: within this, no line can be
MAX_HEAD: Final = 8190
#: request paths remembered parsed into (route, repository, reference), or None for a path the
#: fast path declines (~300 bytes each, ~7.5 MB when full; a path parsed again costs ~16 µs, a
#: third of a whole answer): more than a busy host asks for (10,000 manifests, by digest and by
#: tag, in benchmarks/bench_scale.py); above it they are all forgotten and parsed again
_MAX_TARGETS: Final = 25_000
#: what ``api.get_blob`` reads besides the path: such a blob GET goes to aiohttp
_BLOB_CONDITIONS: Final = frozenset({"range", "if-none-match"})
_BLOB_LINES: Final = (
    "Accept-Ranges: bytes\r\nContent-Type: application/octet-stream\r\n"
    "Cache-Control: max-age=31536000\r\n"
)
#: after Server, as aiohttp places it, for a request that asked to close
_CLOSE: Final = "Connection: close\r\n"
_API_VERSION_LINES: Final = "".join(f"{k}: {v}\r\n" for k, v in API_VERSION.items())


class _Opened(NamedTuple):
    """A blob file opened to be streamed (regproxy.fastfile)."""

    fd: int
    size: int
    digest: Digest
    #: how: ``tls`` (through the transport) or ``plain`` (sendfile)
    files: str


class Head(NamedTuple):
    """What the fast path reads of a request head."""

    method: str
    target: str
    #: the client said ``Connection: close``
    close: bool
    #: a header the blob route answers by (``Range``, ``If-None-Match``)
    conditional: bool


def parse_head(head: bytes) -> Head | None:
    """The :class:`Head` of a strict, simple request head
    (the bytes before its empty line), or None: anything unusual is left to aiohttp's parser,
    and so is anything it refuses (a line over its limit, HTTP/1.1 without ``Host``). Headers
    may repeat (Go sends one ``Accept`` per type), but for ``Host`` (exactly one), those
    aiohttp allows once (``SINGLETON_HEADERS``: ``User-Agent``, ``Content-Type``...) and
    ``Connection``, which may only say ``keep-alive`` (HTTP/1.1's default) or ``close``."""
    if len(head) > MAX_HEAD:
        return None
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        return None
    lines = text.split("\r\n")
    if len(lines) > MAX_HEADERS + 1:
        return None
    parts = lines[0].split(" ")
    if len(parts) != 3 or parts[2] != "HTTP/1.1" or parts[0] not in _METHODS:
        return None
    connection: str | None = None
    hosts = 0
    singletons: set[str] = set()
    conditional = False
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not _TOKEN_RE.match(name):
            return None
        key = name.lower()
        value = value.strip(" \t")
        if key in _DECLINED or not _VALUE_RE.match(value):
            return None
        if key == "connection":
            if connection is not None or value.lower() not in ("keep-alive", "close"):
                return None
            connection = value.lower()
        elif key == "host":
            hosts += 1
        elif key in SINGLETON_HEADERS:
            if key in singletons:
                return None  # aiohttp refuses a second one (400)
            singletons.add(key)
        elif key in _BLOB_CONDITIONS:
            conditional = True
    if hosts != 1:
        return None  # HTTP/1.1 requires one (RFC 9112 3.2): aiohttp answers 400
    return Head(parts[0], parts[1], connection == "close", conditional)


class _Date:
    """The ``Date`` header's value, formatted once a second (as aiohttp does)."""

    __slots__ = ("second", "text")

    def __init__(self) -> None:
        self.second = -1
        self.text = ""

    def now(self) -> str:
        second = int(time.time())
        if second != self.second:
            self.second, self.text = second, formatdate(second, usegmt=True)
        return self.text


class FastPath:
    """Answers cached manifest GETs and HEADs from their request heads (see the module)."""

    def __init__(
        self,
        registry: ProxyRegistry,
        resolver: NameResolver,
        policy: Policy,
        users: UserDB,
        metrics: Metrics,
        instance: str,
        write_timeout: float = 60.0,
    ) -> None:
        self.registry = registry
        self.resolver = resolver
        self.policy = policy
        self.users = users
        self.metrics = metrics
        self.access = logging.getLogger("regproxy.access")
        self._server = f"Server: {SERVER_SOFTWARE}\r\n"
        self._tail = f"{INSTANCE_HEADER}: {instance}\r\n\r\n"
        self._date = _Date()
        self._targets: dict[str, tuple[str, RepoName, str] | None] = {}
        self._answers = metrics.fast_answers
        self.write_timeout = write_timeout

    @classmethod
    def of(cls, app: web.Application) -> FastPath | None:
        """The fast path of an application (None for a registry it does not know)."""
        registry = app[REGISTRY_KEY]
        if not isinstance(registry, ProxyRegistry):
            return None
        return cls(
            registry,
            app[RESOLVER_KEY],
            app[POLICY_KEY],
            app[USERS_KEY],
            app[METRICS_KEY],
            app[INSTANCE_KEY],
            http_limits(app).write_timeout,
        )

    def _target(self, target: str) -> tuple[str, RepoName, str] | None:
        """(the route, the repository, the reference or digest) of a manifest or blob path,
        or None: the same steps as ``api.dispatch`` and its handlers, remembered per path."""
        if target in self._targets:
            return self._targets[target]
        found: tuple[str, RepoName, str] | None = None
        if _PATH_RE.match(target) and "/." not in target and "//" not in target:
            routed = route(target[len("/v2/") :])
            if routed is not None and routed[0] in ("manifest", "blob"):
                kind, parts = routed
                name = parts["name"]
                try:
                    ref = check_reference(parts["ref"]) if kind == "manifest" else parts["digest"]
                    if kind == "blob":
                        Digest.parse(ref)
                    # one copy of a digest for all that caches it (see ``lookups._shared``)
                    found = (kind, self.resolver.resolve(name), sys.intern(ref))
                except (OCIError, ValueError):
                    found = None
        if len(self._targets) >= _MAX_TARGETS:
            self._targets.clear()
        self._targets[target] = found
        return found

    def answer(
        self, head: bytes, remote: str | None, followed: bool = False, files: str = ""
    ) -> tuple[bytes | FileBody | SendfileBody, bool] | None:
        """The whole response to this request head (or, where ``files``, a blob file's to
        stream) and whether the connection closes after it (the client said ``Connection:
        close``), or None to leave it to aiohttp (also a ``close`` with more bytes after it,
        which aiohttp's parser refuses: ``followed``)."""
        started = time.monotonic()
        h = parse_head(head)
        if h is None or (h.close and followed):
            return None
        routed = self._target(h.target)
        if routed is None:
            return None
        # what the login rules let through without credentials (auth.auth_middleware): open,
        # or a read with anonymous pulls on (a name with /blobs/uploads/ in it needs a login)
        need = needs(h.target, h.method, self.users)
        if need is not None and not (need == "read" and self.users.anonymous_read):
            return None
        kind, repo, ref = routed
        found = self._blob(h, repo, ref, files) if kind == "blob" else self._manifest(h, repo, ref)
        if found is None:
            return None
        lines, body, label = found
        get = h.method == "GET"
        response = self._head(lines, h.close)
        if isinstance(body, _Opened):
            return self._file(response, h, repo, body, label, started, remote), h.close
        if get:
            response += body
        notes = {"route": kind, "repo": repo.canonical, "cache": "hit", "upstream": label}
        self._done(h, len(body) if get else 0, started, notes, remote)
        return response, h.close

    def _head(self, lines: str, close: bool) -> bytes:
        """The status line and headers of a 200, as aiohttp writes them."""
        return (
            f"HTTP/1.1 200 OK\r\n{lines}Date: {self._date.now()}\r\n"
            f"{self._server}{_CLOSE if close else ''}{self._tail}"
        ).encode()

    def _done(
        self, h: Head, sent: int, started: float, notes: dict[str, str], remote: str | None
    ) -> None:
        """The request counted and logged (its body sent), as the access logger does."""
        seconds = time.monotonic() - started
        route = notes["route"]
        count_request(self.metrics, route, h.method, 200, seconds)
        self._answers.inc()
        if self.access.isEnabledFor(logging.INFO) and not write_line(
            self.access, h.method, h.target, 200, sent, seconds, notes, remote
        ):
            self.metrics.access_lines_dropped.inc()

    def _file(
        self,
        head: bytes,
        h: Head,
        repo: RepoName,
        opened: _Opened,
        label: str,
        started: float,
        remote: str | None,
    ) -> FileBody | SendfileBody:
        """The body of a blob file opened by :meth:`_blob`; when it ends its bytes served,
        and the request, are counted as ``sendfile.send_file`` and the access logger do."""
        notes = {"route": "blob", "repo": repo.canonical, "cache": "hit", "upstream": label}

        def finish(sent: int, error: str | None, fault: BaseException | None) -> None:
            self.metrics.served("blob", "disk", sent)
            if error is not None:  # as sendfile.note_cut
                notes["error"] = error
                if error == "client_stalled":
                    self.metrics.slow_clients_cut.labels("write").inc()
                elif error == "aborted":
                    log.warning(
                        "blob.aborted digest=%s repo=%s error=%r", opened.digest, repo, fault
                    )
            self._done(h, sent, started, notes, remote)

        kind = FileBody if opened.files == "tls" else SendfileBody
        return kind(head, opened.fd, opened.size, self.write_timeout, finish)

    def _manifest(self, h: Head, repo: RepoName, ref: str) -> tuple[str, bytes, str] | None:
        """(headers up to Content-Length, body, upstream label) of a manifest answered from
        memory, counted as ``api.get_manifest`` counts it; None: aiohttp answers."""
        cached = self.registry.cached_manifest(repo, ref)
        if cached is None:
            return None
        m, label = cached
        if "\r" in m.media_type or "\n" in m.media_type or not self.policy.allowed_now(repo, m):
            return None
        self.metrics.lookup("manifest", "hit", label)
        get = h.method == "GET"
        if get:
            self.metrics.served("manifest", "disk", m.size)
        digest = str(m.digest)
        lines = (
            f"{_API_VERSION_LINES}{CONTENT_DIGEST}: {digest}\r\n"
            f'Content-Type: {m.media_type}\r\nETag: "{digest}"\r\n'
            f"Content-Length: {len(m.body) if get else m.size}\r\n"
        )
        return lines, m.body, label

    def _blob(
        self, h: Head, repo: RepoName, ref: str, files: str
    ) -> tuple[str, bytes | _Opened, str] | None:
        """The same for a blob GET (a HEAD asks whether it exists: aiohttp answers it, as
        ranges and conditions), counted as ``api.get_blob`` counts it: a small blob's bytes,
        or (``files``) a larger one's file opened, if it opens without waiting for the disk."""
        if h.method != "GET" or h.conditional:
            return None
        cached = self.registry.cached_blob(repo, Digest.parse(ref), bool(files))
        if cached is None:
            return None
        blob, label = cached
        body: bytes | _Opened
        if blob.data is not None:
            body = blob.data
            self.metrics.served("blob", "disk", blob.size)
        else:
            assert blob.file is not None
            fd = open_cached(blob.file)
            if fd is None:  # not in the caches, or gone since the lookup (evicted)
                return None
            body = _Opened(fd, blob.size, blob.digest, files)
        self.metrics.lookup("blob", "hit", label)
        digest = str(blob.digest)
        lines = (
            f"{_API_VERSION_LINES}{CONTENT_DIGEST}: {digest}\r\n{_BLOB_LINES}"
            f'ETag: "{digest}"\r\nContent-Length: {blob.size}\r\n'
        )
        return lines, body, label


__all__ = ["FastPath", "Head", "parse_head"]
