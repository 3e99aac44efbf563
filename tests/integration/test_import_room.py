"""A bundle import has its room above storage.min_free before each file is written
(regproxy.bundle over regproxy.space): the importer as ``regproxy import`` runs it (a registry of
its own, no evictor), the command's own function, and ``/admin/import`` in the app (create_app,
real TCP on 127.0.0.1); a store whose filesystem the room check sees as small."""

from __future__ import annotations

import io
import logging
import tarfile
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from regproxy.app import create_app
from regproxy.bundle import Importer
from regproxy.cli.bundles import run_import
from regproxy.config import Config, config_from_dict
from regproxy.errors import StorageFull
from regproxy.names import NameResolver, RepoName
from regproxy.proxy import ProxyRegistry, build_registry
from regproxy.space import NoRoom
from regproxy.store import Store
from regproxy.web_keys import REGISTRY_KEY
from tests.images import make_image, sha256, write_layout
from tests.room import small_disk_usage
from tests.unit.test_removal import RacingIndex

pytestmark = pytest.mark.filterwarnings("ignore::aiohttp.web_exceptions.NotAppKeyWarning")
KB = 1000
#: what the host's other workloads hold of the small filesystem the room check sees
OTHERS = 1000 * KB


def config(root: Path, **storage: object) -> Config:
    return config_from_dict(
        {
            "storage": {"root": str(root), "min_free": "1000KB", **storage},
            "content": {"sync": {"enable": False}},
            "log": {"access": False},
        }
    )


def small_disk(registry: ProxyRegistry, store: Path, size: int) -> None:
    """The store's filesystem, as the room check sees it, is ``size`` bytes: free is what the
    other workloads and the store's blobs and temp files leave of them."""

    registry.space.disk = small_disk_usage(store, size, OTHERS)


def temp_files(store: Path) -> list[Path]:
    return [p for p in (store / "tmp").rglob("*") if p.is_file()]


def blob_files(store: Path) -> list[Path]:
    return [p for p in (store / "blobs").rglob("*") if p.is_file()]


def refused(registry: ProxyRegistry, reason: str) -> float:
    sample = registry.metrics.registry.get_sample_value(
        "regproxy_import_refused_total", {"reason": reason}
    )
    return sample or 0.0


async def test_a_bundle_file_under_the_floor_refuses_the_bundle_which_a_rerun_imports(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """As ``regproxy import`` runs it (its own registry, the filesystem's free bytes alone):
    900 kB above the floor; a first bundle of ~100 kB goes in; a second of two 420 kB layers
    does not fit beside it: refused at the file that does not fit, with nothing of it left
    (no blob, no temp file, no row) and the first bundle still served; with room, a re-run
    imports it."""
    caplog.set_level(logging.INFO)
    store = tmp_path / "store"
    cfg = config(store)
    resolver = NameResolver(cfg)
    first, second = tmp_path / "first", tmp_path / "second"
    write_layout(first, {"docker.io/team/a:1": make_image(layer_sizes=(2048, 90_000))})
    write_layout(second, {"docker.io/team/b:1": make_image(layer_sizes=(420_000, 420_000))})
    registry = build_registry(cfg)
    await registry.open(sweep=False)
    try:
        small_disk(registry, store, OTHERS + 1000 * KB + 900 * KB)
        await Importer(registry, resolver).import_path(first)
        kept = blob_files(store)
        with pytest.raises(NoRoom) as no_room:
            await Importer(registry, resolver).import_path(second)
        detail = str(no_room.value.detail)
        assert "bundle file 'blobs/sha256/" in detail and "more than there is room for" in detail
        assert "min_free 1000000" in detail, detail
        assert refused(registry, "no_space") == 1
        line = next(ln for ln in caplog.text.splitlines() if "import.no_space" in ln)
        assert f"bundle={second}" in line and "file=blobs/sha256/" in line, line
        assert temp_files(store) == [] and sorted(blob_files(store)) == sorted(kept)
        assert registry.space.reserved == 0
        team_a = RepoName("spectro-images/docker.io/team/a", "docker.io", "team/a")
        team_b = RepoName("spectro-images/docker.io/team/b", "docker.io", "team/b")
        assert await registry.local_manifest(team_a, "1") is not None
        assert await registry.local_manifest(team_b, "1") is None
        small_disk(registry, store, OTHERS + 1000 * KB + 2000 * KB)
        summary = await Importer(registry, resolver).import_path(second)
        assert summary.blobs_new == 3 and await registry.local_manifest(team_b, "1") is not None
        assert temp_files(store) == []
    finally:
        await registry.close()


async def test_a_bundle_already_in_the_store_needs_no_room_for_its_blobs(tmp_path: Path) -> None:
    """Imported again, a layout's blobs the store holds are hashed, not written: with only a
    few kB above the floor (index.json's room) the re-run says nothing new."""
    store = tmp_path / "store"
    cfg = config(store)
    layout = tmp_path / "layout"
    write_layout(layout, {"docker.io/team/a:1": make_image(layer_sizes=(2048, 300_000))})
    registry = build_registry(cfg)
    await registry.open(sweep=False)
    try:
        small_disk(registry, store, OTHERS + 1000 * KB + 400 * KB)
        await Importer(registry, NameResolver(cfg)).import_path(layout)
        small_disk(registry, store, OTHERS + 1000 * KB + 320 * KB)  # ~10 kB above the floor
        summary = await Importer(registry, NameResolver(cfg)).import_path(layout)
        assert summary.to_json()["nothing_new"] and refused(registry, "no_space") == 0
    finally:
        await registry.close()


async def test_the_import_command_names_the_bundle_that_does_not_fit_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``regproxy import A B`` (the command's function, in this process): B's layer is larger
    than max_size, so B is refused with one line naming the file and the limit; A is imported
    and stays; the exit status is 1; nothing of B is left in tmp/."""
    store = tmp_path / "store"
    cfg = config(store, min_free=0, max_size="100KB")
    fits, too_big = tmp_path / "fits", tmp_path / "too-big"
    write_layout(fits, {"docker.io/team/a:1": make_image(layer_sizes=(2048, 20_000))})
    write_layout(too_big, {"docker.io/team/b:1": make_image(layer_sizes=(2048, 150_000))})
    assert await run_import(cfg, [fits, too_big], None) == 1
    out, err = capsys.readouterr()
    assert f"{fits}: imported" in out and "spectro-images/docker.io/team/a:1" in out
    line = next(ln for ln in err.splitlines() if str(too_big) in ln)
    assert "refused, insufficient storage: bundle file 'blobs/sha256/" in line, line
    assert "more than the cache may ever hold" in line and "max_size 100000" in line, line
    assert temp_files(store) == []
    await assert_a_imported_b_not(cfg)


async def assert_a_imported_b_not(cfg: Config) -> None:
    """team/a:1 is in the store, team/b:1 is not."""
    registry = build_registry(cfg)
    await registry.open(sweep=False)
    try:
        team_a = RepoName("spectro-images/docker.io/team/a", "docker.io", "team/a")
        team_b = RepoName("spectro-images/docker.io/team/b", "docker.io", "team/b")
        assert await registry.local_manifest(team_a, "1") is not None
        assert await registry.local_manifest(team_b, "1") is None
    finally:
        await registry.close()


def layout_tar(layout: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for p in sorted(layout.rglob("*")):
            if p.is_file():
                tar.add(p, arcname=str(p.relative_to(layout)))
    return buf.getvalue()


async def test_admin_import_without_room_is_507_for_the_body_and_for_its_files(
    tmp_path: Path,
) -> None:
    """/admin/import in the daemon: a bundle larger than the room above the floor is 507 before
    its body is read; one whose body fits but whose files do not fit beside it is 507 once
    they are staged; both with an OCI error body, counted, nothing left in the store."""
    store = tmp_path / "store"
    layout = tmp_path / "layout"
    write_layout(layout, {"docker.io/team/a:1": make_image(layer_sizes=(2048, 300_000))})
    body = layout_tar(layout)
    client: TestClient[Any, Any] = TestClient(
        TestServer(create_app(config(store)), host="127.0.0.1")
    )
    await client.start_server()
    try:
        registry = client.server.app[REGISTRY_KEY]
        assert isinstance(registry, ProxyRegistry)
        for above_floor, what in ((200 * KB, "the bundle (upload from"), (500 * KB, "file")):
            small_disk(registry, store, OTHERS + 1000 * KB + above_floor)
            resp = await client.post(
                "/admin/import", data=body, headers={"Content-Type": "application/x-tar"}
            )
            assert resp.status == 507, await resp.text()
            error = (await resp.json())["errors"][0]
            assert "insufficient storage" in error["message"], error
            assert what in error["detail"] and "more than there is room for" in error["detail"]
            assert temp_files(store) == [] and blob_files(store) == []
        assert refused(registry, "no_space") == 2
        assert registry.space.reserved == 0
        small_disk(registry, store, OTHERS + 1000 * KB + 1000 * KB)
        resp = await client.post("/admin/import", data=body)
        assert resp.status == 200, await resp.text()
        assert (await client.get("/v2/docker.io/team/a/manifests/1")).status == 200
    finally:
        await client.close()


async def test_an_index_that_fills_midway_says_what_was_imported_and_what_not(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``regproxy import`` of a bundle of two images whose index fills (507) as the second
    image's manifest is written: the line names the image imported before it and the one not
    (not "nothing of this bundle was imported"), exit 1, and the first image stays."""
    store = tmp_path / "store"
    cfg = config(store, min_free=0)
    a, b = make_image(seed=b"a"), make_image(seed=b"b")
    bundle = tmp_path / "two"
    write_layout(bundle, {"docker.io/team/a:1": a, "docker.io/team/b:1": b})
    db = RacingIndex(store / "index.db")

    async def full() -> None:
        raise StorageFull("the metadata index could not be written: database or disk is full")

    db.target, db.hook = sha256(b.manifest), full
    monkeypatch.setattr(
        "regproxy.proxy.build_registry", lambda c: ProxyRegistry(Store(store), db, c)
    )
    assert await run_import(cfg, [bundle], None) == 1
    line = next(ln for ln in capsys.readouterr().err.splitlines() if str(bundle) in ln)
    assert "stopped, insufficient storage: the metadata index could not be written" in line, line
    assert "imported before it: 1 image(s) (spectro-images/docker.io/team/a:1)" in line, line
    assert "not imported: 1 image(s) (spectro-images/docker.io/team/b:1)" in line, line
    assert "nothing of this bundle" not in line
    await assert_a_imported_b_not(cfg)
