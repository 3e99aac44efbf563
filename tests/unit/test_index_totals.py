"""The index's running totals and reference counts stay equal to a full recount, whatever
sequence of pushes, pull-throughs, deletes, pins, evictions and gc runs produced the store."""

from __future__ import annotations

import json
import random
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from regproxy import maintenance, pins, schema
from regproxy.config import config_from_dict
from regproxy.errors import OCIError
from regproxy.evict import Evictor
from regproxy.index import Index
from regproxy.names import RepoName
from regproxy.oci import Digest
from regproxy.registry import Registry

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
UPSTREAM = [
    RepoName("spectro-images/docker.io/library/a", "docker.io", "library/a"),
    RepoName("spectro-images/docker.io/library/b", "docker.io", "library/b"),
]
LOCAL = [RepoName("spectro-images/mine/x"), RepoName("spectro-images/mine/y")]


def manifest(config: bytes, layers: list[bytes], subject: bytes | None = None) -> bytes:
    def desc(b: bytes, mt: str) -> dict[str, Any]:
        return {"mediaType": mt, "digest": str(Digest.of(b)), "size": len(b)}

    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": desc(config, "application/vnd.oci.image.config.v1+json"),
        "layers": [desc(b, "application/vnd.oci.image.layer.v1.tar") for b in layers],
    }
    if subject is not None:
        doc["subject"] = desc(subject, OCI_MANIFEST)
    return json.dumps(doc).encode()


def index(children: list[bytes]) -> bytes:
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {
                    "mediaType": OCI_MANIFEST,
                    "digest": str(Digest.of(c)),
                    "size": len(c),
                    "platform": {"os": "linux", "architecture": f"arch{i}"},
                }
                for i, c in enumerate(children)
            ],
        }
    ).encode()


async def body(data: bytes) -> AsyncIterator[bytes]:
    yield data


def recount_refs(path: Path) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """(refs, repos.manifests) as a rebuild from the rows computes them, on a copy."""
    src = sqlite3.connect(path)
    copy = sqlite3.connect(":memory:", isolation_level=None)
    try:
        src.backup(copy)
        copy.execute("PRAGMA recursive_triggers=ON")
        copy.execute("BEGIN")
        schema.rebuild_counts(copy)
        copy.execute("COMMIT")
        return (
            copy.execute("SELECT digest, live, pinned, size FROM refs ORDER BY digest").fetchall(),
            copy.execute("SELECT name, manifests FROM repos ORDER BY name").fetchall(),
        )
    finally:
        src.close()
        copy.close()


def kept_refs(path: Path) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    db = sqlite3.connect(path)
    try:
        return (
            db.execute("SELECT digest, live, pinned, size FROM refs ORDER BY digest").fetchall(),
            db.execute("SELECT name, manifests FROM repos ORDER BY name").fetchall(),
        )
    finally:
        db.close()


class World:
    def __init__(self, reg: Registry, rnd: random.Random, root: Path) -> None:
        self.reg, self.rnd, self.root = reg, rnd, root
        self.blobs = [f"blob-{i}".encode() * (i + 1) for i in range(14)]
        self.configs = [f'{{"config": {i}}}'.encode() for i in range(4)]
        self.held: list[tuple[RepoName, bytes]] = []  # manifests we stored (repo, body)
        self.config = config_from_dict(
            {"storage": {"root": str(root), "upload_ttl": 0, "min_free": 0}}
        )

    def image(self) -> tuple[bytes, list[bytes]]:
        layers = self.rnd.sample(self.blobs, self.rnd.randint(1, 3))
        config = self.rnd.choice(self.configs)
        return manifest(config, layers), [config, *layers]

    async def put_blobs(self, repo: RepoName, blobs: list[bytes]) -> None:
        for b in blobs:
            await self.reg.uploads.monolithic(repo, Digest.of(b), body(b), len(b))

    async def push(self) -> None:
        repo = self.rnd.choice(LOCAL + UPSTREAM[:1])
        body_, blobs = self.image()
        await self.put_blobs(repo, blobs)
        tag = self.rnd.choice(["v1", "v2", "latest"])
        if self.rnd.random() < 0.3:  # an index of two images
            other, more = self.image()
            await self.put_blobs(repo, more)
            for m in (body_, other):
                await self.reg.put_manifest(repo, str(Digest.of(m)), m, OCI_MANIFEST)
                self.held.append((repo, m))
            body_ = index([body_, other])
            await self.reg.put_manifest(repo, tag, body_, OCI_INDEX)
        else:
            await self.reg.put_manifest(repo, tag, body_, OCI_MANIFEST)
        self.held.append((repo, body_))

    async def pull_through(self) -> None:
        """As a pull through the proxy stores an image: the manifest first, its blobs later as
        clients ask for them, some never."""
        repo = self.rnd.choice(UPSTREAM)
        body_, blobs = self.image()
        await self.reg.put_manifest(
            repo,
            self.rnd.choice(["1.0", "2.0"]),
            body_,
            OCI_MANIFEST,
            verify_refs=False,
            pinned=False,
        )
        self.held.append((repo, body_))
        await self.put_blobs(repo, [b for b in blobs if self.rnd.random() < 0.7])
        if self.rnd.random() < 0.3:  # a signature of it
            sig = manifest(self.configs[0], [self.blobs[0]], subject=body_)
            await self.reg.put_manifest(
                repo, str(Digest.of(sig)), sig, OCI_MANIFEST, verify_refs=False, pinned=False
            )
            self.held.append((repo, sig))
            await self.put_blobs(
                repo, [b for b in (self.configs[0], self.blobs[0]) if self.rnd.random() < 0.7]
            )

    async def delete(self) -> None:
        if not self.held:
            return
        repo, m = self.rnd.choice(self.held)
        ref = str(Digest.of(m)) if self.rnd.random() < 0.7 else self.rnd.choice(["v1", "1.0"])
        try:
            await self.reg.delete_manifest(repo, ref)
        except OCIError:
            pass
        if self.rnd.random() < 0.3:
            b = self.rnd.choice(self.blobs)
            try:
                await self.reg.delete_blob(repo, Digest.of(b))
            except OCIError:
                pass

    async def pin(self, on: bool) -> None:
        if not self.held:
            return
        repo, m = self.rnd.choice(self.held)
        try:
            await (pins.pin if on else pins.unpin)(self.reg, repo, str(Digest.of(m)))
        except OCIError:
            pass

    async def evict(self) -> None:
        total = await self.reg.db.read(Index.store_bytes)
        need = self.rnd.randint(1, max(1, total // 2))
        evictor = Evictor(self.reg, self.config, in_use=0.0)
        await evictor.evict(need)

    async def gc(self) -> None:
        await self.reg.flush_access()
        await maintenance.gc(self.config)


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_totals_equal_a_recount_after_any_sequence(
    registry: Registry, tmp_path: Path, seed: int
) -> None:
    rnd = random.Random(seed)
    world = World(registry, rnd, tmp_path / "store")
    ops = {
        "push": world.push,
        "pull": world.pull_through,
        "delete": world.delete,
        "pin": lambda: world.pin(True),
        "unpin": lambda: world.pin(False),
        "evict": world.evict,
        "gc": world.gc,
    }
    weights = {"push": 5, "pull": 6, "delete": 3, "pin": 2, "unpin": 2, "evict": 1, "gc": 1}
    done: list[str] = []
    path = tmp_path / "store" / "index.db"
    for step in range(90):
        name = rnd.choices(list(weights), list(weights.values()))[0]
        await ops[name]()
        done.append(name)
        if step % 10 == 9 or name in ("evict", "gc"):
            totals = await registry.db.read(Index.totals)
            assert totals == await registry.db.read(Index.recount), done
            assert kept_refs(path) == recount_refs(path), done
    assert set(done) == set(ops)  # the seed exercised every kind of change
    final = await registry.db.read(Index.totals)
    assert final.stored_count > 0 and final.manifests > 0
