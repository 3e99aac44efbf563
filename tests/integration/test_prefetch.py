"""Prefetch and pins against a real upstream (Debian's docker-registry) and real clients (skopeo)."""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.images import Image, make_image, make_index, write_layout
from tests.peers import REPO_ROOT, Daemon, free_port, http, skopeo, skopeo_raw

pytestmark = pytest.mark.peers


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def proxy_cfg(port: int, **extra):
    host = f"127.0.0.1:{port}"
    cfg = {"upstreams": {host: {"url": f"http://{host}", "alias": "up.test"}}}
    cfg.update(extra)
    return cfg


def push_images(tmp_path: Path, hostport: str) -> tuple[Image, Image, bytes, Image]:
    """team/app:multi (index of amd64 a + arm64 b) and team/app:v1 (amd64 c) on the upstream."""
    a, b, c = make_image("amd64"), make_image("arm64"), make_image("amd64")
    index = make_index({"amd64": a, "arm64": b})
    layout = tmp_path / "layout"
    write_layout(layout, {"v1": c, "multi": (index, [a, b])})
    dst = f"docker://{hostport}/team/app"
    skopeo("copy", "--all", "--dest-tls-verify=false", f"oci:{layout}:multi", f"{dst}:multi")
    skopeo("copy", "--dest-tls-verify=false", f"oci:{layout}:v1", f"{dst}:v1")
    return a, b, index, c


def metric(daemon: Daemon, name: str, labels: str = "") -> float:
    status, _, body = http("GET", f"{daemon.url}/metrics")
    assert status == 200
    pattern = re.escape(name + (f"{{{labels}}}" if labels else "")) + r" ([0-9.e+]+)"
    m = re.search(pattern, body.decode())
    return float(m.group(1)) if m else 0.0


def wait_for(what: str, predicate, timeout: float, daemon: Daemon | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    log = daemon.log() if daemon is not None else ""
    raise AssertionError(f"{what} did not happen within {timeout}s\n{log[-6000:]}")


def cli(daemon: Daemon, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "regproxy", "--config", str(daemon.root / "regproxy.yaml"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=str(REPO_ROOT),
        check=False,
    )


def pins_json(daemon: Daemon) -> list[dict]:
    out = cli(daemon, "pins", "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def store_blobs(daemon: Daemon) -> set[str]:
    db = sqlite3.connect(f"file:{daemon.root / 'store' / 'index.db'}?mode=ro", uri=True)
    try:
        return {r[0] for r in db.execute("SELECT digest FROM blobs")}
    finally:
        db.close()


def test_prefetch_upstream_down_at_start_then_up(
    tmp_path: Path, registry_factory, daemon_factory
) -> None:
    port = free_port()  # nothing listens here yet: the upstream is down at start-up
    up_host = f"127.0.0.1:{port}"
    images = [f"{up_host}/team/app:multi", {"image": "up.test/team/app:v1"}]
    proxy = daemon_factory(proxy_cfg(port, prefetch={"images": images, "interval": "1h"}))

    wait_for(
        "a failed prefetch attempt",
        lambda: "prefetch.retry images=2 in=2s attempt=3" in proxy.log(),  # two backoffs
        30,
        proxy,
    )
    assert metric(proxy, "regproxy_prefetch_images", 'state="done"') == 0
    assert f"upstream={'up.test'}" in proxy.log() or up_host in proxy.log()

    up = registry_factory(port=port)
    a, b, index, c = push_images(tmp_path, up.hostport)
    t0 = time.monotonic()
    wait_for(
        "prefetch of both images",
        lambda: metric(proxy, "regproxy_prefetch_images", 'state="done"') == 2,
        120,
        proxy,
    )
    print(f"prefetch completed {time.monotonic() - t0:.1f}s after the push")
    assert metric(proxy, "regproxy_prefetch_images", 'state="failed"') == 0
    every_blob = {sha(x) for img in (a, b, c) for x in (img.config, *img.layers)}
    assert metric(proxy, "regproxy_prefetch_bytes_total") >= sum(
        len(x) for img in (a, b, c) for x in (img.config, *img.layers)
    )
    assert every_blob <= store_blobs(proxy)
    assert "prefetch.image ref=" in proxy.log()

    # pinned: the index with both children, and the v1 image
    pins = {(p["repo"], p["digest"]): p for p in pins_json(proxy)}
    repo = "spectro-images/up.test/team/app"
    assert set(pins) == {(repo, sha(index)), (repo, c.digest)}
    assert sorted(pins[(repo, sha(index))]["children"]) == sorted([a.digest, b.digest])
    assert pins[(repo, sha(index))]["tags"] == ["multi"]
    assert pins[(repo, c.digest)]["tags"] == ["v1"]

    # the upstream goes away: everything is served from the store, by tag and by digest
    up.stop()
    for ref, want in (("multi", sha(index)), ("v1", c.digest)):
        assert sha(skopeo_raw(f"{proxy.hostport}/up.test/team/app:{ref}")) == want
        assert sha(skopeo_raw(f"{proxy.hostport}/up.test/team/app@{want}")) == want
    assert sha(skopeo_raw(f"{proxy.hostport}/up.test/team/app@{b.digest}")) == b.digest
    out = tmp_path / "out"
    skopeo(
        "copy",
        "--all",
        "--src-tls-verify=false",
        f"docker://{proxy.hostport}/up.test/team/app:multi",
        f"oci:{out}:multi",
    )
    copied = {p.name for p in (out / "blobs" / "sha256").iterdir()}
    assert {sha(x)[7:] for img in (a, b) for x in (img.config, *img.layers)} <= copied
    skopeo(
        "copy",
        "--src-tls-verify=false",
        f"docker://{proxy.hostport}/up.test/team/app@{b.digest}",
        f"oci:{out}:arm",
    )
    assert not re.search(r"\bfetch\.failed", proxy.log())  # nothing went upstream


def test_prefetch_platform_filter(tmp_path: Path, registry_factory, daemon_factory) -> None:
    up = registry_factory()
    a, b, index, _ = push_images(tmp_path, up.hostport)
    proxy = daemon_factory(
        proxy_cfg(
            up.port,
            prefetch={"images": ["up.test/team/app:multi"], "platforms": ["linux/amd64"]},
        )
    )
    wait_for(
        "prefetch",
        lambda: metric(proxy, "regproxy_prefetch_images", 'state="done"') == 1,
        60,
        proxy,
    )
    have = store_blobs(proxy)
    assert {sha(x) for x in (a.config, *a.layers)} <= have
    assert not {sha(x) for x in (b.config, *b.layers)} & have  # the arm64 child was left alone
    [pin] = pins_json(proxy)
    assert pin["digest"] == sha(index)
    assert pin["children"] == [a.digest]
    assert "platforms=linux/amd64" in proxy.log()

    up.stop()  # the amd64 image is served from the store
    out = tmp_path / "amd64"
    skopeo(
        "copy",
        "--src-tls-verify=false",
        f"docker://{proxy.hostport}/up.test/team/app@{a.digest}",
        f"oci:{out}:x",
    )


def test_pin_unpin_pins_round_trip(tmp_path: Path, registry_factory, daemon_factory) -> None:
    up = registry_factory()
    a, b, index, _ = push_images(tmp_path, up.hostport)
    proxy = daemon_factory(proxy_cfg(up.port))
    # pull-through content is not pinned
    skopeo(
        "copy",
        "--all",
        "--src-tls-verify=false",
        f"docker://{proxy.hostport}/up.test/team/app:multi",
        f"oci:{tmp_path / 'pulled'}:x",
    )
    assert pins_json(proxy) == []
    assert "0 pinned image(s)" in cli(proxy, "pins").stdout

    out = cli(proxy, "pin", "up.test/team/app:multi")
    assert out.returncode == 0, out.stderr
    assert f"pinned spectro-images/up.test/team/app@{sha(index)} (3 manifest(s))" in out.stdout
    [pin] = pins_json(proxy)
    assert pin["digest"] == sha(index) and sorted(pin["children"]) == sorted([a.digest, b.digest])
    table = cli(proxy, "pins").stdout
    assert "spectro-images/up.test/team/app" in table and "multi" in table
    assert "(index, 2 platform(s))" in table and "1 pinned image(s)" in table

    # a child by digest, then the index away: the child stays pinned on its own
    assert cli(proxy, "unpin", f"up.test/team/app@{sha(index)}").returncode == 0
    assert pins_json(proxy) == []
    assert cli(proxy, "pin", f"127.0.0.1:{up.port}/team/app@{a.digest}").returncode == 0
    assert [p["digest"] for p in pins_json(proxy)] == [a.digest]
    # the filter by repository, and a repository with no pins
    assert [
        p["digest"] for p in json.loads(cli(proxy, "pins", "up.test/team/app", "--json").stdout)
    ] == [a.digest]
    assert json.loads(cli(proxy, "pins", "up.test/other", "--json").stdout) == []
    assert cli(proxy, "unpin", f"up.test/team/app@{a.digest}").returncode == 0
    assert pins_json(proxy) == []

    # what is not in the store cannot be pinned: no fetch, exit 1
    missing = cli(proxy, "pin", "up.test/team/app:nope")
    assert missing.returncode == 1
    assert "not in the store" in missing.stderr


def test_prefetch_cli(tmp_path: Path, registry_factory, daemon_factory) -> None:
    up = registry_factory()
    _, b, index, c = push_images(tmp_path, up.hostport)
    proxy = daemon_factory(proxy_cfg(up.port))  # the CLI runs beside the daemon, same store

    out = cli(proxy, "prefetch", "up.test/team/app:v1")
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"[1/1] ok      up.test/team/app:v1 {c.digest}" in out.stdout
    assert "prefetched 1 of 1 image(s), 0 failed" in out.stdout
    assert [p["digest"] for p in pins_json(proxy)] == [c.digest]

    # a cluster profile's pack, pasted as it is; one of its images does not exist
    pack = tmp_path / "pack.yaml"
    pack.write_text(
        yaml.safe_dump(
            {
                "pack": {
                    "content": {
                        "images": [
                            {"image": f"{up.hostport}/team/app:multi"},
                            {"image": "up.test/team/app:missing"},
                        ]
                    }
                }
            }
        )
    )
    out = cli(
        proxy, "prefetch", "--from-file", str(pack), "--platform", "linux/arm64", "--attempts", "1"
    )
    assert out.returncode == 1, out.stdout + out.stderr
    assert "prefetched 1 of 2 image(s), 1 failed" in out.stdout
    assert "FAILED  up.test/team/app:missing" in out.stdout
    assert "failed: up.test/team/app:missing" in out.stderr
    have = store_blobs(proxy)
    assert {sha(x) for x in (b.config, *b.layers)} <= have
    assert not {sha(x) for x in c.layers} - have  # v1's, from before
    pins = {p["digest"]: p for p in pins_json(proxy)}
    assert pins[sha(index)]["children"] == [b.digest]

    # a second run stores nothing new
    again = cli(proxy, "prefetch", "up.test/team/app:v1")
    assert again.returncode == 0 and "0 B fetched" in again.stdout, again.stdout

    # the daemon serves what the CLI fetched, with the upstream gone
    up.stop()
    assert sha(skopeo_raw(f"{proxy.hostport}/up.test/team/app@{b.digest}")) == b.digest
    skopeo(
        "copy",
        "--src-tls-verify=false",
        f"docker://{proxy.hostport}/up.test/team/app@{b.digest}",
        f"oci:{tmp_path / 'arm'}:x",
    )

    # bad arguments: exit 2
    assert cli(proxy, "prefetch", "--platform", "linux", "x:1").returncode == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("pack: {content: {images: [{img: x}]}}\n")
    assert cli(proxy, "prefetch", "--from-file", str(bad)).returncode == 2
