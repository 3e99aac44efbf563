"""The web page shows, per tag and manifest, whether it is signed (and by which key), and lists
signatures, SBOMs and attestations (in process, sync off: everything is pushed here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from regproxy.app import create_app
from regproxy.config import config_from_dict
from tests.fakes import digest_of
from tests.images import make_image
from tests.signing import (
    bundle_referrer,
    dsse_bundle,
    make_key,
    sbom_referrer,
    simple_signature_manifest,
)

pytestmark = pytest.mark.filterwarnings("ignore::aiohttp.web_exceptions.NotAppKeyWarning")
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
REPO = "spectro-images/secure/app"


async def push(
    client: TestClient[Any, Any], ref: str, manifest: bytes, blobs: list[bytes] | dict[str, bytes]
) -> str:
    for data in blobs.values() if isinstance(blobs, dict) else blobs:
        r = await client.post(f"/v2/{REPO}/blobs/uploads/?digest={digest_of(data)}", data=data)
        assert r.status == 201, await r.text()
    r = await client.put(
        f"/v2/{REPO}/manifests/{ref}", data=manifest, headers={"Content-Type": OCI_MANIFEST}
    )
    assert r.status == 201, await r.text()
    return digest_of(manifest)


async def test_signed_unsigned_and_what_refers_to_them(tmp_path: Path) -> None:
    key, other = make_key(), make_key("ed25519")
    pub = key.write_public(tmp_path / "team.pub")
    cfg = config_from_dict(
        {
            "storage": {"root": str(tmp_path / "store")},
            "content": {"sync": {"enable": False}},
            "log": {"access": False},
            "policy": {
                "rules": [
                    {"match": "spectro-images/secure/*", "require": "sigstore", "keys": [str(pub)]}
                ],
            },
        }
    )
    async with TestClient(TestServer(create_app(cfg), host="127.0.0.1")) as client:
        signed, unsigned = make_image(), make_image()
        d1 = await push(client, "v1", signed.manifest, [signed.config, *signed.layers])
        d2 = await push(client, "v2", unsigned.manifest, [unsigned.config, *unsigned.layers])
        sig, sig_blobs = simple_signature_manifest(d1, key)
        await push(client, f"sha256-{d1[7:]}.sig", sig, sig_blobs)
        sbom, sbom_blobs = sbom_referrer(d1, len(signed.manifest))
        await push(client, digest_of(sbom), sbom, sbom_blobs)
        att, att_blobs = bundle_referrer(
            d1,
            len(signed.manifest),
            dsse_bundle(d1, other, predicate="https://slsa.dev/provenance/v1"),
        )
        await push(client, digest_of(att), att, att_blobs)

        r = await client.get(f"/ui/api/manifests/{REPO}@{d1}")
        assert r.status == 200
        doc = await r.json()
        assert doc["signature"]["signed"] is True and doc["signature"]["key"] == str(pub)
        assert doc["signature"]["rule"] == "spectro-images/secure/*"
        kinds = {x["digest"]: x["kind"] for x in doc["referrers"]}
        assert kinds == {
            digest_of(sig): "signature",
            digest_of(sbom): "sbom",
            digest_of(att): "signature",
        } or kinds == {
            digest_of(sig): "signature",
            digest_of(sbom): "sbom",
            digest_of(att): "attestation",
        }

        r = await client.get(f"/ui/api/manifests/{REPO}@{d2}")
        doc = await r.json()
        assert (
            doc["signature"]["signed"] is False
            and "no signature found" in doc["signature"]["reason"]
        )

        r = await client.get(f"/ui/api/repositories/{REPO}/tags")
        tags = {t["tag"]: t for t in (await r.json())["tags"]}
        assert tags["v1"]["signature"]["signed"] is True
        assert tags["v1"]["signature"]["key_name"] == "team.pub"
        assert tags["v2"]["signature"]["signed"] is False
        assert tags[f"sha256-{d1[7:]}.sig"]["signature"] is None  # an artifact: nothing to sign

        html = await (await client.get(f"/ui/repositories/{REPO}")).text()
        assert "team.pub" in html and "not signed" in html
        html = await (await client.get(f"/ui/manifests/{REPO}@{d1}")).text()
        assert 'id="signature"' in html and "signed by" in html and 'data-kind="sbom"' in html
