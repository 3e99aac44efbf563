"""Pull-through against real peers: Debian's docker-registry upstream, skopeo and ctr clients."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from tests.images import make_image, make_index, write_layout
from tests.peers import Containerd, make_htpasswd, push_image, skopeo, skopeo_raw, write_hosts_toml

pytestmark = pytest.mark.peers


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture
def upstream_with_images(tmp_path: Path, registry_factory):
    """A docker-registry holding an OCI image, a multi-arch index and a Docker v2s2 image."""
    up = registry_factory()
    a, b = make_image("amd64"), make_image("arm64")
    layout = tmp_path / "layout"
    write_layout(layout, {"v1": a, "multi": (make_index({"amd64": a, "arm64": b}), [a, b])})
    dst = f"docker://{up.hostport}/team/app"
    skopeo("copy", "--dest-tls-verify=false", f"oci:{layout}:v1", f"{dst}:v1")
    skopeo("copy", "--all", "--dest-tls-verify=false", f"oci:{layout}:multi", f"{dst}:multi")
    skopeo("copy", "--format", "v2s2", "--dest-tls-verify=false", f"oci:{layout}:v1", f"{dst}:v2s2")
    return up


def proxy_cfg(up_hostport: str, **extra):
    cfg = {"upstreams": {up_hostport: {"url": f"http://{up_hostport}", "alias": "up.test"}}}
    cfg.update(extra)
    return cfg


def layout_digest(layout: Path) -> str:
    """The top manifest digest of a layout: dir: keeps the exact bytes, oci: lists it."""
    if (layout / "manifest.json").exists():
        return sha((layout / "manifest.json").read_bytes())
    return json.loads((layout / "index.json").read_text())["manifests"][0]["digest"]


def test_skopeo_and_ctr_pull_through_then_upstream_down(
    tmp_path: Path, upstream_with_images, daemon_factory, containerd
) -> None:
    up = upstream_with_images
    proxy = daemon_factory(proxy_cfg(up.hostport, tag_ttl="0s"))
    want = {
        tag: sha(skopeo_raw(f"{up.hostport}/team/app:{tag}")) for tag in ("v1", "multi", "v2s2")
    }

    # skopeo, host as the first path part (alias form and host_port form)
    for tag, form in (("v1", "up.test"), ("multi", f"127.0.0.1_{up.port}"), ("v2s2", "up.test")):
        raw = skopeo_raw(f"{proxy.hostport}/{form}/team/app:{tag}")
        assert sha(raw) == want[tag], tag
        out = tmp_path / f"out-{tag}"
        skopeo(
            "copy",
            "--all",
            "--src-tls-verify=false",
            f"docker://{proxy.hostport}/{form}/team/app:{tag}",
            f"dir:{out}",
        )
        assert layout_digest(out) == want[tag]

    # containerd through hosts.toml: regproxy is the mirror of the upstream host (?ns=)
    hosts = tmp_path / "hosts"
    write_hosts_toml(hosts, up.hostport, proxy.url)
    ref = f"{up.hostport}/team/app:multi"
    containerd.pull(hosts, ref)
    listed = containerd.ctr("images", "ls").stdout
    assert want["multi"] in listed
    # containerd named the upstream only in ?ns=: the path has no host, yet the canonical
    # repository is the upstream's (the access log shows the path without the query)
    by_ns = [
        line for line in proxy.log().splitlines() if " path=/v2/team/app/manifests/multi " in line
    ]
    assert by_ns, proxy.log()
    assert all(" repo=spectro-images/up.test/team/app " in line for line in by_ns), by_ns

    # every blob crossed the upstream once at most
    log = up.log()
    blob_gets: dict[str, int] = {}
    for line in log.splitlines():
        if '"GET /v2/team/app/blobs/sha256:' in line:
            d = line.split("/blobs/")[1].split(" ")[0]
            blob_gets[d] = blob_gets.get(d, 0) + 1
    assert blob_gets and max(blob_gets.values()) == 1, blob_gets

    # the upstream goes away: the same pulls, by tag and by digest, still work
    up.stop()
    for tag in ("v1", "multi", "v2s2"):
        assert sha(skopeo_raw(f"{proxy.hostport}/up.test/team/app:{tag}")) == want[tag]
        assert sha(skopeo_raw(f"{proxy.hostport}/up.test/team/app@{want[tag]}")) == want[tag]
    out = tmp_path / "after-down"
    skopeo(
        "copy",
        "--all",
        "--src-tls-verify=false",
        f"docker://{proxy.hostport}/up.test/team/app:multi",
        f"oci:{out}:x",
    )
    assert layout_digest(out) == want["multi"]
    second = Containerd(Path(str(containerd.root) + "b"))
    second.start()
    try:
        second.pull(hosts, ref)
        second.pull(hosts, f"{up.hostport}/team/app@{want['v1']}")
    finally:
        second.stop()
        shutil.rmtree(second.root, ignore_errors=True)
    assert "tag.stale" in proxy.log()


def test_upstream_with_basic_auth(tmp_path: Path, registry_factory, daemon_factory) -> None:
    htpasswd = make_htpasswd(tmp_path / "htpasswd", "puller", "s3cret-pass")
    up = registry_factory(htpasswd=htpasswd)
    img = make_image("amd64")
    push_image(
        img,
        tmp_path / "layout",
        f"{up.hostport}/private/app:v1",
        "--dest-creds",
        "puller:s3cret-pass",
    )
    cfg = {
        "upstreams": {
            up.hostport: {
                "url": up.url,
                "alias": "private.test",
                "username": "puller",
                "password": "s3cret-pass",
            }
        }
    }
    proxy = daemon_factory(cfg)
    out = tmp_path / "out"
    skopeo(
        "copy",
        "--src-tls-verify=false",
        f"docker://{proxy.hostport}/private.test/private/app:v1",
        f"oci:{out}:x",
    )
    assert layout_digest(out) == img.digest
    assert "s3cret-pass" not in proxy.log()

    bad = daemon_factory(
        {
            "upstreams": {
                up.hostport: {
                    "url": up.url,
                    "alias": "private.test",
                    "username": "puller",
                    "password": "wrong",
                }
            }
        }
    )
    r = skopeo(
        "inspect",
        "--tls-verify=false",
        "--raw",
        f"docker://{bad.hostport}/private.test/private/app:v1",
        check=False,
    )
    assert r.returncode != 0
    assert "wrong" not in bad.log().replace("wrong password", "")


def test_same_name_pushed_and_pulled_share_one_namespace(
    tmp_path: Path, upstream_with_images, daemon_factory
) -> None:
    """Pulled-through content is in _catalog and tags/list under its canonical name."""
    up = upstream_with_images
    proxy = daemon_factory(proxy_cfg(up.hostport))
    skopeo_raw(f"{proxy.hostport}/up.test/team/app:v1")
    import urllib.request

    with urllib.request.urlopen(f"{proxy.url}/v2/_catalog") as r:
        repos = json.loads(r.read())["repositories"]
    assert "spectro-images/up.test/team/app" in repos
    with urllib.request.urlopen(f"{proxy.url}/v2/spectro-images/up.test/team/app/tags/list") as r:
        tags = json.loads(r.read())["tags"]
    assert {"v1", "multi", "v2s2"} <= set(tags)  # upstream's list merged with the local one


def test_blob_file_lost_from_disk_is_fetched_again(
    tmp_path: Path, registry_factory, daemon_factory
) -> None:
    """The index lists a blob whose file is gone: an upstream repository fetches it again, a
    pushed one answers BLOB_UNKNOWN; neither gets a broken response."""
    up = registry_factory()
    img = make_image("amd64", layer_sizes=(300_000,))
    push_image(img, tmp_path / "layout", f"{up.hostport}/team/app:v1")
    proxy = daemon_factory(proxy_cfg(up.hostport))
    layer = img.layers[0]
    d = sha(layer)
    url = f"{proxy.url}/v2/up.test/team/app/blobs/{d}"
    import urllib.request

    with urllib.request.urlopen(url) as r:
        assert r.read() == layer
    stored = proxy.root / "store" / "blobs" / "sha256" / d[7:9] / d[7:]
    stored.unlink()
    with urllib.request.urlopen(url) as r:  # cached lookups still say "here": fetched again
        assert r.read() == layer
    assert up.requests("GET", f"/blobs/{d}") == 2
    assert "store.missing" in proxy.log()

    # a pushed (local-only) repository has nowhere to fetch from: a clean 404
    from tests.peers import http

    status, _, _ = http(
        "POST", f"{proxy.url}/v2/spectro-images/mine/blobs/uploads/?digest={d}", layer
    )
    assert status == 201
    assert http("GET", f"{proxy.url}/v2/spectro-images/mine/blobs/{d}")[2] == layer
    stored.unlink()
    status, _, body = http("GET", f"{proxy.url}/v2/spectro-images/mine/blobs/{d}")
    assert status == 404 and json.loads(body)["errors"][0]["code"] == "BLOB_UNKNOWN"


def test_push_into_an_upstream_name_while_the_upstream_is_down(
    tmp_path: Path, daemon_factory
) -> None:
    """Pushed, imported and pulled content share one namespace: a push under an upstream's name
    works when that upstream cannot be reached (skopeo's HEAD must not become a 502)."""
    from tests.peers import free_port

    down = f"127.0.0.1:{free_port()}"  # nothing listens here
    proxy = daemon_factory(
        {
            "upstreams": {
                down: {"url": f"http://{down}", "alias": "down.test", "connect_timeout": "1s"}
            }
        }
    )
    a, b = make_image("amd64"), make_image("arm64")
    idx = make_index({"amd64": a, "arm64": b})
    layout = tmp_path / "layout"
    write_layout(layout, {"multi": (idx, [a, b])})
    dest = f"docker://{proxy.hostport}/down.test/team/app:multi"
    skopeo("copy", "--all", "--dest-tls-verify=false", f"oci:{layout}:multi", dest)
    assert sha(skopeo_raw(f"{proxy.hostport}/down.test/team/app:multi")) == sha(idx)
    out = tmp_path / "out"
    skopeo("copy", "--all", "--src-tls-verify=false", dest, f"dir:{out}")
    assert sha((out / "manifest.json").read_bytes()) == sha(idx)


def test_push_into_an_upstream_name_that_the_upstream_holds(
    tmp_path: Path, upstream_with_images, daemon_factory
) -> None:
    """skopeo's HEAD finds the blobs (they come from upstream), it skips their upload, and the
    manifest PUT waits for those transfers instead of failing with MANIFEST_BLOB_UNKNOWN."""
    up = upstream_with_images
    proxy = daemon_factory(proxy_cfg(up.hostport))
    src = f"docker://{up.hostport}/team/app:v1"
    dest = f"docker://{proxy.hostport}/up.test/team/app:pushed"
    skopeo("copy", "--src-tls-verify=false", "--dest-tls-verify=false", src, dest)
    want = sha(skopeo_raw(f"{up.hostport}/team/app:v1"))
    assert sha(skopeo_raw(f"{proxy.hostport}/up.test/team/app:pushed")) == want
