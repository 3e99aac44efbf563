"""An index write on a full disk is 507, like a blob write, and the index works again once there
is room: an in-process daemon whose store is on a small tmpfs (needs root to mount; unmounted
by the test, also when it fails)."""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from regproxy.app import create_app
from regproxy.config import config_from_dict

pytestmark = [
    pytest.mark.process,  # mounts a tmpfs
    pytest.mark.filterwarnings("ignore::aiohttp.web_exceptions.NotAppKeyWarning"),
]
REPO = "/v2/spectro-images/team/app"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def mounted(tmp_path: Path, name: str, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` at ``tmp_path/name`` for the test, unmounted after it."""
    mnt = tmp_path / name
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
        capture_output=True,
        check=False,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr!r}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    yield from mounted(tmp_path, "tmpfs", "3m")


def fill(path: Path) -> None:
    """Take every free byte of the filesystem (a file written until ENOSPC)."""
    with open(path, "wb", buffering=0) as f:
        for size in (1 << 20, 1 << 12, 1 << 9, 1):
            try:
                for _ in range(1 << 14):  # bounded: 3 MiB fills long before
                    f.write(b"\0" * size)
            except OSError:
                continue


async def test_index_writes_on_a_full_disk_are_507_and_recover(tmpfs: Path) -> None:
    config = config_from_dict(
        {
            "storage": {"root": str(tmpfs / "store"), "min_free": 0},
            "content": {"sync": {"enable": False}},
            "log": {"access": False},
        }
    )
    layer, cfg = b"layer bytes " * 100, b'{"architecture":"amd64","os":"linux"}'
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": sha(cfg),
                "size": len(cfg),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": sha(layer),
                    "size": len(layer),
                }
            ],
        }
    ).encode()
    headers = {"Content-Type": OCI_MANIFEST}
    client: TestClient[Any, Any] = TestClient(TestServer(create_app(config), host="127.0.0.1"))
    await client.start_server()
    try:
        for blob in (layer, cfg):
            resp = await client.post(f"{REPO}/blobs/uploads/?digest={sha(blob)}", data=blob)
            assert resp.status == 201, await resp.text()
        assert (
            await client.put(f"{REPO}/manifests/v0", data=manifest, headers=headers)
        ).status == 201

        fill(tmpfs / "filler")
        statuses: list[int] = []
        for i in range(300):  # each new tag is an index write and nothing else
            resp = await client.put(f"{REPO}/manifests/t{i}", data=manifest, headers=headers)
            statuses.append(resp.status)
            if resp.status != 201:
                break
        assert statuses[-1] == 507, statuses
        error = (await resp.json())["errors"][0]
        assert "insufficient storage" in error["message"], error
        # an index-only blob mount too
        resp = await client.post(
            f"/v2/spectro-images/team/other/blobs/uploads/?mount={sha(layer)}&from=spectro-images/team/app"
        )
        assert resp.status in (201, 507), await resp.text()

        (tmpfs / "filler").unlink()
        # room again: the index takes writes (no transaction was left open) and lost nothing
        resp = await client.put(f"{REPO}/manifests/after", data=manifest, headers=headers)
        assert resp.status == 201, await resp.text()
        tags = (await (await client.get(f"{REPO}/tags/list")).json())["tags"]
        assert "v0" in tags and "after" in tags
        assert f"t{len(statuses) - 1}" not in tags  # the refused tag was not half-written
        resp = await client.get(f"{REPO}/manifests/after", headers={"Accept": OCI_MANIFEST})
        assert resp.status == 200 and await resp.read() == manifest
    finally:
        await client.close()


def test_store_commands_on_a_full_disk_say_so_in_one_line(
    tmpfs: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """gc (the command an operator runs on a full disk), fsck, pins, import and export: one
    line on stderr and exit 1, never a sqlite traceback; whether the index cannot even be opened
    (no room for its WAL files) or is open beside a daemon and a change does not fit."""
    import asyncio
    import sqlite3

    from regproxy import cli
    from regproxy.async_index import AsyncIndex
    from regproxy.names import RepoName
    from regproxy.oci import Digest
    from regproxy.registry import LocalRegistry
    from regproxy.store import Store

    monkeypatch.setattr(cli, "setup_logging", lambda level, fmt: None)
    root = tmpfs / "store"
    cfg_file = tmpfs.parent / "regproxy.yaml"
    cfg_file.write_text(f"storage:\n  root: {root}\ncontent:\n  sync:\n    enable: false\n")

    async def a_manifest_for_gc() -> None:
        registry = LocalRegistry(Store(root), AsyncIndex(root / "index.db"))
        await registry.open()
        repo, cfg = RepoName("spectro-images/app"), b"{}"

        async def body() -> Any:
            yield cfg

        cfg_digest = Digest("sha256", hashlib.sha256(cfg).hexdigest())
        await registry.uploads.monolithic(repo, cfg_digest, body(), len(cfg))
        m = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "layers": [],
                "config": {"mediaType": "a/b", "digest": str(cfg_digest), "size": len(cfg)},
            }
        ).encode()
        await registry.put_manifest(repo, sha(m), m, OCI_MANIFEST)
        await registry.delete_manifest(repo, sha(m))  # gc has a row to remove
        await registry.close()

    asyncio.run(a_manifest_for_gc())

    def run(*argv: str) -> str:
        assert cli.main([*argv, "--config", str(cfg_file)]) == 1, argv
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
        return lines[0]

    daemon = sqlite3.connect(root / "index.db")  # as a running daemon: its WAL files exist
    try:
        daemon.execute("SELECT count(*) FROM manifests").fetchone()
        fill(tmpfs / "filler")
        line = run("gc")
        assert line.startswith("regproxy gc: ") and "disk is full" in line, line
    finally:
        daemon.close()
    (tmpfs / "filler").unlink()
    sqlite3.connect(root / "index.db").close()  # the WAL files go with the last connection
    fill(tmpfs / "filler")
    for argv in (
        ["gc"],
        ["fsck"],
        ["pins"],
        ["import", str(tmpfs / "bundle.tar")],
        ["export", "docker.io/a/b:1", "-o", str(tmpfs.parent / "out.tar")],
    ):
        line = run(*argv)
        assert line.startswith(f"regproxy {argv[0]}: "), line
        assert "no space left" in line and str(root / "index.db") in line, line


async def test_a_pull_through_miss_on_a_full_disk_is_507_not_a_cut_200(tmpfs: Path) -> None:
    """The transfer fails at its first write: the client gets 507 (headers wait for the first
    byte to land), not a 200 cut at 0 bytes; with room again the same GET is served."""
    import os

    from tests.fakes import FakeUpstream

    upstream = await FakeUpstream().start()
    data = os.urandom(300_000)
    digest = upstream.add_blob(data)
    config = config_from_dict(
        {
            "storage": {"root": str(tmpfs / "store"), "min_free": 0},
            "log": {"access": False},
            "upstreams": {upstream.hostport: {"url": upstream.url, "alias": "fake.test"}},
        }
    )
    client: TestClient[Any, Any] = TestClient(TestServer(create_app(config), host="127.0.0.1"))
    await client.start_server()
    try:
        fill(tmpfs / "filler")
        for _ in range(2):
            resp = await client.get(f"/v2/fake.test/app/blobs/{digest}")
            assert resp.status == 507, await resp.text()
            assert "insufficient storage" in (await resp.json())["errors"][0]["message"]
        (tmpfs / "filler").unlink()
        resp = await client.get(f"/v2/fake.test/app/blobs/{digest}")
        assert resp.status == 200 and await resp.read() == data
    finally:
        await client.close()
        await upstream.stop()


@pytest.fixture
def roomy_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs with room for the store's reserve (regproxy.store.RESERVE_BYTES)."""
    yield from mounted(tmp_path, "roomy", "48m")


async def test_the_daemon_starts_on_a_full_disk_and_serves_what_it_holds(
    roomy_tmpfs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Something else filled the disk while regproxy was down: it starts anyway (the reserve it
    kept gives the index room to open), serves what it holds, and answers a push that does not
    fit with 507."""
    import os

    from regproxy.store import RESERVE_BYTES

    root = roomy_tmpfs / "store"
    config = config_from_dict(
        {"storage": {"root": str(root)}, "content": {"sync": {"enable": False}}}
    )
    blob = os.urandom(100_000)

    async def started() -> TestClient[Any, Any]:
        client: TestClient[Any, Any] = TestClient(TestServer(create_app(config), host="127.0.0.1"))
        await client.start_server()
        return client

    client = await started()
    try:
        resp = await client.post(f"{REPO}/blobs/uploads/?digest={sha(blob)}", data=blob)
        assert resp.status == 201, await resp.text()
    finally:
        await client.close()
    assert (root / "reserve").stat().st_size == RESERVE_BYTES
    fill(roomy_tmpfs / "filler")  # the index's WAL files went with the daemon: no room for them

    client = await started()
    try:
        resp = await client.get(f"{REPO}/blobs/{sha(blob)}")
        assert resp.status == 200 and await resp.read() == blob
        other = os.urandom(RESERVE_BYTES + 1_000_000)  # more than the reserve gave back
        resp = await client.post(f"{REPO}/blobs/uploads/?digest={sha(other)}", data=other)
        assert resp.status == 507, await resp.text()
    finally:
        await client.close()
    assert not (root / "reserve").exists()
    assert "store.reserve_released" in caplog.text


async def test_a_disk_that_fills_mid_body_cuts_the_pumped_transfer_and_keeps_no_partial(
    roomy_tmpfs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A body large enough for the pump thread (regproxy.pump) fits when it starts (its room is
    reserved, regproxy.space), then something else fills the disk after its first bytes went
    out: the response is cut (never completed), the temp file is gone, nothing is committed;
    with room again the same GET is pulled whole, through the pump."""
    import asyncio
    import logging
    import os

    import aiohttp

    from tests.fakes import BlobFault, FakeUpstream

    caplog.set_level(logging.INFO, logger="regproxy.fetch")
    upstream = await FakeUpstream().start()
    data = os.urandom(12 * 1024 * 1024)
    digest = upstream.add_blob(data)
    gate = asyncio.Event()
    fault = upstream.blob_faults[digest] = BlobFault(hold_at=2 * 1024 * 1024, gate=gate)
    root = roomy_tmpfs / "store"
    config = config_from_dict(
        {
            "storage": {"root": str(root), "min_free": 0},
            "log": {"access": False},
            "upstreams": {upstream.hostport: {"url": upstream.url, "alias": "fake.test"}},
        }
    )
    client: TestClient[Any, Any] = TestClient(TestServer(create_app(config), host="127.0.0.1"))
    await client.start_server()
    try:
        filler = roomy_tmpfs / "filler"
        resp = await client.get(f"/v2/fake.test/app/blobs/{digest}")
        assert resp.status == 200  # the first bytes landed before the disk filled
        await fault.holding.wait()
        fill(filler)
        os.truncate(filler, filler.stat().st_size - 1024 * 1024)  # 1 MiB of room left
        gate.set()
        with pytest.raises(aiohttp.ClientError):
            await resp.read()
        assert list((root / "tmp").iterdir()) == []
        assert not (root / "blobs" / "sha256" / digest[7:9] / digest[7:]).exists()
        filler.unlink()
        del upstream.blob_faults[digest]
        resp = await client.get(f"/v2/fake.test/app/blobs/{digest}")
        assert resp.status == 200 and await resp.read() == data
    finally:
        gate.set()
        await client.close()
        await upstream.stop()
    assert "no space left" in caplog.text
    assert f"fetch.committed digest={digest}" in caplog.text and "copy=thread" in caplog.text
