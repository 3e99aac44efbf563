"""A LocalRegistry over a fresh store and index, for the in-process registry tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from regproxy.async_index import AsyncIndex
from regproxy.registry import LocalRegistry, Registry
from regproxy.store import Store
from tests.unit.disk import disk_dir as disk_dir


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[Registry]:
    root = tmp_path / "store"
    reg = LocalRegistry(Store(root), AsyncIndex(root / "index.db"))
    await reg.open()
    yield reg
    await reg.close()
