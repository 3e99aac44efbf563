"""Warm serving benchmark: regproxy against Debian's docker-registry, same content, same run.

Cases: blob GETs of 4 KiB and 1 MiB, manifest GETs by digest and by tag, each under concurrency
1, 8 and 32 (load from ``wrk``, a C load generator), and one 1 GiB blob stream (``curl``).
Every figure is the median of several bounded runs, beside the server's CPU seconds (user +
system, all threads, from /proc) per request or per GiB. Both servers bind 127.0.0.1 on free
ports and are stopped by PID at the end, whatever happens.

    python -m benchmarks.bench_serve            # full run (~2.5 min on 2 cores)
    python -m benchmarks.bench_serve --tls      # both servers on HTTPS: blobs and the stream
    python -m benchmarks.bench_serve --quick    # smoke run (~1 min)
    python -m benchmarks.bench_serve --json     # also write benchmarks/results/serve-<time>.json
    python -m benchmarks.bench_serve --access-log  # both servers write a line per request

Needs ``wrk``, ``curl`` and ``docker-registry`` on PATH (``apt-get install -y wrk curl
docker-registry``; ``openssl`` for ``--tls``); it installs nothing itself.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: the repository root is not on sys.path yet
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (
    GO_SUITES,
    OCI_CONFIG,
    OCI_LAYER,
    OCI_MANIFEST,
    WRK_DONE,
    BenchError,
    CpuMeter,
    GiB,
    KiB,
    MiB,
    TestCA,
    check_tools,
    load_1m,
    make_test_ca,
    peak_rss_mb,
    print_log_tails,
    push_blob,
    report,
    request,
    reset_peak_rss,
    run_summary,
    run_wrk,
)
from tests.peers import Daemon, DockerRegistry, free_port, started, stop_process, wait_http

REPO = "bench/serve"
TAG = "bench"

# Goals of issue 2: regproxy/peer req/s ratio per case; p99 at c=8; peak RSS.
GOAL_RATIO = {"blob 4KiB": 10.0, "manifest digest": 10.0, "manifest tag": 10.0, "blob 1MiB": 2.0}
#: over TLS (issue 14): warm 1 MiB blobs at least 2x the peer's TLS figure
GOAL_RATIO_TLS = {"blob 1MiB": 2.0}
GOAL_STREAM_RATIO = 1.0
GOAL_P99_C8_MS = 5.0
GOAL_RSS_MB = 100.0


# --- content --------------------------------------------------------------------------------------
@dataclass
class Content:
    small: bytes
    medium: bytes
    big_path: Path
    big_digest: str
    config: bytes
    manifest: bytes

    @staticmethod
    def digest(data: bytes) -> str:
        return "sha256:" + hashlib.sha256(data).hexdigest()

    @property
    def manifest_digest(self) -> str:
        return self.digest(self.manifest)


def make_content(workdir: Path, big_size: int) -> Content:
    small = os.urandom(4 * KiB)
    medium = os.urandom(1 * MiB)
    big_path = workdir / "big.bin"
    h = hashlib.sha256()
    chunk = os.urandom(MiB)
    with open(big_path, "wb") as f:
        for i in range(big_size // MiB):
            # Distinct content per MiB without paying os.urandom for a whole GiB.
            block = i.to_bytes(8, "big") + chunk[8:]
            h.update(block)
            f.write(block)
    big_digest = "sha256:" + h.hexdigest()
    config = json.dumps(
        {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}
    ).encode()

    def desc(media_type: str, data_digest: str, size: int) -> dict[str, Any]:
        return {"mediaType": media_type, "digest": data_digest, "size": size}

    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": desc(OCI_CONFIG, Content.digest(config), len(config)),
            "layers": [
                desc(OCI_LAYER, Content.digest(small), len(small)),
                desc(OCI_LAYER, Content.digest(medium), len(medium)),
                desc(OCI_LAYER, big_digest, big_size),
            ],
        },
        indent=2,
    ).encode()
    return Content(small, medium, big_path, big_digest, config, manifest)


def push_content(port: int, content: Content, tls: ssl.SSLContext | None) -> None:
    for data in (content.config, content.small, content.medium):
        push_blob(port, REPO, Content.digest(data), data, tls)
    push_blob(port, REPO, content.big_digest, content.big_path, tls)
    status, _, text = request(
        port,
        "PUT",
        f"/v2/{REPO}/manifests/{TAG}",
        body=content.manifest,
        headers={"Content-Type": OCI_MANIFEST},
        tls=tls,
    )
    if status != 201:
        raise BenchError(f"PUT manifest on :{port} answered {status}: {text[:200]!r}")


# --- measuring ------------------------------------------------------------------------------------
def large(case: str) -> bool:
    """Cases whose CPU is counted per GiB of body; the others per request."""
    return not (case.endswith("4KiB") or case.startswith("manifest"))


@dataclass
class Cell:
    server: str
    case: str
    concurrency: int
    runs: list[dict[str, float]] = field(default_factory=list)
    rss_mb: float = 0.0

    def median(self, key: str) -> float:
        return statistics.median(r[key] for r in self.runs) if self.runs else float("nan")


def with_cpu(r: dict[str, float], cpu_s: float) -> dict[str, float]:
    """A run's figures with the server's CPU: seconds, per request (µs) and per GiB (s)."""
    r["cpu_s"] = cpu_s
    r["cpu_us_req"] = cpu_s / r["requests"] * 1e6 if r["requests"] else float("nan")
    r["cpu_s_gib"] = cpu_s / (r["bytes"] / GiB) if r["bytes"] else float("nan")
    return r


def run_curl(url: str, timeout: float, ca: Path | None) -> dict[str, float]:
    cmd = ["curl", "-sS", "--fail", "-o", "/dev/null", "--max-time", str(int(timeout))]
    cmd += ["-w", "%{size_download} %{time_total} %{time_starttransfer}"]
    if ca is not None:  # the TLS 1.3 suites in Go's order, as wrk (TestCA.go_order_env)
        cmd += ["--cacert", str(ca), "--tls13-ciphers", GO_SUITES]
    proc = subprocess.run(
        [*cmd, url], capture_output=True, text=True, timeout=timeout + 10, check=False
    )
    if proc.returncode != 0:
        raise BenchError(f"curl {url} failed ({proc.returncode}): {proc.stderr}")
    size, total, ttfb = (float(x) for x in proc.stdout.split())
    return {
        "req_s": 1 / total,
        "gb_s": size / total / 1e9,
        "p50_ms": ttfb * 1000,  # time to first byte
        "p99_ms": total * 1000,  # whole transfer
        "max_ms": total * 1000,
        "requests": 1,
        "bytes": size,
        "seconds": total,
    }


# --- the run --------------------------------------------------------------------------------------
@dataclass
class Settings:
    runs: int
    seconds: float
    warmup: float
    concurrency: tuple[int, ...]
    big_size: int
    stream_runs: int
    budget: float  # seconds for the whole measuring phase
    tls: bool = False
    #: also load a bare aiohttp server answering every GET with the manifest (floor_server)
    floor: bool = False
    #: both servers write their access lines (off by default, as in the figures below)
    access_log: bool = False


class Floor:
    """benchmarks.floor_server in a subprocess (stopped by PID)."""

    def __init__(self, tmp: Path, content: Content) -> None:
        body = tmp / "floor-manifest.json"
        body.write_bytes(content.manifest)
        self.port = free_port()
        cmd = [sys.executable, "-m", "benchmarks.floor_server", "--port", str(self.port)]
        cmd += ["--body", str(body), "--digest", content.manifest_digest]
        self.proc = subprocess.Popen(cmd, cwd=str(Path(__file__).resolve().parent.parent))
        try:
            wait_http(f"http://127.0.0.1:{self.port}/v2/floor", proc=self.proc)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        stop_process(self.proc)


def servers(
    tmp: Path, ca: TestCA | None, access_log: bool = False
) -> tuple[Daemon, DockerRegistry]:
    """Both servers; ``access_log``: both write a line per request (to a file here; regproxy
    to journald in production), else neither does."""
    config: dict[str, Any] = {"log": {"access": access_log, "level": "WARNING"}}
    if ca is not None:
        config["tls"] = {"cert": str(ca.cert), "key": str(ca.key)}
    daemon = Daemon(tmp / "regproxy", config)
    daemon.root.mkdir(parents=True)
    peer = DockerRegistry(
        tmp / "registry",
        extra={"log": {"level": "error", "accesslog": {"disabled": not access_log}}},
        tls=(ca.cert, ca.key) if ca is not None else None,
    )
    return daemon, peer


def bench(settings: Settings, progress: bool = True) -> dict[str, Any]:
    tools = {t: t for t in ("wrk", "curl", "docker-registry")}
    check_tools("bench_serve", {**tools, "openssl": "openssl"} if settings.tls else tools)
    started_at = time.time()
    load_start = load_1m()
    deadline = time.monotonic() + settings.budget
    cells: list[Cell] = []
    scheme = "https" if settings.tls else "http"
    with tempfile.TemporaryDirectory(prefix="regproxy-bench-") as tmpdir:
        tmp = Path(tmpdir)
        ca = make_test_ca(tmp / "tls") if settings.tls else None
        tls = ca.client_context() if ca is not None else None
        # wrk offers the TLS 1.3 suites as Go clients (containerd, skopeo) do
        wrk_env = ca.go_order_env() if ca is not None else None
        daemon, peer = servers(tmp, ca, settings.access_log)
        floor: Floor | None = None
        try:
            with started(daemon, peer):
                daemon.start()
                peer.start()
                assert daemon.proc is not None and peer.proc is not None
                pids = {"regproxy": daemon.proc.pid, "registry": peer.proc.pid}
                ports = {"regproxy": daemon.port, "registry": peer.port}
                if progress:
                    print(
                        f"making content (big blob {settings.big_size // MiB} MiB) ...", flush=True
                    )
                content = make_content(tmp, settings.big_size)
                for name, port in ports.items():
                    push_content(port, content, tls)
                    if progress:
                        print(f"pushed to {name} on :{port} ({scheme})", flush=True)
                content.big_path.unlink()
                if settings.floor:
                    floor = Floor(tmp, content)
                    pids["floor"], ports["floor"] = floor.proc.pid, floor.port
                script = tmp / "report.lua"
                script.write_text(WRK_DONE)
                accept = {"Accept": f"{OCI_MANIFEST}, application/vnd.oci.image.index.v1+json"}
                cases = [
                    ("blob 4KiB", f"/v2/{REPO}/blobs/{Content.digest(content.small)}", {}),
                    ("blob 1MiB", f"/v2/{REPO}/blobs/{Content.digest(content.medium)}", {}),
                ]
                if not settings.tls:  # over TLS: the blob cases (issue 14)
                    cases += [
                        (
                            "manifest digest",
                            f"/v2/{REPO}/manifests/{content.manifest_digest}",
                            accept,
                        ),
                        ("manifest tag", f"/v2/{REPO}/manifests/{TAG}", accept),
                    ]
                for case, path, headers in cases:
                    for conc in settings.concurrency:
                        names = ["regproxy", "registry"]
                        if floor is not None and case.startswith("manifest"):
                            names.append("floor")
                        for server in names:
                            url = f"{scheme}://127.0.0.1:{ports[server]}{path}"
                            cell = Cell(server, case, conc)
                            if time.monotonic() > deadline:
                                raise BenchError("time budget exhausted; use --quick or fewer runs")
                            run_wrk(url, conc, settings.warmup, headers, script, wrk_env)
                            reset_peak_rss(pids[server])
                            for _ in range(settings.runs):
                                cpu = CpuMeter({server: pids[server]}).start()
                                r = run_wrk(url, conc, settings.seconds, headers, script, wrk_env)
                                cell.runs.append(with_cpu(r, cpu.used()[server]))
                            cell.rss_mb = peak_rss_mb(pids[server])
                            cells.append(cell)
                            if progress:
                                print(f"  {cell_line(cell)}", flush=True)
                big = f"/v2/{REPO}/blobs/{content.big_digest}"
                for server in ("regproxy", "registry"):
                    url = f"{scheme}://127.0.0.1:{ports[server]}{big}"
                    cell = Cell(server, f"blob {settings.big_size // MiB}MiB stream", 1)
                    ca_file = ca.ca if ca is not None else None
                    run_curl(url, 120, ca_file)  # warm the page cache and the server
                    reset_peak_rss(pids[server])
                    for _ in range(settings.stream_runs):
                        if time.monotonic() > deadline:
                            raise BenchError("time budget exhausted during the stream runs")
                        cpu = CpuMeter({server: pids[server]}).start()
                        r = run_curl(url, 120, ca_file)
                        cell.runs.append(with_cpu(r, cpu.used()[server]))
                    cell.rss_mb = peak_rss_mb(pids[server])
                    cells.append(cell)
                    if progress:
                        print(f"  {cell_line(cell)}", flush=True)
                overall = {name: peak_rss_mb(pid) for name, pid in pids.items()}
        except BaseException:
            print_log_tails({"regproxy": daemon.log(), "registry": peer.log()})
            raise
        finally:
            if floor is not None:
                floor.stop()
    return {
        **run_summary(started_at, load_start),
        "settings": asdict(settings),
        "peak_rss_mb_since_last_reset": overall,
        "cells": [
            {
                "server": c.server,
                "case": c.case,
                "concurrency": c.concurrency,
                "rss_mb": round(c.rss_mb, 1),
                **{k: round(c.median(k), 4) for k in FIGURES},
                "runs": c.runs,
            }
            for c in cells
        ],
    }


FIGURES = ("req_s", "gb_s", "p50_ms", "p99_ms", "cpu_us_req", "cpu_s_gib")


def cpu_text(case: str, cpu_us_req: float, cpu_s_gib: float) -> str:
    return f"{cpu_s_gib:.2f} s/GiB" if large(case) else f"{cpu_us_req:.0f} us/req"


def cell_line(c: Cell) -> str:
    cpu = cpu_text(c.case, c.median("cpu_us_req"), c.median("cpu_s_gib"))
    rate = (
        f"{c.median('gb_s'):6.2f} GB/s"
        if c.case.endswith("stream")
        else f"{c.median('req_s'):>8.0f} req/s p99 {c.median('p99_ms'):7.2f} ms"
    )
    return (
        f"{c.case:<16} c={c.concurrency:<3} {c.server:<9} {rate} CPU {cpu} rss {c.rss_mb:6.1f} MB"
    )


# --- report ---------------------------------------------------------------------------------------
def render(result: dict[str, Any]) -> str:
    by = {(c["case"], c["concurrency"], c["server"]): c for c in result["cells"]}
    keys = list(dict.fromkeys((c["case"], c["concurrency"]) for c in result["cells"]))
    tls = result["settings"].get("tls", False)
    head = (
        f"{'case':<18}{'c':>3} | {'regproxy req/s':>14} {'GB/s':>6} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'CPU':>12} {'RSS MB':>6} | {'registry req/s':>14} {'GB/s':>6} {'p50 ms':>7} "
        f"{'p99 ms':>7} {'CPU':>12} {'RSS MB':>6} | {'ratio':>6} {'CPU':>6} {'goal':>5}"
    )
    lines = [head, "-" * len(head)]
    verdicts: list[str] = []
    goals = GOAL_RATIO_TLS if tls else GOAL_RATIO
    for case, conc in keys:
        a, b = by.get((case, conc, "regproxy")), by.get((case, conc, "registry"))
        if a is None or b is None:
            continue
        stream = case.endswith("stream")
        metric = "gb_s" if stream else "req_s"
        ratio = a[metric] / b[metric] if b[metric] else float("inf")
        cpu_key = "cpu_s_gib" if large(case) else "cpu_us_req"
        cpu_ratio = a[cpu_key] / b[cpu_key] if b[cpu_key] else float("nan")
        goal = (None if tls else GOAL_STREAM_RATIO) if stream else goals.get(case)
        mark = "" if goal is None else ("ok" if ratio >= goal else "MISS")
        lines.append(
            f"{case:<18}{conc:>3} | {a['req_s']:>14.1f} {a['gb_s']:>6.3f} {a['p50_ms']:>7.2f} "
            f"{a['p99_ms']:>7.2f} {cpu_text(case, a['cpu_us_req'], a['cpu_s_gib']):>12} "
            f"{a['rss_mb']:>6.1f} | {b['req_s']:>14.1f} {b['gb_s']:>6.3f} "
            f"{b['p50_ms']:>7.2f} {b['p99_ms']:>7.2f} "
            f"{cpu_text(case, b['cpu_us_req'], b['cpu_s_gib']):>12} {b['rss_mb']:>6.1f} | "
            f"{ratio:>5.2f}x {cpu_ratio:>5.2f}x {mark:>5}"
        )
        if goal is not None:
            verdicts.append(
                f"{'ok  ' if ratio >= goal else 'MISS'} {case} c={conc}: "
                f"{ratio:.2f}x {'GB/s' if stream else 'req/s'} (goal >= {goal:g}x)"
            )
        f = by.get((case, conc, "floor"))
        if f is not None:
            lines.append(
                f"{'  bare aiohttp floor':<21} | {f['req_s']:>14.1f} {f['gb_s']:>6.3f} "
                f"{f['p50_ms']:>7.2f} {f['p99_ms']:>7.2f} "
                f"{cpu_text(case, f['cpu_us_req'], f['cpu_s_gib']):>12} {f['rss_mb']:>6.1f} | "
                f"{f['req_s'] / b['req_s'] if b['req_s'] else float('inf'):.1f}x the peer: the "
                "most an aiohttp server reaches here"
            )
        if conc == 8 and case in goals and not large(case):
            ok = a["p99_ms"] < GOAL_P99_C8_MS
            verdicts.append(
                f"{'ok  ' if ok else 'MISS'} {case} c=8: p99 {a['p99_ms']:.2f} ms "
                f"(goal < {GOAL_P99_C8_MS:g} ms)"
            )
    rss = max(c["rss_mb"] for c in result["cells"] if c["server"] == "regproxy")
    verdicts.append(
        f"{'ok  ' if rss < GOAL_RSS_MB else 'MISS'} regproxy peak RSS {rss:.1f} MB "
        f"(goal < {GOAL_RSS_MB:g} MB)"
    )
    s = result["settings"]
    lines += [
        "",
        f"{'HTTPS (test CA, suites offered in Go order)' if tls else 'plain HTTP'}; access lines "
        f"{'on (both servers, to a file)' if s.get('access_log') else 'off'}; medians of {s['runs']} runs x "
        f"{s['seconds']:g} s per cell (wrk -t1, after a {s['warmup']:g} s warm-up); stream: "
        f"median of {s['stream_runs']} curl runs, p50 = time to first byte, p99 = whole transfer",
        "CPU = the server process's user+system CPU (all threads, /proc/PID/stat) during the "
        "runs: per request for 4 KiB and manifests, per GiB of body for 1 MiB and the stream",
        "RSS = peak (VmHWM) of the server process during that cell's runs; ratio = "
        "regproxy/registry (req/s or GB/s; then CPU, lower is better)",
        f"{result['machine']['cpus']} CPUs, Python {result['machine']['python']}, "
        f"kernel {result['machine']['kernel']}, total {result['seconds']:g} s, load average "
        f"(1 min) at start/end {result['loadavg_1m_start_end'][0]}/"
        f"{result['loadavg_1m_start_end'][1]} (other work on the machine skews the figures)",
        "",
        "goals (issues 2 and 14):",
        *("  " + v for v in verdicts),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--quick", action="store_true", help="short smoke run (1 run x 1 s, 64 MiB stream)"
    )
    p.add_argument(
        "--tls",
        action="store_true",
        help="both servers on HTTPS (a test CA made with openssl): blob cases and the stream",
    )
    p.add_argument(
        "--floor",
        action="store_true",
        help="also load a bare aiohttp server answering with the manifest (benchmarks.floor_server)",
    )
    p.add_argument(
        "--access-log",
        action="store_true",
        help="both servers write a line per request (regproxy's log.access, the peer's accesslog)",
    )
    p.add_argument("--json", action="store_true", help="write results to benchmarks/results/")
    p.add_argument("--runs", type=int, help="runs per cell (default 3; --quick 1)")
    p.add_argument("--seconds", type=float, help="seconds per run (default 1)")
    p.add_argument(
        "--concurrency",
        type=lambda v: tuple(int(c) for c in v.split(",")),
        help="comma-separated wrk concurrencies (default 1,8,32)",
    )
    p.add_argument(
        "--big-mib", type=int, help="size of the streamed blob in MiB (default 1024; --quick 64)"
    )
    args = p.parse_args(argv)
    settings = (
        Settings(1, 1, 1, (1, 8, 32), 64 * MiB, 1, 300)
        if args.quick
        else Settings(3, 1, 1, (1, 8, 32), GiB, 3, 600)
    )
    settings.tls = args.tls
    settings.floor = args.floor and not args.tls
    settings.access_log = args.access_log
    if args.runs:
        settings.runs = max(1, min(args.runs, 20))
        settings.stream_runs = settings.runs
    if args.seconds:
        settings.seconds = max(1.0, min(args.seconds, 60.0))
    if args.concurrency:
        settings.concurrency = tuple(max(1, min(c, 256)) for c in args.concurrency)
    if args.big_mib:
        settings.big_size = max(1, min(args.big_mib, 8192)) * MiB
    cells = 2 * 4 * len(settings.concurrency)
    settings.budget = max(
        settings.budget, cells * (settings.warmup + settings.runs * settings.seconds) + 300
    )
    try:
        result = bench(settings)
    except BenchError as exc:
        print(f"bench_serve: {exc}", file=sys.stderr)
        return 1
    report(
        render(result), result, ("serve-tls" if settings.tls else "serve") if args.json else None
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
