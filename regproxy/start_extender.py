"""Telling systemd that a long start is busy, not hung (an index upgrade: a recount of a million
blobs takes tens of seconds; the unit's ``TimeoutStartSec`` is 120 s)."""

from __future__ import annotations

import time
from typing import Final

from regproxy.systemd import notify_once

#: each notice pushes systemd's start timeout this far ahead...
EXTEND_SECONDS: Final = 60
#: ...and one is sent this often (SQLite calls :class:`StartExtender` every :data:`EXTEND_STEPS`
#: VM steps, as its progress handler)
EXTEND_EVERY: Final = 10.0
EXTEND_STEPS: Final = 100_000


class StartExtender:
    """A SQLite progress handler for long start-up work: tells systemd
    (``EXTEND_TIMEOUT_USEC``) at once and then every :data:`EXTEND_EVERY` seconds that the start
    is busy. Outside systemd (no ``NOTIFY_SOCKET``: ``gc``, ``fsck --repair`` from a shell) it
    sends nothing."""

    def __init__(self, status: str) -> None:
        self.status = f"STATUS={status}"
        self.next = 0.0

    def __call__(self) -> int:
        now = time.monotonic()
        if now >= self.next:
            self.next = now + EXTEND_EVERY
            notify_once(f"EXTEND_TIMEOUT_USEC={EXTEND_SECONDS * 1_000_000}", self.status)
        return 0  # go on
