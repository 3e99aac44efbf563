"""Upstream auth: WWW-Authenticate parsing, credentials from config and auth files, tokens."""

from __future__ import annotations

import asyncio
import base64
import json

import pytest

from regproxy.config import UpstreamConfig
from regproxy.errors import ConfigError
from regproxy.upstream.auth import Credentials, TokenCache, parse_www_authenticate


# --- parse_www_authenticate --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("header", "scheme", "params"),
    [
        (
            'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
            'scope="repository:library/nginx:pull"',
            "bearer",
            {
                "realm": "https://auth.docker.io/token",
                "service": "registry.docker.io",
                "scope": "repository:library/nginx:pull",
            },
        ),
        ('Basic realm="Registry Realm"', "basic", {"realm": "Registry Realm"}),
        ('basic realm="test"', "basic", {"realm": "test"}),
        (
            'Bearer realm="https://ghcr.io/token", scope="repository:a/b:pull,push"',
            "bearer",
            {"realm": "https://ghcr.io/token", "scope": "repository:a/b:pull,push"},
        ),
        (
            "BEARER realm=https://x/token,service=svc",
            "bearer",
            {"realm": "https://x/token", "service": "svc"},
        ),
        ('Bearer Realm="r" , Service = "s"', "bearer", {"realm": "r", "service": "s"}),
        (r'Bearer realm="a \"quoted\" realm\\"', "bearer", {"realm": 'a "quoted" realm\\'}),
        (
            'Bearer error="invalid_token",realm="r"',
            "bearer",
            {"error": "invalid_token", "realm": "r"},
        ),
        ("Basic", "basic", {}),
        ("", "", {}),
        ("   ", "", {}),
    ],
)
def test_parse_www_authenticate(header: str, scheme: str, params: dict[str, str]) -> None:
    assert parse_www_authenticate(header) == (scheme, params)


def test_parse_www_authenticate_garbage_does_not_raise() -> None:
    scheme, params = parse_www_authenticate('Bearer realm="unterminated, service=x')
    assert scheme == "bearer"
    assert isinstance(params, dict)


# --- credentials -------------------------------------------------------------------------------
def test_credentials_from_username_password() -> None:
    cfg = UpstreamConfig("ghcr.io", username="u", password="hunter2")
    creds = Credentials.from_config(cfg, "ghcr.io")
    assert creds == Credentials("u", "hunter2")
    assert creds is not None
    assert creds.basic() == "Basic " + base64.b64encode(b"u:hunter2").decode()
    assert "hunter2" not in repr(creds)


def test_credentials_none_configured() -> None:
    assert Credentials.from_config(UpstreamConfig("quay.io"), "quay.io") is None


def _auth_file(tmp_path, auths) -> str:
    p = tmp_path / "config.json"
    p.write_text(json.dumps({"auths": auths}))
    return str(p)


def test_credentials_from_auth_file(tmp_path) -> None:
    path = _auth_file(
        tmp_path,
        {
            "https://index.docker.io/v1/": {"auth": base64.b64encode(b"hub:s3cr:et").decode()},
            "ghcr.io": {"username": "gh", "password": "tok"},
            "https://myregistry.local:5000": {"auth": base64.b64encode(b"me:pw").decode()},
            "quay.io": {},
        },
    )
    cfg = UpstreamConfig("*", auth_file=path)
    assert Credentials.from_config(cfg, "docker.io") == Credentials("hub", "s3cr:et")
    assert Credentials.from_config(cfg, "registry-1.docker.io") == Credentials("hub", "s3cr:et")
    assert Credentials.from_config(cfg, "ghcr.io") == Credentials("gh", "tok")
    assert Credentials.from_config(cfg, "myregistry.local:5000") == Credentials("me", "pw")
    assert Credentials.from_config(cfg, "myregistry.local") is None
    assert Credentials.from_config(cfg, "quay.io") is None
    assert Credentials.from_config(cfg, "gcr.io") is None


def test_username_password_win_over_auth_file(tmp_path) -> None:
    path = _auth_file(tmp_path, {"ghcr.io": {"username": "file", "password": "x"}})
    cfg = UpstreamConfig("ghcr.io", username="cfg", password="y", auth_file=path)
    assert Credentials.from_config(cfg, "ghcr.io") == Credentials("cfg", "y")


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        json.dumps({"credHelpers": {}}),
        json.dumps({"auths": {"ghcr.io": {"auth": "!!"}}}),
    ],
)
def test_bad_auth_file_is_a_config_error(tmp_path, content: str) -> None:
    p = tmp_path / "config.json"
    p.write_text(content)
    with pytest.raises(ConfigError) as info:
        Credentials.from_config(UpstreamConfig("ghcr.io", auth_file=str(p)), "ghcr.io")
    assert info.value.key == "upstreams.ghcr.io.auth_file"


def test_missing_auth_file_is_a_config_error(tmp_path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        Credentials.from_config(
            UpstreamConfig("ghcr.io", auth_file=str(tmp_path / "nope.json")), "ghcr.io"
        )


# --- token cache -------------------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


KEY = ("https://auth/token", "svc", "repository:a/b:pull")


async def test_token_cached_until_expiry_minus_threshold() -> None:
    clock = Clock()
    cache = TokenCache(threshold=10, clock=clock)
    calls = 0

    async def fetch():
        nonlocal calls
        calls += 1
        return {"token": f"t{calls}", "expires_in": 300}

    assert await cache.get(KEY, fetch) == "t1"
    clock.now += 289
    assert await cache.get(KEY, fetch) == "t1"
    clock.now += 1  # 290 = 300 - threshold: renewed a little before expiry
    assert await cache.get(KEY, fetch) == "t2"
    assert calls == 2 == cache.fetches


async def test_token_default_lifetime_and_access_token() -> None:
    clock = Clock()
    cache = TokenCache(threshold=10, clock=clock)
    tokens = iter(["a", "b"])

    async def fetch():
        return {"access_token": next(tokens)}  # no expires_in: 60 s

    assert await cache.get(KEY, fetch) == "a"
    clock.now += 49
    assert cache.peek(KEY) == "a"
    clock.now += 1
    assert cache.peek(KEY) is None
    assert await cache.get(KEY, fetch) == "b"


async def test_short_lived_token_is_still_used() -> None:
    clock = Clock()
    cache = TokenCache(threshold=30, clock=clock)

    async def fetch():
        return {"token": "short", "expires_in": 4}

    assert await cache.get(KEY, fetch) == "short"
    clock.now += 1.9
    assert cache.peek(KEY) == "short"  # threshold capped at half the lifetime
    clock.now += 0.1
    assert cache.peek(KEY) is None


async def test_keys_are_separate() -> None:
    cache = TokenCache()

    async def fetch_a():
        return {"token": "A"}

    async def fetch_b():
        return {"token": "B"}

    other = ("https://auth/token", "svc", "repository:c/d:pull")
    assert await cache.get(KEY, fetch_a) == "A"
    assert await cache.get(other, fetch_b) == "B"
    assert await cache.get(KEY, fetch_b) == "A"


async def test_one_refresh_under_concurrency() -> None:
    cache = TokenCache()
    calls = 0
    gate = asyncio.Event()

    async def fetch():
        nonlocal calls
        calls += 1
        await gate.wait()
        return {"token": "shared", "expires_in": 120}

    tasks = [asyncio.create_task(cache.get(KEY, fetch)) for _ in range(50)]
    await asyncio.sleep(0.01)
    gate.set()
    assert await asyncio.gather(*tasks) == ["shared"] * 50
    assert calls == 1


async def test_invalidate_only_the_stale_token() -> None:
    cache = TokenCache()
    values = iter(["old", "new"])

    async def fetch():
        return {"token": next(values)}

    assert await cache.get(KEY, fetch) == "old"
    cache.invalidate(KEY, "old")
    assert await cache.get(KEY, fetch) == "new"
    cache.invalidate(KEY, "old")  # a late 401 for the old token keeps the new one
    assert cache.peek(KEY) == "new"


async def test_concurrent_401s_refresh_once() -> None:
    """N requests that all got 401 with the same token cause one fetch."""
    cache = TokenCache()
    calls = 0

    async def fetch():
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)
        return {"token": f"t{calls}"}

    assert await cache.get(KEY, fetch) == "t1"

    async def on_401() -> str:
        cache.invalidate(KEY, "t1")
        return await cache.get(KEY, fetch)

    assert await asyncio.gather(*(on_401() for _ in range(20))) == ["t2"] * 20
    assert calls == 2


async def test_failed_fetch_is_not_cached_and_lock_released() -> None:
    cache = TokenCache()
    attempts = 0

    async def fetch():
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise RuntimeError("token server down")
        return {"token": "ok"}

    with pytest.raises(RuntimeError):
        await cache.get(KEY, fetch)
    assert await cache.get(KEY, fetch) == "ok"


async def test_response_without_token_raises() -> None:
    cache = TokenCache()

    async def fetch():
        return {"expires_in": 60}

    with pytest.raises(ValueError, match="token"):
        await cache.get(KEY, fetch)


async def test_token_cache_is_bounded_least_recently_used_first_out() -> None:
    cache = TokenCache(max_tokens=3)

    async def fetch() -> dict[str, object]:
        return {"token": "t", "expires_in": 300}

    for repo in ("a", "b", "c"):
        await cache.get(("realm", "svc", f"repository:{repo}:pull"), fetch)
    assert cache.peek(("realm", "svc", "repository:a:pull")) == "t"  # a is now the newest
    await cache.get(("realm", "svc", "repository:d:pull"), fetch)
    assert len(cache) == 3
    assert cache.peek(("realm", "svc", "repository:b:pull")) is None  # b went first
    assert cache.peek(("realm", "svc", "repository:a:pull")) == "t"
    assert cache._locks == {}  # no lock is kept for keys nobody is fetching


@pytest.mark.parametrize("token", ["a\r\nX-Evil: 1", "a\x00b", "with space", "\u00ff\u2028"])
async def test_a_token_that_cannot_be_a_header_value_is_refused(token: str) -> None:
    """A hostile token server: the token goes into an Authorization header, where aiohttp
    refuses control characters (a ValueError the client saw as a 500)."""
    cache = TokenCache()

    async def fetch():
        return {"token": token}

    with pytest.raises(ValueError, match="printable ASCII"):
        await cache.get(KEY, fetch)
    assert cache.peek(KEY) is None


async def test_a_token_that_never_expires_is_fetched_again_after_a_day() -> None:
    clock = Clock()
    cache = TokenCache(threshold=10, clock=clock)
    tokens = iter(["forever", "next"])

    async def fetch():
        return {"token": next(tokens), "expires_in": 10**400}  # float() of it overflows

    assert await cache.get(KEY, fetch) == "forever"
    clock.now += 86400 - 10
    assert await cache.get(KEY, fetch) == "next"
