"""Shared pieces of the in-process registry tests (the `registry` fixture is in conftest.py)."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator

from regproxy.names import RepoName
from regproxy.oci import Digest

REPO = RepoName("spectro-images/app")
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


async def body(*parts: bytes) -> AsyncIterator[bytes]:
    for p in parts:
        yield p


def digest(data: bytes) -> Digest:
    return Digest("sha256", hashlib.sha256(data).hexdigest())
