"""Hash a batch of small stored files: the loop ``fsck`` runs, on a thread or in a worker process.

At a million small files the per-file cost is what counts: one ``open``, one ``read``, one
``close`` and a hash, a few microseconds of Python around them. Run on a thread of the ``fsck``
process, every one of those calls waits for the interpreter lock that the rest of the command
(the index pages, the batches, the garbage collector) holds now and then; run in a process of
its own it waits for nothing, and two of them use both cores. So this module imports only the
standard library and runs as a script (``python -I hash_files.py BLOBS``, see :func:`serve`): a
worker starts in a few milliseconds, carries nothing else, and needs neither the package on the
path nor anything of the command's ``__main__`` (which ``multiprocessing`` would import again).
"""

from __future__ import annotations

import hashlib
import os
import signal
import sys
from typing import BinaryIO, Final

#: bytes per extra read of a file that turned out longer than the index says
MORE: Final = 1024 * 1024

#: (digest, hex digest found or None when the file is missing, bytes read)
Found = tuple[str, "str | None", int]


def hash_small_files(blobs: str, items: list[tuple[str, int]]) -> tuple[int, int, list[Found]]:
    """Hash each ``(digest, size)`` stored under ``blobs`` (``<alg>/<xx>/<hex>``): (files, bytes
    hashed, the ones that are missing or do not hash to their name). A file is read in one call
    of its expected size plus one byte (a short read is the end of a regular file); a longer
    one is read to its end, so a file that grew is caught too."""
    suspicious: list[Found] = []
    total = 0
    for digest, size in items:
        alg, _, hexd = digest.partition(":")
        try:
            fd = os.open(f"{blobs}/{alg}/{hexd[:2]}/{hexd}", os.O_RDONLY)
        except FileNotFoundError:
            suspicious.append((digest, None, 0))
            continue
        try:
            data = os.read(fd, size + 1)
            while len(data) > size and (more := os.read(fd, MORE)):
                data += more
        finally:
            os.close(fd)
        total += len(data)
        got = hashlib.new(alg, data).hexdigest()
        if got != hexd:
            suspicious.append((digest, got, len(data)))
    return len(items), total, suspicious


def serve(blobs: str, requests: BinaryIO, replies: BinaryIO) -> None:
    """A worker process: batches in, findings out, until ``requests`` ends.

    A batch is lines of ``<digest> <size>`` ended by an empty line; its reply is one line
    ``<files> <bytes> <n>`` and then ``n`` lines ``<digest> <hex digest or -> <bytes read>``."""
    while True:
        items: list[tuple[str, int]] = []
        while (line := requests.readline()) not in (b"", b"\n"):
            digest, size = line.split()
            items.append((digest.decode(), int(size)))
        if not line and not items:
            return
        files, total, suspicious = hash_small_files(blobs, items)
        out = [f"{files} {total} {len(suspicious)}\n"]
        out += [f"{d} {got or '-'} {n}\n" for d, got, n in suspicious]
        replies.write("".join(out).encode())
        replies.flush()
        if not line:
            return


if __name__ == "__main__":
    # Ctrl-C on a terminal reaches the whole process group: the command stops its workers
    # by ending their input; one whose command died ends at the broken pipe, quietly (the
    # reply it could not write is dropped: the interpreter's last flush at exit would print
    # "Exception ignored ... BrokenPipeError" on the terminal it shares with the command)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        serve(sys.argv[1], sys.stdin.buffer, sys.stdout.buffer)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
