"""regproxy.policy's pure parts: what counts as an artifact (never refused) and cosign tags."""

from __future__ import annotations

import json

import pytest

from regproxy.oci import Digest
from regproxy.policy import cosign_tag_subject, is_artifact
from regproxy.referrers import fallback_tag
from tests.images import make_image
from tests.signing import (
    bundle_referrer,
    dsse_bundle,
    make_key,
    sbom_referrer,
    sha256,
    simple_signature_manifest,
)

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
D = sha256(b"image")


def manifest_with(*layer_types: str) -> bytes:
    layers = [{"mediaType": t, "digest": sha256(t.encode()), "size": 1} for t in layer_types]
    cfg = {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": D, "size": 2}
    return json.dumps(
        {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": cfg, "layers": layers}
    ).encode()


@pytest.mark.parametrize(
    ("body", "media_type", "artifact"),
    [
        (simple_signature_manifest(D, make_key())[0], OCI_MANIFEST, True),
        (bundle_referrer(D, 1, dsse_bundle(D, make_key()))[0], OCI_MANIFEST, True),
        (sbom_referrer(D, 1)[0], OCI_MANIFEST, True),
        (manifest_with("text/spdx+json", "text/plain"), OCI_MANIFEST, True),
        (manifest_with(), OCI_MANIFEST, True),
        (make_image().manifest, OCI_MANIFEST, False),
        (manifest_with("application/vnd.wasm.content.layer.v1+wasm"), OCI_MANIFEST, False),
        (manifest_with("application/vnd.cncf.helm.chart.content.v1.tar+gzip"), OCI_MANIFEST, False),
        (
            manifest_with(
                "application/vnd.dev.cosign.simplesigning.v1+json", "application/octet-stream"
            ),
            OCI_MANIFEST,
            False,
        ),
        (
            json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}).encode(),
            OCI_INDEX,
            False,
        ),
        (b"not json", OCI_MANIFEST, False),
    ],
)
def test_what_runs_nothing(body: bytes, media_type: str, artifact: bool) -> None:
    assert is_artifact(body, media_type) is artifact


def test_tags_name_their_subject() -> None:
    d = Digest.parse(D)
    assert fallback_tag(d) == f"sha256-{d.hex}"
    for tag in (
        f"sha256-{d.hex}",
        f"sha256-{d.hex}.sig",
        f"sha256-{d.hex}.att",
        f"sha256-{d.hex}.sbom",
    ):
        assert cosign_tag_subject(tag) == D
    assert cosign_tag_subject("v1") is None
    assert cosign_tag_subject("sha256-nothex.sig") is None
    long = Digest("sha512", "a" * 128)
    assert fallback_tag(long) == "sha512-" + "a" * 64  # the hex is cut to 64 characters
