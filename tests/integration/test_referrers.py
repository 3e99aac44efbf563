"""Referrers pull-through, in process: an upstream with the OCI 1.1 referrers API, one without
(the tag schema and cosign's tags), merging with local referrers, artifactType, tag_ttl and
stale answers (an injected clock, no sleeps)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from regproxy import api
from regproxy.app import create_app
from regproxy.config import config_from_dict
from regproxy.proxy import ProxyRegistry
from tests.fakes import Clock, FakeUpstream, digest_of
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
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
REPO = "team/app"


def put_image(up: FakeUpstream) -> tuple[str, int]:
    img = make_image()
    for blob in (img.config, *img.layers):
        up.add_blob(blob)
    d = up.add_manifest(REPO, "v1", img.manifest, OCI_MANIFEST)
    return d, len(img.manifest)


def put_artifact(
    up: FakeUpstream, manifest: bytes, blobs: dict[str, bytes], tag: str | None = None
) -> str:
    for data in blobs.values():
        up.add_blob(data)
    d = digest_of(manifest)
    up.add_manifest(REPO, tag or d, manifest, OCI_MANIFEST)
    return d


async def proxy(
    tmp_path: Path, up: FakeUpstream, **extra: Any
) -> tuple[TestClient[Any, Any], Clock]:
    raw: dict[str, Any] = {
        "storage": {"root": str(tmp_path / "store")},
        "upstreams": {up.hostport: {"url": up.url, "alias": "fake.test", "read_timeout": "3s"}},
        "tag_ttl": "300s",
        "log": {"access": False},
    }
    raw.update(extra)
    app = create_app(config_from_dict(raw))
    client: TestClient[Any, Any] = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    clock = Clock()
    registry = app[api.REGISTRY_KEY]
    assert isinstance(registry, ProxyRegistry)
    registry.referrer_index.clock = clock
    return client, clock


async def referrers(
    client: TestClient[Any, Any], name: str, digest: str, query: str = ""
) -> tuple[dict[str, Any], Any]:
    resp = await client.get(f"/v2/{name}/referrers/{digest}{query}")
    assert resp.status == 200, await resp.text()
    assert resp.headers["Content-Type"].startswith(OCI_INDEX)
    return json.loads(await resp.read()), resp.headers


async def test_referrers_api_upstream_merged_filtered_cached_and_stale(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    upstream.referrers_api = True
    subject, size = put_image(upstream)
    sbom = put_artifact(upstream, *sbom_referrer(subject, size))
    bundle = put_artifact(
        upstream, *bundle_referrer(subject, size, dsse_bundle(subject, make_key()))
    )
    # cosign's legacy tag has no subject: the API does not list it, regproxy finds it anyway
    sig_m, sig_b = simple_signature_manifest(subject, make_key())
    sig = put_artifact(upstream, sig_m, sig_b, tag=f"sha256-{subject[7:]}.sig")
    client, clock = await proxy(tmp_path, upstream)
    try:
        # a referrer pushed here (an attestation of our own) is merged in
        local_manifest, local_blobs = sbom_referrer(subject, size)
        for d, data in local_blobs.items():
            r = await client.post(f"/v2/fake.test/{REPO}/blobs/uploads/?digest={d}", data=data)
            assert r.status == 201, await r.text()
        r = await client.put(
            f"/v2/fake.test/{REPO}/manifests/{digest_of(local_manifest)}",
            data=local_manifest,
            headers={"Content-Type": OCI_MANIFEST},
        )
        assert r.status == 201 and r.headers["OCI-Subject"] == subject
        local = digest_of(local_manifest)

        doc, _ = await referrers(client, f"fake.test/{REPO}", subject)
        assert {m["digest"] for m in doc["manifests"]} == {sbom, bundle, local, sig}
        by = {m["digest"]: m for m in doc["manifests"]}
        assert by[bundle]["artifactType"] == "application/vnd.dev.sigstore.bundle.v0.3+json"
        assert by[sbom]["artifactType"] == "application/spdx+json"
        assert upstream.count("GET", f"/referrers/{subject}") == 1

        # ?ns= names the same repository; the answer is cached for tag_ttl
        doc2, _ = await referrers(client, REPO, subject, f"?ns={upstream.hostport}")
        assert doc2 == doc and upstream.count("GET", f"/referrers/{subject}") == 1

        # artifactType filters, and says so
        doc, headers = await referrers(
            client, f"fake.test/{REPO}", subject, "?artifactType=application/spdx%2Bjson"
        )
        assert {m["digest"] for m in doc["manifests"]} == {sbom, local}
        assert headers["OCI-Filters-Applied"] == "artifactType"

        # the referrer manifests and blobs come on demand like any content
        r = await client.get(f"/v2/fake.test/{REPO}/manifests/{bundle}")
        assert r.status == 200 and digest_of(await r.read()) == bundle

        # after tag_ttl the upstream is asked again; when it is down, the last answer is served
        clock.now += 301
        await upstream.stop()
        doc, _ = await referrers(client, f"fake.test/{REPO}", subject)
        assert {m["digest"] for m in doc["manifests"]} == {sbom, bundle, local, sig}

        # an unknown subject is an empty index, never a 404 (upstream down or not)
        doc, _ = await referrers(client, f"fake.test/{REPO}", "sha256:" + "0" * 64)
        assert doc == {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
    finally:
        await client.close()


async def test_tag_schema_and_cosign_tags_when_upstream_has_no_referrers_api(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    subject, size = put_image(upstream)
    hex_part = subject.split(":")[1]
    sbom_m, sbom_b = sbom_referrer(subject, size)
    sbom = put_artifact(upstream, sbom_m, sbom_b)
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {
                    "mediaType": OCI_MANIFEST,
                    "digest": sbom,
                    "size": len(sbom_m),
                    "artifactType": "application/spdx+json",
                }
            ],
        }
    ).encode()
    upstream.add_manifest(REPO, f"sha256-{hex_part}", index, OCI_INDEX)
    sig_m, sig_b = simple_signature_manifest(subject, make_key())
    sig = put_artifact(upstream, sig_m, sig_b, tag=f"sha256-{hex_part}.sig")
    client, clock = await proxy(tmp_path, upstream)
    try:
        doc, _ = await referrers(client, f"fake.test/{REPO}", subject)
        by = {m["digest"]: m for m in doc["manifests"]}
        assert set(by) == {sbom, sig}
        assert by[sig]["artifactType"] == "application/vnd.dev.cosign.simplesigning.v1+json"
        assert by[sbom]["artifactType"] == "application/spdx+json"
        assert upstream.count("GET", f"/referrers/{subject}") == 1  # 404: the tag schema next

        # the tags were stored like any tag: with the upstream gone and nothing cached in
        # memory (a restart) they are still the answer, from the store
        await upstream.stop()
        clock.now += 10_000
        registry = client.server.app[api.REGISTRY_KEY]
        assert isinstance(registry, ProxyRegistry)
        registry.referrer_index._cache.clear()
        doc, _ = await referrers(client, f"fake.test/{REPO}", subject)
        assert {m["digest"] for m in doc["manifests"]} == {sbom, sig}
        r = await client.get(f"/v2/fake.test/{REPO}/manifests/sha256-{hex_part}.sig")
        assert r.status == 200 and digest_of(await r.read()) == sig
    finally:
        await client.close()


async def test_sync_disabled_answers_from_the_store(tmp_path: Path) -> None:
    raw = {
        "storage": {"root": str(tmp_path / "store")},
        "content": {"sync": {"enable": False}},
        "log": {"access": False},
    }
    async with TestClient(
        TestServer(create_app(config_from_dict(raw)), host="127.0.0.1")
    ) as client:
        subject = "sha256:" + "1" * 64
        doc, headers = await referrers(client, "docker.io/team/app", subject)
        assert doc["manifests"] == [] and "OCI-Filters-Applied" not in headers
        # a malformed digest is the digest's error, not a 404 or a 500
        r = await client.get("/v2/docker.io/team/app/referrers/sha256:nothex")
        assert r.status == 400


async def test_sync_disabled_asks_the_peers(tmp_path: Path) -> None:
    def raw(name: str, **extra: Any) -> dict[str, Any]:
        return {
            "storage": {"root": str(tmp_path / name)},
            "content": {"sync": {"enable": False}},
            "log": {"access": False},
            **extra,
        }

    async with TestClient(
        TestServer(create_app(config_from_dict(raw("a"))), host="127.0.0.1")
    ) as a:
        subject = "sha256:" + "2" * 64
        manifest, blobs = sbom_referrer(subject, 100)
        for d, data in blobs.items():
            r = await a.post(f"/v2/docker.io/team/app/blobs/uploads/?digest={d}", data=data)
            assert r.status == 201
        r = await a.put(
            f"/v2/docker.io/team/app/manifests/{digest_of(manifest)}",
            data=manifest,
            headers={"Content-Type": OCI_MANIFEST},
        )
        assert r.status == 201
        peer = f"http://127.0.0.1:{a.server.port}"
        app_b = create_app(config_from_dict(raw("b", peers={"urls": [peer], "timeout": "5s"})))
        async with TestClient(TestServer(app_b, host="127.0.0.1")) as b:
            doc, _ = await referrers(b, "docker.io/team/app", subject)
            assert [m["digest"] for m in doc["manifests"]] == [digest_of(manifest)]
            assert doc["manifests"][0]["artifactType"] == "application/spdx+json"
            r = await b.get(f"/v2/docker.io/team/app/manifests/{digest_of(manifest)}")
            assert r.status == 200  # and the manifest itself comes from the peer


@pytest.mark.parametrize(
    "body",
    [b'{"layers": 5}', b'{"layers": [3, {"mediaType": 4}]}', b"[1]", b"[" * 100_000, b"\xff"],
)
def test_a_cosign_sbom_of_any_shape_is_a_referrer_of_cosigns_type(body: bytes) -> None:
    """The .sbom tag's manifest names the SBOM's type in its layer; a body that does not (an
    index, odd types, not JSON) is still listed, with cosign's type, never a TypeError."""
    from regproxy.oci import OCI_INDEX, Digest
    from regproxy.referrers import COSIGN_SUFFIXES, cosign_descriptor

    d = Digest.of(body)
    desc = cosign_descriptor("sha256-" + "a" * 64 + ".sbom", OCI_INDEX, d, body)
    assert (desc.digest, desc.size) == (d, len(body))
    assert desc.artifact_type == COSIGN_SUFFIXES[".sbom"]
