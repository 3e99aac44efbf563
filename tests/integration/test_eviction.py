"""Eviction against real peers: a docker-registry upstream, skopeo, a regproxy daemon."""

from __future__ import annotations

import hashlib
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.images import Image, make_image
from tests.peers import Daemon, http, push_image, skopeo

pytestmark = pytest.mark.peers
LAYER = 600_000  # bytes of random payload: one image is ~600 kB in the store


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def blob_file(d: Daemon, digest: str) -> Path:
    hexd = digest.split(":")[1]
    return d.root / "store" / "blobs" / "sha256" / hexd[:2] / hexd


def pull(d: Daemon, name: str, out: Path) -> str:
    """skopeo copy through regproxy into a dir: layout; the manifest digest it got."""
    skopeo("copy", "--src-tls-verify=false", f"docker://{d.hostport}/{name}", f"dir:{out}")
    return sha((out / "manifest.json").read_bytes())


def metric(d: Daemon, name: str) -> float:
    _, _, body = http("GET", f"{d.url}/metrics")
    m = re.search(rf"^{name} ([0-9.e+]+)$", body.decode(), re.MULTILINE)
    assert m, name
    return float(m.group(1))


def wait_for(pred, timeout: float = 40.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_lru_unpinned_go_pinned_and_recent_stay(
    tmp_path: Path, registry_factory, daemon_factory
) -> None:
    up = registry_factory()
    images: dict[str, Image] = {}
    for i in range(5):
        img = make_image(layer_sizes=(LAYER,))
        images[f"a{i}"] = img
        push_image(img, tmp_path / f"layout-a{i}", f"{up.hostport}/team/a{i}:v1")
    proxy = daemon_factory(
        {
            "upstreams": {up.hostport: {"url": up.url, "alias": "up.test"}},
            "tag_ttl": "1h",
            "storage": {"max_size": "2.8MB", "min_free": 0, "evict_interval": "1s"},
        }
    )
    # a pushed image is pinned: it is the oldest content and must survive
    pinned = make_image(layer_sizes=(LAYER,))
    push_image(
        pinned, tmp_path / "layout-pinned", f"{proxy.hostport}/spectro-images/mine/pinned:v1"
    )
    # 4 images, ~2.4 MB: under the limit
    for name in ("a0", "a1", "a2"):
        assert (
            pull(proxy, f"up.test/team/{name}:v1", tmp_path / f"p1-{name}") == images[name].digest
        )
    assert pull(proxy, "up.test/team/a0:v1", tmp_path / "p2-a0") == images["a0"].digest  # recent
    assert "evict.manifest" not in proxy.log()
    # two more: ~3.6 MB, over 2.8 MB: a1 and a2 (least recently used, unpinned) must go
    for name in ("a3", "a4"):
        assert (
            pull(proxy, f"up.test/team/{name}:v1", tmp_path / f"p1-{name}") == images[name].digest
        )

    # after the in-use guard (5 s since the last access) a1, then a2 go
    # a round's files are unlinked after its rows went (evict.manifest): its evict.done line
    # comes once the last of them is gone
    def a2_round_done() -> bool:
        log = proxy.log()
        return "team/a2 digest" in log and "evict.done" in log.split("team/a2 digest", 1)[1]

    wait_for(a2_round_done, what="an eviction of a1 and a2, its files gone")
    log = proxy.log()
    evicted = re.findall(r"evict\.manifest repo=(\S+) digest=(\S+) bytes=(\d+)", log)
    assert [r.rsplit("/", 2)[-2:] for r, _, _ in evicted] == [["team", "a1"], ["team", "a2"]], log
    assert [d for _, d, _ in evicted] == [images["a1"].digest, images["a2"].digest]
    assert all(int(b) > LAYER for _, _, b in evicted)
    for name in ("a1", "a2"):
        assert not blob_file(proxy, sha(images[name].layers[0])).exists()
        assert not blob_file(proxy, images[name].digest).exists()
    for img in (pinned, images["a0"], images["a3"], images["a4"]):
        assert blob_file(proxy, sha(img.layers[0])).exists()
    assert metric(proxy, "regproxy_evicted_bytes_total") >= 2 * LAYER
    assert metric(proxy, "regproxy_pinned_bytes") >= LAYER
    assert metric(proxy, "regproxy_store_bytes") <= 2_800_000
    assert metric(proxy, "regproxy_store_limit_bytes") == 2_800_000
    assert metric(proxy, "regproxy_evict_short_bytes") == 0  # what had to go could go
    assert metric(proxy, "regproxy_store_filesystem_free_bytes") > 0

    # every kept image still pulls, from the store (no new upstream blob GETs)
    before = {n: up.requests("GET", f"/blobs/{sha(images[n].layers[0])}") for n in images}
    for name in ("a0", "a3", "a4"):
        assert (
            pull(proxy, f"up.test/team/{name}:v1", tmp_path / f"p3-{name}") == images[name].digest
        )
        assert up.requests("GET", f"/blobs/{sha(images[name].layers[0])}") == before[name]
    assert pull(proxy, "spectro-images/mine/pinned:v1", tmp_path / "p3-pinned") == pinned.digest
    # an evicted one pulls again, from upstream, with the right bytes
    out = tmp_path / "p3-a1"
    assert pull(proxy, "up.test/team/a1:v1", out) == images["a1"].digest
    assert up.requests("GET", f"/blobs/{sha(images['a1'].layers[0])}") == before["a1"] + 1
    layer = out / sha(images["a1"].layers[0]).split(":")[1]
    assert layer.read_bytes() == images["a1"].layers[0]


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        check=False,
    )
    return r.returncode == 0


def test_disk_full_fails_cleanly_and_keeps_what_was_stored(
    tmp_path: Path, registry_factory, daemon_factory
) -> None:
    mnt = tmp_path / "tmpfs"
    if not _mount_tmpfs(mnt, "6m"):
        pytest.skip("cannot mount a tmpfs here (needs root and mount permission)")
    proxy: Daemon | None = None
    try:
        up = registry_factory()
        small, big = make_image(layer_sizes=(300_000,)), make_image(layer_sizes=(8_000_000,))
        for name, img in (("small", small), ("big", big)):
            push_image(img, tmp_path / f"layout-{name}", f"{up.hostport}/team/{name}:v1")
        proxy = daemon_factory(
            {
                "upstreams": {up.hostport: {"url": up.url, "alias": "up.test"}},
                "storage": {"root": str(mnt / "store"), "min_free": 0},
            }
        )
        assert pull(proxy, "up.test/team/small:v1", tmp_path / "small") == small.digest
        # a pull-through that does not fit fails; so does a push
        r = skopeo(
            "copy",
            "--src-tls-verify=false",
            f"docker://{proxy.hostport}/up.test/team/big:v1",
            f"dir:{tmp_path / 'big'}",
            check=False,
        )
        assert r.returncode != 0
        data = b"\0" * 7_000_000
        st, _, body = http(
            "POST",
            f"{proxy.url}/v2/spectro-images/mine/big/blobs/uploads/?digest={sha(data)}",
            data,
        )
        assert st == 507, body
        # nothing stored before is damaged, nothing partial is left behind
        assert list((mnt / "store" / "tmp").iterdir()) == []
        assert pull(proxy, "up.test/team/small:v1", tmp_path / "small2") == small.digest
        assert (tmp_path / "small2" / sha(small.layers[0]).split(":")[1]).read_bytes() == (
            small.layers[0]
        )
        proxy.stop()
        fsck = subprocess.run(
            ["python", "-m", "regproxy", "--config", str(proxy.root / "regproxy.yaml"), "fsck"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    finally:
        if proxy is not None:
            proxy.stop()
        subprocess.run(["umount", str(mnt)], check=False)
