"""Imports hold a bundle to its own claims: archives written by skopeo, then tampered with.

A docker archive's layer file names and its config's ``rootfs.diff_ids``, an OCI archive's
``index.json`` and descriptors: each lie is refused with a message naming it, and the store is
left exactly as it was (no blob files, no temp files, no index rows, no pins).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import lzma
import sqlite3
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp.test_utils import TestClient, TestServer

from regproxy.app import create_app
from regproxy.bundle import BundleError, Importer, ImportSummary
from regproxy.config import Config, config_from_dict
from regproxy.names import NameResolver
from regproxy.proxy import build_registry
from tests.images import make_image, write_layout
from tests.peers import REPO_ROOT, skopeo

pytestmark = [
    pytest.mark.peers,
    pytest.mark.filterwarnings("ignore::aiohttp.web_exceptions.NotAppKeyWarning"),
]
TABLES = ("repos", "blobs", "repo_blobs", "manifests", "repo_manifests", "manifest_refs", "tags")
Members = dict[str, bytes]


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _config(root: Path) -> Config:
    return config_from_dict(
        {
            "storage": {"root": str(root)},
            "content": {"sync": {"enable": False}},
            "log": {"access": False},
        }
    )


async def import_bundle(root: Path, bundle: Path) -> ImportSummary:
    config = _config(root)
    registry = build_registry(config)
    await registry.open(sweep=False)
    try:
        return await Importer(registry, NameResolver(config)).import_path(bundle)
    finally:
        await registry.close()


def state(root: Path) -> tuple[list[str], dict[str, list[Any]]]:
    """Every file under blobs/ and tmp/, and every row of the index (pins included)."""
    files = sorted(
        str(p.relative_to(root)) for d in ("blobs", "tmp") for p in (root / d).rglob("*")
    )
    rows: dict[str, list[Any]] = {}
    with sqlite3.connect(root / "index.db") as db:
        for table in TABLES:
            rows[table] = sorted(map(repr, db.execute(f"SELECT * FROM {table}")))
    return files, rows


def read_tar(path: Path) -> Members:
    with tarfile.open(path) as tar:
        return {
            m.name: tar.extractfile(m).read()  # type: ignore[union-attr]
            for m in tar.getmembers()
            if m.isfile()
        }


def write_tar(path: Path, members: Members) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def flip(data: bytes) -> bytes:
    mid = len(data) // 2
    return data[:mid] + bytes([data[mid] ^ 0xFF]) + data[mid + 1 :]


@pytest.fixture(scope="module")
def archives(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("archives")
    img = make_image("amd64", layer_sizes=(3000, 40_000))
    write_layout(d / "layout", {"v1": img})
    skopeo("copy", f"oci:{d / 'layout'}:v1", f"docker-archive:{d / 'docker.tar'}:team/x:1")
    skopeo("copy", f"oci:{d / 'layout'}:v1", f"oci-archive:{d / 'oci.tar'}:docker.io/team/x:1")
    docker = read_tar(d / "docker.tar")
    entry = json.loads(docker["manifest.json"])[0]
    return {
        "dir": d,
        "image": img,
        "docker": docker,
        "entry": entry,
        "oci": read_tar(d / "oci.tar"),
    }


@pytest.fixture
async def baseline(tmp_path: Path, archives: dict[str, Any]) -> Path:
    """A store that already holds the OCI archive's image (same name as the docker archive's)."""
    root = tmp_path / "store"
    await import_bundle(root, archives["dir"] / "oci.tar")
    return root


# --- docker archives ----------------------------------------------------------------------------
def _docker(archives: dict[str, Any], change: Callable[[Members, dict[str, Any]], None]) -> Members:
    members = dict(archives["docker"])
    entry = json.loads(json.dumps(archives["entry"]))
    change(members, entry)
    members["manifest.json"] = json.dumps([entry]).encode()
    return members


def _rename(members: Members, entry: dict[str, Any], old: str, data: bytes, ext: str) -> None:
    """Replace a file by data under the name its own digest gives, as the tools would."""
    new = sha(data).split(":")[1] + ext
    del members[old]
    members[new] = data
    if entry["Config"] == old:
        entry["Config"] = new
    entry["Layers"] = [new if p == old else p for p in entry["Layers"]]


def layer_changed_in_place(m: Members, e: dict[str, Any]) -> None:
    m[e["Layers"][0]] = flip(m[e["Layers"][0]])


def layer_changed_and_renamed(m: Members, e: dict[str, Any]) -> None:
    _rename(m, e, e["Layers"][1], flip(m[e["Layers"][1]]), ".tar")


def config_changed_in_place(m: Members, e: dict[str, Any]) -> None:
    cfg = json.loads(m[e["Config"]])
    cfg["architecture"] = "arm64"
    m[e["Config"]] = json.dumps(cfg).encode()


def config_claims_fewer_layers(m: Members, e: dict[str, Any]) -> None:
    cfg = json.loads(m[e["Config"]])
    cfg["rootfs"]["diff_ids"] = cfg["rootfs"]["diff_ids"][:1]
    _rename(m, e, e["Config"], json.dumps(cfg).encode(), ".json")


def gzip_layer_of_other_bytes(m: Members, e: dict[str, Any]) -> None:
    _rename(m, e, e["Layers"][0], gzip.compress(flip(m[e["Layers"][0]]), mtime=0), ".tar.gz")


def xz_layer(m: Members, e: dict[str, Any]) -> None:
    _rename(m, e, e["Layers"][0], lzma.compress(m[e["Layers"][0]]), ".tar.xz")


DOCKER_LIES = {
    layer_changed_in_place: ("layer '", "is damaged: its name says sha256:"),
    layer_changed_and_renamed: ("is damaged: its bytes hash to", "rootfs.diff_ids[1] is sha256:"),
    config_changed_in_place: ("config '", "is damaged: its name says sha256:"),
    config_claims_fewer_layers: ("2 layer file(s), but the config's rootfs.diff_ids lists 1",),
    gzip_layer_of_other_bytes: ("its gzip-decompressed bytes hash to", "rootfs.diff_ids[0]"),
    xz_layer: ("is xz-compressed",),
}


async def test_a_docker_archive_that_lies_is_refused_and_leaves_nothing(
    tmp_path: Path, archives: dict[str, Any], baseline: Path
) -> None:
    before = state(baseline)
    for change, expect in DOCKER_LIES.items():
        bundle = write_tar(tmp_path / f"{change.__name__}.tar", _docker(archives, change))
        with pytest.raises(BundleError) as refused:
            await import_bundle(baseline, bundle)
        msg = str(refused.value)
        assert all(e in msg for e in expect), (change.__name__, msg)
        assert msg.startswith("manifest.json entry 0: "), msg
        assert state(baseline) == before, change.__name__


async def test_compressed_docker_layers_are_checked_against_diff_ids_and_typed(
    tmp_path: Path, archives: dict[str, Any]
) -> None:
    """go-containerregistry writes gzip layers named by their own digest; zstd works the same."""
    layers: list[bytes] = []

    def compress(m: Members, e: dict[str, Any]) -> None:
        first, second = e["Layers"]
        _rename(m, e, first, gzip.compress(m[first], mtime=0), ".tar.gz")
        zstd = subprocess.run(
            ["zstd", "-q", "-c"], input=m[second], capture_output=True, check=True
        ).stdout
        _rename(m, e, second, zstd, ".tar.zst")
        layers.extend(m[p] for p in e["Layers"])

    root = tmp_path / "store"
    summary = await import_bundle(root, write_tar(tmp_path / "c.tar", _docker(archives, compress)))
    assert summary.images == ["spectro-images/docker.io/team/x:1"]
    config = _config(root)
    registry = build_registry(config)
    await registry.open(sweep=False)
    try:
        repo, _ = NameResolver(config).parse_reference("docker.io/team/x:1")
        m = await registry.get_manifest(repo, "1")
    finally:
        await registry.close()
    manifest = json.loads(m.body)
    assert [(d["mediaType"], d["digest"], d["size"]) for d in manifest["layers"]] == [
        ("application/vnd.oci.image.layer.v1.tar+gzip", sha(layers[0]), len(layers[0])),
        ("application/vnd.oci.image.layer.v1.tar+zstd", sha(layers[1]), len(layers[1])),
    ]
    assert (
        manifest["config"]["digest"] == json.loads(archives["image"].manifest)["config"]["digest"]
    )


async def test_an_honest_docker_archive_keeps_the_digests_its_config_names(
    tmp_path: Path, archives: dict[str, Any], baseline: Path
) -> None:
    before = state(baseline)
    await import_bundle(baseline, archives["dir"] / "docker.tar")
    assert state(baseline) != before  # it did change the store: the refusals above were real
    cfg = json.loads(archives["image"].config)
    layers = state(baseline)[1]["blobs"]
    assert all(any(d in row for row in layers) for d in cfg["rootfs"]["diff_ids"])


# --- OCI archives -------------------------------------------------------------------------------
def _oci(archives: dict[str, Any], change: Callable[[Members, dict[str, Any]], None]) -> Members:
    members = dict(archives["oci"])
    index = json.loads(members["index.json"])
    change(members, index)
    members["index.json"] = json.dumps(index).encode()
    return members


def index_size_wrong(m: Members, index: dict[str, Any]) -> None:
    index["manifests"][0]["size"] += 1


def index_media_type_wrong(m: Members, index: dict[str, Any]) -> None:
    index["manifests"][0]["mediaType"] = "application/vnd.oci.image.index.v1+json"


def layer_size_wrong(m: Members, index: dict[str, Any]) -> None:
    desc = index["manifests"][0]
    path = "blobs/sha256/" + desc["digest"].split(":")[1]
    manifest = json.loads(m.pop(path))
    manifest["layers"][1]["size"] -= 1
    body = json.dumps(manifest).encode()
    m["blobs/sha256/" + sha(body).split(":")[1]] = body
    desc["digest"], desc["size"] = sha(body), len(body)


def index_names_a_layer(m: Members, index: dict[str, Any]) -> None:
    """index.json pointing at a 40 kB layer as if it were the manifest."""
    layer = json.loads(m["blobs/sha256/" + index["manifests"][0]["digest"].split(":")[1]])
    index["manifests"][0]["digest"] = layer["layers"][1]["digest"]
    index["manifests"][0]["size"] = layer["layers"][1]["size"]


OCI_LIES = {
    index_size_wrong: "index.json says sha256:",
    index_media_type_wrong: "index.json says sha256:",
    layer_size_wrong: " bytes, the bundle's is ",
    index_names_a_layer: "is invalid",
}


async def test_an_oci_archive_whose_index_lies_is_refused_and_leaves_nothing(
    tmp_path: Path, archives: dict[str, Any], baseline: Path
) -> None:
    before = state(baseline)
    for change, expect in OCI_LIES.items():
        bundle = write_tar(tmp_path / f"{change.__name__}.tar", _oci(archives, change))
        with pytest.raises(BundleError) as refused:
            await import_bundle(baseline, bundle)
        assert expect in str(refused.value), (change.__name__, str(refused.value))
        assert "spectro-images/docker.io/team/x:1" in str(refused.value)
        assert state(baseline) == before, change.__name__


# --- the same refusals over HTTP and from the command line -------------------------------------------
async def test_upload_of_a_lying_bundle_is_400_bundle_invalid(
    tmp_path: Path, archives: dict[str, Any]
) -> None:
    root = tmp_path / "store"
    body = io.BytesIO()
    with tarfile.open(fileobj=body, mode="w") as tar:
        for name, data in _docker(archives, layer_changed_and_renamed).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    async with TestClient(TestServer(create_app(_config(root)), host="127.0.0.1")) as client:
        resp = await client.post("/admin/import", data=body.getvalue())
        assert resp.status == 400
        error = (await resp.json())["errors"][0]
        assert error["code"] == "BUNDLE_INVALID"
        assert "rootfs.diff_ids[1]" in error["detail"]
        assert (await client.get("/v2/docker.io/team/x/manifests/1")).status == 404
    assert [p for p in (root / "blobs").rglob("*") if p.is_file()] == []


def test_the_cli_names_the_lie_and_exits_1(tmp_path: Path, archives: dict[str, Any]) -> None:
    cfg = tmp_path / "cli.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {"storage": {"root": str(tmp_path / "s")}, "content": {"sync": {"enable": False}}}
        )
    )
    bundle = write_tar(tmp_path / "bad.tar", _docker(archives, layer_changed_in_place))
    proc = subprocess.run(
        [sys.executable, "-m", "regproxy", "--config", str(cfg), "import", str(bundle)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
        check=False,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    layer = archives["entry"]["Layers"][0]
    assert f"{bundle}: refused: manifest.json entry 0: layer {layer!r} is damaged" in proc.stderr


# --- hostile archives: refused as the bundle's fault, never a crash or a memory spike -------------------
async def test_hostile_archive_shapes_are_refused(tmp_path: Path, baseline: Path) -> None:
    before = state(baseline)
    # a GNU long name of 2 MiB: tarfile would read it whole into memory
    long_name = tmp_path / "long-name.tar"
    with tarfile.open(long_name, "w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo("n" * (2 * 1024 * 1024))
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(BundleError, match="extended header of 2097153 bytes"):
        await import_bundle(baseline, long_name)
    # a manifest nested 100,000 levels deep
    nested = b'{"schemaVersion": 2, "config": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": sha(nested),
                "size": len(nested),
                "annotations": {"org.opencontainers.image.ref.name": "docker.io/team/deep:1"},
            }
        ],
    }
    deep = write_tar(
        tmp_path / "deep.tar",
        {"index.json": json.dumps(index).encode(), "blobs/sha256/" + sha(nested)[7:]: nested},
    )
    with pytest.raises(BundleError, match="is invalid"):
        await import_bundle(baseline, deep)
    assert state(baseline) == before
