"""The signature policy in process: rule matching, index children, decision caching with an
injected clock, a signature arriving later, enforcement points (pull-through, push)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from regproxy.app import create_app
from regproxy.config import config_from_dict
from regproxy.names import NameResolver
from regproxy.policy import Policy
from regproxy.web_keys import POLICY_KEY
from tests.fakes import Clock, FakeUpstream, digest_of
from tests.images import make_image, make_index
from tests.signing import make_key, simple_signature_manifest

pytestmark = pytest.mark.filterwarnings("ignore::aiohttp.web_exceptions.NotAppKeyWarning")
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


def add_image(up: FakeUpstream, tag: str) -> tuple[str, Any]:
    img = make_image()
    for blob in (img.config, *img.layers):
        up.add_blob(blob)
    return up.add_manifest("team/app", tag, img.manifest, OCI_MANIFEST), img


def add_signature(up: FakeUpstream, digest: str, key) -> None:
    manifest, blobs = simple_signature_manifest(digest, key)
    for data in blobs.values():
        up.add_blob(data)
    up.add_manifest("team/app", f"sha256-{digest[7:]}.sig", manifest, OCI_MANIFEST)


def config(tmp_path: Path, up: FakeUpstream | None, pub: Path, **policy: Any) -> Any:
    raw: dict[str, Any] = {
        "storage": {"root": str(tmp_path / "store")},
        "tag_ttl": "60s",
        "log": {"access": False},
        "policy": {
            "rules": [{"match": "fake.test/team/*", "require": "sigstore", "keys": [str(pub)]}],
            **policy,
        },
    }
    if up is not None:
        raw["upstreams"] = {
            up.hostport: {"url": up.url, "alias": "fake.test", "read_timeout": "3s"}
        }
    return config_from_dict(raw)


async def start(cfg: Any) -> tuple[TestClient[Any, Any], Clock]:
    app = create_app(cfg)
    client: TestClient[Any, Any] = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    clock = Clock()
    app[POLICY_KEY].clock = clock  # one clock for the decisions and the referrers they read
    app[POLICY_KEY].registry.referrer_index.clock = clock
    return client, clock


async def status(client: TestClient[Any, Any], path: str) -> int:
    resp = await client.get(path, headers={"Accept": f"{OCI_MANIFEST}, {OCI_INDEX}"})
    await resp.read()
    return resp.status


def test_rules_match_the_config_key_the_alias_and_the_project_path(tmp_path: Path) -> None:
    pub = make_key().write_public(tmp_path / "k.pub")
    cfg = config_from_dict(
        {
            "upstreams": {"10.0.0.5:5000": {"url": "http://10.0.0.5:5000", "alias": "site"}},
            "policy": {
                "rules": [
                    {"match": "10.0.0.5:5000/team/*", "require": "sigstore", "keys": [str(pub)]},
                    {"match": "docker.io/library/*", "require": "none"},
                    {"match": "spectro-images/secure/*", "require": "sigstore", "keys": [str(pub)]},
                    {"match": "*", "require": "sigstore", "keys": [str(pub)]},
                ]
            },
        }
    )

    class Host:
        pass

    host = Host()
    host.config = cfg  # type: ignore[attr-defined]
    policy = Policy(host)  # type: ignore[arg-type]
    names = NameResolver(cfg)
    rule = lambda name: policy.rule_for(names.resolve(name))[1].match  # noqa: E731
    assert rule("site/team/app") == "10.0.0.5:5000/team/*"
    assert rule("spectro-images/site/team/app") == "10.0.0.5:5000/team/*"
    assert rule("docker.io/nginx") == "docker.io/library/*"
    assert rule("spectro-images/secure/app") == "spectro-images/secure/*"
    assert rule("ghcr.io/o/i") == "*"
    assert policy.applies_to(names.resolve("ghcr.io/o/i"))
    assert not policy.applies_to(names.resolve("spectro-images/secure/app"))  # push not enforced


async def test_index_children_denial_cache_and_a_late_signature(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    key = make_key()
    pub = key.write_public(tmp_path / "k.pub")
    a, b = make_image("amd64"), make_image("arm64")
    for img in (a, b):
        for blob in (img.config, *img.layers):
            upstream.add_blob(blob)
        upstream.add_manifest("team/app", img.digest, img.manifest, OCI_MANIFEST)
    multi = upstream.add_manifest(
        "team/app", "multi", make_index({"amd64": a, "arm64": b}), OCI_INDEX
    )
    add_signature(upstream, multi, key)
    late, _ = add_image(upstream, "late")
    client, clock = await start(config(tmp_path, upstream, pub))
    try:
        # a child asked before its index: no signed index lists it here yet
        assert await status(client, f"/v2/fake.test/team/app/manifests/{a.digest}") == 403
        assert await status(client, "/v2/fake.test/team/app/manifests/multi") == 200
        # now the signed index lists it (the denial of the child is cached: decide again later)
        clock.now += 61
        assert await status(client, f"/v2/fake.test/team/app/manifests/{a.digest}") == 200
        assert await status(client, f"/v2/fake.test/team/app/manifests/{b.digest}") == 200

        # a denial is cached for tag_ttl: no new upstream lookups within it
        assert await status(client, "/v2/fake.test/team/app/manifests/late") == 403
        asked = upstream.count("GET", f"sha256-{late[7:]}.sig")
        assert await status(client, "/v2/fake.test/team/app/manifests/late") == 403
        assert upstream.count("GET", f"sha256-{late[7:]}.sig") == asked
        # the signature lands upstream: still denied until the cached denial expires ...
        add_signature(upstream, late, key)
        assert await status(client, "/v2/fake.test/team/app/manifests/late") == 403
        clock.now += 61
        assert await status(client, "/v2/fake.test/team/app/manifests/late") == 200
    finally:
        await client.close()


async def test_push_enforcement_and_a_pushed_signature_counts_at_once(tmp_path: Path) -> None:
    key = make_key()
    pub = key.write_public(tmp_path / "k.pub")
    cfg = config_from_dict(
        {
            "storage": {"root": str(tmp_path / "store")},
            "content": {"sync": {"enable": False}},
            "log": {"access": False},
            "policy": {
                "rules": [
                    {"match": "spectro-images/secure/*", "require": "sigstore", "keys": [str(pub)]}
                ],
                "enforce": ["push"],
            },
        }
    )
    client, _ = await start(cfg)
    try:
        img = make_image()
        for blob in (img.config, *img.layers):
            r = await client.post(
                f"/v2/spectro-images/secure/app/blobs/uploads/?digest={digest_of(blob)}", data=blob
            )
            assert r.status == 201
        r = await client.put(
            "/v2/spectro-images/secure/app/manifests/v1",
            data=img.manifest,
            headers={"Content-Type": OCI_MANIFEST},
        )
        assert r.status == 201  # a push is accepted: its signature comes after it
        assert await status(client, "/v2/spectro-images/secure/app/manifests/v1") == 403
        # cosign pushes the signature: served at once (the cached denial is forgotten)
        manifest, blobs = simple_signature_manifest(img.digest, key)
        for d, data in blobs.items():
            r = await client.post(
                f"/v2/spectro-images/secure/app/blobs/uploads/?digest={d}", data=data
            )
            assert r.status == 201
        r = await client.put(
            f"/v2/spectro-images/secure/app/manifests/sha256-{img.digest[7:]}.sig",
            data=manifest,
            headers={"Content-Type": OCI_MANIFEST},
        )
        assert r.status == 201
        assert await status(client, "/v2/spectro-images/secure/app/manifests/v1") == 200
        assert (
            await status(
                client, f"/v2/spectro-images/secure/app/manifests/sha256-{img.digest[7:]}.sig"
            )
            == 200
        )
    finally:
        await client.close()


async def test_a_decision_outlives_the_cancelled_request_that_started_it(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    """The first asker of a decision may be cancelled (a prefetch timing out, a shutdown): the
    others waiting on the same decision get it, not its CancelledError."""
    import asyncio

    from regproxy.oci import Digest

    key = make_key()
    pub = key.write_public(tmp_path / "k.pub")
    digest, _ = add_image(upstream, "v1")
    add_signature(upstream, digest, key)
    client, _ = await start(config(tmp_path, upstream, pub))
    try:
        policy = client.server.app[POLICY_KEY]
        repo = NameResolver(policy.config).resolve("fake.test/team/app")
        upstream.manifest_gate = asyncio.Event()  # the decision waits on the upstream
        first = asyncio.create_task(policy.check(repo, Digest.parse(digest)))
        await asyncio.wait_for(upstream.manifest_arrived.wait(), 10)
        second = asyncio.create_task(policy.check(repo, Digest.parse(digest)))
        await asyncio.sleep(0.01)  # it joins the decision in flight
        first.cancel()
        upstream.manifest_gate.set()
        decision = await asyncio.wait_for(second, 10)
        assert decision.allowed, decision
        with pytest.raises(asyncio.CancelledError):
            await first
    finally:
        await client.close()
