"""The transfer (regproxy.fetch): what a reader gets when the transfer's file is gone."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from pathlib import Path
from typing import Any

import pytest

from regproxy.errors import OCIError, StorageFull
from regproxy.inflight import Transfer
from regproxy.oci import Digest
from regproxy.store import Store


def digest(data: bytes) -> Digest:
    return Digest("sha256", hashlib.sha256(data).hexdigest())


class _Watched(Transfer):
    """Says when a reader's open of the file has been tried."""

    tried: threading.Event

    def _open_for_read(self) -> Any:
        try:
            return super()._open_for_read()
        finally:
            self.tried.set()


async def test_reader_of_a_transfer_whose_temp_file_is_gone_gets_the_transfers_failure(
    tmp_path: Path,
) -> None:
    """A failed transfer removes its file before it publishes why (regproxy.fetch): a reader
    that opens in between waits for it and gets that failure, a full disk's 507 (it got a 502
    of its own, "its file is gone": one run in ten of tests/unit/test_fetch_disk_faults.py)."""
    store = Store(tmp_path / "store")
    store.open()
    t = _Watched(digest(b"z" * 10), store)
    t.tried = threading.Event()
    t.writer = store.writer()
    t.size = 10
    t.writer.abort()  # a failed transfer removed its temp file before publishing the failure
    reading = asyncio.ensure_future(anext(t.read_range(0, 9)))
    assert await asyncio.to_thread(t.tried.wait, 30)
    t.error = StorageFull("no space left on the registry host")
    t.notify()
    with pytest.raises(OCIError) as err:
        await asyncio.wait_for(reading, 30)
    assert type(err.value) is StorageFull and err.value.http_status == 507, err.value
