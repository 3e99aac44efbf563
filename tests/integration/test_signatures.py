"""The signature policy with real clients: Debian's docker-registry upstream, skopeo.

skopeo writes and reads the signatures (``use-sigstore-attachments`` in a registries.d of the
test's own); the signing itself is tests/signing.py's (Debian's skopeo has sigstore disabled).
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from regproxy.cosign import load_public_key, verify_simple_signing
from tests.images import make_image, write_layout
from tests.peers import REPO_ROOT, DockerRegistry, error_codes, http, skopeo, skopeo_raw
from tests.signing import (
    Key,
    bundle_referrer,
    dsse_bundle,
    make_key,
    payload,
    push_artifact,
    read_dir_signatures,
    registries_d,
    sbom_referrer,
    sha256,
    sign_dir,
)

pytestmark = pytest.mark.peers
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


@dataclass
class Upstream:
    registry: DockerRegistry
    key: Key
    pub: Path
    digests: dict[str, str]  # tag -> manifest digest
    referrers: dict[str, str]  # referrer digest -> artifactType, of the v1 image (upstream's view)


def skopeo_with(rd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return skopeo("--registries.d", str(rd), *args, check=check)


def signed_copy(
    tmp: Path, rd: Path, dest: str, key: Key | None, *, names: str | None = None
) -> str:
    """A fresh image copied to ``dest`` with skopeo; signed (sigstore attachment) by ``key``,
    over ``names`` when given (a signature of another digest)."""
    layout, staged = tmp / f"oci-{dest.rsplit(':', 1)[-1]}", tmp / f"dir-{dest.rsplit(':', 1)[-1]}"
    write_layout(layout, {"v1": make_image()})
    skopeo("copy", f"oci:{layout}:v1", f"dir:{staged}")
    digest = sha256((staged / "manifest.json").read_bytes())
    if key is not None:
        sign_dir(staged, key, names)
    skopeo_with(rd, "copy", "--dest-tls-verify=false", f"dir:{staged}", f"docker://{dest}")
    return digest


@pytest.fixture
def upstream(tmp_path: Path, registry_factory) -> Upstream:
    up = registry_factory()
    rd = registries_d(tmp_path / "registries.d", up.hostport)
    key, other = make_key(), make_key()
    base = f"{up.hostport}/team/app"
    digests = {
        "v1": signed_copy(tmp_path, rd, f"{base}:v1", key),
        "unsigned": signed_copy(tmp_path, rd, f"{base}:unsigned", None),
        "otherkey": signed_copy(tmp_path, rd, f"{base}:otherkey", other),
        "wrongdigest": signed_copy(tmp_path, rd, f"{base}:wrongdigest", key, names=sha256(b"x")),
    }
    # cosign v3's form only: a sigstore bundle attached as a referrer (listed in the tag schema)
    digests["bundled"] = signed_copy(tmp_path, rd, f"{base}:bundled", None)
    bundled = bundle_referrer(digests["bundled"], 1, dsse_bundle(digests["bundled"], key))
    d = push_artifact(up.url, "team/app", *bundled)
    push_artifact(
        up.url,
        "team/app",
        json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_INDEX,
                "manifests": [{"mediaType": OCI_MANIFEST, "digest": d, "size": len(bundled[0])}],
            }
        ).encode(),
        {},
        ref=f"sha256-{digests['bundled'][7:]}",
        media_type=OCI_INDEX,
    )
    # bad signature manifests: 100 layers; one far too large; a signed payload that is no JSON
    for tag, layers in (
        ("manylayers", 100),
        ("hugesig", 1),
        ("badpayload", 1),
    ):
        digests[tag] = signed_copy(tmp_path, rd, f"{base}:{tag}", None)
        body = b"not json at all" if tag == "badpayload" else payload(digests[tag])
        note = "A" * (400 * 1024) if tag == "hugesig" else base64.b64encode(key.sign(body)).decode()
        layer = {
            "mediaType": "application/vnd.dev.cosign.simplesigning.v1+json",
            "digest": sha256(body),
            "size": len(body),
            "annotations": {"dev.cosignproject.cosign/signature": note},
        }
        cfg = b"{}"
        sig_manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": sha256(cfg),
                    "size": 2,
                },
                "layers": [layer] * layers,
            }
        ).encode()
        push_artifact(
            up.url,
            "team/app",
            sig_manifest,
            {sha256(cfg): cfg, sha256(body): body},
            ref=f"sha256-{digests[tag][7:]}.sig",
        )
    subject = digests["v1"]
    size = len(skopeo_raw(f"{base}:v1"))
    # referrers of v1 the way a client attaches them to a registry without the referrers API:
    # the artifacts with a subject, and the tag schema's index listing them
    entries = []
    for manifest, blobs in (
        bundle_referrer(subject, size, dsse_bundle(subject, key)),
        sbom_referrer(subject, size),
    ):
        d = push_artifact(up.url, "team/app", manifest, blobs)
        art = json.loads(manifest)["artifactType"]
        entries.append(
            {"mediaType": OCI_MANIFEST, "digest": d, "size": len(manifest), "artifactType": art}
        )
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}).encode()
    push_artifact(up.url, "team/app", index, {}, ref=f"sha256-{subject[7:]}", media_type=OCI_INDEX)
    sig = sha256(skopeo_raw(f"{base}:sha256-{subject[7:]}.sig"))
    referrers = {e["digest"]: e["artifactType"] for e in entries}
    referrers[sig] = "application/vnd.dev.cosign.simplesigning.v1+json"
    return Upstream(up, key, key.write_public(tmp_path / "team.pub"), digests, referrers)


def policy_config(up: Upstream, **extra) -> dict:
    cfg = {
        "upstreams": {up.registry.hostport: {"url": up.registry.url, "alias": "up.test"}},
        "policy": {
            "rules": [
                {"match": "up.test/team/*", "require": "sigstore", "keys": [str(up.pub)]},
                {"match": "*", "require": "none"},
            ]
        },
    }
    cfg.update(extra)
    return cfg


def test_signed_served_with_its_signature_the_rest_refused(
    tmp_path: Path, upstream: Upstream, daemon_factory
) -> None:
    proxy = daemon_factory(policy_config(upstream))
    rd = registries_d(tmp_path / "rd-proxy", proxy.hostport)
    signed = upstream.digests["v1"]

    # skopeo through the host-path name: the image and its signature come along
    out = tmp_path / "pulled"
    skopeo_with(
        rd,
        "copy",
        "--src-tls-verify=false",
        f"docker://{proxy.hostport}/up.test/team/app:v1",
        f"dir:{out}",
    )
    assert sha256((out / "manifest.json").read_bytes()) == signed
    sigs = read_dir_signatures(out)
    assert sigs, "no signature came along"
    key = load_public_key(upstream.pub)
    assert any(
        verify_simple_signing(p, __import__("base64").b64encode(s).decode(), signed, (key,)).ok
        for p, s in sigs
    )

    # containerd's form (?ns=): the same decisions
    ns = f"ns={upstream.registry.hostport}"
    status, headers, _ = http(
        "GET", f"{proxy.url}/v2/team/app/manifests/v1?{ns}", headers={"Accept": OCI_MANIFEST}
    )
    assert status == 200 and headers["Docker-Content-Digest"] == signed

    # unsigned, signed by another key, a signature of another digest: 403, nothing served
    for tag, words in (
        ("unsigned", "no signature found"),
        ("otherkey", "not signed by a trusted key"),
        ("wrongdigest", "for another manifest"),
        ("manylayers", "100 layers"),
        ("hugesig", "too large"),
        ("badpayload", "not JSON"),
    ):
        digest = upstream.digests[tag]
        for url in (
            f"{proxy.url}/v2/up.test/team/app/manifests/{tag}",
            f"{proxy.url}/v2/team/app/manifests/{tag}?{ns}",
            f"{proxy.url}/v2/up.test/team/app/manifests/{digest}",
        ):
            for method in ("GET", "HEAD"):
                status, _, body = http(method, url, headers={"Accept": OCI_MANIFEST})
                assert status == 403, (tag, url, method, status)
                if method == "GET":
                    assert error_codes(body) == ["DENIED"]
                    detail = json.loads(body)["errors"][0]["detail"]
                    assert "up.test/team/*" in detail and words in detail, (tag, detail)
        bad = skopeo(
            "copy",
            "--src-tls-verify=false",
            f"docker://{proxy.hostport}/up.test/team/app:{tag}",
            f"dir:{tmp_path / tag}",
            check=False,
        )
        assert bad.returncode != 0 and "denied" in bad.stderr.lower(), bad.stderr
        assert not (tmp_path / tag / "manifest.json").exists()
    assert "policy.denied" in proxy.log() and "rule=up.test/team/*" in proxy.log()
    assert "request.crashed" not in proxy.log() and "Traceback" not in proxy.log()
    _, _, metrics = http("GET", f"{proxy.url}/metrics")
    text = metrics.decode()
    assert 'regproxy_policy_decisions_total{result="denied",rule="up.test/team/*"}' in text
    assert 'regproxy_policy_decisions_total{result="allowed",rule="up.test/team/*"}' in text

    # the referrers of the image pulled through are the upstream's (its tag schema and .sig)
    status, headers, body = http("GET", f"{proxy.url}/v2/up.test/team/app/referrers/{signed}")
    assert status == 200 and headers["Content-Type"].startswith(OCI_INDEX)
    got = {m["digest"]: m.get("artifactType") for m in json.loads(body)["manifests"]}
    assert got == upstream.referrers
    # and each is served, an artifact whatever the rule says
    for d in got:
        status, _, _ = http(
            "GET",
            f"{proxy.url}/v2/up.test/team/app/manifests/{d}",
            headers={"Accept": OCI_MANIFEST},
        )
        assert status == 200, d


def test_a_rule_matches_the_upstream_key_form_and_unmatched_names_pass(
    upstream: Upstream, daemon_factory
) -> None:
    cfg = policy_config(upstream)
    cfg["policy"]["rules"] = [
        {
            "match": f"{upstream.registry.hostport}/team/*",
            "require": "sigstore",
            "keys": [str(upstream.pub)],
        }
    ]
    proxy = daemon_factory(cfg)
    for tag, want in (("v1", 200), ("unsigned", 403)):
        status, _, _ = http(
            "GET",
            f"{proxy.url}/v2/up.test/team/app/manifests/{tag}",
            headers={"Accept": OCI_MANIFEST},
        )
        assert status == want, tag


def regproxy_cli(cfg: dict, root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    path = root / "cli.yaml"
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**cfg, "storage": {"root": str(root / "store")}}))
    return subprocess.run(
        [sys.executable, "-m", "regproxy", "--config", str(path), *args],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=REPO_ROOT,
        check=False,
    )


def test_air_gap_export_import_keeps_signatures_and_the_policy(
    tmp_path: Path, upstream: Upstream, daemon_factory
) -> None:
    cfg = policy_config(upstream)
    base = f"{upstream.registry.hostport}/team/app"
    # the connected host: export pulls the images and their referrers through
    connected = tmp_path / "connected"
    bundle = tmp_path / "bundle.tar"
    done = regproxy_cli(
        cfg, connected, "export", f"{base}:v1", f"{base}:unsigned", "-o", str(bundle)
    )
    assert done.returncode == 0, done.stderr
    with tarfile.open(bundle) as tar:
        index = json.load(tar.extractfile("index.json"))  # type: ignore[arg-type]
    names = [m["annotations"]["org.opencontainers.image.ref.name"] for m in index["manifests"]]
    signed = upstream.digests["v1"]
    assert f"{base}:sha256-{signed[7:]}.sig" in names
    sig = next(d for d, art in upstream.referrers.items() if art.endswith("simplesigning.v1+json"))
    assert {f"{base}@{d}" for d in upstream.referrers if d != sig} <= set(names)

    # the air-gapped host: sync off, the same policy
    gapped = {**cfg, "content": {"sync": {"enable": False}}}
    imported = regproxy_cli(gapped, tmp_path / "gapped", "import", str(bundle))
    assert imported.returncode == 0, imported.stderr
    proxy = daemon_factory({**gapped, "storage": {"root": str(tmp_path / "gapped" / "store")}})
    rd = registries_d(tmp_path / "rd-gapped", proxy.hostport)
    out = tmp_path / "pulled"
    skopeo_with(
        rd,
        "copy",
        "--src-tls-verify=false",
        f"docker://{proxy.hostport}/up.test/team/app:v1",
        f"dir:{out}",
    )
    assert sha256((out / "manifest.json").read_bytes()) == signed and read_dir_signatures(out)
    status, _, body = http(
        "GET",
        f"{proxy.url}/v2/up.test/team/app/manifests/unsigned",
        headers={"Accept": OCI_MANIFEST},
    )
    assert status == 403 and "no signature found" in body.decode()
    status, _, body = http("GET", f"{proxy.url}/v2/up.test/team/app/referrers/{signed}")
    assert {m["digest"] for m in json.loads(body)["manifests"]} == set(upstream.referrers)

    # enforce: import refuses the bundle for its unsigned image, before anything is stored
    strict = {**gapped, "policy": {**gapped["policy"], "enforce": ["pull-through", "import"]}}
    refused = regproxy_cli(strict, tmp_path / "strict", "import", str(bundle))
    assert refused.returncode == 1, refused.stdout
    assert "spectro-images/up.test/team/app:unsigned" in refused.stderr
    assert "no signature found" in refused.stderr
    assert not [p for p in (tmp_path / "strict" / "store" / "blobs").rglob("*") if p.is_file()]
    only_signed = tmp_path / "signed.tar"
    assert (
        regproxy_cli(cfg, connected, "export", f"{base}:v1", "-o", str(only_signed)).returncode == 0
    )
    accepted = regproxy_cli(strict, tmp_path / "strict", "import", str(only_signed))
    assert accepted.returncode == 0, accepted.stderr


def test_prefetch_takes_the_signatures_along(
    tmp_path: Path, upstream: Upstream, daemon_factory
) -> None:
    cfg = policy_config(upstream)
    root = tmp_path / "node"
    done = regproxy_cli(cfg, root, "prefetch", f"{upstream.registry.hostport}/team/app:v1")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"referrers={len(upstream.referrers)}" in done.stdout
    upstream.registry.stop()  # from now on the node has only what prefetch brought
    proxy = daemon_factory(
        {**cfg, "content": {"sync": {"enable": False}}, "storage": {"root": str(root / "store")}}
    )
    status, headers, _ = http(
        "GET", f"{proxy.url}/v2/up.test/team/app/manifests/v1", headers={"Accept": OCI_MANIFEST}
    )
    assert status == 200 and headers["Docker-Content-Digest"] == upstream.digests["v1"]
    status, _, body = http(
        "GET", f"{proxy.url}/v2/up.test/team/app/referrers/{upstream.digests['v1']}"
    )
    assert {m["digest"] for m in json.loads(body)["manifests"]} == set(upstream.referrers)
    pins = regproxy_cli(cfg, root, "pins", "--json")
    pinned = {p["digest"] for p in json.loads(pins.stdout)}
    assert set(upstream.referrers) <= pinned, pins.stdout
