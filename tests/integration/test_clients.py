"""Real clients over real TCP: skopeo copies in and out, containerd's ctr pulls through a mirror."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tests.images import Image, make_image, make_index, sha256, write_layout
from tests.peers import Containerd, Daemon, have, http, skopeo, skopeo_raw, write_hosts_toml

pytestmark = [
    pytest.mark.peers,
    pytest.mark.skipif(not have("skopeo"), reason="skopeo missing"),
]

PROJECT = "spectro-images"


def _copy_in(src: str, dest: str, *extra: str) -> None:
    skopeo("copy", "--dest-tls-verify=false", *extra, src, f"docker://{dest}")


def _copy_out(src: str, dest: str, *extra: str) -> None:
    skopeo("copy", "--src-tls-verify=false", *extra, f"docker://{src}", dest)


def _raw_digest(ref: str) -> str:
    return sha256(skopeo_raw(ref))


def _layout_digest(layout: Path, tag: str) -> str:
    index = json.loads((layout / "index.json").read_text())
    found = [
        m["digest"]
        for m in index["manifests"]
        if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag
    ]
    assert len(found) == 1, index
    return str(found[0])


def _layout_blob(layout: Path, digest: str) -> bytes:
    alg, hex_ = digest.split(":")
    return (layout / "blobs" / alg / hex_).read_bytes()


@pytest.fixture
def layout(tmp_path: Path) -> tuple[Path, Image, bytes, dict[str, Image]]:
    """One single-arch image (tag ``single``) and one two-arch index (tag ``multi``)."""
    img = make_image("amd64")
    plats = {"amd64": make_image("amd64"), "arm64": make_image("arm64")}
    index = make_index(plats)
    src = tmp_path / "src"
    write_layout(src, {"single": img, "multi": (index, list(plats.values()))})
    return src, img, index, plats


def test_skopeo_oci_image_round_trip(
    daemon: Daemon, layout: tuple[Path, Image, bytes, dict[str, Image]], tmp_path: Path
) -> None:
    src, img, _, _ = layout
    ref = f"{daemon.hostport}/{PROJECT}/docker.io/library/x:oci"
    _copy_in(f"oci:{src}:single", ref)
    assert _raw_digest(ref) == img.digest
    # every form of the name reaches the same repository
    assert _raw_digest(f"{daemon.hostport}/docker.io/x:oci") == img.digest
    assert _raw_digest(f"{daemon.hostport}/docker.io/library/x@{img.digest}") == img.digest
    out = tmp_path / "out"
    _copy_out(f"{daemon.hostport}/docker.io/x:oci", f"oci:{out}:back")
    assert _layout_digest(out, "back") == img.digest
    assert _layout_blob(out, img.digest) == img.manifest
    for blob in (img.config, *img.layers):
        assert _layout_blob(out, sha256(blob)) == blob
    status, _, body = http("GET", f"{daemon.url}/v2/_catalog")
    assert status == 200
    assert f"{PROJECT}/docker.io/library/x" in json.loads(body)["repositories"]


def test_skopeo_docker_v2s2_round_trip(
    daemon: Daemon, layout: tuple[Path, Image, bytes, dict[str, Image]], tmp_path: Path
) -> None:
    src = layout[0]
    # convert once to a dir: copy so the exact v2s2 bytes skopeo pushes are known
    v2dir = tmp_path / "v2s2"
    skopeo("copy", "--format", "v2s2", f"oci:{src}:single", f"dir:{v2dir}")
    v2 = (v2dir / "manifest.json").read_bytes()
    assert json.loads(v2)["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    ref = f"{daemon.hostport}/docker.io/v2img:v1"
    _copy_in(f"dir:{v2dir}", ref, "--format", "v2s2")
    assert _raw_digest(ref) == sha256(v2)
    status, headers, body = http(
        "GET",
        f"{daemon.url}/v2/{PROJECT}/docker.io/library/v2img/manifests/v1",
        headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"},
    )
    assert status == 200 and body == v2
    assert headers["Content-Type"] == "application/vnd.docker.distribution.manifest.v2+json"
    assert headers["Docker-Content-Digest"] == sha256(v2)
    # back out, byte for byte (dir: keeps the manifest as it is)
    back = tmp_path / "back"
    _copy_out(f"{daemon.hostport}/{PROJECT}/docker.io/library/v2img:v1", f"dir:{back}")
    assert (back / "manifest.json").read_bytes() == v2
    # and into an OCI layout (skopeo converts v2s2 to OCI for oci:; the layers stay the same)
    out = tmp_path / "out"
    _copy_out(ref, f"oci:{out}:back")
    oci_manifest = json.loads(_layout_blob(out, _layout_digest(out, "back")))
    assert [layer["digest"] for layer in oci_manifest["layers"]] == [
        layer["digest"] for layer in json.loads(v2)["layers"]
    ]


def test_skopeo_multi_arch_index_round_trip(
    daemon: Daemon, layout: tuple[Path, Image, bytes, dict[str, Image]], tmp_path: Path
) -> None:
    src, _, index, plats = layout
    ref = f"{daemon.hostport}/{PROJECT}/docker.io/library/multi:v1"
    _copy_in(f"oci:{src}:multi", ref, "--all")
    assert _raw_digest(ref) == sha256(index)
    assert _raw_digest(f"{daemon.hostport}/docker.io/multi:v1") == sha256(index)
    for img in plats.values():
        assert _raw_digest(f"{daemon.hostport}/docker.io/multi@{img.digest}") == img.digest
    status, headers, _ = http(
        "HEAD",
        f"{daemon.url}/v2/docker.io/multi/manifests/v1",
        headers={"Accept": "application/vnd.oci.image.index.v1+json"},
    )
    assert status == 200
    assert headers["Content-Type"] == "application/vnd.oci.image.index.v1+json"
    assert headers["Docker-Content-Digest"] == sha256(index)
    out = tmp_path / "out"
    _copy_out(f"{daemon.hostport}/docker.io/multi:v1", f"oci:{out}:back", "--all")
    assert _layout_digest(out, "back") == sha256(index)
    assert _layout_blob(out, sha256(index)) == index
    for img in plats.values():
        assert _layout_blob(out, img.digest) == img.manifest
        for blob in (img.config, *img.layers):
            assert hashlib.sha256(_layout_blob(out, sha256(blob))).hexdigest() == sha256(blob)[7:]


@pytest.mark.skipif(not (have("containerd") and have("ctr")), reason="containerd missing")
def test_ctr_pulls_through_mirror(
    daemon: Daemon,
    containerd: Containerd,
    layout: tuple[Path, Image, bytes, dict[str, Image]],
    tmp_path: Path,
) -> None:
    src, img, index, plats = layout
    fake = "127.0.0.1:5999"  # a registry host nobody serves: only the mirror can answer
    _copy_in(f"oci:{src}:single", f"{daemon.hostport}/{PROJECT}/127.0.0.1_5999/app:v1")
    _copy_in(f"oci:{src}:multi", f"{daemon.hostport}/{PROJECT}/127.0.0.1_5999/multi:v1", "--all")
    hosts = tmp_path / "hosts"
    write_hosts_toml(hosts, fake, daemon.url)
    # what containerd asks first: HEAD of the tag with ?ns=
    status, headers, _ = http(
        "HEAD",
        f"{daemon.url}/v2/app/manifests/v1?ns=127.0.0.1%3A5999",
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json, */*"},
    )
    assert status == 200, headers
    assert headers["Docker-Content-Digest"] == img.digest
    assert headers["Content-Length"] == str(len(img.manifest))

    containerd.pull(hosts, f"{fake}/app:v1")
    listed = containerd.ctr("images", "ls").stdout
    assert f"{fake}/app:v1" in listed and img.digest in listed
    containerd.pull(hosts, f"{fake}/app@{img.digest}")
    # the layers really are in containerd's content store, with the digests pushed
    content = containerd.ctr("content", "ls").stdout
    for blob in (img.config, *img.layers):
        assert sha256(blob) in content
    # a multi-arch index: ctr picks this machine's platform (amd64)
    containerd.pull(hosts, "--platform", "linux/amd64", f"{fake}/multi:v1")
    listed = containerd.ctr("images", "ls").stdout
    assert sha256(index) in listed
    assert sha256(plats["amd64"].layers[0]) in containerd.ctr("content", "ls").stdout
    # requests went through regproxy with ns= (access log names the canonical repository)
    log = daemon.log()
    assert f"repo={PROJECT}/127.0.0.1_5999/app" in log


def test_skopeo_registry_to_registry_list_tags_and_delete(
    daemon: Daemon, layout: tuple[Path, Image, bytes, dict[str, Image]]
) -> None:
    src, img, _, _ = layout
    a = f"{daemon.hostport}/docker.io/library/first"
    b = f"{daemon.hostport}/{PROJECT}/docker.io/library/second"
    _copy_in(f"oci:{src}:single", f"{a}:v1")
    _copy_in(f"oci:{src}:single", f"{a}:v2")
    # regproxy to regproxy: skopeo mounts the blobs it already pushed there (?mount=&from=)
    skopeo(
        "copy",
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
        f"docker://{a}:v1",
        f"docker://{b}:v1",
    )
    assert _raw_digest(f"{b}:v1") == img.digest
    log = daemon.log()
    assert "blobs/uploads" in log
    tags = json.loads(skopeo("list-tags", "--tls-verify=false", f"docker://{a}").stdout)
    assert sorted(tags["Tags"]) == ["v1", "v2"]
    # skopeo inspect (not raw) reads the config blob too
    info = json.loads(skopeo("inspect", "--tls-verify=false", f"docker://{b}:v1").stdout)
    assert info["Digest"] == img.digest and info["Architecture"] == "amd64"
    skopeo("delete", "--tls-verify=false", f"docker://{b}:v1")
    status, _, body = http("GET", f"{daemon.url}/v2/docker.io/library/second/manifests/v1")
    assert status == 404
    assert json.loads(body)["errors"][0]["code"] in ("MANIFEST_UNKNOWN", "NAME_UNKNOWN")
    # the other repository is untouched
    assert _raw_digest(f"{a}:v2") == img.digest


@pytest.mark.skipif(not (have("containerd") and have("ctr")), reason="containerd missing")
def test_ctr_pulls_docker_hub_name_through_mirror(
    daemon: Daemon,
    containerd: Containerd,
    layout: tuple[Path, Image, bytes, dict[str, Image]],
    tmp_path: Path,
) -> None:
    src, img, _, _ = layout
    # pushed under the short form; containerd asks for library/hubimg with ?ns=docker.io
    _copy_in(f"oci:{src}:single", f"{daemon.hostport}/docker.io/hubimg:1.0")
    hosts = tmp_path / "hosts"
    write_hosts_toml(hosts, "docker.io", daemon.url)
    containerd.pull(hosts, "docker.io/library/hubimg:1.0")
    listed = containerd.ctr("images", "ls").stdout
    assert "docker.io/library/hubimg:1.0" in listed and img.digest in listed
    # an unknown tag is a clean failure, not a hang
    proc = containerd.ctr(
        "images",
        "pull",
        "--plain-http",
        "--hosts-dir",
        str(hosts),
        "docker.io/library/hubimg:nope",
        check=False,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "StatusNotFound" in (proc.stdout + proc.stderr)  # the mirror answered 404
