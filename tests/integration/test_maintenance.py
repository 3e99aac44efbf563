"""``regproxy fsck`` and ``regproxy gc`` beside a running daemon, with real peers."""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.images import make_image
from tests.peers import REPO_ROOT, Daemon, http, push_image, skopeo

pytestmark = pytest.mark.peers


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def blob_file(d: Daemon, digest: str) -> Path:
    hexd = digest.split(":")[1]
    return d.root / "store" / "blobs" / "sha256" / hexd[:2] / hexd


def cli(d: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "regproxy", "--config", str(d.root / "regproxy.yaml"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=str(REPO_ROOT),
    )


def pull(d: Daemon, name: str, out: Path) -> str:
    skopeo("copy", "--src-tls-verify=false", f"docker://{d.hostport}/{name}", f"dir:{out}")
    return sha((out / "manifest.json").read_bytes())


def state(d: Daemon) -> tuple[list[tuple[str, int]], dict[str, list[tuple]]]:
    """Every file under the store (but the index) and every index row."""
    root = d.root / "store"
    files = sorted(
        (str(p.relative_to(root)), p.stat().st_size)
        for p in root.rglob("*")
        if p.is_file() and not p.name.startswith("index.db")
    )
    db = sqlite3.connect(root / "index.db")
    try:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        rows = {t: sorted(db.execute(f"SELECT * FROM {t}").fetchall()) for t in tables}
    finally:
        db.close()
    return files, rows


def contents(d: Daemon) -> tuple[list[tuple[str, int]], dict[str, list[tuple]]]:
    """Files and what the index holds, without access times (the daemon flushes those)."""
    files, rows = state(d)
    keys = {t: sorted({r[:2] for r in v}) for t, v in rows.items()}
    return files, keys


@pytest.fixture
def upstream_image(tmp_path: Path, registry_factory):
    up = registry_factory()
    img = make_image(layer_sizes=(2048, 200_000))  # one small layer, one served from a file
    push_image(img, tmp_path / "layout", f"{up.hostport}/team/app:v1")
    return up, img


def test_fsck_quarantines_damage_and_the_next_pull_fetches_again(
    tmp_path: Path, upstream_image, daemon_factory
) -> None:
    up, img = upstream_image
    proxy = daemon_factory(
        {
            "upstreams": {up.hostport: {"url": up.url, "alias": "up.test"}},
            "storage": {"evict_interval": "1s"},
        }
    )
    assert pull(proxy, "up.test/team/app:v1", tmp_path / "first") == img.digest
    assert cli(proxy, "fsck").returncode == 0
    layer = sha(img.layers[1])
    path = blob_file(proxy, layer)
    data = bytearray(path.read_bytes())
    data[1000] ^= 0xFF
    path.write_bytes(bytes(data))
    gets = up.requests("GET", f"/blobs/{layer}")

    before = contents(proxy)
    r = cli(proxy, "fsck")  # reports, changes nothing
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"mismatch blob {layer}" in r.stdout
    assert "referenced by spectro-images/" in r.stdout and "fsck --repair" in r.stdout
    assert contents(proxy) == before
    r = cli(proxy, "fsck", "--repair")
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"mismatch blob {layer}" in r.stdout and "removed from the index" in r.stdout
    quarantined = proxy.root / "store" / "quarantine" / f"sha256-{layer.split(':')[1]}"
    assert quarantined.read_bytes() == bytes(data)
    assert not path.exists()
    assert cli(proxy, "fsck").returncode == 0  # the damage is out of the store and the index

    # the running daemon notices the index changed (next eviction tick) and fetches it again
    time.sleep(2.5)
    out = tmp_path / "second"
    assert pull(proxy, "up.test/team/app:v1", out) == img.digest
    assert (out / layer.split(":")[1]).read_bytes() == img.layers[1]
    assert up.requests("GET", f"/blobs/{layer}") == gets + 1
    assert path.read_bytes() == img.layers[1]


def test_gc_dry_run_changes_nothing_then_gc_removes_orphans_and_unreferenced(
    tmp_path: Path, upstream_image, daemon_factory
) -> None:
    up, img = upstream_image
    proxy = daemon_factory(
        {
            "upstreams": {up.hostport: {"url": up.url, "alias": "up.test"}},
            "storage": {"upload_ttl": "1s"},
        }
    )
    assert pull(proxy, "up.test/team/app:v1", tmp_path / "first") == img.digest
    # a pushed blob that no manifest ever referenced
    loose = os.urandom(5000)
    st, _, body = http(
        "POST", f"{proxy.url}/v2/spectro-images/mine/x/blobs/uploads/?digest={sha(loose)}", loose
    )
    assert st == 201, body
    # a file a crash left between rename and index row, and a stray temp file
    orphan = os.urandom(3000)
    opath = blob_file(proxy, sha(orphan))
    opath.parent.mkdir(parents=True, exist_ok=True)
    opath.write_bytes(orphan)
    stray = proxy.root / "store" / "tmp" / "deadbeef"
    stray.write_bytes(b"partial")
    old = time.time() - 7200
    for p in (opath, stray):
        os.utime(p, (old, old))
    # the loose blob is older than upload_ttl now: aged in the index as the files are on disk,
    # not waited for
    with contextlib.closing(sqlite3.connect(proxy.root / "store" / "index.db")) as db, db:
        db.execute(
            "UPDATE blobs SET created=?, last_access=? WHERE digest=?", (old, old, sha(loose))
        )

    before = state(proxy)
    r = cli(proxy, "gc", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert f"would remove blob {sha(loose)}" in r.stdout
    assert f"would remove orphan file {sha(orphan)}" in r.stdout
    assert "would remove temp file deadbeef" in r.stdout
    assert state(proxy) == before

    r = cli(proxy, "gc")
    assert r.returncode == 0, r.stderr
    assert f"removed blob {sha(loose)}" in r.stdout
    assert not opath.exists() and not stray.exists()
    assert not blob_file(proxy, sha(loose)).exists()
    _, rows = state(proxy)
    assert sha(loose) not in {row[0] for row in rows["blobs"]}
    # the image is untouched: every file it needs is there and it pulls without the upstream
    for blob in (img.manifest, img.config, *img.layers):
        assert blob_file(proxy, sha(blob)).read_bytes() == blob
    gets = sum(up.requests("GET", f"/blobs/{sha(b)}") for b in (img.config, *img.layers))
    assert pull(proxy, "up.test/team/app:v1", tmp_path / "after") == img.digest
    assert sum(up.requests("GET", f"/blobs/{sha(b)}") for b in (img.config, *img.layers)) == gets
    r = cli(proxy, "gc")
    assert "0 manifests, 0 blobs, 0 uploads, 0 temp files, 0 orphan files" in r.stdout
