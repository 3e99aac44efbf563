"""Readiness (``/readyz``): can this host serve what it holds?

Ready means: the store's filesystem takes a write (a file made and removed in ``tmp/``, off
the event loop), the metadata index answers a query, and the listener accepts (this request
came through it, and the daemon is not draining). Upstreams are reported, never required: an
offline or air-gapped host that serves its store is a healthy host. Their state is what the
traffic already showed, read from the upstream metrics; ``/readyz`` never dials anything, so
a probe every second costs no upstream request and never waits for a slow registry.

Each check runs one at a time and ``/readyz`` waits for it :data:`ANSWER_SECONDS` at most, then
answers with the check before (see :class:`_Check`): a probe answers in time while an eviction,
``gc`` or ``fsck`` keep the disk busy, and a disk that takes no write within
:data:`CHECK_TIMEOUT` still makes the host not ready.

``/healthz`` (alive) stays in app.py and checks nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from regproxy.config import Config
from regproxy.metrics import Metrics
from regproxy.proxy import ProxyRegistry
from regproxy.registry import Registry

log = logging.getLogger("regproxy.health")

CHECK_TIMEOUT: Final = 5.0  # a disk or index that takes longer than this is not ready
#: how long ``/readyz`` waits for its checks before it answers with the ones before: the
#: store's check fsyncs a file, which waits for the disk (10-500 ms on a busy one, during an
#: eviction's deletes), and the index's check may queue behind the web page's queries
ANSWER_SECONDS: Final = 0.02
SAMPLE_SECONDS: Final = 5.0  # how often upstream metrics are read into the last known state
READY_EVERY: Final = 6  # samples between readiness checks for ``regproxy_ready`` (30s)
#: error kinds that mean the host did not answer at all (others: it answered, with an error)
UNREACHABLE_KINDS: Final = frozenset({"connect", "timeout"})


@dataclass(slots=True)
class UpstreamState:
    answered: float = 0.0  # response-header count (any status) at the last sample
    failed: float = 0.0  # connect/timeout errors at the last sample
    last_ok: float | None = None  # wall-clock time an answer was last seen
    last_failure: float | None = None
    last_failure_kind: str | None = None

    @property
    def state(self) -> str:
        if self.last_ok is None and self.last_failure is None:
            return "unknown"
        if self.last_failure is None:
            return "reachable"
        if self.last_ok is None:
            return "unreachable"
        return "reachable" if self.last_ok >= self.last_failure else "unreachable"

    def to_json(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "last_ok": self.last_ok,
            "last_failure": self.last_failure,
            "last_failure_kind": self.last_failure_kind,
        }


def _counts(metrics: Metrics) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Answers per upstream source, and unreachable-kind errors per upstream source, from the
    counts the upstream clients keep (metrics.counts; the metrics are never read back)."""
    counts = metrics.counts
    answered = {src: float(n) for (kind, src), n in counts.answered.items() if kind == "upstream"}
    failed: dict[str, dict[str, float]] = {}
    for (kind, src), by_kind in counts.failed.items():
        if kind != "upstream":
            continue
        unreachable = {k: float(n) for k, n in by_kind.items() if k in UNREACHABLE_KINDS}
        if unreachable:
            failed[src] = unreachable
    return answered, failed


class UpstreamWatch:
    """Last known reachability of each upstream (and mirror, and peer), from the traffic."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.sources: dict[str, UpstreamState] = {}
        # what the metrics held before (a registry shared with an earlier app) is not news
        answered, failed = _counts(metrics)
        for source, n in answered.items():
            self.sources.setdefault(source, UpstreamState()).answered = n
        for source, kinds in failed.items():
            self.sources.setdefault(source, UpstreamState()).failed = sum(kinds.values())
        self._baseline = set(self.sources)

    def sample(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        answered, failed = _counts(self.metrics)
        for source in answered.keys() | failed.keys():
            st = self.sources.setdefault(source, UpstreamState())
            kinds = failed.get(source, {})
            n_fail = sum(kinds.values())
            if n_fail > st.failed:
                st.last_failure = now
                st.last_failure_kind = max(kinds, key=lambda k: kinds[k])
            n_ok = answered.get(source, 0.0)
            if n_ok > st.answered:
                st.last_ok = now  # both in one interval: it answers now, which is what counts
            st.answered, st.failed = n_ok, n_fail

    def to_json(self) -> dict[str, Any]:
        return {
            name: st.to_json()
            for name, st in sorted(self.sources.items())
            if name not in self._baseline or st.state != "unknown"
        }


def _touch(tmp: Path) -> None:
    """Write and fsync a few bytes in ``tmp/``, where uploads and fetches write.

    The file is unnamed (``O_TMPFILE``): it never shows in ``tmp/``, whose emptiness means "no
    partial upload or fetch" to the start-up sweep, ``fsck`` and the tests. A filesystem without
    ``O_TMPFILE`` gets a named file, removed at once."""
    path: Path | None = None
    try:
        fd = os.open(tmp, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise
        path = tmp / f".readyz-{uuid.uuid4().hex}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, b"ok")
        os.fsync(fd)
    finally:
        os.close(fd)
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


class _Check:
    """One readiness check at a time, answered within a budget.

    A caller starts the check unless one is running, and waits for it up to ``answer_within``;
    then it takes the last finished result instead (the disk is slow, not failing). A check
    still running :data:`CHECK_TIMEOUT` after it started is a failure (``timed_out``). Until
    one has finished, a caller waits for it (up to that timeout): there is no result before."""

    def __init__(
        self,
        run: Callable[[], Awaitable[str | None]],
        timed_out: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.run = run
        self.timed_out = timed_out
        self.clock = clock
        self.task: asyncio.Task[str | None] | None = None
        self.started = 0.0
        self.finished = False
        self.last: str | None = None

    async def result(self, answer_within: float) -> str | None:
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._run())
            self.started = self.clock()
        left = CHECK_TIMEOUT - (self.clock() - self.started)
        try:
            return await asyncio.wait_for(
                asyncio.shield(self.task), answer_within if self.finished else left
            )
        except TimeoutError:
            pass
        if self.clock() - self.started >= CHECK_TIMEOUT or not self.finished:
            return self.timed_out
        return self.last

    async def _run(self) -> str | None:
        self.last = await self.run()
        self.finished = True
        return self.last


class Health:
    def __init__(self, registry: Registry, config: Config) -> None:
        self.registry = registry
        self.config = config
        self.draining = False
        self.upstreams = UpstreamWatch(registry.metrics)
        tmp = registry.store.tmp
        self._store_check = _Check(
            self._store_writable, f"no write to {tmp} within {CHECK_TIMEOUT:.0f}s"
        )
        self._index_check = _Check(
            self._index_open, f"the index did not answer within {CHECK_TIMEOUT:.0f}s"
        )

    async def _store_writable(self) -> str | None:
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, _touch, self.registry.store.tmp)
        except OSError as exc:
            return f"{self.registry.store.tmp}: {exc.strerror or exc}"
        return None

    async def _index_open(self) -> str | None:
        try:
            await self.registry.catalog(1, None)
        except Exception as exc:  # sqlite3 errors and a closed index alike
            return f"{type(exc).__name__}: {exc}"
        return None

    async def check(self, extra: Mapping[str, bool] | None = None) -> tuple[int, dict[str, Any]]:
        """(HTTP status, body) for ``/readyz``; ``extra`` are more checks that must hold
        (``prefetch_done`` when ``prefetch.required_for_ready``)."""
        store_err, index_err = await asyncio.gather(
            self._store_check.result(ANSWER_SECONDS), self._index_check.result(ANSWER_SECONDS)
        )
        listener_err = "shutting down" if self.draining else None
        checks = {
            "store_writable": store_err is None,
            "index_open": index_err is None,
            "listener": listener_err is None,
            **(extra or {}),
        }
        ready = all(checks.values())
        self.registry.metrics.ready.set(
            1 if store_err is None and index_err is None and not self.draining else 0
        )
        body: dict[str, Any] = {"ready": ready, "checks": checks}
        errors = {
            k: v
            for k, v in (
                ("store_writable", store_err),
                ("index_open", index_err),
                ("listener", listener_err),
            )
            if v is not None
        }
        if errors:
            body["errors"] = errors
            log.warning("readyz.not_ready %s", " ".join(f"{k}={v!r}" for k, v in errors.items()))
        self.upstreams.sample()
        body["sync"] = self.config.sync_enable
        body["upstreams"] = self.upstreams.to_json()
        body["peers"] = self.peers()
        return (200 if ready else 503), body

    def peers(self) -> list[dict[str, Any]]:
        """The cluster's hosts as this one sees them: up, down (and for how long), self."""
        peers = self.registry.peers if isinstance(self.registry, ProxyRegistry) else None
        return peers.to_json() if peers is not None and peers.enabled else []

    async def lifespan(self, _app: object) -> AsyncIterator[None]:
        """For ``cleanup_ctx``: sample upstream state in the background while serving."""
        task = asyncio.create_task(self._sampler())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def on_shutdown(self, _app: object) -> None:
        self.draining = True

    async def _sampler(self) -> None:
        """Upstream state every SAMPLE_SECONDS; readiness (``regproxy_ready``) every READY_EVERY
        samples, so a host that nothing probes still reports it to Prometheus."""
        n = 0
        while True:
            try:
                if n % READY_EVERY == 0:
                    await self.check()
                else:
                    self.upstreams.sample()
            except Exception:  # the sampler must outlive any one failed check
                log.exception("health.sample_failed")
            n += 1
            await asyncio.sleep(SAMPLE_SECONDS)
