"""Cluster benchmark: 5 hosts pull the same cold image at the same moment; what crosses upstream.

One plain Debian ``docker-registry`` on 127.0.0.1 is the upstream. It holds one image: a config,
a big layer (256 MiB by default, streamed from ``os.urandom``) and two small layers, tagged
``latest``. In front of it, one cluster after the other, each on empty stores:

  home      5 regproxy hosts listing each other (``peers.urls``, home hosts on: the default);
  no-home   the same with ``peers.home_hosts: false`` (every host asks its peers what they hold,
            then fetches for itself);
  registry  5 ``docker-registry`` proxies (``proxy.remoteurl``), which know nothing of each other.

Phase 1, cold pull: each of the 5 hosts gets one client (started at the same moment) that does
what containerd does: the manifest by tag, then the config and all layers at once (``curl``,
sizes checked). Figures: upstream blob bytes (x the image's bytes: the goal is 1.0x), upstream
manifest requests, upstream blob GETs, the time until the last host's client had the whole image,
and each host's peak RSS (``VmHWM``).

Phase 2, tag re-check: regproxy's ``tag_ttl`` is 2 s; after waiting 2.5 s all 5 clients ask for
the tag again, at the same moment; figures: upstream manifest ``HEAD`` and ``GET`` requests (goal:
1 HEAD for the cluster). docker-registry proxies are asked the same, for comparison.

Upstream requests are read from the upstream's access log, in the window of each phase.

    python -m benchmarks.bench_cluster                 # 256 MiB layer
    python -m benchmarks.bench_cluster --layer-mib 64  # a smaller layer (a loaded machine)
    python -m benchmarks.bench_cluster --json          # also write benchmarks/results/cluster-*.json

Needs ``curl`` and ``docker-registry`` on PATH (``apt-get install -y curl docker-registry``).
Every process it starts is stopped by PID at the end, also on failure.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import hashlib
import json
import shutil
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: the repository root is not on sys.path yet
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common
from benchmarks.bench_pull import (
    ACCEPT,
    REPO,
    AccessLog,
    Hit,
    curl,
    curl_result,
    push_random_blob,
    push_small_blob,
)
from benchmarks.common import (
    OCI_CONFIG,
    OCI_LAYER,
    OCI_MANIFEST,
    BenchError,
    GiB,
    MiB,
    check_tools,
    load_1m,
    print_log_tails,
    report,
    request,
    run_summary,
)
from tests.peers import Daemon, DockerRegistry, free_port

HOSTS = 5
TAG = "latest"
ALIAS = "up.test"
TAG_TTL = 2.0
CLUSTERS = ("home", "no-home", "registry")
GOAL_BYTES_RATIO = 1.0  # upstream blob bytes / image bytes, home hosts on
GOAL_TAG_HEADS = 1  # upstream HEADs for the tag after tag_ttl, home hosts on


@dataclass
class Image:
    config: tuple[str, int]
    layers: list[tuple[str, int]]
    manifest: str

    @property
    def blobs(self) -> list[tuple[str, int]]:
        return [self.config, *self.layers]

    @property
    def size(self) -> int:
        return sum(size for _, size in self.blobs)


def push_image(port: int, layer_size: int) -> Image:
    config = json.dumps({"architecture": "amd64", "os": "linux"}).encode()
    small = [
        hashlib.shake_256(bytes([i]) + str(time.time()).encode()).digest(n)
        for i, n in enumerate((300_000, 40_000))
    ]
    config_d = push_small_blob(port, config)
    layers = [(push_random_blob(port, layer_size), layer_size)]
    layers += [(push_small_blob(port, data), len(data)) for data in small]
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_d, "size": len(config)},
            "layers": [{"mediaType": OCI_LAYER, "digest": d, "size": n} for d, n in layers],
        }
    ).encode()
    status, _, text = request(
        port,
        "PUT",
        f"/v2/{REPO}/manifests/{TAG}",
        body=manifest,
        headers={"Content-Type": OCI_MANIFEST},
    )
    if status != 201:
        raise BenchError(f"PUT manifest answered {status}: {text[:200]!r}")
    return Image((config_d, len(config)), layers, "sha256:" + hashlib.sha256(manifest).hexdigest())


# --- the clusters ---------------------------------------------------------------------------------
class Cluster:
    """5 servers of one kind in front of the upstream, on empty stores."""

    def __init__(self, kind: str, workdir: Path, upstream: DockerRegistry) -> None:
        self.kind = kind
        self.workdir = workdir / kind
        self.upstream = upstream
        self.servers: list[Daemon | DockerRegistry] = []

    def start(self) -> float:
        """Start all 5 at once; seconds from the last one answering until all saw each other."""
        ports = [free_port() for _ in range(HOSTS)]
        urls = [f"http://127.0.0.1:{p}" for p in ports]
        for i, port in enumerate(ports):
            root = self.workdir / f"host{i}"
            root.mkdir(parents=True)
            server: Daemon | DockerRegistry
            if self.kind == "registry":
                server = DockerRegistry(
                    root,
                    port=port,
                    proxy_url=self.upstream.url,
                    extra={"log": {"level": "error", "accesslog": {"disabled": True}}},
                )
            else:
                server = Daemon(
                    root,
                    {
                        "log": {"access": False, "level": "WARNING"},
                        "upstreams": {
                            self.upstream.hostport: {"url": self.upstream.url, "alias": ALIAS}
                        },
                        "tag_ttl": f"{TAG_TTL:g}s",
                        "peers": {
                            "urls": urls,
                            "timeout": "2s",
                            "home_hosts": self.kind == "home",
                        },
                    },
                    port=port,
                )
            self.servers.append(server)
        for server in self.servers:  # all at once, as hosts that boot together
            if isinstance(server, Daemon):
                server.start(wait=False)
            else:
                server.start()
        for server in self.servers:
            if isinstance(server, Daemon):
                server.wait_ready()
        return self.wait_peers(urls) if self.kind != "registry" else 0.0

    def wait_peers(self, urls: list[str], limit: float = 30.0) -> float:
        """Until every host sees every other one up (hosts that boot together)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < limit:
            ready = 0
            for url in urls:
                with urllib.request.urlopen(f"{url}/readyz", timeout=5) as r:
                    peers = json.loads(r.read())["peers"]
                ready += sum(1 for p in peers if p["state"] in ("up", "self")) == len(urls)
            if ready == len(urls):
                return time.monotonic() - t0
            time.sleep(0.2)
        raise BenchError(f"{self.kind}: hosts did not find each other within {limit:g} s")

    def stop(self) -> None:
        for server in self.servers:
            with contextlib.suppress(Exception):
                server.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def base(self, i: int) -> str:
        server = self.servers[i]
        if isinstance(server, DockerRegistry):
            return f"http://127.0.0.1:{server.port}/v2/{REPO}"
        return f"http://127.0.0.1:{server.port}/v2/{ALIAS}/{REPO}"

    def pids(self) -> list[int]:
        return [s.proc.pid for s in self.servers if s.proc is not None]

    def logs(self) -> dict[str, str]:
        return {f"{self.kind}{i}": s.log()[-3000:] for i, s in enumerate(self.servers)}


def get_manifest(url: str) -> bytes:
    req = urllib.request.Request(url, headers={"Accept": ACCEPT})
    with urllib.request.urlopen(req, timeout=120) as r:
        return bytes(r.read())


def pull(base: str, image: Image, timeout: float) -> float:
    """What containerd does: the manifest by tag, then every blob at once. Seconds it took."""
    t0 = time.monotonic()
    body = get_manifest(f"{base}/manifests/{TAG}")
    if "sha256:" + hashlib.sha256(body).hexdigest() != image.manifest:
        raise BenchError(f"{base}: the manifest is not the one pushed")
    procs = [(curl(f"{base}/blobs/{d}", timeout), size) for d, size in image.blobs]
    for proc, size in procs:
        curl_result(proc, size)
    return time.monotonic() - t0


def upstream_figures(hits: list[Hit], image: Image) -> dict[str, float]:
    blobs = [h for h in hits if h.method == "GET" and "/blobs/sha256:" in h.path]
    manifests = [h for h in hits if "/manifests/" in h.path]
    return {
        "blob_bytes": sum(h.size for h in blobs),
        "bytes_ratio": sum(h.size for h in blobs) / image.size,
        "blob_gets": len(blobs),
        "manifest_requests": len(manifests),
        "manifest_heads": sum(1 for h in manifests if h.method == "HEAD"),
        "manifest_gets": sum(1 for h in manifests if h.method == "GET"),
    }


def run_cluster(
    kind: str, workdir: Path, upstream: DockerRegistry, log: AccessLog, image: Image
) -> dict[str, Any]:
    cluster = Cluster(kind, workdir, upstream)
    try:
        t_boot = time.monotonic()
        found = cluster.start()
        booted = time.monotonic() - t_boot
        log.settle(0.5, 5)
        mark = log.mark()
        timeout = 600.0
        cpu = common.CpuMeter({str(i): pid for i, pid in enumerate(cluster.pids())}).start()
        t0 = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(HOSTS) as pool:
            times = list(pool.map(lambda i: pull(cluster.base(i), image, timeout), range(HOSTS)))
        last = time.monotonic() - t0
        log.settle(1.0, 10)
        cold_cpu = sum(cpu.used().values())  # the 5 hosts, until the upstream was quiet
        cold = upstream_figures(log.since(mark), image)
        rss = [common.peak_rss_mb(pid) for pid in cluster.pids()]
        # phase 2: the tag again after tag_ttl, all at once
        time.sleep(TAG_TTL + 0.5)
        mark = log.mark()
        with concurrent.futures.ThreadPoolExecutor(HOSTS) as pool:
            bodies = list(
                pool.map(lambda i: get_manifest(f"{cluster.base(i)}/manifests/{TAG}"), range(HOSTS))
            )
        if any("sha256:" + hashlib.sha256(b).hexdigest() != image.manifest for b in bodies):
            raise BenchError(f"{kind}: a host answered the tag with another manifest")
        log.settle(1.0, 10)
        tag = upstream_figures(log.since(mark), image)
        return {
            "boot_s": booted,
            "peers_found_s": found,
            "last_host_s": last,
            "host_s": times,
            "peak_rss_mb": rss,
            # CPU seconds of all 5 hosts per GiB they delivered to their clients
            "cpu_s_gib": cold_cpu / (HOSTS * image.size / GiB),
            "cold": cold,
            "tag": {k: tag[k] for k in ("manifest_requests", "manifest_heads", "manifest_gets")},
        }
    except Exception:
        print_log_tails(cluster.logs())
        raise
    finally:
        cluster.stop()


# --- report ---------------------------------------------------------------------------------------
def render(result: dict[str, Any]) -> str:
    img = result["image"]
    lines = [
        f"5 hosts pull one cold image at once: {img['bytes'] / MiB:.1f} MiB "
        f"({img['layer_mib']} MiB layer + config + 2 small layers), upstream docker-registry",
        "",
        f"{'cluster':<10} {'upstream blob MiB':>17} {'x image':>8} {'blob GETs':>9} "
        f"{'manifest reqs':>13} {'last host s':>11} {'CPU s/GiB':>9} "
        f"{'peak RSS MB (each host)':<32}",
    ]
    for kind in CLUSTERS:
        r = result["clusters"].get(kind)
        if r is None:
            continue
        c = r["cold"]
        rss = " ".join(f"{x:.0f}" for x in r["peak_rss_mb"])
        lines.append(
            f"{kind:<10} {c['blob_bytes'] / MiB:>17.1f} {c['bytes_ratio']:>8.2f} "
            f"{c['blob_gets']:>9d} {c['manifest_requests']:>13d} {r['last_host_s']:>11.1f} "
            f"{r['cpu_s_gib']:>9.2f} {rss}"
        )
    lines += [
        "CPU s/GiB: user+system CPU of all 5 hosts (/proc) from the pulls' start until the "
        "upstream was quiet, per GiB the clients got",
        "",
        f"the same tag by all 5 at once after tag_ttl ({TAG_TTL:g} s): upstream manifest requests",
        f"{'cluster':<10} {'HEAD':>5} {'GET':>5}",
    ]
    for kind in CLUSTERS:
        r = result["clusters"].get(kind)
        if r is not None:
            t = r["tag"]
            lines.append(f"{kind:<10} {t['manifest_heads']:>5d} {t['manifest_gets']:>5d}")
    home = result["clusters"].get("home")
    if home is not None:
        ok_bytes = home["cold"]["bytes_ratio"] <= GOAL_BYTES_RATIO + 0.001
        ok_tag = (
            home["tag"]["manifest_heads"] <= GOAL_TAG_HEADS and not home["tag"]["manifest_gets"]
        )
        lines += [
            "",
            "goals (issue 13):",
            f"  [{'ok' if ok_bytes else 'MISSED'}] home hosts: upstream bytes "
            f"{home['cold']['bytes_ratio']:.2f}x the image (goal {GOAL_BYTES_RATIO:g}x)",
            f"  [{'ok' if ok_tag else 'MISSED'}] home hosts: {home['tag']['manifest_heads']} "
            f"upstream HEAD(s) and {home['tag']['manifest_gets']} GET(s) for the tag after tag_ttl "
            f"(goal {GOAL_TAG_HEADS} HEAD)",
        ]
    lines.append("")
    for kind in ("home", "no-home"):
        r = result["clusters"].get(kind)
        if r is not None:
            lines.append(
                f"{kind}: 5 hosts started at once; all saw each other {r['peers_found_s']:.1f} s "
                f"after the last answered (start to that point {r['boot_s']:.1f} s)"
            )
    lines += [
        f"{result['machine']['cpus']} CPUs, Python {result['machine']['python']}, "
        f"{result['seconds']:g} s in all, load average (1 min) at start/end "
        f"{result['loadavg_1m_start_end'][0]}/{result['loadavg_1m_start_end'][1]}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--layer-mib", type=int, default=256, help="the big layer (default 256)")
    p.add_argument("--json", action="store_true", help="write results to benchmarks/results/")
    p.add_argument("--clusters", default=",".join(CLUSTERS), help=f"which, of {','.join(CLUSTERS)}")
    args = p.parse_args(argv)
    check_tools("bench_cluster", {"curl": "curl", "docker-registry": "docker-registry"})
    kinds = [k for k in args.clusters.split(",") if k]
    unknown = set(kinds) - set(CLUSTERS)
    if unknown:
        raise SystemExit(f"bench_cluster: unknown cluster(s) {sorted(unknown)}")
    started_at, load_start = time.time(), load_1m()
    workdir = Path(tempfile.mkdtemp(prefix="regproxy-bench-cluster-"))
    upstream = DockerRegistry(workdir / "upstream")
    try:
        upstream.start()
        image = push_image(upstream.port, args.layer_mib * MiB)
        log = AccessLog(upstream.root / "registry.log")
        results = {}
        for kind in kinds:
            print(f"cluster {kind} ...", flush=True)
            results[kind] = run_cluster(kind, workdir, upstream, log, image)
    finally:
        upstream.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    result = {
        **run_summary(started_at, load_start),
        "image": {"bytes": image.size, "layer_mib": args.layer_mib, "blobs": len(image.blobs)},
        "clusters": results,
    }
    report(render(result), result, "cluster" if args.json else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
