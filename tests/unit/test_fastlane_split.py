"""The fast lane's framing does not depend on how the bytes arrive (regproxy.connections): one
stream of pipelined requests (lane answers, declined GETs, a body that looks like a request)
cut at every byte boundary, and at random places in several pieces, is answered the same,
each request once, in order, and no bytes of a body are read as a request.

The fakes are those of tests/unit/test_fastlane_guard.py, with an aiohttp stand-in that frames
what it is handed (``Content-Length`` bodies too) and answers each request at once, telling
the guard as aiohttp's access logger does.
"""

from __future__ import annotations

import random
from typing import Any

from tests.unit.test_fastlane_guard import Conn, Inner, req

BODY = req("/fast4")[:20]  # a body that starts like a request the lane would answer
STREAM = (
    req("/fast1")
    + req("/slow1")
    + req("/fast2", "Accept: a", "Accept: b")
    + req("/fast3", method="HEAD")
    + req("/slow2")
    + req("/fast5")
    + req("/v2/x/blobs/uploads/1", f"Content-Length: {len(BODY)}", method="PATCH")
    + BODY
    + req("/fast6")
)
#: each request once, in order; the body's lookalike never
ORDER = [
    b"/fast1",
    b"/slow1",
    b"/fast2",
    b"/fast3",
    b"/slow2",
    b"/fast5",
    b"/v2/x/blobs/uploads/1",
    b"/fast6",
]


class Answering(Inner):
    """aiohttp: frames what it is handed and answers each request at once, in order."""

    def __init__(self, conn: Any) -> None:
        super().__init__()
        self.conn = conn
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self.buf += data
        while (end := self.buf.find(b"\r\n\r\n")) >= 0:
            head = self.buf[:end]
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.lower() == b"content-length":
                    length = int(value)
            if len(self.buf) < end + 4 + length:
                return
            self.buf = self.buf[end + 4 + length :]
            self.conn.transport.write(b"INNER " + head.split(b" ")[1] + b"\n")
            self.conn.done()


def answers(cuts: list[int]) -> list[bytes]:
    """The targets answered, by the lane or aiohttp, for STREAM sent in pieces at ``cuts``."""
    c = Conn()
    c.inner = Answering(c)
    c.proto.inner = c.inner
    try:
        last = 0
        for cut in [*cuts, len(STREAM)]:
            c.send(STREAM[last:cut])
            last = cut
        return [line.split(b" ", 1)[1].rstrip(b"\n") for line in c.answered()]
    finally:
        c.lost()


async def test_every_split_answers_each_request_once_in_order() -> None:
    assert answers([]) == ORDER
    for cut in range(1, len(STREAM)):
        assert answers([cut]) == ORDER, cut
    rnd = random.Random(7)
    for _ in range(300):
        cuts = sorted(rnd.sample(range(1, len(STREAM)), rnd.randint(2, 12)))
        assert answers(cuts) == ORDER, cuts


async def test_the_lane_answers_what_it_can_whatever_the_split() -> None:
    """Not only in order: the lane takes back the connection after aiohttp's answers (each
    /fast request before the upload is the lane's, the one after it aiohttp's), however the
    bytes were cut."""
    whole = Conn()
    whole.inner = Answering(whole)
    whole.proto.inner = whole.inner
    try:
        whole.send(STREAM)
        by = [line.split(b" ")[0] for line in whole.answered()]
    finally:
        whole.lost()
    assert by == [b"ANSWER"] + [b"INNER"] * 7
    c = Conn()
    c.inner = Answering(c)
    c.proto.inner = c.inner
    try:
        for i in range(len(STREAM)):  # a byte at a time
            c.send(STREAM[i : i + 1])
        by = [line.split(b" ")[0] for line in c.answered()]
    finally:
        c.lost()
    lane, inner = b"ANSWER", b"INNER"
    assert by == [lane, inner, lane, lane, inner, lane, inner, inner]
