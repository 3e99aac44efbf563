"""A progress line for long command-line work (gc, fsck): on a terminal only.

When stderr is a terminal, :meth:`Progress.update` rewrites one line in place, at most a few
times a second; otherwise (a pipe, a log, a test) it writes nothing, so output stays clean.
"""

from __future__ import annotations

import sys
import time
from typing import Final, TextIO

#: seconds between two redraws
EVERY: Final = 0.25
WIDTH: Final = 100


class Progress:
    def __init__(
        self,
        what: str,
        stream: TextIO | None = None,
        *,
        enabled: bool | None = None,
        every: float = EVERY,
    ) -> None:
        self.what = what
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.every = every
        self._last = -every
        self._shown = False

    def update(self, text: str, *, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < self.every:
            return
        self._last = now
        line = f"{self.what}: {text}"[:WIDTH]
        self.stream.write("\r" + line.ljust(WIDTH))
        self.stream.flush()
        self._shown = True

    def done(self) -> None:
        """Clear the line (the command prints its report after it)."""
        if self._shown:
            self.stream.write("\r" + " " * WIDTH + "\r")
            self.stream.flush()
            self._shown = False


def rate(n: float, seconds: float) -> float:
    return n / seconds if seconds > 0 else 0.0
