"""What writing a blob into the page cache costs this machine, the way a cold pull writes it
(1 MiB writes, writeback started every 4 MiB: regproxy.store.BlobWriter), kept or dropped
behind (``storage.drop_behind_above``).

    python -m benchmarks.page_cost --mib 1024 --rounds 3

Each round writes a fresh file three ways and prints the writing thread's CPU seconds per GiB:
``kept, after idle`` after ``--idle`` seconds (on a VM whose host takes free memory back, the
pages are fresh again: each first write into one faults in the host), ``kept, at once`` right
after that file was deleted (into its pages, still the machine's), and ``dropped behind``
after the same idle (the writer's own dropped pages are its next ones). On bare metal the three
are alike; on the test VM they are not (benchmarks/README.md, "Cold pull, fourth pass").
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import GiB, MiB
from regproxy.store import Store

KINDS = ("kept, at once", "kept, after idle", "dropped behind")


def write_blob(root: Path, size: int, drop: bool) -> float:
    """CPU seconds of this thread to write ``size`` bytes through a BlobWriter (then removed)."""
    store = Store(root)
    store.open()
    w = store.writer()
    if drop:
        w.drop_behind(lambda: 1 << 62)  # no reader: only the writer's lag holds pages
    chunk = os.urandom(MiB)
    began = time.thread_time()
    for _ in range(size // MiB):
        w.write_unhashed(chunk)
    used = time.thread_time() - began
    w.abort()
    return used


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--mib", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--idle", type=float, default=5.0, help="seconds before the idle writes")
    p.add_argument("--dir", type=Path, default=Path("/var/tmp"), help="on the store's disk")
    args = p.parse_args(argv)
    size = max(8, min(args.mib, 8192)) * MiB
    rounds = max(1, min(args.rounds, 10))
    got: dict[str, list[float]] = {k: [] for k in KINDS}
    with tempfile.TemporaryDirectory(prefix="regproxy-pagecost-", dir=args.dir) as tmp:
        root = Path(tmp) / "store"
        for r in range(rounds):
            time.sleep(args.idle)
            got[KINDS[1]].append(write_blob(root, size, drop=False))
            # into the pages the file before had, just freed
            got[KINDS[0]].append(write_blob(root, size, drop=False))
            time.sleep(args.idle)
            got[KINDS[2]].append(write_blob(root, size, drop=True))
            line = ", ".join(f"{k} {got[k][-1] / (size / GiB):.2f}" for k in KINDS)
            print(f"round {r}: CPU-s per GiB written: {line}", flush=True)
    print(f"\nmedians of {rounds} rounds, {size // MiB} MiB each, idle {args.idle:g} s")
    print("| write | CPU-s per GiB |")
    print("|---|---|")
    for k in KINDS:
        print(f"| {k} | {statistics.median(got[k]) / (size / GiB):.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
