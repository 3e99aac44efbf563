"""Client sessions for callers outside this package (peers), so only ``upstream/`` opens them."""

from __future__ import annotations

import aiohttp


def shared_session(limit_per_host: int) -> aiohttp.ClientSession:
    """One session for many :class:`~regproxy.upstream.UpstreamClient` of one kind (peers).

    Bytes stay exactly as sent (no decompression), no cookies, no proxy from the environment.
    """
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, limit_per_host=limit_per_host),
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=False,
    )
