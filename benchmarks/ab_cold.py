"""Cold pull A/B: regproxy variants (other trees, other environments) and optionally Debian's
docker-registry in proxy mode, each pulling one cold blob through from one docker-registry
upstream, in alternating rounds of one run.

    git archive main regproxy | tar -x -C /tmp/base
    python -m benchmarks.ab_cold --variant base=/tmp/base --variant tree=. --rounds 6
    python -m benchmarks.ab_cold --variant tree=. --variant big=.,REGPROXY_X=1 --peer
    python -m benchmarks.ab_cold --variant tree=. --rounds 1 --trace   # a timeline per pull

A variant is ``NAME=DIR[,KEY=VALUE...]``: the ``regproxy`` package found in DIR (``.``: this
tree), with those environment variables; a KEY ``cfg:storage.drop_behind_above`` is a config key
instead (``--variant drop=.,cfg:storage.drop_behind_above=512MiB``). Each round starts every server on an empty store after
a ``sync`` (see bench_pull), the first server of a round moving on by one each round. Figures:
the client's GB/s (curl's total time), the server's CPU-seconds per GiB until the blob is
committed, the upstream's, and the per-round ratios against the first variant. ``--trace``
samples every thread of the server every few ms (``/proc/PID/task/*/schedstat`` and ``io``)
and prints where each thread ran, waited for a core, and moved bytes, in 50 ms steps.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_pull import (
    ALIAS,
    REPO,
    AccessLog,
    blob_bytes,
    curl,
    curl_result,
    flush_disk,
    push_random_blob,
)
from benchmarks.common import CpuMeter, GiB, MiB, check_tools, load_1m, with_keys
from tests.peers import Daemon, DockerRegistry, started, stop_process

STEP = 0.05  # seconds per line of a trace


@dataclass
class Variant:
    name: str
    tree: Path | None  # None: this tree (the working directory)
    env: dict[str, str] = field(default_factory=dict)
    #: config keys (dotted) set for this variant
    config: dict[str, str] = field(default_factory=dict)


def parse_variant(text: str) -> Variant:
    name, _, rest = text.partition("=")
    parts = rest.split(",")
    tree = None if parts[0] in ("", ".") else Path(parts[0]).resolve()
    pairs = [p.split("=", 1) for p in parts[1:] if p]
    env = {k: v for k, v in pairs if not k.startswith("cfg:")}
    config = {k.removeprefix("cfg:"): v for k, v in pairs if k.startswith("cfg:")}
    if tree is not None:
        # PYTHONSAFEPATH: the working directory (this tree) does not come first on sys.path
        env = {"PYTHONSAFEPATH": "1", "PYTHONPATH": str(tree), **env}
    return Variant(name, tree, env, config)


# --- sampling ---------------------------------------------------------------------------------------
def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _io(text: str) -> tuple[int, int]:
    fields = dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)
    return int(fields.get("rchar", 0)), int(fields.get("wchar", 0))


def _stat_cpu(pid: int) -> float:
    text = _read(f"/proc/{pid}/stat")
    if not text:
        return 0.0
    fields = text.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Sampler:
    """Every ``period`` s: per thread of ``pid`` (name, ns on a core, ns waiting for one,
    rchar, wchar), and the bytes written by the upstream and the client."""

    def __init__(self, pid: int, upstream: int, period: float = 0.004) -> None:
        self.pid, self.upstream, self.period = pid, upstream, period
        self.client = 0
        self.rows: list[
            tuple[float, dict[int, tuple[str, int, int, int, int]], int, int, list[int]]
        ] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._names: dict[int, str] = {}
        self.switches_at: dict[int, tuple[int, int]] = {}
        self.switches: dict[int, tuple[int, int]] = {}

    def start(self) -> Sampler:
        self.switches_at = self._switches()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.switches = self._switches()

    def _switches(self) -> dict[int, tuple[int, int]]:
        """Per thread: voluntary (it waited) and involuntary (preempted) context switches."""
        out = {}
        with contextlib.suppress(OSError):
            for t in os.listdir(f"/proc/{self.pid}/task"):
                status = _read(f"/proc/{self.pid}/task/{t}/status")
                f = dict(x.split(":", 1) for x in status.splitlines() if ":" in x)
                if "voluntary_ctxt_switches" in f:
                    out[int(t)] = (
                        int(f["voluntary_ctxt_switches"]),
                        int(f["nonvoluntary_ctxt_switches"]),
                    )
        return out

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            tasks: dict[int, tuple[str, int, int, int, int]] = {}
            try:
                tids = [int(t) for t in os.listdir(f"/proc/{self.pid}/task")]
            except OSError:
                tids = []
            for tid in tids:
                base = f"/proc/{self.pid}/task/{tid}"
                sched = _read(f"{base}/schedstat").split()
                if len(sched) < 2:
                    continue
                if tid not in self._names:
                    self._names[tid] = _read(f"{base}/comm").strip()
                r, w = _io(_read(f"{base}/io"))
                tasks[tid] = (self._names[tid], int(sched[0]), int(sched[1]), r, w)
            up = _io(_read(f"/proc/{self.upstream}/io"))[1]
            cl = _io(_read(f"/proc/{self.client}/io"))[1] if self.client else 0
            machine = [int(x) for x in _read("/proc/stat").split("\n", 1)[0].split()[1:9]]
            self.rows.append((now, tasks, up, cl, machine))
            self._stop.wait(self.period)


def print_trace(s: Sampler, t0: float, label: str) -> None:
    """Per thread totals, then 50 ms steps: MB moved and each busy thread's share of the step
    on a core (and, after the slash, waiting for one)."""
    rows = s.rows
    if len(rows) < 2:
        return
    first, last = rows[0][1], rows[-1][1]
    busy = []
    for tid, (name, run, wait, r, w) in last.items():
        r0 = first.get(tid, (name, 0, 0, 0, 0))
        d = (run - r0[1], wait - r0[2], r - r0[3], w - r0[4])
        if d[0] > 5_000_000:
            busy.append((tid, name, d))
    print(
        f"\n-- trace {label}: per thread (s on a core / s waiting for one, MB read / written, "
        "context switches voluntary / involuntary)"
    )
    for tid, name, d in busy:
        a, b = s.switches_at.get(tid, (0, 0)), s.switches.get(tid, (0, 0))
        print(
            f"  {tid} {name:<16} {d[0] / 1e9:.3f} / {d[1] / 1e9:.3f}  "
            f"{d[2] / MiB:.0f} / {d[3] / MiB:.0f} MB  {b[0] - a[0]} / {b[1] - a[1]}"
        )
    cols = [tid for tid, _, _ in busy]
    head = " ".join(f"{n[:9]:>9}" for _, n, _ in busy)
    print(f"  {'t':>5} {'up MB':>6} {'client':>6} {head}  idle/io/sirq/steal %")
    i = 0
    step_start = rows[0]
    while i < len(rows):
        j = i
        while j < len(rows) and rows[j][0] - step_start[0] < STEP:
            j += 1
        if j >= len(rows):
            break
        end = rows[j]
        dt = end[0] - step_start[0]
        cells = []
        for tid in cols:
            a = step_start[1].get(tid)
            b = end[1].get(tid)
            if a is None or b is None:
                cells.append(f"{'':>9}")
                continue
            cells.append(
                f"{(b[1] - a[1]) / 1e9 / dt * 100:>4.0f}/{(b[2] - a[2]) / 1e9 / dt * 100:<4.0f}"
            )
        up = (end[2] - step_start[2]) / MiB
        cl = (end[3] - step_start[3]) / MiB if end[3] and step_start[3] else 0.0
        m = [b - a for a, b in zip(step_start[4], end[4], strict=True)]
        ticks = sum(m) or 1
        # user nice system idle iowait irq softirq steal: % of all cores (200 on two)
        share = [x * 100 * (os.cpu_count() or 1) / ticks for x in m]
        machine = f"{share[3]:3.0f}/{share[4]:3.0f}/{share[6]:3.0f}/{share[7]:3.0f}"
        print(f"  {step_start[0] - t0:5.2f} {up:6.0f} {cl:6.0f} {' '.join(cells)}  {machine}")
        step_start = end
        i = j


# --- one pull -----------------------------------------------------------------------------------------
def cold_pull(
    server: Daemon | DockerRegistry,
    url: str,
    size: int,
    committed: Any,
    upstream_pid: int,
    uplog: AccessLog,
    digest: str,
    trace: str | None,
    around: str = "",
) -> dict[str, float]:
    assert server.proc is not None
    mark = uplog.mark()
    cpu = CpuMeter({"server": server.proc.pid, "upstream": upstream_pid}).start()
    sampler = Sampler(server.proc.pid, upstream_pid).start() if trace else None
    watcher = None
    if around:
        cmd = [a.replace("{pid}", str(server.proc.pid)) for a in shlex.split(around)]
        watcher = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)
    t0 = time.monotonic()
    proc = curl(url, max(60.0, size / (20 * MiB)))
    if sampler is not None:
        sampler.client = proc.pid
    end = commit = None
    while end is None or commit is None:
        now = time.monotonic() - t0
        if commit is None and committed():
            commit = now
        if end is None and proc.poll() is not None:
            end = now
        if end is not None and now > end + 120:
            break
        time.sleep(0.002)
    total = curl_result(proc, size)
    if sampler is not None:
        sampler.stop()
    if watcher is not None:
        watcher.send_signal(signal.SIGINT)
        try:
            watcher.wait(60)
        except subprocess.TimeoutExpired:
            stop_process(watcher)
    uplog.settle(quiet=0.5, limit=60)
    used = cpu.used()
    if sampler is not None and trace:
        print_trace(sampler, t0, trace)
    return {
        "gb_s": size / total / 1e9,
        "cpu": used["server"] / (size / GiB),
        "up_cpu": used["upstream"] / (size / GiB),
        "end": end or float("nan"),
        "commit": commit if commit is not None else float("nan"),
        "up_x": blob_bytes(uplog.since(mark), digest) / size,
        "t0": t0,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--variant", action="append", default=[], help="NAME=DIR[,KEY=VALUE...]")
    p.add_argument("--peer", action="store_true", help="also docker-registry in proxy mode")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--mib", type=int, default=1024, help="the blob's size")
    p.add_argument("--trace", action="store_true", help="print a timeline of every pull")
    p.add_argument(
        "--around",
        default="",
        help="a command run during each pull, stopped by SIGINT ({pid}: the server's), "
        "e.g. 'perf sched record -a -o /tmp/s.data'",
    )
    args = p.parse_args(argv)
    check_tools("ab_cold", {"curl": "curl", "docker-registry": "docker-registry"})
    variants = [parse_variant(v) for v in args.variant] or [parse_variant("tree=.")]
    rounds = max(1, min(args.rounds, 20))
    size = max(1, min(args.mib, 4096)) * MiB
    print(f"load {os.getloadavg()[0]:.2f} at the start", flush=True)
    results: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="regproxy-abcold-") as tmpdir:
        tmp = Path(tmpdir)
        upstream = DockerRegistry(
            tmp / "upstream", extra={"log": {"level": "error", "accesslog": {"disabled": False}}}
        )
        current: list[Daemon | DockerRegistry] = []

        def stop_current() -> None:
            while current:
                current.pop().stop()

        class _Stopper:
            def stop(self) -> None:
                stop_current()

        with started(upstream, _Stopper()):
            upstream.start()
            assert upstream.proc is not None
            uplog = AccessLog(upstream.root / "registry.log")
            digest = push_random_blob(upstream.port, size)
            names: list[str] = [v.name for v in variants] + (["registry"] if args.peer else [])
            for r in range(rounds):
                k = r % len(names)
                for name in names[k:] + names[:k]:
                    root = tmp / f"{name}-{r}"
                    root.mkdir()
                    flush_disk()
                    hexd = digest.split(":", 1)[1]
                    server: Daemon | DockerRegistry
                    if name == "registry":
                        server = DockerRegistry(
                            root,
                            proxy_url=upstream.url,
                            extra={"log": {"level": "error", "accesslog": {"disabled": True}}},
                        )
                        current.append(server)
                        server.start()
                        url = f"http://127.0.0.1:{server.port}/v2/{REPO}/blobs/{digest}"
                        data = root / "data/docker/registry/v2/blobs/sha256" / hexd[:2] / hexd
                        committed: Any = (data / "data").exists
                    else:
                        v = next(x for x in variants if x.name == name)
                        config = {
                            "log": {"access": False, "level": "WARNING"},
                            "upstreams": {upstream.hostport: {"url": upstream.url, "alias": ALIAS}},
                        }
                        server = Daemon(root, with_keys(config, v.config), env=v.env)
                        current.append(server)
                        server.start()
                        url = f"http://127.0.0.1:{server.port}/v2/{ALIAS}/{REPO}/blobs/{digest}"
                        blob = root / "store" / "blobs" / "sha256" / hexd[:2] / hexd
                        tmpd = root / "store" / "tmp"

                        def committed(blob: Path = blob, tmpd: Path = tmpd) -> bool:
                            return blob.exists() and not any(tmpd.iterdir())

                    load = os.getloadavg()[0]
                    out = cold_pull(
                        server,
                        url,
                        size,
                        committed,
                        upstream.proc.pid,
                        uplog,
                        digest,
                        f"{name} round {r}" if args.trace else None,
                        args.around.replace("{round}", str(r)),
                    )
                    out["load"] = load
                    if isinstance(server, Daemon):
                        for line in server.log().splitlines():
                            if line.startswith("EXP"):
                                words = line.split()
                                if "at" in words:
                                    i = words.index("at")
                                    words[i + 1] = f"{float(words[i + 1]) - out['t0']:.3f}"
                                print("   ", " ".join(words))
                    results.setdefault(name, []).append(out)
                    print(
                        f"round {r} {name:<10} {out['gb_s']:.2f} GB/s, CPU {out['cpu']:.2f} s/GiB "
                        f"(upstream {out['up_cpu']:.2f}), ended {out['end']:.2f} s, committed "
                        f"{out['commit']:.2f} s, upstream {out['up_x']:.2f}x, load {load:.2f}",
                        flush=True,
                    )
                    stop_current()
                    # its files go (as in bench_pull): the next pull's page cache reuses their
                    # pages; kept, every round wrote into memory new to the VM, which cost
                    # regproxy (it writes before its response ends) up to 2x CPU by round 4
                    shutil.rmtree(root, ignore_errors=True)
    print(f"\nmedians of {rounds} rounds, {size // MiB} MiB cold, load at the end {load_1m()}")
    print("| server | GB/s | CPU-s/GiB | upstream CPU-s/GiB | ended s | committed s |")
    print("|---|---|---|---|---|---|")
    for name, runs in results.items():

        def med(key: str, runs: list[dict[str, float]] = runs) -> float:
            return statistics.median(x[key] for x in runs)

        print(
            f"| {name} | {med('gb_s'):.2f} | {med('cpu'):.2f} | {med('up_cpu'):.2f} | "
            f"{med('end'):.2f} | {med('commit'):.2f} |"
        )
    base = variants[0].name
    print(f"\nper round against {base} (median, min-max):")
    for name, runs in results.items():
        if name == base:
            continue
        pairs = list(zip(runs, results[base], strict=True))
        gbs = [x["gb_s"] / b["gb_s"] for x, b in pairs]
        cpu = [x["cpu"] / b["cpu"] for x, b in pairs]
        print(
            f"  {name}: GB/s {statistics.median(gbs):.2f}x ({min(gbs):.2f}-{max(gbs):.2f}), "
            f"CPU-s/GiB {statistics.median(cpu):.2f}x ({min(cpu):.2f}-{max(cpu):.2f})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
