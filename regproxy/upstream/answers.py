"""What upstream answers become: manifest heads and bodies, blob streams, tag pages.

The parsing here is bounded whatever the upstream sends: JSON goes through
:func:`regproxy.oci.load_json` (size and nesting limits, never a RecursionError), a tag page
keeps at most what was asked for, and only strings that are tags.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Final

import aiohttp
from aiohttp import hdrs

from regproxy.errors import DigestInvalid, UpstreamError
from regproxy.oci import TAG_RE, Digest, JSONInvalid, load_json
from regproxy.units import BULK_CHUNK

#: the longest a receive on a taken-over socket blocks before its reader looks at the clock
RECEIVE_SLICE: Final = 0.25
_CONTENT_RANGE_RE: Final = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$")


@dataclass(frozen=True, slots=True)
class ManifestHead:
    digest: Digest | None
    media_type: str
    size: int | None
    #: the answer's ``Age`` (RFC 9111 5.1): a cluster's home host says how long ago it
    #: confirmed the tag with its upstream
    age: float | None = None


@dataclass(frozen=True, slots=True)
class ManifestGet:
    body: bytes
    media_type: str
    #: of the body, with the algorithm of the reference or the header (sha256 otherwise)
    digest: Digest
    age: float | None = None


@dataclass(frozen=True, slots=True)
class TagPage:
    """Tags of one upstream ``tags/list`` answer, and whether upstream has more after them."""

    tags: list[str]
    more: bool


class BlobStream:
    """An open upstream blob response. ``await close()`` it (or use ``async with``).

    It holds one of the upstream's connection slots until closed.
    """

    def __init__(
        self,
        response: aiohttp.ClientResponse,
        *,
        size: int,
        offset: int,
        source: str,
        guard: Callable[[str], AbstractContextManager[None]],
        release: Callable[[], None] = lambda: None,
        read_timeout: float = 30.0,
    ) -> None:
        self._response = response
        self._read_timeout = read_timeout
        self._guard = guard
        self._release = release
        #: total blob size
        self.size = size
        #: where this body starts in the blob (0 when the server ignored our Range)
        self.offset = offset
        #: the base URL that answered (a mirror or the upstream), credentials masked
        self.source = source

    def take_socket(self, at_least: int) -> SocketBody | None:
        """The rest of the body as a socket of its own, for a thread to read (regproxy.pump),
        when it comes over plain TCP with a Content-Length and at least ``at_least`` bytes of
        it are still to come; else None (TLS, chunked, short: read :meth:`chunks`).

        What the HTTP client read already is taken from its buffer (``read_nowait``: each read
        lets its parser feed what it held back), then its reading is paused for good, so every
        byte after that is in the socket. The connection is not reused afterwards (:meth:`close`
        closes a body it did not see end).
        """
        resp = self._response
        conn = resp.connection
        transport = conn.transport if conn is not None else None
        if conn is None or conn.protocol is None or transport is None or transport.is_closing():
            return None
        if transport.get_extra_info("ssl_object") is not None:
            return None
        raw = transport.get_extra_info("socket")
        length = resp.content_length
        content = resp.content
        if (
            raw is None
            or length is None
            or hdrs.TRANSFER_ENCODING in resp.headers
            or content.exception() is not None
            or content.at_eof()
            or length - content.total_bytes < at_least
        ):
            return None
        parts: list[bytes] = []
        while data := content.read_nowait():
            parts.append(data)
        conn.protocol.pause_reading()  # also stops the client's own read timeout
        head = b"".join(parts)
        if content.total_bytes != len(head) or len(head) > length:
            # bytes the client read that we did not get: the socket would be out of step
            raise UpstreamError(self.source, "could not take over the blob body")
        sock = socket.socket(fileno=os.dup(raw.fileno()))
        sock.setblocking(True)  # MSG_WAITALL fills a buffer in one call; SO_RCVTIMEO bounds it
        whole, frac = divmod(RECEIVE_SLICE, 1.0)
        sock.setsockopt(
            socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", int(whole), int(frac * 1e6))
        )
        return SocketBody(head, length - len(head), sock, self._guard, self._read_timeout)

    async def chunks(self) -> AsyncIterator[bytes]:
        """Body chunks as they arrive (up to 1 MiB); a cut body raises UpstreamError."""
        with self._guard("blob body"):
            async for chunk in self._response.content.iter_chunked(BULK_CHUNK):
                yield chunk

    async def close(self) -> None:
        try:
            if self._response.content.at_eof():
                self._response.release()  # read to the end: the connection may be reused
            else:
                self._response.close()  # a half-read body must not go back to the pool
        finally:
            self._release()

    async def __aenter__(self) -> BlobStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class SocketBody:
    """The rest of a plain-TCP body, read from a duplicate of its connection's socket (see
    :class:`regproxy.pump.SocketBody`). :meth:`close` it after the reading thread is done."""

    def __init__(
        self,
        head: bytes,
        left: int,
        sock: socket.socket,
        guard: Callable[[str], AbstractContextManager[None]],
        read_timeout: float,
    ) -> None:
        self.head = head
        self.left = left
        self.read_timeout = read_timeout
        self._sock = sock
        self._guard = guard

    def receive_into(self, buffer: memoryview) -> int:
        return self._sock.recv_into(buffer, len(buffer), socket.MSG_WAITALL)

    def interrupt(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def guard(self) -> AbstractContextManager[None]:
        return self._guard("blob body")

    def close(self) -> None:
        self._sock.close()


def media_type(value: str | None) -> str:
    return (value or "").split(";", 1)[0].strip()


#: digits a number header may have (an int64's worth); a longer one is not believed
MAX_HEADER_DIGITS: Final = 18


def header_number(value: str | None) -> int | None:
    """A header's non-negative decimal (``Age``, ``Retry-After``, ``ratelimit-remaining``):
    ASCII digits only (``str.isdigit`` also takes ``²``, which ``int`` refuses, and ``int``
    refuses more than 4,300 digits), at most :data:`MAX_HEADER_DIGITS`; None otherwise."""
    value = (value or "").strip()
    if value.isascii() and value.isdigit() and len(value) <= MAX_HEADER_DIGITS:
        return int(value)
    return None


def age_header(value: str | None) -> float | None:
    """``Age: 12`` -> 12.0; None when absent or not delta-seconds."""
    n = header_number(value)
    return float(n) if n is not None else None


def digest_header(value: str | None) -> Digest | None:
    if not value:
        return None
    try:
        return Digest.parse(value.strip())
    except DigestInvalid:
        return None


def body_media_type(body: bytes) -> str:
    """The ``mediaType`` a manifest body declares, or "" (also for bodies that are no JSON)."""
    try:
        doc = load_json(body)
    except JSONInvalid:
        return ""
    mt = doc.get("mediaType") if isinstance(doc, dict) else None
    return mt if isinstance(mt, str) else ""


def tags_of(body: bytes, limit: int, after: str | None = None) -> list[str]:
    """At most ``limit`` tags (after ``after``, for upstreams that ignore ``last``) of a
    ``tags/list`` body; ValueError names what is wrong with it."""
    try:
        doc = load_json(body)
    except JSONInvalid as exc:
        raise ValueError(f"tags/list: {exc.detail}") from None
    tags = doc.get("tags") if isinstance(doc, dict) else None
    if tags is None:
        return []
    if not isinstance(tags, list):
        raise ValueError("tags/list has no tags array")
    wanted = (t for t in tags if isinstance(t, str) and TAG_RE.match(t))
    return [t for t in wanted if after is None or t > after][: max(limit, 0)]


def blob_extent(resp: aiohttp.ClientResponse) -> tuple[int, int]:
    """(total size, offset of this body) from Content-Range (206) or Content-Length (200);
    ValueError when the answer does not say."""
    if resp.status == 206:
        m = _CONTENT_RANGE_RE.match(resp.headers.get(hdrs.CONTENT_RANGE, ""))
        if m and m.group(3) != "*":
            return int(m.group(3)), int(m.group(1))
        raise ValueError("206 without a usable Content-Range")
    if resp.content_length is None:
        raise ValueError("blob response without Content-Length")
    return resp.content_length, 0
