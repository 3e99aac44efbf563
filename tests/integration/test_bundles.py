"""Air-gapped content: bundles made by real tools, imported with sync disabled, pulled back."""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

from tests.images import make_image, make_index, write_layout
from tests.peers import REPO_ROOT, http, skopeo, skopeo_raw, write_hosts_toml

pytestmark = pytest.mark.peers
OFFLINE = {"content": {"sync": {"enable": False}}}


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def regproxy(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    cfg = root / "cli.yaml"
    if not cfg.exists():
        cfg.write_text(yaml.safe_dump({"storage": {"root": str(root / "store")}, **OFFLINE}))
    proc = subprocess.run(
        [sys.executable, "-m", "regproxy", "--config", str(cfg), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO_ROOT,
        check=False,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"regproxy {args} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def store_state(root: Path) -> tuple[set[str], set[str], list[str]]:
    """Files under blobs/ and tmp/, and the repositories a daemon would list."""
    store = root / "store"
    blobs = (
        {p.name for p in (store / "blobs").rglob("*") if p.is_file()}
        if (store / "blobs").exists()
        else set()
    )
    tmp = {p.name for p in (store / "tmp").iterdir()} if (store / "tmp").exists() else set()
    import sqlite3

    repos: list[str] = []
    if (store / "index.db").exists():
        with sqlite3.connect(store / "index.db") as db:
            repos = sorted(
                r[0] for r in db.execute("SELECT repo || '@' || digest FROM repo_manifests")
            )
            repos += sorted(r[0] for r in db.execute("SELECT repo || ':' || tag FROM tags"))
    return blobs, tmp, repos


@pytest.fixture
def bundles(tmp_path: Path):
    a, b = make_image("amd64"), make_image("arm64")
    idx = make_index({"amd64": a, "arm64": b})
    layout = tmp_path / "layout"
    write_layout(layout, {"v1": a, "multi": (idx, [a, b])})
    out = tmp_path / "bundles"
    out.mkdir()
    skopeo("copy", f"oci:{layout}:v1", f"oci-archive:{out}/oci.tar:docker.io/team/app:v1")
    skopeo(
        "copy", "--all", f"oci:{layout}:multi", f"oci-archive:{out}/multi.tar:ghcr.io/team/multi:2"
    )
    skopeo("copy", f"oci:{layout}:v1", f"docker-archive:{out}/docker.tar:team/dock:3")
    with open(out / "oci.tar", "rb") as src, gzip.open(out / "oci.tar.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    if shutil.which("zstd"):
        subprocess.run(
            ["zstd", "-q", "-o", str(out / "multi.tar.zst"), str(out / "multi.tar")], check=True
        )
    return {"layout": layout, "dir": out, "a": a, "b": b, "index": idx}


def test_import_every_kind_then_pull_offline(
    tmp_path: Path, bundles, daemon_factory, containerd
) -> None:
    node = tmp_path / "node"
    node.mkdir()
    d = bundles["dir"]
    paths = [d / "oci.tar.gz", d / "multi.tar", d / "docker.tar"]
    if (d / "multi.tar.zst").exists():
        paths.append(d / "multi.tar.zst")
    out = regproxy(node, "import", *map(str, paths))
    assert "spectro-images/docker.io/team/app:v1" in out.stdout
    r = regproxy(node, "import", str(bundles["layout"]), "--name", "docker.io/team/lay")
    assert "spectro-images/docker.io/team/lay:multi" in r.stdout
    again = regproxy(node, "import", str(d / "multi.tar"))
    assert "nothing new" in again.stdout

    proxy = daemon_factory({**OFFLINE, "storage": {"root": str(node / "store")}}, name="served")
    a, idx = bundles["a"], bundles["index"]
    assert sha(skopeo_raw(f"{proxy.hostport}/docker.io/team/app:v1")) == a.digest
    assert sha(skopeo_raw(f"{proxy.hostport}/docker.io/team/app@{a.digest}")) == a.digest
    assert sha(skopeo_raw(f"{proxy.hostport}/ghcr.io/team/multi:2")) == sha(idx)
    assert sha(skopeo_raw(f"{proxy.hostport}/docker.io/team/lay:multi")) == sha(idx)
    # the docker archive's config and layers keep their digests
    dock = json.loads(skopeo_raw(f"{proxy.hostport}/docker.io/team/dock:3"))
    assert dock["config"]["digest"] == json.loads(a.manifest)["config"]["digest"]
    copied = tmp_path / "copied"
    skopeo(
        "copy",
        "--all",
        "--src-tls-verify=false",
        f"docker://{proxy.hostport}/ghcr.io/team/multi:2",
        f"dir:{copied}",
    )
    assert sha((copied / "manifest.json").read_bytes()) == sha(idx)

    hosts = tmp_path / "hosts"
    write_hosts_toml(hosts, "ghcr.io", proxy.url)
    write_hosts_toml(hosts, "docker.io", proxy.url)
    containerd.pull(hosts, "ghcr.io/team/multi:2")
    containerd.pull(hosts, f"docker.io/team/app@{a.digest}")
    containerd.pull(hosts, "docker.io/team/dock:3")
    assert sha(idx) in containerd.ctr("images", "ls").stdout


def test_export_into_a_fresh_store_and_into_containerd(tmp_path: Path, bundles, containerd) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    regproxy(first, "import", str(bundles["dir"] / "multi.tar"), str(bundles["dir"] / "oci.tar"))
    archive = tmp_path / "export.tar"
    regproxy(first, "export", "ghcr.io/team/multi:2", "docker.io/team/app:v1", "-o", str(archive))
    r = regproxy(second, "import", str(archive))
    assert "spectro-images/ghcr.io/team/multi:2" in r.stdout
    assert "spectro-images/docker.io/team/app:v1" in r.stdout
    assert store_state(first)[0] == store_state(second)[0]
    # skopeo reads it by the reference we wrote
    out = tmp_path / "via-skopeo"
    skopeo("copy", "--all", f"oci-archive:{archive}:ghcr.io/team/multi:2", f"dir:{out}")
    assert sha((out / "manifest.json").read_bytes()) == sha(bundles["index"])
    # containerd imports it
    containerd.ctr("images", "import", "--all-platforms", str(archive))
    listed = containerd.ctr("images", "ls").stdout
    assert "ghcr.io/team/multi:2" in listed and sha(bundles["index"]) in listed
    # one platform only
    one = tmp_path / "amd64.tar"
    regproxy(first, "export", "ghcr.io/team/multi:2", "--platform", "linux/amd64", "-o", str(one))
    with tarfile.open(one) as tar:
        index = json.loads(tar.extractfile("index.json").read())  # type: ignore[union-attr]
    assert index["manifests"][0]["digest"] == bundles["a"].digest


def _rewrite(src: Path, dst: Path, change) -> None:
    """Copy a tar, letting change(name, data) return new data (or None to drop the member)."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for m in tin.getmembers():
            data = tin.extractfile(m).read() if m.isfile() else None  # type: ignore[union-attr]
            if data is not None:
                data = change(m.name, data)
                if data is None:
                    continue
                m.size = len(data)
                import io

                tout.addfile(m, io.BytesIO(data))
            else:
                tout.addfile(m)


def test_damaged_bundles_leave_the_store_exactly_as_before(tmp_path: Path, bundles) -> None:
    node = tmp_path / "node"
    node.mkdir()
    regproxy(node, "import", str(bundles["dir"] / "docker.tar"))  # something there before
    before = store_state(node)
    src = bundles["dir"] / "multi.tar"
    layer = json.loads(bundles["b"].manifest)["layers"][0]["digest"].split(":")[1]
    child = bundles["b"].digest.split(":")[1]

    def flip(name: str, data: bytes) -> bytes | None:
        return data[:-1] + bytes([data[-1] ^ 1]) if name.endswith(layer) else data

    def drop_layer(name: str, data: bytes) -> bytes | None:
        return None if name.endswith(layer) else data

    def drop_manifest(name: str, data: bytes) -> bytes | None:
        return None if name.endswith(child) else data

    cases = {}
    for label, change in (
        ("flipped", flip),
        ("missing-blob", drop_layer),
        ("missing-manifest", drop_manifest),
    ):
        p = tmp_path / f"{label}.tar"
        _rewrite(src, p, change)
        cases[label] = p
    truncated = tmp_path / "truncated.tar"
    data = src.read_bytes()
    truncated.write_bytes(data[: len(data) * 2 // 3])
    cases["truncated"] = truncated

    expect = {
        "flipped": f"sha256:{layer}",
        "missing-blob": f"sha256:{layer}",
        "missing-manifest": f"sha256:{child}",
        "truncated": "truncated",
    }
    for label, p in cases.items():
        r = regproxy(node, "import", str(p), check=False)
        assert r.returncode != 0, label
        msg = r.stderr
        assert expect[label] in msg or (label == "truncated" and "tar" in msg), (label, msg)
        if label.startswith("missing"):
            assert "ghcr.io/team/multi" in msg, msg  # names the image
        assert store_state(node) == before, label


def test_upload_over_http_imports_streamed(tmp_path: Path, bundles, daemon_factory) -> None:
    proxy = daemon_factory(OFFLINE)
    body = (bundles["dir"] / "multi.tar").read_bytes()
    status, _, resp = http(
        "POST", f"{proxy.url}/admin/import", body, {"Content-Type": "application/x-tar"}
    )
    assert status == 200, resp
    summary = json.loads(resp)
    assert summary["images"] == ["spectro-images/ghcr.io/team/multi:2"]
    assert sha(skopeo_raw(f"{proxy.hostport}/ghcr.io/team/multi:2")) == sha(bundles["index"])
    status, _, resp = http("POST", f"{proxy.url}/admin/import", b"not a tar at all")
    assert status == 400
    assert json.loads(resp)["errors"][0]["code"] == "BUNDLE_INVALID"
    # an index of an unexpected shape is the bundle's fault: 400, never a 500
    import io

    for index in (b'{"manifests": [42]}', b'{"manifests": [{"digest": "md5:abc"}]}', b"[]"):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            info = tarfile.TarInfo("index.json")
            info.size = len(index)
            tar.addfile(info, io.BytesIO(index))
        status, _, resp = http("POST", f"{proxy.url}/admin/import", buf.getvalue())
        assert status == 400, (index, resp)
        assert json.loads(resp)["errors"][0]["code"] == "BUNDLE_INVALID"
