"""``regproxy containerd-config``: ctr pulls through regproxy with only the files it wrote."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from tests.conftest import needs_registry
from tests.images import make_image
from tests.peers import REPO_ROOT, Containerd, Daemon, DockerRegistry, have, push_image

pytestmark = [pytest.mark.peers]


def _containerd_config(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "regproxy", "--config", str(config), "containerd-config", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO_ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def _tree(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): p.read_text() for p in sorted(d.rglob("*")) if p.is_file()}


def test_files_backup_idempotent(tmp_path: Path) -> None:
    cfg = tmp_path / "regproxy.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "listen": "0.0.0.0:30003",
                "upstreams": {
                    "docker.io": {},
                    "index.docker.io": {},
                    "ghcr.io": {},
                    "*.pkg.dev": {},
                    "*": {},
                    "10.0.0.5:5000": {"url": "http://10.0.0.5:5000"},
                },
            }
        )
    )
    d = tmp_path / "certs.d"
    (d / "docker.io").mkdir(parents=True)
    theirs = 'server = "https://docker.io"\n'
    (d / "docker.io" / "hosts.toml").write_text(theirs)
    (d / "quay.io").mkdir()
    (d / "quay.io" / "hosts.toml").write_text(theirs)  # not ours to touch

    first = _containerd_config(cfg, "--dir", str(d), "--default").stdout
    tree = _tree(d)
    assert sorted(tree) == sorted(
        [
            "10.0.0.5:5000/hosts.toml",
            "_default/hosts.toml",
            "docker.io/hosts.toml",
            *[k for k in tree if k.startswith("docker.io/hosts.toml.bak-")],
            "ghcr.io/hosts.toml",
            "quay.io/hosts.toml",
        ]
    ), tree
    backups = [k for k in tree if k.startswith("docker.io/hosts.toml.bak-")]
    assert len(backups) == 1 and tree[backups[0]] == theirs
    assert tree["quay.io/hosts.toml"] == theirs
    hub = tree["docker.io/hosts.toml"]
    assert 'server = "https://registry-1.docker.io"' in hub
    assert '[host."http://127.0.0.1:30003"]\n  capabilities = ["pull", "resolve"]' in hub
    assert 'server = "http://10.0.0.5:5000"' in tree["10.0.0.5:5000/hosts.toml"]
    assert 'server = "https://ghcr.io"' in tree["ghcr.io/hosts.toml"]
    assert "server" not in tree["_default/hosts.toml"]
    assert f"replaced {d / 'docker.io' / 'hosts.toml'}" in first
    assert backups[0].split("/")[1] in first
    assert "'*.pkg.dev'" in first and "'*'" in first

    second = _containerd_config(cfg, "--dir", str(d), "--default").stdout
    assert "nothing changed" in second, second
    assert _tree(d) == tree

    dry = _containerd_config(cfg, "--dir", str(d), "--url", "http://10.1.1.1:30003", "--dry-run")
    assert "would be replaced" in dry.stdout
    assert _tree(d) == tree


@needs_registry
@pytest.mark.skipif(not (have("ctr") and have("skopeo")), reason="ctr/skopeo missing")
def test_ctr_pulls_through_regproxy_with_generated_files(
    daemon_factory: Callable[..., Daemon],
    registry_factory: Callable[..., DockerRegistry],
    containerd: Containerd,
    tmp_path: Path,
) -> None:
    upstream = registry_factory()
    img = make_image("amd64")
    push_image(img, tmp_path / "layout", f"{upstream.hostport}/team/app:v1")
    d = daemon_factory({"upstreams": {upstream.hostport: {"url": upstream.url}, "*.pkg.dev": {}}})
    hosts_dir = tmp_path / "certs.d"
    out = _containerd_config(d.root / "regproxy.yaml", "--dir", str(hosts_dir), "--url", d.url)
    assert f"created  {hosts_dir / upstream.hostport / 'hosts.toml'}" in out.stdout, out.stdout
    assert sorted(_tree(hosts_dir)) == [f"{upstream.hostport}/hosts.toml"]

    ref = f"{upstream.hostport}/team/app:v1"
    pulled = containerd.ctr(
        "images", "pull", "--hosts-dir", str(hosts_dir), "--plain-http", "--snapshotter",
        "native", ref,
    )  # fmt: skip
    assert img.digest in containerd.ctr("images", "ls").stdout, pulled.stdout
    # containerd asked regproxy, with ?ns= naming the registry: the upstream's repository
    log = d.log()
    manifest_lines = [
        line for line in log.splitlines()
        if "path=/v2/team/app/manifests/" in line and "status=200" in line
    ]  # fmt: skip
    assert manifest_lines, log
    canonical = f"repo=spectro-images/{upstream.hostport.replace(':', '_')}/team/app "
    assert all(canonical in line for line in manifest_lines), manifest_lines
    blob_lines = [ln for ln in log.splitlines() if "path=/v2/team/app/blobs/sha256:" in ln]
    assert len(blob_lines) >= 1 + len(img.layers), log  # config and every layer
    # and regproxy fetched them from the upstream: the pull went through it, not around it
    assert (
        upstream.requests("GET", f"/v2/team/app/manifests/{img.digest}")
        + upstream.requests("GET", "/v2/team/app/manifests/v1")
        >= 1
    )
