"""A store at scale: start-up, lookups idle and during eviction, listing, gc and fsck.

Builds (benchmarks/scale_store.py, through regproxy's own index code) a store of 100,000
manifests in 10,000 repositories with 1,001,000 blob rows at ``--scale 1`` (tiny files: the
index is what is measured), then, in one run:

* starts ``regproxy serve`` on it: time to ``/readyz`` 200, peak RSS;
* warm manifest lookups by digest and by tag (pinned content: 10,000 distinct paths of each at
  scale 1) with ``wrk``: p50/p99 idle, then after a restart with ``max_size`` set so that 30% of
  the store must go, during that eviction. Warm means every path was looked up once before: each
  measurement follows a warming pass (also during the eviction) that asks for every path once
  on 8 connections (bounded by :data:`WARM_SECONDS`); its figures, each path's first lookup
  through a Python client, are printed beside. The eviction rate (manifests/s, from
  ``evict.done``);
* ``_catalog?n=100`` and the web page's repository list at page 1 and page 500 (20 per page;
  the last page when there are fewer, none but page 1 when one page holds them all, as at
  ``--scale`` 0.01 and below), beside the same ``_catalog`` walk on docker-registry holding as
  many repositories;
* ``gc --dry-run`` and ``fsck`` beside the daemon, and ``sha256sum`` over the same files, plus
  fsck against ``sha256sum`` on large files (read and hash throughput);
* ``/readyz`` polled every 50 ms during the eviction, gc and fsck: its worst latency.

    python -m benchmarks.bench_scale --scale 0.05   # a small run (~2 minutes)
    python -m benchmarks.bench_scale                 # the full store (disk: ~6 GB under /tmp)

Needs ``wrk`` and ``docker-registry`` (``apt-get install -y wrk docker-registry``).
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (
    OCI_MANIFEST,
    REPO_ROOT,
    WRK_DONE,
    BenchError,
    CpuMeter,
    MiB,
    check_tools,
    load_1m,
    peak_rss_mb,
    print_log_tails,
    report,
    request,
    run_summary,
    run_wrk,
)
from benchmarks.scale_store import Shape, build, registry_layout
from regproxy.index import Index
from regproxy.oci import Digest
from regproxy.store import Store
from tests.peers import Daemon, DockerRegistry, free_port, started

GOALS = {"ready_s": 3.0, "lookup_p99_evict_ms": 5.0, "rss_mb": 150.0, "catalog_ms": 10.0}
#: the longest a warming pass (every path once) may take; it reports how many it reached
WARM_SECONDS = 120.0
WARM_CONNECTIONS = 8
ACCEPT = {"Accept": OCI_MANIFEST}
LUA_PATHS = """
local paths = {%s}
local i = 0
request = function()
  i = i + 1
  if i > #paths then i = 1 end
  return wrk.format("GET", paths[i])
end
"""


class ReadyProbe(threading.Thread):
    """GET /readyz every 50 ms on a fresh connection (as a kubelet does): latencies, failures."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port, self.stop_event = port, threading.Event()
        self.ms: list[float] = []
        self.failures = 0

    def run(self) -> None:
        while not self.stop_event.is_set():
            t0 = time.monotonic()
            try:
                status, _, _ = request(self.port, "GET", "/readyz", timeout=2)
            except OSError:
                status = 0
            self.ms.append((time.monotonic() - t0) * 1000)
            self.failures += status != 200
            self.stop_event.wait(0.05)

    def result(self) -> dict[str, Any]:
        self.stop_event.set()
        self.join(5)
        return {
            "max_ms": round(max(self.ms, default=0.0), 1),
            "probes": len(self.ms),
            "failures": self.failures,
        }


def timed_gets(port: int, path: str, n: int) -> dict[str, float]:
    """n sequential GETs on one keep-alive connection: p50/p99/max in ms."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    ms = []
    try:
        for _ in range(n):
            t0 = time.monotonic()
            conn.request("GET", path)
            resp = conn.getresponse()
            resp.read()
            ms.append((time.monotonic() - t0) * 1000)
            if resp.status != 200:
                raise BenchError(f"GET {path} on :{port} answered {resp.status}")
    finally:
        conn.close()
    ms.sort()
    return {
        "p50_ms": round(statistics.median(ms), 2),
        "p99_ms": round(ms[min(len(ms) - 1, int(len(ms) * 0.99))], 2),
        "max_ms": round(ms[-1], 2),
        "n": n,
    }


def regproxy_daemon(home: Path, store: Path) -> Daemon:
    """A daemon of its own (config, log) over the shared store."""
    home.mkdir(parents=True, exist_ok=True)
    cfg = {
        "log": {"access": False, "level": "INFO"},
        "content": {"sync": {"enable": False}},
        "storage": {"root": str(store), "min_free": 0, "evict_interval": "1h"},
    }
    return Daemon(home, cfg)


def start_timed(d: Daemon) -> float:
    """Start the daemon; seconds until /readyz answers 200."""
    t0 = time.monotonic()
    d.start(wait=False)
    deadline = t0 + 120
    while time.monotonic() < deadline:
        assert d.proc is not None
        if d.proc.poll() is not None:
            raise BenchError(f"regproxy exited with {d.proc.returncode}")
        try:
            if request(d.port, "GET", "/readyz", timeout=2)[0] == 200:
                return time.monotonic() - t0
        except OSError:
            pass
        time.sleep(0.01)
    raise BenchError("regproxy was not ready within 120 s")


def warming_pass(d: Daemon, paths: list[str]) -> dict[str, Any]:
    """GET every path once on :data:`WARM_CONNECTIONS` keep-alive connections (each path's
    first lookup), within :data:`WARM_SECONDS`: how many, how fast, p50/p99 (Python client)."""
    assert d.proc is not None
    todo, lock, ms = iter(paths), threading.Lock(), []
    deadline = time.monotonic() + WARM_SECONDS
    failed: list[str] = []

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=60)
        try:
            while time.monotonic() < deadline:
                with lock:
                    path = next(todo, None)
                if path is None:
                    return
                t0 = time.monotonic()
                conn.request("GET", path, headers=ACCEPT)
                resp = conn.getresponse()
                resp.read()
                with lock:
                    ms.append((time.monotonic() - t0) * 1000)
                    if resp.status != 200:
                        failed.append(f"{path}: {resp.status}")
        finally:
            conn.close()

    cpu = CpuMeter({"d": d.proc.pid}).start()
    t0 = time.monotonic()
    threads = [threading.Thread(target=client) for _ in range(WARM_CONNECTIONS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    secs = time.monotonic() - t0
    if failed:
        raise BenchError(f"warming pass: {len(failed)} not 200, e.g. {failed[0]}")
    ms.sort()
    n = len(ms)
    return {
        "paths": n,
        "of": len(paths),
        "seconds": round(secs, 2),
        "req_s": round(n / secs, 1) if secs else 0.0,
        "p50_ms": round(ms[n // 2], 2) if n else 0.0,
        "p99_ms": round(ms[min(n - 1, int(n * 0.99))], 2) if n else 0.0,
        "cpu_us_req": round(cpu.used()["d"] / n * 1e6, 1) if n else 0.0,
    }


def fast_answers(port: int) -> int:
    """The daemon's ``regproxy_http_fast_answers_total``."""
    _, _, body = request(port, "GET", "/metrics")
    m = re.search(r"^regproxy_http_fast_answers_total ([\d.e+]+)$", body.decode(), re.MULTILINE)
    if m is None:
        raise BenchError("no regproxy_http_fast_answers_total in /metrics")
    return int(float(m[1]))


def lookups(
    d: Daemon, paths: list[str], seconds: float, tmp: Path, name: str, warm: bool
) -> dict[str, Any]:
    """wrk at concurrency 8 cycling through ``paths`` (after a pass that looks every one up
    once, if ``warm``), and the daemon's CPU per request meanwhile."""
    port = d.port
    script = tmp / f"{name}.lua"
    script.write_text(LUA_PATHS % ",".join(json.dumps(p) for p in paths) + WRK_DONE)
    url = f"http://127.0.0.1:{port}/"
    first = warming_pass(d, paths) if warm else None
    t0 = time.time()
    assert d.proc is not None
    answered = fast_answers(port)
    cpu = CpuMeter({"d": d.proc.pid}).start()
    r = run_wrk(url, 8, seconds, ACCEPT, script)
    out: dict[str, Any] = {k: round(r[k], 3) for k in ("req_s", "p50_ms", "p99_ms", "max_ms")}
    out["cpu_us_req"] = round(cpu.used()["d"] / r["requests"] * 1e6, 1)
    # the share answered from memory in the fast lane: the rest looked something up
    out["fast_share"] = round(min(1.0, (fast_answers(port) - answered) / r["requests"]), 4)
    if first is not None:  # the warming pass: each path's first lookup
        out["first_pass"] = first
    return out | {"from": t0, "to": time.time()}


def cli(config: Path, *args: str) -> tuple[float, str]:
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "regproxy", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=3600,
        check=False,
        cwd=str(REPO_ROOT),
    )
    if proc.returncode != 0:
        raise BenchError(
            f"regproxy {' '.join(args)} exited {proc.returncode}: {proc.stdout[-500:]}"
            f"{proc.stderr[-500:]}"
        )
    return time.monotonic() - t0, proc.stdout.strip().splitlines()[-1]


def sha256sum(paths_root: Path) -> float:
    t0 = time.monotonic()
    subprocess.run(
        f"find {paths_root} -type f -print0 | xargs -0 sha256sum > /dev/null",
        shell=True,
        check=True,
        timeout=3600,
    )
    return time.monotonic() - t0


def tree_bytes(root: Path) -> tuple[int, int]:
    n = size = 0
    for dirpath, _, files in os.walk(root):
        for f in files:
            n += 1
            size += os.stat(os.path.join(dirpath, f)).st_size
    return n, size


def big_files_store(root: Path, total: int, count: int = 8) -> None:
    """``count`` random blobs of ``total`` bytes in all, indexed: fsck's throughput on big files."""
    store = Store(root)
    store.open()
    ix = Index(root / "index.db")
    ix.open()
    try:
        with ix.transaction():
            ix.ensure_repo("spectro-images/bench/big", None, "bench/big")
            for i in range(count):
                chunk, tmp = os.urandom(MiB), store.temp_path()
                h = hashlib.sha256()
                with open(tmp, "wb") as f:
                    for k in range(total // count // MiB):
                        block = i.to_bytes(4, "big") + k.to_bytes(4, "big") + chunk[8:]
                        h.update(block)
                        f.write(block)
                d = Digest("sha256", h.hexdigest())
                store.blob_path(d).parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp, store.blob_path(d))
                ix.add_blob("spectro-images/bench/big", str(d), total // count)
    finally:
        ix.close()


def bench(scale: float, seconds: float, workdir: Path | None) -> dict[str, Any]:
    check_tools("bench_scale", {"wrk": "wrk", "docker-registry": "docker-registry"})
    started_at, load_start = time.time(), load_1m()
    shape = Shape.of(scale)
    out: dict[str, Any] = {"scale": scale, "shape": shape.__dict__ | {"blobs": shape.blobs}}
    with tempfile.TemporaryDirectory(prefix="regproxy-scale-", dir=workdir) as tmpdir:
        tmp = Path(tmpdir)
        print(
            f"building {shape.manifests} manifests, {shape.repos} repositories, "
            f"{shape.blobs} blob rows ...",
            flush=True,
        )
        root = tmp / "store"
        built = build(root, shape)
        out["build_s"] = round(built.seconds, 1)
        peer = DockerRegistry(
            tmp / "registry", extra={"log": {"level": "error", "accesslog": {"disabled": True}}}
        )
        first = regproxy_daemon(tmp / "idle", root)
        second = regproxy_daemon(tmp / "evicting", root)
        try:
            with started(peer, first, second):
                out["peer"] = peer_catalog(peer, shape, built.names)
                out |= measure(first, second, root, tmp, built, seconds)
                out["fsck_big"] = fsck_big(tmp, scale)
        except BaseException:
            print_log_tails({"regproxy": first.log() + second.log(), "registry": peer.log()})
            raise
    return {**run_summary(started_at, load_start), **out}


def peer_catalog(peer: DockerRegistry, shape: Shape, names: list[str]) -> dict[str, Any]:
    peer.start()
    status, headers, _ = request(peer.port, "POST", "/v2/bench/repo-00000/blobs/uploads/")
    if status != 202:
        raise BenchError(f"docker-registry upload POST: {status}")
    config = b"{}"
    d = "sha256:" + hashlib.sha256(config).hexdigest()
    loc = headers.get("Location", "")
    loc = "/" + loc.split("/", 3)[3] if loc.startswith("http") else loc
    request(peer.port, "PUT", f"{loc}&digest={d}", body=config)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": d,
                "size": 2,
            },
            "layers": [],
        }
    ).encode()
    st, _, text = request(
        peer.port,
        "PUT",
        "/v2/bench/repo-00000/manifests/v0",
        body=manifest,
        headers={"Content-Type": OCI_MANIFEST},
    )
    if st != 201:
        raise BenchError(f"docker-registry manifest PUT: {st} {text[:200]!r}")
    peer_names = [f"bench/repo-{r:05d}" for r in range(shape.repos)]
    t0 = time.monotonic()
    registry_layout(peer.root / "data", "bench/repo-00000", peer_names)
    print(
        f"docker-registry: {shape.repos} repositories laid out in {time.monotonic() - t0:.0f} s",
        flush=True,
    )
    out = {"catalog_page1": timed_gets(peer.port, "/v2/_catalog?n=100", 10)}
    deep = deep_page(peer_names, 100)
    if deep is not None:
        page, last = deep
        out[f"catalog_page{page}"] = timed_gets(peer.port, f"/v2/_catalog?n=100&last={last}", 10)
    out["rss_mb"] = round(peak_rss_mb(peer.proc.pid), 1) if peer.proc else None
    return out


def deep_page(names: list[str], per_page: int, want: int = 500) -> tuple[int, str] | None:
    """Page ``want`` of a listing of the (sorted) ``names``, ``per_page`` a page, or its last
    page when it has fewer: (the page's number, the name before it: ``last``/``after``); None
    when the listing is one page (page 1, measured anyway), as at small ``--scale``."""
    page = min(want, -(-len(names) // per_page))
    return (page, names[(page - 1) * per_page - 1]) if page >= 2 else None


def measure(
    first: Daemon, second: Daemon, root: Path, tmp: Path, built: Any, seconds: float
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    pins = built.pinned_digests[:10_000]
    by_digest = [f"/v2/{r}/manifests/{d}" for r, _, d in pins]
    by_tag = [f"/v2/{r}/manifests/{t}" for r, t, _ in pins]
    out["ready_s"] = round(start_timed(first), 3)
    port = first.port
    out["idle_digest"] = lookups(first, by_digest, seconds, tmp, "digest", warm=True)
    out["idle_tag"] = lookups(first, by_tag, seconds, tmp, "tag", warm=True)
    names = built.names
    out["catalog_page1"] = timed_gets(port, "/v2/_catalog?n=100", 200)
    deep = deep_page(names, 100)
    if deep is not None:
        page, last = deep
        out[f"catalog_page{page}"] = timed_gets(port, f"/v2/_catalog?n=100&last={quote(last)}", 200)
    out["ui_page1"] = timed_gets(port, "/ui/repositories?per_page=20", 50)
    deep = deep_page(names, 20)
    if deep is not None:
        page, last = deep
        out[f"ui_page{page}"] = timed_gets(
            port, f"/ui/repositories?per_page=20&page={page}&after={quote(last)}", 50
        )
    # sorted by size (every repository's kept size), and one repository's tags page
    out["ui_page1_by_size"] = timed_gets(port, "/ui/repositories?per_page=20&sort=size", 20)
    out["ui_tags"] = timed_gets(port, f"/ui/repositories/{names[len(names) // 2]}", 20)
    out["rss_idle_mb"] = round(peak_rss_mb(first.proc.pid), 1) if first.proc else None
    first.stop()
    # again, with a limit that makes 30% of the store go: lookups while it goes
    ix = Index(root / "index.db", readonly=True)
    used = ix.totals().stored_bytes
    ix.close()
    second.config["storage"] |= {"max_size": int(used * 0.75), "evict_to": int(used * 0.70)}
    second.port = free_port()
    probe = ReadyProbe(second.port)
    out["ready_evicting_s"] = round(start_timed(second), 3)
    began = time.time()
    probe.start()
    # warm lookups, as the issue asks, each after its own warming pass (every path once, both
    # during the eviction: the share of each window it ran in is printed); the warming pass's
    # figures (the first lookup of each path) are kept and printed beside them
    out["evict_digest"] = lookups(second, by_digest, seconds, tmp, "digest2", warm=True)
    out["evict_tag"] = lookups(second, by_tag, seconds, tmp, "tag2", warm=True)
    deadline = time.monotonic() + 600
    while "evict.done" not in second.log() and time.monotonic() < deadline:
        time.sleep(0.2)
    out["readyz_during_evict"] = probe.result()
    m = re.search(
        r"evict\.done freed=(\d+) manifests=(\d+) loose=\d+ batches=(\d+) "
        r"seconds=([\d.]+)",
        second.log(),
    )
    if m is None:
        raise BenchError("no evict.done line in the daemon's log")
    freed, evicted, batches, secs = int(m[1]), int(m[2]), int(m[3]), float(m[4])
    ended = began + secs  # it started before /readyz answered: an upper bound of its end

    def share(w: dict[str, float]) -> float:
        """How much of a lookup window the eviction ran in."""
        return round(max(0.0, min(ended, w["to"]) - w["from"]) / (w["to"] - w["from"]), 2)

    out["eviction"] = {
        "manifests": evicted,
        "freed": freed,
        "batches": batches,
        "seconds": secs,
        "manifests_s": round(evicted / secs if secs else 0.0, 1),
        "share_digest": share(out["evict_digest"]),
        "share_tag": share(out["evict_tag"]),
    }
    config = second.root / "regproxy.yaml"
    sha256sum(root / "blobs")  # the page cache warm for fsck as for the sha256sum after it
    for name, args in (("gc_dry_run", ("gc", "--dry-run")), ("fsck", ("fsck",))):
        probe = ReadyProbe(second.port)
        probe.start()
        secs, summary = cli(config, *args)
        out[name] = {"seconds": round(secs, 1), "summary": summary, "readyz": probe.result()}
    files, size = tree_bytes(root / "blobs")
    out["sha256sum"] = {
        "seconds": round(sha256sum(root / "blobs"), 2),
        "files": files,
        "bytes": size,
    }
    out["fsck"]["hashing_s"] = own_seconds(out["fsck"]["summary"])
    out["rss_peak_mb"] = round(peak_rss_mb(second.proc.pid), 1) if second.proc else None
    return out


def own_seconds(summary: str) -> float:
    """The seconds fsck reports for its own work (the command's wall time adds the start of a
    Python process: imports, opening the index)."""
    m = re.search(r"hashed in ([\d.]+)s", summary)
    if m is None:
        raise BenchError(f"no time in the fsck summary: {summary}")
    return max(0.01, float(m[1]))


def fsck_big(tmp: Path, scale: float) -> dict[str, Any]:
    """fsck against sha256sum on large files (warm page cache, both)."""
    root = tmp / "big" / "store"
    total = max(256, round(1024 * min(1.0, max(scale, 0.25))) // 8 * 8) * MiB
    big_files_store(root, total)
    config = tmp / "big" / "regproxy.yaml"
    config.write_text(json.dumps({"storage": {"root": str(root)}}))
    sha256sum(root / "blobs")  # warm the page cache
    sha = sha256sum(root / "blobs")
    secs, summary = cli(config, "fsck")
    own = own_seconds(summary)
    return {
        "bytes": total,
        "sha256sum_s": round(sha, 2),
        "fsck_s": round(secs, 2),
        "hashing_s": own,
        "summary": summary,
        "ratio": round(sha / own, 2),
    }


def render(r: dict[str, Any]) -> str:
    def lat(x: dict[str, Any]) -> str:
        cpu = f", CPU {x['cpu_us_req']:.0f} us/req" if "cpu_us_req" in x else ""
        if "fast_share" in x:
            cpu += f", {x['fast_share']:.2%} from memory (fast lane)"
        return f"p50 {x['p50_ms']:.2f} ms, p99 {x['p99_ms']:.2f} ms{cpu}"

    def cold(x: dict[str, Any]) -> str:
        f = x.get("first_pass")
        if not f:
            return ""
        return (
            f"\n    warming pass (each path's first lookup, Python client, 8 connections): "
            f"{f['paths']} of {f['of']} paths in {f['seconds']} s, {f['req_s']:.0f} req/s, "
            f"p50 {f['p50_ms']:.2f} ms, p99 {f['p99_ms']:.2f} ms, CPU {f['cpu_us_req']:.0f} us/req"
        )

    pages = sorted(k for k in r if k.startswith("catalog_page"))
    ui = sorted(k for k in r if k.startswith("ui_page"))
    ev = r["eviction"]
    lines = [
        f"store: {r['shape']['manifests']} manifests, {r['shape']['repos']} repositories, "
        f"{r['shape']['blobs']} blob rows (scale {r['scale']:g}); built in {r['build_s']} s",
        f"time to /readyz: {r['ready_s']} s (restart with 30% to evict: {r['ready_evicting_s']} s)",
        f"peak RSS: idle {r['rss_idle_mb']} MB, at the end {r['rss_peak_mb']} MB",
        f"lookup by digest idle:   {r['idle_digest']['req_s']:.0f} req/s, {lat(r['idle_digest'])}"
        f"{cold(r['idle_digest'])}",
        f"lookup by tag idle:      {r['idle_tag']['req_s']:.0f} req/s, {lat(r['idle_tag'])}"
        f"{cold(r['idle_tag'])}",
        f"lookup by digest evict:  {r['evict_digest']['req_s']:.0f} req/s, {lat(r['evict_digest'])}"
        f"{cold(r['evict_digest'])}",
        f"lookup by tag evict:     {r['evict_tag']['req_s']:.0f} req/s, {lat(r['evict_tag'])}"
        f"{cold(r['evict_tag'])}",
        f"eviction: {ev['manifests']} manifests ({ev['freed']} bytes) in {ev['seconds']} s, "
        f"{ev['manifests_s']} manifests/s, {ev['batches']} batches; it ran during "
        f"{ev['share_digest']:.0%} / {ev['share_tag']:.0%} of the digest / tag lookup windows",
        f"/readyz during eviction: worst {r['readyz_during_evict']['max_ms']} ms, "
        f"{r['readyz_during_evict']['failures']} not 200",
    ]
    for k in pages:
        peer = r["peer"].get(k)
        lines.append(
            f"_catalog?n=100 {k[8:]:>8}: regproxy {lat(r[k])}"
            + (f" | docker-registry {lat(peer)}" if peer else "")
        )
    for k in ui:
        lines.append(f"web page repositories {k[3:]:>8}: {lat(r[k])}")
    if "ui_tags" in r:
        lines.append(f"web page a repository's tags: {lat(r['ui_tags'])}")
    for k in ("gc_dry_run", "fsck"):
        lines.append(
            f"{k}: {r[k]['seconds']} s, /readyz worst {r[k]['readyz']['max_ms']} ms "
            f"({r[k]['readyz']['failures']} not 200): {r[k]['summary']}"
        )
    s = r["sha256sum"]
    small = s["seconds"] / r["fsck"]["hashing_s"]
    lines.append(
        f"sha256sum on the same {s['files']} files ({s['bytes']} bytes): {s['seconds']} s; "
        f"fsck hashed them in {r['fsck']['hashing_s']} s: {small:.0%} of sha256sum's speed"
    )
    b = r["fsck_big"]
    lines.append(
        f"large files ({b['bytes'] // MiB} MiB): sha256sum {b['sha256sum_s']} s, fsck "
        f"{b['hashing_s']} s ({b['fsck_s']} s with the command's start): "
        f"{b['ratio']:.0%} of sha256sum's speed"
    )
    worst_catalog = max(r[k]["p99_ms"] for k in pages)
    lookup_p99 = max(r["evict_digest"]["p99_ms"], r["evict_tag"]["p99_ms"])
    goals = [
        ("ready", r["ready_s"] < GOALS["ready_s"], f"{r['ready_s']} s < 3 s"),
        (
            "lookup p99 during eviction",
            lookup_p99 < GOALS["lookup_p99_evict_ms"],
            f"{lookup_p99:.2f} ms < 5 ms",
        ),
        ("RSS", (r["rss_peak_mb"] or 0) < GOALS["rss_mb"], f"{r['rss_peak_mb']} MB < 150 MB"),
        (
            "_catalog?n=100 anywhere",
            worst_catalog < GOALS["catalog_ms"],
            f"p99 {worst_catalog:.2f} ms < 10 ms",
        ),
        ("fsck vs sha256sum (large files)", b["ratio"] >= 0.8, f"{b['ratio']:.0%} >= 80%"),
        ("fsck vs sha256sum (the store's small files)", small >= 0.8, f"{small:.0%} >= 80%"),
    ]
    lines += [
        "",
        f"load average (1 min) at start/end {r['loadavg_1m_start_end']}, "
        f"{r['machine']['cpus']} CPUs, {r['seconds']} s",
        "goals:",
    ]
    lines += [f"  {'ok  ' if ok else 'MISS'} {name}: {text}" for name, ok, text in goals]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--scale", type=float, default=1.0, help="1 = 100,000 manifests (default)")
    p.add_argument("--seconds", type=float, default=5.0, help="seconds per wrk run (default 5)")
    p.add_argument("--workdir", type=Path, help="where to build the store (default: /tmp)")
    p.add_argument("--json", action="store_true", help="write results to benchmarks/results/")
    args = p.parse_args(argv)
    try:
        result = bench(max(0.001, min(args.scale, 10.0)), max(1.0, args.seconds), args.workdir)
    except BenchError as exc:
        print(f"bench_scale: {exc}", file=sys.stderr)
        return 1
    report(render(result), result, "scale" if args.json else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
