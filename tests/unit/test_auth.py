"""regproxy.auth: htpasswd parsing and reloads, bcrypt checks and their cache, the request rules."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import subprocess
from pathlib import Path

import bcrypt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from regproxy import auth, web_errors
from regproxy.auth import UserDB, parse_htpasswd, verify_password
from regproxy.config import AuthConfig

# api keeps per-request facts under plain string keys (request["error"]): web.RequestKey only came
# with aiohttp 3.14, and the project supports older ones; aiohttp 3.14 warns once per key
pytestmark = pytest.mark.filterwarnings("ignore::aiohttp.web_exceptions.NotAppKeyWarning")


def htpasswd_line(user: str, password: str) -> str:
    out = subprocess.run(
        ["htpasswd", "-Bbn", user, password], check=True, capture_output=True, text=True
    )
    return out.stdout.strip()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Sleeps:
    def __init__(self) -> None:
        self.calls: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


# --- parsing --------------------------------------------------------------------------------------
@pytest.mark.process
def test_parse_htpasswd_keeps_bcrypt_lines_only(caplog: pytest.LogCaptureFixture) -> None:
    alice = htpasswd_line("alice", "wonder")
    text = "\n".join(
        [
            "# operators",
            "",
            alice,
            "bob:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=",
            "carol:$apr1$abc$defghijklmnopqrstuvwx",
            "no-colon-here",
            "  dave:$2b$05$" + "a" * 53 + "  ",
        ]
    )
    with caplog.at_level(logging.WARNING, "regproxy.auth"):
        users = parse_htpasswd(text, "test")
    assert set(users) == {"alice", "dave"}
    assert users["alice"].startswith(b"$2y$")
    assert "bob" in caplog.text and "carol" in caplog.text and "line=6" in caplog.text
    assert "W6ph5" not in caplog.text and "$apr1$" not in caplog.text  # no hash in the log


@pytest.mark.process
def test_htpasswd_2y_hash_verifies() -> None:
    hashed = htpasswd_line("alice", "wonder").split(":", 1)[1].encode()
    assert hashed.startswith(b"$2y$")
    assert verify_password("wonder", hashed)
    assert not verify_password("Wonder", hashed)
    assert not verify_password("", hashed)


def test_verify_password_2b_long_and_malformed() -> None:
    hashed = bcrypt.hashpw(b"x" * 72, bcrypt.gensalt(rounds=4))
    assert hashed.startswith(b"$2b$")
    assert verify_password("x" * 72, hashed)
    # bcrypt reads 72 bytes: a longer password would match by its first 72; it is refused
    assert not verify_password("x" * 73, hashed)
    assert not verify_password("x" * 71, hashed)
    assert not verify_password("x", b"$2y$05$not-a-hash")
    assert verify_password("pässwörd", bcrypt.hashpw("pässwörd".encode(), bcrypt.gensalt(4)))


# --- reloads ----------------------------------------------------------------------------------------
@pytest.mark.process
def test_reload_follows_the_file(tmp_path: Path) -> None:
    path = tmp_path / "htpasswd"
    path.write_text(htpasswd_line("alice", "a") + "\n")
    conf_hash = bcrypt.hashpw(b"c", bcrypt.gensalt(4)).decode()
    db = UserDB(AuthConfig(htpasswd=str(path), users={"carol": conf_hash}))
    assert db.enabled
    assert set(db.users()) == {"carol"}
    assert db.reload_if_changed()
    assert set(db.users()) == {"alice", "carol"}
    assert not db.reload_if_changed()  # unchanged: not read again

    path.write_text(htpasswd_line("alice", "a") + "\n" + htpasswd_line("bob", "b") + "\n")
    os.utime(path, ns=(1, 1))  # a different mtime even on a coarse clock
    assert db.reload_if_changed()
    assert set(db.users()) == {"alice", "bob", "carol"}

    path.unlink()
    assert db.reload_if_changed()  # a removed file removes its users (fail closed)
    assert set(db.users()) == {"carol"}
    assert not db.reload_if_changed()


@pytest.mark.process
def test_file_user_wins_over_config_user(tmp_path: Path) -> None:
    path = tmp_path / "htpasswd"
    path.write_text(htpasswd_line("alice", "from-file") + "\n")
    conf_hash = bcrypt.hashpw(b"from-config", bcrypt.gensalt(4)).decode()
    db = UserDB(AuthConfig(htpasswd=str(path), users={"alice": conf_hash}))
    db.reload_if_changed()
    assert verify_password("from-file", db.users()["alice"])


def test_missing_file_means_no_users_but_auth_on(tmp_path: Path) -> None:
    db = UserDB(AuthConfig(htpasswd=str(tmp_path / "nope")))
    assert not db.reload_if_changed()
    assert db.enabled and not db.users()
    assert not UserDB(AuthConfig()).enabled


@pytest.mark.process
async def test_refresh_is_throttled_and_sees_changes(tmp_path: Path) -> None:
    path = tmp_path / "htpasswd"
    path.write_text(htpasswd_line("alice", "a") + "\n")
    clock = Clock()
    db = UserDB(AuthConfig(htpasswd=str(path)), clock=clock, failure_delay=0)
    assert await db.verify("alice", "a")
    path.write_text(htpasswd_line("bob", "b") + "\n")
    os.utime(path, ns=(2, 2))
    assert not await db.verify("bob", "b")  # not looked at again within the second
    clock.now += auth.RELOAD_CHECK_SECONDS
    assert await db.verify("bob", "b")
    assert not await db.verify("alice", "a")  # removed, and its cached success with it
    db.close()


# --- the cache ---------------------------------------------------------------------------------------
@pytest.fixture
def bcrypt_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    real = auth.verify_password

    def counting(password: str, hashed: bytes) -> bool:
        calls.append(password)
        return real(password, hashed)

    monkeypatch.setattr(auth, "verify_password", counting)
    return calls


async def test_success_is_cached_for_a_while(bcrypt_calls: list[str]) -> None:
    clock = Clock()
    h = bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode()
    db = UserDB(AuthConfig(users={"alice": h}), clock=clock)
    for _ in range(5):
        assert await db.verify("alice", "pw")
    assert len(bcrypt_calls) == 1
    for _ in range(2):
        assert not await db.verify("alice", "wrong")
    assert len(bcrypt_calls) == 3  # failures are never cached
    assert not await db.verify("nobody", "pw")  # an unknown user costs a bcrypt too
    assert len(bcrypt_calls) == 4
    clock.now += auth.CACHE_TTL
    assert await db.verify("alice", "pw")
    assert len(bcrypt_calls) == 5
    # no plaintext kept anywhere in the cache
    assert all(b"pw" not in k and b"alice" not in k for k in db._cache)
    db.close()


async def test_concurrent_checks_share_one_bcrypt(bcrypt_calls: list[str]) -> None:
    h = bcrypt.hashpw(b"pw", bcrypt.gensalt(8)).decode()
    db = UserDB(AuthConfig(users={"alice": h}))
    results = await asyncio.gather(*(db.verify("alice", "pw") for _ in range(20)))
    assert all(results)
    assert len(bcrypt_calls) == 1
    db.close()


async def test_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth, "CACHE_SIZE", 3)
    monkeypatch.setattr(auth, "verify_password", lambda p, h: True)
    users = {f"u{i}": bcrypt.hashpw(b"x", bcrypt.gensalt(4)).decode() for i in range(5)}
    db = UserDB(AuthConfig(users=users))
    for u in users:
        assert await db.verify(u, "x")
    assert len(db._cache) == 3
    db.close()


async def test_failed_login_is_slow_counted_and_logged_without_password(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sleeps = Sleeps()
    h = bcrypt.hashpw(b"right", bcrypt.gensalt(4)).decode()
    db = UserDB(AuthConfig(users={"alice": h}), sleep=sleeps)
    before = db.metrics.login_failures._value.get()
    with caplog.at_level(logging.INFO, "regproxy.auth"):
        assert not await db.login("alice", "hunter2-guess", remote="10.1.2.3", via="test")
        assert await db.login("alice", "right", remote="10.1.2.3", via="test")
    assert sleeps.calls == [auth.FAILURE_DELAY]
    assert db.metrics.login_failures._value.get() == before + 1
    assert "alice" in caplog.text and "10.1.2.3" in caplog.text
    assert "hunter2" not in caplog.text and "right" not in caplog.text.replace("wrong", "")
    db.close()


# --- the request rules ---------------------------------------------------------------------------------
async def _ok(request: web.Request) -> web.Response:
    return web.Response(text=f"ok {auth.USER.get() or '-'}")


def _app(config: AuthConfig, sleeps: Sleeps) -> web.Application:
    app = web.Application(middlewares=[web_errors.error_middleware])
    auth.setup(app, config)
    app[auth.USERS_KEY] = UserDB(config, sleep=sleeps)
    app.router.add_route("*", "/v2/", _ok)
    app.router.add_route("*", r"/v2/{path:.+}", _ok)
    app.router.add_get("/metrics", _ok)
    app.router.add_route("*", "/admin/import", _ok)
    app.router.add_get("/healthz", _ok)
    return app


def _basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


@pytest.fixture
def users() -> dict[str, str]:
    return {"alice": bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode()}


MANIFEST = "/v2/spectro-images/app/manifests/v1"
UPLOAD = "/v2/spectro-images/app/blobs/uploads/"


@pytest.mark.parametrize("anonymous_pull", [True, False])
async def test_rules(users: dict[str, str], anonymous_pull: bool) -> None:
    sleeps = Sleeps()
    app = _app(AuthConfig(users=users, anonymous_pull=anonymous_pull, realm='edge "1"'), sleeps)
    async with TestClient(TestServer(app)) as client:
        # reads: open only with anonymous pull
        for method, path in [("GET", MANIFEST), ("HEAD", MANIFEST), ("GET", "/metrics")]:
            resp = await client.request(method, path)
            assert resp.status == (200 if anonymous_pull else 401), (method, path)
        # the ping always asks for a login: that is when clients with credentials send them
        resp = await client.get("/v2/")
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"] == 'Basic realm="edge \\"1\\""'
        assert (await resp.json())["errors"][0]["code"] == "UNAUTHORIZED"
        # changes always need a login, and upload sessions too, even by GET
        for method, path in [
            ("POST", UPLOAD),
            ("GET", UPLOAD + "abc"),
            ("PUT", MANIFEST),
            ("DELETE", MANIFEST),
            ("POST", "/admin/import"),
            ("GET", "/admin/import"),
        ]:
            resp = await client.request(method, path)
            assert resp.status == 401, (method, path)
            assert resp.headers["WWW-Authenticate"].startswith("Basic realm=")
            resp = await client.request(method, path, headers=_basic("alice", "pw"))
            assert resp.status == 200 and await resp.text() == "ok alice"
        # an empty Basic pair (what some clients send when they have none) is anonymous
        resp = await client.get(MANIFEST, headers=_basic("", ""))
        assert resp.status == (200 if anonymous_pull else 401)
        # a wrong password is refused even where anonymous reads are allowed, and slowly
        resp = await client.get(MANIFEST, headers=_basic("alice", "nope"))
        assert resp.status == 401
        assert sleeps.calls == [auth.FAILURE_DELAY]
        # garbage in the header is no credential
        resp = await client.put(MANIFEST, headers={"Authorization": "Basic !!!"})
        assert resp.status == 401
        resp = await client.put(MANIFEST, headers={"Authorization": "Bearer abc"})
        assert resp.status == 401
        # health is never guarded; a peer header earns nothing
        assert (await client.get("/healthz")).status == 200
        resp = await client.put(MANIFEST, headers={"Regproxy-Peer": "1"})
        assert resp.status == 401


async def test_no_users_is_open_as_before() -> None:
    sleeps = Sleeps()
    app = _app(AuthConfig(), sleeps)
    async with TestClient(TestServer(app)) as client:
        for method, path in [("GET", "/v2/"), ("POST", UPLOAD), ("DELETE", MANIFEST)]:
            assert (await client.request(method, path)).status == 200


async def test_no_users_and_no_anonymous_pull_refuses_everything() -> None:
    app = _app(AuthConfig(anonymous_pull=False), Sleeps())
    async with TestClient(TestServer(app)) as client:
        for method, path in [("GET", "/v2/"), ("GET", MANIFEST), ("POST", UPLOAD)]:
            assert (await client.request(method, path)).status == 401


async def test_check_login_for_the_web_page(users: dict[str, str]) -> None:
    sleeps = Sleeps()
    app = _app(AuthConfig(users=users), sleeps)
    async with TestClient(TestServer(app)):
        assert await auth.check_login(app, "alice", "pw")
        assert not await auth.check_login(app, "alice", "no", remote="192.0.2.1")
        assert auth.may_change_content(app, "alice")
        assert not auth.may_change_content(app, "mallory")
    assert sleeps.calls == [auth.FAILURE_DELAY]
