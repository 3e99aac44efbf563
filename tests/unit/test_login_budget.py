"""A per-client budget of refused logins; 429 with Retry-After once spent; passwords past 72 bytes.

In-process: the whole app (create_app) on a loopback test server, an injected clock and sleep,
so nothing here waits a minute or a second.
"""

from __future__ import annotations

import asyncio
import base64
import re
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import bcrypt
import pytest
from aiohttp.test_utils import TestClient, TestServer

from regproxy import auth
from regproxy.app import create_app
from regproxy.auth import UserDB
from regproxy.config import AuthConfig, config_from_dict
from regproxy.errors import ConfigError, TooManyRequests
from regproxy.login_budget import LoginBudget, client_key
from regproxy.metrics import Metrics

pytestmark = pytest.mark.filterwarnings("ignore::aiohttp.web_exceptions.NotAppKeyWarning")
PASSWORD = "p" * 72  # the longest password bcrypt reads whole
HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
MANIFEST = "/v2/spectro-images/app/manifests/v1"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def no_sleep(seconds: float) -> None:
    return None


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def throttled(metrics: Metrics, reason: str) -> float:
    return float(metrics.login_throttled.labels(reason)._value.get())


# --- the budget itself ---------------------------------------------------------------------------
def test_budget_window_pending_checks_and_client_keys() -> None:
    clock = Clock()
    budget = LoginBudget(3, clock=clock)
    assert budget.spent("a") is None
    for _ in range(3):
        assert budget.admit("a") is None
    assert budget.admit("a") == 1  # three checks running fill the budget
    budget.finish("a", failed=False)  # a right password costs nothing
    budget.finish("a", failed=True)
    clock.now += 20
    budget.finish("a", failed=True)
    assert budget.spent("a") is None
    budget.refused("a")  # the third refusal, at t=20
    assert budget.spent("a") == 40  # until the first (t=0) leaves the window
    assert budget.admit("a") == 40
    assert budget.spent("b") is None  # other clients have their own
    clock.now += 40
    assert budget.spent("a") is None
    assert budget.admit("a") is None
    # an IPv6 host holds its /64; IPv4-mapped addresses are the IPv4 client
    assert client_key("2001:db8:1:2:aaaa::1") == client_key("2001:db8:1:2:bbbb::9")
    assert client_key("2001:db8:1:3::1") != client_key("2001:db8:1:2::1")
    assert client_key("::ffff:192.0.2.7") == client_key("192.0.2.7") == "192.0.2.7"
    assert client_key(None) == "-"


def test_budget_remembers_a_bounded_number_of_clients() -> None:
    budget = LoginBudget(2, clock=Clock(), max_clients=100)
    assert budget.admit("busy") is None  # a check in flight is never forgotten
    for i in range(1000):
        budget.refused(f"10.0.{i // 256}.{i % 256}")
    assert len(budget) == 100
    budget.refused("10.0.3.231")
    budget.refused("10.0.3.231")
    assert budget.spent("10.0.3.231") is not None  # the most recent are kept
    assert budget.admit("busy") is None  # still known: one pending, one more admitted
    assert budget.admit("busy") is not None


# --- over HTTP: the registry API, the web page's form and its JSON ---------------------------------
@pytest.fixture
def bcrypt_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    real = auth.verify_password

    def counting(password: str, hashed: bytes) -> bool:
        calls.append(password)
        return real(password, hashed)

    monkeypatch.setattr(auth, "verify_password", counting)
    return calls


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[tuple[TestClient[Any, Any], Clock]]:
    config = config_from_dict(
        {
            "storage": {"root": str(tmp_path / "store")},
            "content": {"sync": {"enable": False}},
            "log": {"access": False},
            "auth": {"users": {"alice": HASH}, "login_failures_per_minute": 10},
        }
    )
    web_app = create_app(config)
    clock = Clock()
    web_app[auth.USERS_KEY] = UserDB(config.auth, clock=clock, sleep=no_sleep)
    client: TestClient[Any, Any] = TestClient(TestServer(web_app, host="127.0.0.1"))
    await client.start_server()
    yield client, clock
    await client.close()


async def test_parallel_guessers_get_the_budget_then_429(app, bcrypt_calls: list[str]) -> None:
    client, clock = app
    m = client.app[auth.USERS_KEY].metrics
    throttled_before = throttled(m, "budget")
    resps = await asyncio.gather(
        *(client.put(MANIFEST, headers=basic("alice", f"guess-{i}")) for i in range(300))
    )
    statuses = sorted(r.status for r in resps)
    assert statuses == [401] * 10 + [429] * 290
    assert len(bcrypt_calls) == 10  # no more guesses were checked than the budget allows
    limited = next(r for r in resps if r.status == 429)
    assert 1 <= int(limited.headers["Retry-After"]) <= 60
    assert (await limited.json())["errors"][0]["code"] == "TOOMANYREQUESTS"
    assert throttled(m, "budget") == throttled_before + 290
    # spent: even the right password is refused (a spent budget says nothing about a guess)
    resp = await client.get(MANIFEST, headers=basic("alice", PASSWORD))
    assert resp.status == 429
    # the web page's JSON and its login form are the same budget
    resp = await client.get("/ui/api/overview", headers=basic("alice", PASSWORD))
    assert resp.status == 429 and "Retry-After" in resp.headers
    resp = await form_login(client, PASSWORD)
    assert resp.status == 429 and "Retry-After" in resp.headers
    assert "Too many failed logins" in await resp.text()
    # a minute later the address may log in again
    clock.now += 60
    assert (await client.get(MANIFEST, headers=basic("alice", PASSWORD))).status == 404
    assert (await form_login(client, PASSWORD)).status == 303


async def test_a_cached_login_is_refused_too_once_the_budget_is_spent(app) -> None:
    client, _ = app
    assert (await client.get(MANIFEST, headers=basic("alice", PASSWORD))).status == 404
    for i in range(10):
        assert (await client.get(MANIFEST, headers=basic("alice", f"no-{i}"))).status == 401
    assert (await client.get(MANIFEST, headers=basic("alice", PASSWORD))).status == 429
    assert (await client.get(MANIFEST)).status == 404  # no credentials: never throttled


async def form_login(client: TestClient[Any, Any], password: str) -> Any:
    page = await client.get("/ui/login")
    token = re.search(r'name="login_token" value="([^"]+)"', await page.text())
    assert token is not None
    return await client.post(
        "/ui/login",
        data={"username": "alice", "password": password, "login_token": token[1], "next": "/ui/"},
        allow_redirects=False,
    )


async def test_form_logins_spend_the_budget(app) -> None:
    client, _ = app
    for i in range(10):
        assert (await form_login(client, f"wrong-{i}")).status == 401
    resp = await form_login(client, PASSWORD)
    assert resp.status == 429
    assert int(resp.headers["Retry-After"]) == 60


async def test_passwords_longer_than_72_bytes_are_refused_not_cut(
    app, bcrypt_calls: list[str]
) -> None:
    client, _ = app
    metrics = client.app[auth.USERS_KEY].metrics
    failures = metrics.login_failures._value.get()
    # bcrypt would accept this one: its first 72 bytes are the password
    resp = await client.get(MANIFEST, headers=basic("alice", PASSWORD + "anything"))
    assert resp.status == 401
    assert bcrypt_calls == []  # refused before any check
    assert metrics.login_failures._value.get() == failures + 1
    resp = await client.get(MANIFEST, headers=basic("alice", "p" * 70 + "é"))  # 72 bytes, wrong
    assert resp.status == 401
    assert (await client.get(MANIFEST, headers=basic("alice", PASSWORD))).status == 404
    # a peer password no login accepts stops start-up
    with pytest.raises(ConfigError, match=r"peers\.password"):
        config_from_dict({"peers": {"username": "p", "password": "x" * 73}})


# --- what a wrong password may hold: delayed refusals and queued checks are bounded ------------------
async def test_delayed_refusals_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth, "MAX_DELAYED", 3)
    release = asyncio.Event()
    sleeping = 0

    async def held(seconds: float) -> None:
        nonlocal sleeping
        sleeping += 1
        await release.wait()

    db = UserDB(AuthConfig(users={"alice": HASH}, login_failures_per_minute=0), sleep=held)
    tasks = [
        asyncio.create_task(db.login("alice", f"no-{i}", remote=f"192.0.2.{i}", via="test"))
        for i in range(8)
    ]
    done: set[asyncio.Task[bool]] = set()
    pending = set(tasks)
    while len(done) < 5:
        finished, pending = await asyncio.wait(
            pending, timeout=30, return_when=asyncio.FIRST_COMPLETED
        )
        assert finished, "a refusal beyond the bound waited"
        done |= finished
    # three wait out the delay, the other five were answered at once
    assert len(pending) == 3 and sleeping == 3
    assert all(t.result() is False for t in done)
    release.set()
    assert await asyncio.gather(*pending) == [False] * 3
    assert db._delayed == 0
    db.close()


async def test_queued_password_checks_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth, "MAX_CHECKS", 2)
    gate = threading.Event()

    def slow(password: str, hashed: bytes) -> bool:
        gate.wait(30)
        return False

    monkeypatch.setattr(auth, "verify_password", slow)
    db = UserDB(AuthConfig(users={"alice": HASH}), sleep=no_sleep)
    busy = throttled(db.metrics, "busy")
    first = [
        asyncio.create_task(db.login("alice", f"g{i}", remote=f"192.0.2.{i}", via="test"))
        for i in range(2)
    ]
    for _ in range(1000):  # the two tasks start their checks on their first step
        if len(db._inflight) == 2:
            break
        await asyncio.sleep(0)
    assert len(db._inflight) == 2
    with pytest.raises(TooManyRequests) as exc:
        await db.login("alice", "third", remote="192.0.2.99", via="test")
    assert exc.value.retry_after == 1
    assert throttled(db.metrics, "busy") == busy + 1
    gate.set()
    assert await asyncio.gather(*first) == [False, False]
    db.close()
