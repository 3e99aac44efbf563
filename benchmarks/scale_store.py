"""Build the stores bench_scale measures: a regproxy store written through regproxy's own index
code (``regproxy.index.Index``: the same rows, triggers and totals a daemon writes), with tiny
files, and a docker-registry filesystem with the same number of repositories.

Shape at scale 1: 10,000 repositories, 100,000 manifests (10 per repository, each tagged), each
listing a config and 9 layers of its own plus 2 of a shared pool of 1,000 base layers: 1,001,000
blob rows. Every 10th repository is pushed (local name, pinned); the others are pull-through
names (``docker.io``) with access times spread over a week, in a seeded random order.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from regproxy.index import Index, ManifestRecord
from regproxy.oci import Digest
from regproxy.repo_sizes import count_some
from regproxy.store import Store

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
LAYERS_OWN = 9
LAYERS_SHARED = 2
PER_REPO = 10
PINNED_EVERY = 10  # every 10th repository is pushed (pinned)
TX_REPOS = 50  # repositories per write transaction while building


@dataclass(frozen=True)
class Shape:
    repos: int
    manifests: int
    shared: int

    @classmethod
    def of(cls, scale: float) -> Shape:
        repos = max(20, round(10_000 * scale))
        return cls(repos, repos * PER_REPO, max(20, round(1000 * scale)))

    @property
    def blobs(self) -> int:
        return self.manifests * (1 + LAYERS_OWN) + self.shared


def repo_name(r: int) -> str:
    if r % PINNED_EVERY == 0:
        return f"spectro-images/bench/repo-{r:05d}"
    return f"spectro-images/docker.io/bench/repo-{r:05d}"


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _write(store: Store, digest: str, data: bytes) -> None:
    path = store.blob_path(Digest.parse(digest))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


@dataclass
class Built:
    seconds: float
    pinned_digests: list[tuple[str, str, str]]  # (repo, tag, digest) of pinned manifests
    names: list[str]  # repositories, sorted


def build(root: Path, shape: Shape, seed: int = 11, progress: bool = True) -> Built:
    started = time.monotonic()
    store = Store(root)
    store.open()
    for i in range(256):
        (store.blobs / "sha256" / f"{i:02x}").mkdir(parents=True, exist_ok=True)
    ix = Index(root / "index.db")
    ix.open()
    rnd = random.Random(seed)
    now = time.time()
    shared = [f"shared base layer {i}".encode() * 4 for i in range(shape.shared)]
    shared_d = [_sha(b) for b in shared]
    pinned: list[tuple[str, str, str]] = []
    try:
        with ix.transaction():
            ix.ensure_repo("spectro-images/bench/base", None, "bench/base")
            for b, d in zip(shared, shared_d, strict=True):
                ix.add_blob("spectro-images/bench/base", d, len(b))
                _write(store, d, b)
        for first in range(0, shape.repos, TX_REPOS):
            with ix.transaction():
                for r in range(first, min(first + TX_REPOS, shape.repos)):
                    _repo(ix, store, r, shared, shared_d, rnd, now, pinned)
            if progress and (first // TX_REPOS) % 20 == 0:
                done = min(first + TX_REPOS, shape.repos)
                print(f"  built {done}/{shape.repos} repositories", flush=True)
        # every repository's size counted, as a daemon that has run a while keeps them
        # (regproxy.repo_sizes): the daemon measured has none left to count in the background
        while count_some(ix, 1.0, 64):
            pass
    finally:
        ix.close()
    names = sorted(repo_name(r) for r in range(shape.repos))
    return Built(time.monotonic() - started, pinned, names)


def _repo(
    ix: Index,
    store: Store,
    r: int,
    shared: list[bytes],
    shared_d: list[str],
    rnd: random.Random,
    now: float,
    pinned: list[tuple[str, str, str]],
) -> None:
    name = repo_name(r)
    is_pinned = r % PINNED_EVERY == 0
    host = None if is_pinned else "docker.io"
    ix.ensure_repo(name, host, name.split("/", 1)[1])
    touches = []
    for m in range(PER_REPO):
        config = json.dumps({"repo": r, "m": m, "os": "linux"}).encode()
        layers = [f"layer {r}/{m}/{k}".encode() for k in range(LAYERS_OWN)]
        own = [(config, _sha(config))] + [(b, _sha(b)) for b in layers]
        for b, d in own:
            ix.add_blob(name, d, len(b))
            _write(store, d, b)
        picks = rnd.sample(range(len(shared)), LAYERS_SHARED)
        for i in picks:
            ix.link_blob(name, shared_d[i])
        descs = [{"mediaType": OCI_LAYER, "digest": d, "size": len(b)} for b, d in own[1:]]
        descs += [
            {"mediaType": OCI_LAYER, "digest": shared_d[i], "size": len(shared[i])} for i in picks
        ]
        body = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": own[0][1], "size": len(config)},
                "layers": descs,
            }
        ).encode()
        digest = _sha(body)
        _write(store, digest, body)
        rec = ManifestRecord(
            digest,
            OCI_MANIFEST,
            len(body),
            None,
            None,
            None,
            [d for _, d in own] + [shared_d[i] for i in picks],
            [],
        )
        tag = f"v{m}"
        ix.add_manifest(name, rec, tag=tag, pinned=is_pinned)
        if is_pinned:
            pinned.append((name, tag, digest))
            touches.append((name, digest, now - 60))
        else:
            touches.append((name, digest, now - 3600 - rnd.random() * 7 * 86400))
    ix.touch(touches)


def registry_layout(data: Path, template: str, names: list[str]) -> None:
    """Copy the repository tree docker-registry wrote for ``template`` to every name (its link
    files and directories: what its catalog walk reads)."""
    repos = data / "docker" / "registry" / "v2" / "repositories"
    src = repos / template
    for name in names:
        dest = repos / name
        if dest != src and not dest.exists():
            shutil.copytree(src, dest)
