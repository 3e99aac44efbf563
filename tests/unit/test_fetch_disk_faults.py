"""A write error of this host's own disk during a pull-through transfer (regproxy.fetch, on the
loop and on a pump thread) is the store's error, not the source's: no source is set aside or
tried next, the waiters get 507 (full) or 500 (EIO), nothing is committed, the temp file goes,
and the log line names the digest, the repository and the local file.

The faults are the kernel's own: past ``fail_at`` bytes the temp file's descriptor is swapped for
``/dev/full`` (ENOSPC) or a pty whose other side is closed (EIO)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from regproxy.async_index import AsyncIndex
from regproxy.config import config_from_dict
from regproxy.deadline import Timing
from regproxy.errors import OCIError, StorageFull, StoreFailed, UpstreamError
from regproxy.fetch import Fetcher, Source, Stream
from regproxy.names import NameResolver
from regproxy.oci import Digest
from regproxy.proxy import ProxyRegistry
from regproxy.store import BlobWriter, Store
from regproxy.upstream.answers import SocketBody
from tests.fakes import FakeUpstream
from tests.inproc import FakeTime

DATA = os.urandom(96 * 1024)
DIGEST = Digest.of(DATA)
HALF = len(DATA) // 2
REPO = "spectro-images/docker.io/team/app"


def broken_fd(fault: str) -> int:
    """A descriptor whose writes fail as a broken disk's do."""
    if fault == "ENOSPC":
        return os.open("/dev/full", os.O_WRONLY | os.O_CLOEXEC)
    master, slave = os.openpty()
    os.close(master)  # a write to the other side is now EIO
    return slave


class FaultyWriter(BlobWriter):
    """Its file takes ``fail_at`` bytes, then every write fails with the store's ``fault``."""

    fault = "EIO"
    fail_at = 0

    def write_unhashed(self, data: bytes | bytearray | memoryview) -> None:
        if self._fd is not None and self.size + len(data) > self.fail_at:
            bad = broken_fd(self.fault)
            os.dup2(bad, self._fd)
            os.close(bad)
        super().write_unhashed(data)


class FaultyStore(Store):
    """Its writers fail past ``fail_at`` bytes while ``armed``."""

    def __init__(self, root: Path, fault: str, fail_at: int, *, armed: bool = True) -> None:
        super().__init__(root)
        self.fault, self.fail_at, self.armed = fault, fail_at, armed

    def writer(
        self, name: str | None = None, *, append: bool = False, deferred: bool = False
    ) -> BlobWriter:
        if not self.armed:
            return super().writer(name, append=append, deferred=deferred)
        w = FaultyWriter(self, self.temp_path(name), append=append, deferred=deferred)
        w.fault, w.fail_at = self.fault, self.fail_at
        return w


@contextlib.contextmanager
def socket_errors(what: str) -> Iterator[None]:
    """As the upstream transport's guard: the socket's errors are the source's."""
    try:
        yield
    except OSError as exc:
        raise UpstreamError("peer.test", f"{what}: {exc}", kind="connect") from exc


class LoopStream:
    """The body in two chunks through the loop (``chunks``)."""

    size, offset = len(DATA), 0

    def __init__(self, source: str) -> None:
        self.source = source

    async def chunks(self) -> AsyncIterator[bytes]:
        with socket_errors("blob body"):
            yield DATA[:HALF]
            yield DATA[HALF:]

    async def close(self) -> None:
        pass


class SocketStream(LoopStream):
    """The body over a real socket, taken over by a pump thread (as a plain-HTTP source's is):
    ``DATA[:HALF]`` already read by the HTTP client (``head``), the rest in the socket."""

    def __init__(self, source: str) -> None:
        super().__init__(source)
        self.ours, theirs = socket.socketpair()
        with theirs:
            theirs.sendall(DATA[HALF:])  # fits the socket's buffer; then the sender is done

    def take_socket(self, at_least: int) -> SocketBody:
        return SocketBody(DATA[:HALF], len(DATA) - HALF, self.ours, socket_errors, 30.0)

    async def close(self) -> None:
        self.ours.close()


class Counted:
    """A source that counts its opens and the cuts it is blamed for."""

    def __init__(self, name: str, kind: str, copy: str) -> None:
        self.opens, self.cuts = 0, 0
        stream = SocketStream if copy == "thread" else LoopStream

        async def open_(digest: Digest, offset: int) -> Stream:
            self.opens += 1
            return stream(name)

        def cut(digest: Digest, exc: UpstreamError) -> None:
            self.cuts += 1

        self.source = Source(name, kind, open_, on_cut=cut)


@pytest.mark.parametrize("copy", ["loop", "thread"])
@pytest.mark.parametrize("fault", ["EIO", "ENOSPC"])
@pytest.mark.parametrize("at", [0, HALF], ids=["first-write", "mid-body"])
async def test_a_local_write_error_blames_no_source_and_commits_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, copy: str, fault: str, at: int
) -> None:
    caplog.set_level(logging.INFO, logger="regproxy.fetch")
    store = FaultyStore(tmp_path / "store", fault, at)
    store.open()

    async def on_commit(digest: Digest, size: int, repo: str, source: str) -> None:
        raise AssertionError("nothing may be committed")

    async def no_wait(seconds: float) -> None:
        await asyncio.sleep(0)

    f = Fetcher(store, on_commit, timing=Timing(sleep=no_wait))
    peer, upstream = Counted("peer.test", "peer", copy), Counted("up.test", "upstream", copy)
    t = f.start(DIGEST, [peer.source, upstream.source], REPO)
    got = bytearray()

    async def read() -> None:
        async for chunk in t.read_range(0, len(DATA) - 1):
            got.extend(chunk)

    try:
        with pytest.raises(OCIError) as err:
            await asyncio.wait_for(read(), 30)
        expected = StorageFull if fault == "ENOSPC" else StoreFailed
        assert type(err.value) is expected, err.value
        assert err.value.http_status == (507 if fault == "ENOSPC" else 500)
        assert len(got) < len(DATA)  # a cut, never a whole body
        assert (peer.opens, peer.cuts, upstream.opens) == (1, 0, 0)  # no resume, no next source
        assert list(store.tmp.iterdir()) == [] and store.stat(DIGEST) is None
        assert not f.inflight
        lines = [r.getMessage() for r in caplog.records if r.name == "regproxy.fetch"]
        assert not [x for x in lines if "source_failed" in x or "continue" in x], lines
        failed = [x for x in lines if x.startswith("fetch.store_failed ")]
        assert len(failed) == 1, lines
        assert f"digest={DIGEST} repo={REPO} path={store.tmp}/" in failed[0]
        assert fault in failed[0] and "peer.test" not in failed[0]
        reason = "no_space" if fault == "ENOSPC" else "io"
        counted = f.metrics.registry.get_sample_value(
            "regproxy_fetch_store_errors_total", {"reason": reason}
        )
        assert counted == 1
    finally:
        await f.drain(0)


def test_the_faults_are_the_kernels(tmp_path: Path) -> None:
    """The injected faults are what a write really gets (no fake exception)."""
    for fault, code in (("EIO", errno.EIO), ("ENOSPC", errno.ENOSPC)):
        fd = broken_fd(fault)
        try:
            with pytest.raises(OSError) as err:
                os.write(fd, b"x")
            assert err.value.errno == code
        finally:
            os.close(fd)


def manifest(upstream: FakeUpstream, tag: str, marker: str) -> str:
    config = marker.encode()
    body = (
        '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",'
        '"config":{"mediaType":"application/vnd.oci.image.config.v1+json",'
        f'"digest":"{upstream.add_blob(config)}","size":{len(config)}}},"layers":[]}}'
    ).encode()
    return upstream.add_manifest(
        "team/app", tag, body, "application/vnd.oci.image.manifest.v1+json"
    )


@pytest.mark.parametrize("fault", ["EIO", "ENOSPC"])
async def test_a_manifest_our_disk_cannot_take_is_not_blamed_on_the_upstream(
    tmp_path: Path, fault: str
) -> None:
    """A cold pull whose manifest cannot be written is the store's 507/500 (before: a 502
    "unusable manifest" from the upstream); a tag re-check that cannot store the moved tag
    serves the one held, as when the upstream cannot answer."""
    upstream = await FakeUpstream().start()
    clock = FakeTime()
    root = tmp_path / "store"
    store = FaultyStore(root, fault, 0, armed=False)
    config = config_from_dict(
        {
            "storage": {"root": str(root), "min_free": 0},
            "upstreams": {upstream.hostport: {"url": upstream.url, "alias": "fake.test"}},
            "tag_ttl": "1h",
        }
    )
    reg = ProxyRegistry(store, AsyncIndex(root / "index.db"), config, timing=clock.timing)
    await reg.open()
    try:
        repo, _ = NameResolver(config).parse_reference("fake.test/team/app")
        held = manifest(upstream, "v1", "one")
        assert str((await reg.get_manifest(repo, "v1")).digest) == held
        manifest(upstream, "v1", "two")  # the tag moved upstream
        manifest(upstream, "v2", "three")
        clock.advance(2 * 3600)
        store.armed = True
        with pytest.raises(OCIError) as err:
            await reg.get_manifest(repo, "v2")
        expected = StorageFull if fault == "ENOSPC" else StoreFailed
        assert type(err.value) is expected, err.value
        assert str((await reg.get_manifest(repo, "v1")).digest) == held  # stale, not an error
        assert list(store.tmp.iterdir()) == []
    finally:
        await reg.close()
        await upstream.stop()
