"""Start-up reads no table of the index in full and walks no blob tree (in-process daemon)."""

from __future__ import annotations

import asyncio
import os
import re
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from regproxy import schema
from regproxy.app import create_app
from regproxy.config import config_from_dict
from regproxy.index import Index, ManifestRecord
from regproxy.store import Store

#: tables whose size grows with the store: never scanned at start-up
BIG = (
    "repos",
    "blobs",
    "repo_blobs",
    "manifests",
    "repo_manifests",
    "manifest_refs",
    "tags",
    "refs",
)


def fill(root: Path) -> None:
    Store(root).open()
    ix = Index(root / "index.db")
    try:
        with ix.transaction():
            for r in range(30):
                repo = f"spectro-images/docker.io/team/r{r}"
                ix.ensure_repo(repo, "docker.io", f"team/r{r}")
                blobs = [f"sha256:{r:04d}{i:060d}" for i in range(3)]
                for b in blobs:
                    ix.add_blob(repo, b, 100)
                rec = ManifestRecord(
                    f"sha256:{r:064d}",
                    "application/vnd.oci.image.manifest.v1+json",
                    300,
                    None,
                    None,
                    None,
                    blobs,
                    [],
                )
                ix.add_manifest(repo, rec, tag="v1", pinned=r % 3 == 0)
    finally:
        ix.close()


async def test_start_up_scans_no_table_and_no_blob_tree(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "store"
    fill(root)
    traced: list[str] = []
    connect = schema.connect

    def traced_connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
        db = connect(path, readonly=readonly)
        db.set_trace_callback(traced.append)
        return db

    def no_walk(*_a: Any, **_k: Any) -> None:
        raise AssertionError("start-up must not walk the blob tree")

    monkeypatch.setattr(schema, "connect", traced_connect)
    monkeypatch.setattr(Store, "iter_blobs", no_walk)
    monkeypatch.setattr(os, "walk", no_walk)
    config = config_from_dict(
        {
            "storage": {"root": str(root), "max_size": "1GB"},
            "content": {"sync": {"enable": False}},
            "log": {"access": False},
        }
    )
    client: TestClient[Any, Any] = TestClient(TestServer(create_app(config), host="127.0.0.1"))
    await client.start_server()
    try:
        assert (await client.get("/readyz")).status == 200
        deadline = time.monotonic() + 30  # only a failure waits this long (a loaded host)
        while time.monotonic() < deadline:  # the evictor's first check runs beside the listener
            if any("FROM totals" in s for s in traced):
                break
            await asyncio.sleep(0.01)
        assert any("FROM totals" in s for s in traced), traced
    finally:
        await client.close()
    check = sqlite3.connect(root / "index.db")
    try:
        for sql in traced:
            if not re.match(r"\s*(SELECT|UPDATE|DELETE|INSERT|WITH)", sql, re.IGNORECASE):
                continue
            plan = " ".join(str(r[3]) for r in check.execute("EXPLAIN QUERY PLAN " + sql))
            scanned = [t for t in BIG if re.search(rf"\bSCAN {t}\b(?! USING)", plan)]
            assert not scanned, (sql, plan)
    finally:
        check.close()
