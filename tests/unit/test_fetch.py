"""The transfer (regproxy.fetch): what a reader gets when the transfer's file is gone."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from regproxy.errors import OCIError
from regproxy.inflight import Transfer
from regproxy.oci import Digest
from regproxy.store import Store


def digest(data: bytes) -> Digest:
    return Digest("sha256", hashlib.sha256(data).hexdigest())


async def test_reader_of_a_transfer_whose_temp_file_is_gone_gets_an_oci_error(
    tmp_path: Path,
) -> None:
    store = Store(tmp_path / "store")
    store.open()
    t = Transfer(digest(b"z" * 10), store)
    t.writer = store.writer()
    t.size = 10
    t.writer.abort()  # a failed transfer removed its temp file before publishing the failure
    with pytest.raises(OCIError):
        async for _ in t.read_range(0, 9):
            pass
