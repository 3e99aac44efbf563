"""Hostile clients benchmark: regproxy against Debian's docker-registry, same content, same run.

For each server, twice: first on an idle server, then while 2,000 idle keep-alive connections
and 200 slow readers are held:

- warm 4 KiB blob GETs with ``wrk`` (concurrency 8): p50 and p99 latency;
- a warm 5 MB blob GET (a file, not a small object served from memory), one at a time on a new
  connection: p50 and p99 of the whole transfer;
- peak RSS of the server process (``VmHWM``, reset before each phase).

An idle connection made one ``GET /v2/`` and then sends nothing (a pooled client connection);
a slow reader asked for a 64 MiB blob with a 4 KiB receive buffer, which it reads once a second.
Both servers bind 127.0.0.1 on free ports and are stopped by PID at the end, whatever happens.

    python -m benchmarks.bench_hostile            # full run (~3 min on 2 cores)
    python -m benchmarks.bench_hostile --quick    # smoke run (~1 min)
    python -m benchmarks.bench_hostile --json     # also write benchmarks/results/hostile-*.json

Needs ``wrk``, ``curl`` and ``docker-registry`` on PATH (``apt-get install -y wrk curl
docker-registry``); it installs nothing itself.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import multiprocessing
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: the repository root is not on sys.path yet
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (
    WRK_DONE,
    BenchError,
    CpuMeter,
    GiB,
    KiB,
    MiB,
    check_tools,
    load_1m,
    peak_rss_mb,
    print_log_tails,
    push_blob,
    report,
    reset_peak_rss,
    run_summary,
    run_wrk,
)
from tests.peers import Daemon, DockerRegistry, started

REPO = "bench/hostile"
PROBE_BYTES = 5_000_000
SLOW_RCVBUF = 4 * KiB
SLOW_TAKE = 16 * KiB  # bytes a slow reader takes per tick
SLOW_TICK = 1.0  # seconds
# Goals of issue 10
GOAL_PROBE_P99_RATIO = 2.0
GOAL_RSS_MB = 150.0
CURL = ("curl", "-sS", "--fail", "-o", "/dev/null", "--max-time", "120")


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def percentile(samples: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(samples)
    return ordered[max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))]


# --- the hostile crowd ---------------------------------------------------------------------------
class Crowd:
    """Idle keep-alive connections and slow readers (in a process of their own, so that reading
    slowly costs the measuring side nothing), held until :meth:`close`."""

    def __init__(self, port: int, idle: int, slow: int, slow_path: str) -> None:
        ctx = multiprocessing.get_context("fork")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(
            target=_hold, args=(child, port, idle, slow, slow_path), daemon=True
        )
        self._proc.start()
        if not self._conn.poll(600):
            self._stop_process()
            raise BenchError("the crowd did not connect within 600 s")
        self.refused: int = self._conn.recv()

    def close(self) -> dict[str, int]:
        """Stop; the crowd's figures: idle_open, slow_open, slow_taken (bytes)."""
        try:
            self._conn.send("stop")
            if not self._conn.poll(60):
                raise BenchError("the crowd did not stop within 60 s")
            figures: dict[str, int] = self._conn.recv()
            return figures
        finally:
            self._stop_process()

    def _stop_process(self) -> None:
        self._proc.join(10)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)


def _connect(port: int, rcvbuf: int | None = None) -> socket.socket:
    s = socket.socket()
    if rcvbuf is not None:  # before connect: the window the server sees stays small
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(30)
    s.connect(("127.0.0.1", port))
    return s


def _hold(conn: Connection, port: int, idle: int, slow: int, slow_path: str) -> None:
    """The crowd's process: connect, tell the parent, read slowly until told to stop."""
    idlers, readers, refused, taken = [], [], 0, 0
    for _ in range(idle):
        s = _connect(port)
        s.sendall(b"GET /v2/ HTTP/1.1\r\nHost: bench\r\n\r\n")
        refused += not s.recv(4096).startswith(b"HTTP/1.1 200")  # a small answer: one segment
        idlers.append(s)
    for _ in range(slow):
        s = _connect(port, SLOW_RCVBUF)
        s.sendall(f"GET {slow_path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
        try:
            refused += not s.recv(SLOW_TAKE).startswith(b"HTTP/1.1 200")
        except TimeoutError:  # no answer within 30 s: a server whose workers are all taken
            refused += 1
        s.setblocking(False)
        readers.append(s)
    conn.send(refused)
    while not conn.poll(SLOW_TICK):
        for s in readers:
            with contextlib.suppress(BlockingIOError, InterruptedError, ConnectionResetError):
                taken += len(s.recv(SLOW_TAKE))
    conn.recv()
    conn.send(
        {
            "idle_open": sum(_is_open(s) for s in idlers),
            "slow_open": sum(_is_open(s) for s in readers),
            "slow_taken": taken,
        }
    )
    for s in idlers + readers:
        s.close()


def _is_open(s: socket.socket) -> bool:
    """Whether the server has not closed this connection (nothing is read from it)."""
    s.setblocking(False)  # with a timeout, recv would first wait for data
    try:
        return s.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True  # nothing to read, and not closed
    except OSError:
        return False


# --- measuring -----------------------------------------------------------------------------------
def probe(port: int, path: str, runs: int) -> list[float]:
    """Seconds for each of ``runs`` whole 5 MB GETs, one after the other (``curl``'s own
    figure, so the client's start-up is not counted)."""
    out = []
    for _ in range(runs):
        proc = subprocess.run(
            [*CURL, "-w", "%{size_download} %{time_total}", f"http://127.0.0.1:{port}{path}"],
            capture_output=True,
            text=True,
            timeout=130,
            check=False,
        )
        if proc.returncode != 0:
            raise BenchError(f"probe on :{port} failed ({proc.returncode}): {proc.stderr}")
        size, total = proc.stdout.split()
        if int(float(size)) != PROBE_BYTES:
            raise BenchError(f"probe on :{port} got {size} bytes")
        out.append(float(total))
    return out


@dataclass
class Settings:
    seconds: float  # wrk seconds per measurement
    probes: int
    idle: int
    slow: int
    slow_mib: int


def measure(
    port: int, pid: int, paths: dict[str, str], settings: Settings, script: Path
) -> dict[str, float]:
    reset_peak_rss(pid)
    url = f"http://127.0.0.1:{port}{paths['small']}"
    run_wrk(url, 8, 1, {}, script)  # warm-up
    cpu = CpuMeter({"server": pid}).start()
    w = run_wrk(url, 8, settings.seconds, {}, script)
    small_cpu = cpu.used()["server"]
    cpu.start()
    times = probe(port, paths["probe"], settings.probes)
    probe_cpu = cpu.used()["server"]
    return {
        "small_cpu_us_req": round(small_cpu / w["requests"] * 1e6, 1),
        "probe_cpu_s_gib": round(probe_cpu / (len(times) * PROBE_BYTES / GiB), 2),
        "small_req_s": round(w["req_s"], 1),
        "small_p50_ms": round(w["p50_ms"], 3),
        "small_p99_ms": round(w["p99_ms"], 3),
        "probe_p50_ms": round(statistics.median(times) * 1000, 2),
        "probe_p99_ms": round(percentile(times, 99) * 1000, 2),
        "rss_mb": round(peak_rss_mb(pid), 1),
    }


def bench(settings: Settings, progress: bool = True) -> dict[str, Any]:
    check_tools("bench_hostile", {t: t for t in ("wrk", "curl", "docker-registry")})
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = settings.idle + settings.slow + 256
    if soft < need:  # this process holds the crowd's sockets
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(need, soft)), hard))
    started_at, load_start = time.time(), load_1m()
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="regproxy-bench-") as tmpdir:
        tmp = Path(tmpdir)
        daemon = Daemon(tmp / "regproxy", {"log": {"access": False, "level": "WARNING"}})
        daemon.root.mkdir(parents=True)
        peer = DockerRegistry(
            tmp / "registry",
            extra={"log": {"level": "error", "accesslog": {"disabled": True}}},
        )
        try:
            with started(daemon, peer):
                daemon.start()
                peer.start()
                assert daemon.proc is not None and peer.proc is not None
                servers = {
                    "regproxy": (daemon.port, daemon.proc.pid),
                    "registry": (peer.port, peer.proc.pid),
                }
                small, warm = os.urandom(4 * KiB), os.urandom(PROBE_BYTES)
                big_path = tmp / "big.bin"
                big_path.write_bytes(os.urandom(settings.slow_mib * MiB))
                big = digest(big_path.read_bytes())
                for port, _ in servers.values():
                    push_blob(port, REPO, digest(small), small)
                    push_blob(port, REPO, digest(warm), warm)
                    push_blob(port, REPO, big, big_path)
                paths = {
                    "small": f"/v2/{REPO}/blobs/{digest(small)}",
                    "probe": f"/v2/{REPO}/blobs/{digest(warm)}",
                    "slow": f"/v2/{REPO}/blobs/{big}",
                }
                script = tmp / "report.lua"
                script.write_text(WRK_DONE)
                for name, (port, pid) in servers.items():
                    idle = measure(port, pid, paths, settings, script)
                    if progress:
                        print(f"{name:<9} idle  {idle}", flush=True)
                    crowd = Crowd(port, settings.idle, settings.slow, paths["slow"])
                    try:
                        held = measure(port, pid, paths, settings, script)
                    finally:
                        figures = crowd.close()
                    held.update(
                        idle_open=figures["idle_open"],
                        slow_open=figures["slow_open"],
                        refused=crowd.refused,
                        slow_taken_mb=round(figures["slow_taken"] / MiB, 1),
                    )
                    if progress:
                        print(f"{name:<9} held  {held}", flush=True)
                    results[name] = {"idle": idle, "held": held}
        except BaseException:
            print_log_tails({"regproxy": daemon.log(), "registry": peer.log()})
            raise
    return {**run_summary(started_at, load_start), "settings": asdict(settings), **results}


# --- report --------------------------------------------------------------------------------------
ROWS = [
    ("4 KiB req/s (c=8)", "small_req_s", "{:.0f}"),
    ("4 KiB p50 ms", "small_p50_ms", "{:.2f}"),
    ("4 KiB p99 ms", "small_p99_ms", "{:.2f}"),
    ("5 MB probe p50 ms", "probe_p50_ms", "{:.1f}"),
    ("5 MB probe p99 ms", "probe_p99_ms", "{:.1f}"),
    ("peak RSS MB", "rss_mb", "{:.1f}"),
    ("4 KiB CPU us/req", "small_cpu_us_req", "{:.0f}"),
    ("5 MB probe CPU s/GiB", "probe_cpu_s_gib", "{:.2f}"),
]


def render(result: dict[str, Any]) -> str:
    s = result["settings"]
    head = f"{'':<20} | {'regproxy idle':>13} {'held':>9} | {'registry idle':>13} {'held':>9}"
    lines = [head, "-" * len(head)]
    for label, key, fmt in ROWS:
        cells = [
            fmt.format(result[server][phase][key])
            for server in ("regproxy", "registry")
            for phase in ("idle", "held")
        ]
        lines.append(f"{label:<20} | {cells[0]:>13} {cells[1]:>9} | {cells[2]:>13} {cells[3]:>9}")
    for server in ("regproxy", "registry"):
        h = result[server]["held"]
        lines.append(
            f"{server}: held {h['idle_open']}/{s['idle']} idle and {h['slow_open']}/{s['slow']} "
            f"slow connections to the end ({h['refused']} refused or unanswered), slow readers took "
            f"{h['slow_taken_mb']} MB"
        )
    r = result["regproxy"]
    ratio = r["held"]["probe_p99_ms"] / r["idle"]["probe_p99_ms"]
    rss = max(r["idle"]["rss_mb"], r["held"]["rss_mb"])
    lines += [
        "",
        f"held = while {s['idle']} idle keep-alive connections and {s['slow']} slow readers "
        f"({s['slow_mib']} MiB blob, a 4 KiB receive buffer read once a second) are connected; "
        "wrk -t1 -c8 "
        f"for {s['seconds']:g} s per figure; {s['probes']} probes one after the other",
        f"{result['machine']['cpus']} CPUs, Python {result['machine']['python']}, kernel "
        f"{result['machine']['kernel']}, total {result['seconds']:g} s, load average (1 min) at "
        f"start/end {result['loadavg_1m_start_end'][0]}/{result['loadavg_1m_start_end'][1]} "
        "(other work on the machine skews the figures)",
        "",
        "goals (issue 10):",
        f"  {'ok  ' if ratio <= GOAL_PROBE_P99_RATIO else 'MISS'} regproxy 5 MB probe p99 held/idle "
        f"{ratio:.2f}x (goal <= {GOAL_PROBE_P99_RATIO:g}x)",
        f"  {'ok  ' if rss < GOAL_RSS_MB else 'MISS'} regproxy peak RSS {rss:.1f} MB "
        f"(goal < {GOAL_RSS_MB:g} MB)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run (1 s wrk, 5 probes, 16 MiB)")
    p.add_argument("--json", action="store_true", help="write results to benchmarks/results/")
    args = p.parse_args(argv)
    settings = (
        Settings(seconds=1, probes=5, idle=2000, slow=200, slow_mib=16)
        if args.quick
        else Settings(seconds=5, probes=30, idle=2000, slow=200, slow_mib=64)
    )
    try:
        result = bench(settings)
    except BenchError as exc:
        print(f"bench_hostile: {exc}", file=sys.stderr)
        return 1
    report(render(result), result, "hostile" if args.json else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
