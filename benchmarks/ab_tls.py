"""TLS A/B: regproxy with ``tls.workers`` 0 (the event loop does TLS) against N worker threads
(regproxy.tls_relay), and Debian's docker-registry, on HTTPS, in one run, rounds alternating.

    python -m benchmarks.ab_tls                       # workers 0 and 2; c=8,32; 1 MiB blob
    python -m benchmarks.ab_tls --workers 0,1,2 --rounds 6 --seconds 2 --concurrency 1,8,32
    python -m benchmarks.ab_tls --size-mib 256 --concurrency 1 --no-peer   # one big stream
    git archive main regproxy | tar -x -C /tmp/base          # another version of the code ...
    python -m benchmarks.ab_tls --workers 0 --baseline /tmp/base   # ... against this tree's
    python -m benchmarks.ab_tls --size-kib 128 --no-peer ...   # a 128 KiB blob
    python -m benchmarks.ab_tls --range --no-peer ...          # its first byte only (Range)

Medians over the rounds of req/s, server CPU-seconds per GiB and per request, and peak RSS for
each (server, concurrency). Needs ``wrk``, ``docker-registry`` and ``openssl``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_serve import REPO, Content
from benchmarks.common import (
    WRK_DONE,
    CpuMeter,
    GiB,
    MiB,
    check_tools,
    load_1m,
    make_test_ca,
    peak_rss_mb,
    push_blob,
    reset_peak_rss,
    run_wrk,
)
from tests.peers import Daemon, DockerRegistry, started


def loop_cpu_seconds(pid: int) -> float:
    """CPU of the process's main thread (its event loop), in seconds."""
    fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workers", default="0,2", help="tls.workers values to compare (0: in-loop)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--concurrency", default="8,32")
    p.add_argument("--size-mib", type=int, default=1, help="the blob's size (default 1 MiB)")
    p.add_argument("--size-kib", type=int, help="the blob's size in KiB (instead of --size-mib)")
    p.add_argument("--range", action="store_true", help="ask for its first byte only (Range)")
    p.add_argument("--plain", action="store_true", help="plain HTTP instead (the same A/B)")
    p.add_argument("--no-peer", action="store_true", help="leave docker-registry out")
    p.add_argument(
        "--client-order",
        choices=("go", "openssl"),
        default="go",
        help="the TLS 1.3 suites wrk offers first: go (AES-128-GCM, as containerd and skopeo "
        "on AES hardware; the default) or openssl (AES-256-GCM, wrk's own order)",
    )
    p.add_argument(
        "--baseline",
        type=Path,
        help="also run the regproxy package found in this directory (another version), "
        "with the first --workers value",
    )
    args = p.parse_args(argv)
    check_tools("ab_tls", {t: t for t in ("wrk", "docker-registry", "openssl")})
    workers = [int(w) for w in args.workers.split(",")]
    concurrency = [max(1, min(int(c), 256)) for c in args.concurrency.split(",")]
    rounds, seconds = max(1, min(args.rounds, 20)), max(1.0, min(args.seconds, 30.0))
    load_start = load_1m()
    with tempfile.TemporaryDirectory(prefix="regproxy-abtls-") as tmpdir:
        tmp = Path(tmpdir)
        ca = make_test_ca(tmp / "tls")
        tls = None if args.plain else ca.client_context()
        wrk_env = ca.go_order_env() if args.client_order == "go" else None
        servers: dict[str, Any] = {}
        for w in workers:
            config: dict[str, Any] = {"log": {"access": False, "level": "WARNING"}}
            if not args.plain:
                config["tls"] = {"cert": str(ca.cert), "key": str(ca.key), "workers": w}
            d = Daemon(tmp / f"regproxy-w{w}", config)
            d.root.mkdir(parents=True)
            servers[f"regproxy w={w}"] = d
        if args.baseline is not None:
            # PYTHONSAFEPATH: the working directory (this tree) does not come first on sys.path
            env = {"PYTHONSAFEPATH": "1", "PYTHONPATH": str(args.baseline.resolve())}
            if not args.plain:
                config = {**config, "tls": {**config["tls"], "workers": workers[0]}}
            d = Daemon(tmp / "regproxy-base", config, env=env)
            d.root.mkdir(parents=True)
            servers["regproxy base"] = d
        if not args.no_peer:
            servers["registry"] = DockerRegistry(
                tmp / "registry",
                extra={"log": {"level": "error", "accesslog": {"disabled": True}}},
                tls=None if args.plain else (ca.cert, ca.key),
            )
        size = args.size_kib * 1024 if args.size_kib else args.size_mib * MiB
        blob = os.urandom(max(1, min(size, 1024 * MiB)))
        headers = {"Range": "bytes=0-0"} if args.range else {}
        digest = Content.digest(blob)
        script = tmp / "report.lua"
        script.write_text(WRK_DONE)
        results: dict[tuple[str, int], list[tuple[float, float, float, float, float]]] = {}
        rss: dict[tuple[str, int], float] = {}
        with started(*servers.values()):
            for server in servers.values():
                server.start()
                push_blob(server.port, REPO, digest, blob, tls)
            order = list(servers.items())
            for r in range(rounds):
                for conc in concurrency:
                    # each round starts with the next server: the first of a round ran ~10%
                    # slower at c=8 whichever code it held (two runs with the roles swapped),
                    # so a fixed order biases the per-round ratios
                    k = r % len(order)
                    for name, server in order[k:] + order[:k]:
                        scheme = "http" if args.plain else "https"
                        url = f"{scheme}://127.0.0.1:{server.port}/v2/{REPO}/blobs/{digest}"
                        if r == 0:
                            run_wrk(url, conc, seconds, headers, script, wrk_env)
                            reset_peak_rss(server.proc.pid)
                        cpu = CpuMeter({name: server.proc.pid}).start()
                        loop_at = loop_cpu_seconds(server.proc.pid)
                        out = run_wrk(url, conc, seconds, headers, script, wrk_env)
                        used = cpu.used()[name]
                        gib = out["bytes"] / GiB or 1.0
                        per_gib, loop_gib = (
                            used / gib,
                            (loop_cpu_seconds(server.proc.pid) - loop_at) / gib,
                        )
                        us_req = used * 1e6 / out["requests"]
                        results.setdefault((name, conc), []).append(
                            (out["req_s"], per_gib, loop_gib, out["gb_s"], us_req)
                        )
                        rss[(name, conc)] = peak_rss_mb(server.proc.pid)
                        print(
                            f"round {r} c={conc} {name}: {out['req_s']:.0f} req/s "
                            f"{per_gib:.2f} CPU-s/GiB (main thread {loop_gib:.2f}) "
                            f"{us_req:.0f} CPU-us/req",
                            flush=True,
                        )
        print(
            f"\nmedians of {rounds} rounds x {seconds:g} s, load {load_start} -> {load_1m()}, "
            f"wrk offering the TLS 1.3 suites in {args.client_order}'s order"
        )
        print(
            "| server | c | req/s | GB/s | CPU-s/GiB | of it the main thread | CPU-µs/req "
            "| peak RSS MB |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for (name, conc), runs in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            req = statistics.median(x[0] for x in runs)
            cpu_gib = statistics.median(x[1] for x in runs)
            loop_gib = statistics.median(x[2] for x in runs)
            gb_s = statistics.median(x[3] for x in runs)
            us_req = statistics.median(x[4] for x in runs)
            print(
                f"| {name} | {conc} | {req:.0f} | {gb_s:.2f} | {cpu_gib:.2f} | {loop_gib:.2f} | "
                f"{us_req:.0f} | {rss[(name, conc)]:.1f} |"
            )
        base = "regproxy base" if args.baseline is not None else f"regproxy w={workers[0]}"
        print(f"\nper round, against {base} in the same round (median, min-max):")
        for (name, conc), runs in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            if name == base:
                continue
            pairs = list(zip(runs, results[(base, conc)], strict=True))
            ratios = [x[0] / b[0] for x, b in pairs]
            cpu = [x[4] / b[4] for x, b in pairs]  # per request: also for a 1-byte range
            print(
                f"  c={conc} {name}: req/s {statistics.median(ratios):.2f}x "
                f"({min(ratios):.2f}-{max(ratios):.2f}), CPU per request {statistics.median(cpu):.2f}x "
                f"({min(cpu):.2f}-{max(cpu):.2f})"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
