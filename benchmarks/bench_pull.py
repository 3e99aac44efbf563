"""Pull-through benchmark: regproxy against Debian's docker-registry in proxy mode, same run.

One plain docker-registry on 127.0.0.1 is the upstream; it holds a 1 GiB blob, a 256 MiB blob,
a config and an OCI manifest tagged ``latest`` (pushed over plain HTTP, the big blobs streamed
from ``os.urandom`` in 1 MiB chunks). regproxy (``upstreams:`` entry, ``tag_ttl: 5m``) and a
second docker-registry with ``proxy.remoteurl`` both sit in front of it. Cases:

  (a) cold pull of the 1 GiB blob (one ``curl``): client GB/s, bytes fetched from upstream, and
      when the blob is committed in the server's store, measured from the request start and set
      against the moment the response ended;
  (b) warm pull of the same blob (GB/s);
  (c) 16 concurrent cold pulls of the 256 MiB blob: total time, upstream bytes, peak RSS;
  (d) manifest GET and HEAD by tag inside ``tag_ttl`` under concurrency 1, 8 and 32 (``wrk``):
      req/s, p99 and upstream requests per client request (HEAD with ``ab -i -k``: wrk 4.1
      waits for a body after a HEAD that announces a Content-Length).

Each figure comes with the server's CPU seconds (user + system, all threads, from /proc): per
GiB for (a)-(c), the cold pull's counted until the blob is committed and the upstream is quiet
(the upstream's own beside it), per request for (d).

Upstream traffic is read from the upstream's access log (gorilla's combined format: one line per
request with the body bytes written), in the window of each measurement. (a)-(c) start each
server afresh on an empty store for every run; figures are medians of the runs.

    python -m benchmarks.bench_pull                  # full run (~2.5 min on 2 cores)
    python -m benchmarks.bench_pull --quick          # smoke run (~1 min, 64/32 MiB blobs)
    python -m benchmarks.bench_pull --wait-calm 180  # first wait up to 180 s for load < 1.0
    python -m benchmarks.bench_pull --json           # also write benchmarks/results/pull-*.json

Needs ``wrk``, ``ab``, ``curl`` and ``docker-registry`` on PATH (``apt-get install -y wrk
apache2-utils curl docker-registry``); it installs nothing itself. ``--profile`` also needs
``py-spy`` (``pip install py-spy``).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: the repository root is not on sys.path yet
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common
from benchmarks.common import (
    OCI_CONFIG,
    OCI_LAYER,
    OCI_MANIFEST,
    WRK_DONE,
    BenchError,
    CpuMeter,
    GiB,
    MiB,
    check_tools,
    load_1m,
    print_log_tails,
    report,
    request,
    run_summary,
    with_keys,
)
from tests.peers import Daemon, DockerRegistry, stop_process

# what containerd sends on a tag HEAD
ACCEPT = ", ".join(
    [
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        OCI_MANIFEST,
        "application/vnd.oci.image.index.v1+json",
        "*/*",
    ]
)
REPO = "bench/pull"
TAG = "latest"
ALIAS = "up.test"
SERVERS = ("regproxy", "registry")

# Goals of issue 3.
GOAL_COLD_RATIO = 0.8  # client GB/s, regproxy/registry
GOAL_COLD_CPU = 2.0  # regproxy's CPU seconds per GiB of a cold pull (issue 14)
GOAL_COMMIT_SLACK_S = 0.05  # committed no later than this after the response ended
GOAL_HERD_TIME_RATIO = 1.0
GOAL_RSS_MB = 100.0
GOAL_TAG_RATIO = 10.0

# 127.0.0.1 - - [24/Nov/2026:11:28:12 +0000] "GET /v2/ HTTP/1.1" 200 2 "" "curl/7.88.1"
ACCESS_LINE = re.compile(rb'^\S+ \S+ \S+ \[[^\]]*\] "([A-Z]+) (\S+) [^"]*" (\d{3}) (\d+|-)')


@dataclass
class Settings:
    big_size: int  # (a), (b)
    herd_size: int  # (c)
    herd_clients: int
    runs: int  # fresh-store runs of (a)+(b) and of (c), per server
    wrk_runs: int
    wrk_seconds: float
    warmup: float
    concurrency: tuple[int, ...]
    budget: float  # seconds for everything after the push
    #: regproxy config keys (dotted) set for its runs (--set)
    keys: dict[str, str] = field(default_factory=dict)


# --- plain HTTP -----------------------------------------------------------------------------------
def _location(headers: http.client.HTTPMessage) -> str:
    loc = headers.get("Location") or ""
    if loc.startswith("http"):
        loc = "/" + loc.split("/", 3)[3]
    if not loc:
        raise BenchError("upload answered without a Location")
    return loc


def _with_digest(location: str, digest: str) -> str:
    return f"{location}{'&' if '?' in location else '?'}digest={digest}"


def push_small_blob(port: int, data: bytes) -> str:
    """POST, then PUT ?digest= with the whole body."""
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    status, headers, text = request(port, "POST", f"/v2/{REPO}/blobs/uploads/")
    if status != 202:
        raise BenchError(f"POST upload answered {status}: {text[:200]!r}")
    status, _, text = request(
        port,
        "PUT",
        _with_digest(_location(headers), digest),
        body=data,
        headers={"Content-Type": "application/octet-stream"},
    )
    if status != 201:
        raise BenchError(f"PUT upload answered {status}: {text[:200]!r}")
    return digest


def push_random_blob(port: int, size: int, chunk: int = MiB) -> str:
    """POST, PATCH with os.urandom chunks streamed and hashed on the way (never the whole blob
    in memory, nothing on local disk), then PUT ?digest= with an empty body."""
    status, headers, text = request(port, "POST", f"/v2/{REPO}/blobs/uploads/")
    if status != 202:
        raise BenchError(f"POST upload answered {status}: {text[:200]!r}")
    h = hashlib.sha256()

    def chunks() -> Iterator[bytes]:
        left = size
        while left > 0:
            block = os.urandom(min(chunk, left))
            h.update(block)
            left -= len(block)
            yield block

    status, headers, text = request(
        port,
        "PATCH",
        _location(headers),
        body=chunks(),
        headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
    )
    if status != 202:
        raise BenchError(f"PATCH upload answered {status}: {text[:200]!r}")
    digest = "sha256:" + h.hexdigest()
    status, _, text = request(
        port, "PUT", _with_digest(_location(headers), digest), headers={"Content-Length": "0"}
    )
    if status != 201:
        raise BenchError(f"PUT upload answered {status}: {text[:200]!r}")
    return digest


@dataclass
class Content:
    big: str
    big_size: int
    herd: str
    herd_size: int
    manifest_digest: str


def push_content(port: int, settings: Settings) -> Content:
    config = json.dumps(
        {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}
    ).encode()
    config_digest = push_small_blob(port, config)
    big = push_random_blob(port, settings.big_size)
    herd = push_random_blob(port, settings.herd_size)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
            "layers": [
                {"mediaType": OCI_LAYER, "digest": big, "size": settings.big_size},
                {"mediaType": OCI_LAYER, "digest": herd, "size": settings.herd_size},
            ],
        },
        indent=2,
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
    return Content(
        big,
        settings.big_size,
        herd,
        settings.herd_size,
        "sha256:" + hashlib.sha256(manifest).hexdigest(),
    )


# --- the upstream's access log --------------------------------------------------------------------
@dataclass
class Hit:
    method: str
    path: str
    status: int
    size: int


class AccessLog:
    """docker-registry writes one combined-format line per request to stdout (its log file)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def mark(self) -> int:
        """Offset just past the last complete line."""
        data = self.path.read_bytes()
        return data.rfind(b"\n") + 1

    def since(self, offset: int) -> list[Hit]:
        with open(self.path, "rb") as f:
            f.seek(offset)
            data = f.read()
        data = data[: data.rfind(b"\n") + 1]
        hits = []
        for line in data.splitlines():
            m = ACCESS_LINE.match(line)
            if m:
                size = 0 if m[4] == b"-" else int(m[4])
                hits.append(Hit(m[1].decode(), m[2].decode(), int(m[3]), size))
        return hits

    def size(self) -> int:
        return self.path.stat().st_size

    def settle(self, quiet: float, limit: float) -> None:
        """Until nothing was logged for ``quiet`` seconds (at most ``limit`` seconds)."""
        deadline = time.monotonic() + limit
        last, since = self.size(), time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.05)
            now = self.size()
            if now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= quiet:
                return


def request_kind(path: str) -> str:
    path = path.split("?", 1)[0]
    if path.rstrip("/") == "/v2":
        return "/v2/"
    for kind in ("/manifests/", "/blobs/uploads/", "/blobs/", "/tags/"):
        if kind in path:
            return kind.strip("/")
    return "other"


def blob_bytes(hits: list[Hit], digest: str) -> int:
    return sum(h.size for h in hits if h.method == "GET" and h.path.endswith(f"/blobs/{digest}"))


# --- the servers ----------------------------------------------------------------------------------
class Server:
    """One server under test on a store of its own; ``fresh()`` starts it on an empty one."""

    def __init__(
        self, name: str, workdir: Path, upstream: DockerRegistry, keys: dict[str, str]
    ) -> None:
        self.keys = keys
        self.name = name
        self.workdir = workdir
        self.upstream = upstream
        self.generation = 0
        self.proc_obj: Daemon | DockerRegistry | None = None

    @property
    def pid(self) -> int:
        assert self.proc_obj is not None and self.proc_obj.proc is not None
        return self.proc_obj.proc.pid

    @property
    def port(self) -> int:
        assert self.proc_obj is not None
        return self.proc_obj.port

    @property
    def root(self) -> Path:
        return self.workdir / f"{self.name}-{self.generation}"

    def start(self) -> None:
        self.generation += 1
        self.root.mkdir(parents=True)
        if self.name == "regproxy":
            config = {
                "log": {"access": False, "level": "WARNING"},
                "upstreams": {self.upstream.hostport: {"url": self.upstream.url, "alias": ALIAS}},
                "tag_ttl": "5m",
            }
            self.proc_obj = Daemon(self.root, with_keys(config, self.keys))
            self.proc_obj.start()
        else:
            self.proc_obj = DockerRegistry(
                self.root,
                proxy_url=self.upstream.url,
                extra={"log": {"level": "error", "accesslog": {"disabled": True}}},
            ).start()

    def stop(self) -> None:
        if self.proc_obj is not None:
            self.proc_obj.stop()
            self.proc_obj = None
            shutil.rmtree(self.root, ignore_errors=True)

    def fresh(self) -> None:
        self.stop()
        self.start()

    def log(self) -> str:
        return self.proc_obj.log() if self.proc_obj is not None else ""

    def blob_url(self, digest: str) -> str:
        if self.name == "regproxy":
            return f"http://127.0.0.1:{self.port}/v2/{ALIAS}/{REPO}/blobs/{digest}"
        return f"http://127.0.0.1:{self.port}/v2/{REPO}/blobs/{digest}"

    def tag_path(self) -> str:
        path = f"/v2/{REPO}/manifests/{TAG}"
        return f"{path}?ns={self.upstream.hostport}" if self.name == "regproxy" else path

    def tag_url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.tag_path()}"

    def committed(self, digest: str) -> Callable[[], bool]:
        hexd = digest.split(":", 1)[1]
        if self.name == "regproxy":
            store = self.root / "store"
            path = store / "blobs" / "sha256" / hexd[:2] / hexd
            tmp = store / "tmp"

            def regproxy_done() -> bool:
                if not path.exists():
                    return False
                with os.scandir(tmp) as it:
                    return next(it, None) is None

            return regproxy_done
        data = (
            self.root / "data/docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"
        ).resolve()
        return data.exists

    def peak_rss_mb(self) -> float:
        return common.peak_rss_mb(self.pid)


# --- clients --------------------------------------------------------------------------------------
def curl(url: str, timeout: float) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            "curl",
            "-sS",
            "-o",
            "/dev/null",
            "--max-time",
            str(int(timeout)),
            "-w",
            "%{http_code} %{size_download} %{time_total}",
            url,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def curl_result(proc: subprocess.Popen[str], size: int) -> float:
    """Checks status and size; returns curl's own total time."""
    out, err = proc.communicate(timeout=10)
    parts = out.split()
    if proc.returncode != 0 or len(parts) != 3 or parts[0] != "200" or int(parts[1]) != size:
        raise BenchError(f"curl: exit {proc.returncode}, {out!r} (want 200 {size}), {err.strip()}")
    return float(parts[2])


def pull_watching(
    url: str, size: int, committed: Callable[[], bool], timeout: float, commit_wait: float
) -> dict[str, float]:
    """One curl of a blob while polling the store; times are seconds since the request start."""
    t0 = time.monotonic()
    proc = curl(url, timeout)
    end: float | None = None
    commit: float | None = None
    while True:
        now = time.monotonic() - t0
        if commit is None and committed():
            commit = now
        if end is None and proc.poll() is not None:
            end = now
        if end is not None and (commit is not None or now > end + commit_wait):
            break
        if now > timeout + 10:
            proc.kill()
            proc.wait(5)
            raise BenchError(f"pull of {url} did not end within {timeout} s")
        time.sleep(0.005)
    total = curl_result(proc, size)
    return {
        "gb_s": size / total / 1e9,
        "response_end_s": end,
        "commit_s": commit if commit is not None else float("nan"),
    }


def herd(url: str, size: int, clients: int, timeout: float) -> float:
    t0 = time.monotonic()
    procs = [curl(url, timeout) for _ in range(clients)]
    try:
        deadline = t0 + timeout + 10
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline:
                raise BenchError(f"herd on {url} did not end within {timeout} s")
            time.sleep(0.01)
        total = time.monotonic() - t0
        for p in procs:
            curl_result(p, size)
        return total
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(5)


def run_wrk(
    url: str, concurrency: int, seconds: float, headers: dict[str, str], script: Path
) -> dict[str, float]:
    """The figures the tag cells keep from a wrk run."""
    r = common.run_wrk(url, concurrency, seconds, headers, script)
    return {k: r[k] for k in ("req_s", "p50_ms", "p99_ms", "requests")}


def run_ab_head(
    url: str, concurrency: int, seconds: float, headers: dict[str, str], csv: Path
) -> dict[str, float]:
    """HEAD load from ApacheBench: wrk 4.1 waits for a body after a HEAD that announces a
    Content-Length, so HEAD cells use ``ab -i -k`` (HTTP/1.0 keep-alive, one thread)."""
    cmd = ["ab", "-i", "-k", "-q", "-c", str(concurrency), "-t", str(max(1, round(seconds)))]
    cmd += ["-n", "100000000", "-s", "5", "-e", str(csv)]
    for k, v in headers.items():
        cmd += ["-H", f"{k}: {v}"]
    cmd.append(url)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30, check=False)

    def field_of(name: str) -> float:
        m = re.search(rf"^{name}:\s+([\d.]+)", proc.stdout, re.MULTILINE)
        if m is None:
            raise BenchError(
                f"ab printed no {name!r} ({proc.returncode}): {proc.stdout}\n{proc.stderr}"
            )
        return float(m[1])

    done, failed = field_of("Complete requests"), field_of("Failed requests")
    non2xx = re.search(r"^Non-2xx responses:\s+(\d+)", proc.stdout, re.MULTILINE)
    if proc.returncode != 0 or failed or non2xx or not done:
        raise BenchError(f"ab saw errors against {url}: {proc.stdout}\n{proc.stderr}")
    pct = {}
    for line in csv.read_text().splitlines()[1:]:
        k, _, v = line.partition(",")
        pct[int(float(k))] = float(v)
    return {
        "req_s": field_of("Requests per second"),
        "p50_ms": pct[50],
        "p99_ms": pct[99],
        "requests": done,
    }


# --- the run --------------------------------------------------------------------------------------
@dataclass
class Figures:
    runs: dict[str, list[dict[str, float]]] = field(default_factory=dict)

    def add(self, key: str, values: dict[str, float]) -> None:
        self.runs.setdefault(key, []).append(values)

    def median(self, key: str, name: str) -> float:
        vals = [r[name] for r in self.runs.get(key, []) if r[name] == r[name]]
        return statistics.median(vals) if vals else float("nan")

    def worst(self, key: str, name: str) -> float:
        vals = [r[name] for r in self.runs.get(key, [])]
        return max(vals) if vals else float("nan")


def wait_calm(limit: float, threshold: float) -> None:
    deadline = time.monotonic() + limit
    load = os.getloadavg()[0]
    while load >= threshold and time.monotonic() < deadline:
        print(f"load {load:.2f} >= {threshold:g}, waiting ...", flush=True)
        time.sleep(min(10.0, max(0.0, deadline - time.monotonic())))
        load = os.getloadavg()[0]


def flush_disk() -> None:
    """Write out every file's dirty pages (``sync``) before a cold run. The peer stores a pulled
    blob without fsync: each of its runs leaves about the blob's size of unwritten data behind,
    and regproxy's commit (fsync before the response's last byte) would write that out first
    (ext4's ordered mode), so whichever server ran second paid for the first."""
    os.sync()


@contextlib.contextmanager
def py_spy(pid: int, out: Path | None) -> Iterator[None]:
    """``py-spy record`` of the daemon around a block (only with --profile DIR)."""
    if out is None or shutil.which("py-spy") is None:
        yield
        return
    cmd = ["py-spy", "record", "--pid", str(pid), "--rate", "200", "--nonblocking", "--threads"]
    proc = subprocess.Popen(
        [*cmd, "-f", "raw", "-o", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            stop_process(proc)


def bench(settings: Settings, profile: Path | None = None, progress: bool = True) -> dict[str, Any]:
    check_tools(
        "bench_pull",
        {"wrk": "wrk", "ab": "apache2-utils", "curl": "curl", "docker-registry": "docker-registry"},
    )
    started_at = time.time()
    load_start = load_1m()
    fig = Figures()
    kinds: dict[str, dict[str, int]] = {}  # upstream requests by kind, in the (d) cells
    say: Callable[[str], None] = (lambda s: print(s, flush=True)) if progress else (lambda s: None)
    with tempfile.TemporaryDirectory(prefix="regproxy-pull-bench-") as tmpdir:
        tmp = Path(tmpdir)
        upstream = DockerRegistry(
            tmp / "upstream", extra={"log": {"level": "error", "accesslog": {"disabled": False}}}
        )
        servers = {name: Server(name, tmp, upstream, settings.keys) for name in SERVERS}
        try:
            upstream.start()
            assert upstream.proc is not None
            upstream_pid = upstream.proc.pid
            uplog = AccessLog(upstream.root / "registry.log")
            say(
                f"pushing {settings.big_size // MiB} MiB and {settings.herd_size // MiB} MiB "
                f"blobs to the upstream on :{upstream.port} ..."
            )
            content = push_content(upstream.port, settings)
            deadline = time.monotonic() + settings.budget

            def budget(what: str) -> None:
                if time.monotonic() > deadline:
                    raise BenchError(f"time budget exhausted before {what}; try --quick")

            big_timeout = max(60.0, settings.big_size / (20 * MiB))  # >= 20 MiB/s
            herd_timeout = max(60.0, settings.herd_clients * settings.herd_size / (20 * MiB))
            for run in range(settings.runs):
                order = SERVERS if run % 2 == 0 else SERVERS[::-1]
                for name in order:
                    budget(f"cold pull run {run + 1}")
                    srv = servers[name]
                    flush_disk()  # no run pays for the previous one's unwritten data
                    srv.fresh()
                    mark = uplog.mark()
                    out = profile / f"cold-{name}.folded" if profile and run == 0 else None
                    cpu = CpuMeter({"server": srv.pid, "upstream": upstream_pid}).start()
                    with py_spy(srv.pid, out if name == "regproxy" else None):
                        cold = pull_watching(
                            srv.blob_url(content.big),
                            content.big_size,
                            srv.committed(content.big),
                            big_timeout,
                            commit_wait=120,
                        )
                    uplog.settle(quiet=1.0, limit=60)
                    used = cpu.used()  # until committed and the upstream is quiet
                    cold["cpu_s_gib"] = used["server"] / (content.big_size / GiB)
                    cold["upstream_cpu_s_gib"] = used["upstream"] / (content.big_size / GiB)
                    hits = uplog.since(mark)
                    cold["upstream_x"] = blob_bytes(hits, content.big) / content.big_size
                    cold["upstream_gets"] = sum(
                        1 for h in hits if h.method == "GET" and content.big in h.path
                    )
                    cold["lag_s"] = cold["commit_s"] - cold["response_end_s"]
                    cold["rss_mb"] = srv.peak_rss_mb()
                    fig.add(f"cold/{name}", cold)
                    cpu = CpuMeter({"server": srv.pid}).start()
                    warm = pull_watching(
                        srv.blob_url(content.big),
                        content.big_size,
                        lambda: True,
                        big_timeout,
                        commit_wait=0,
                    )
                    warm["cpu_s_gib"] = cpu.used()["server"] / (content.big_size / GiB)
                    fig.add(f"warm/{name}", warm)
                    say(
                        f"  run {run + 1} {name:<9} cold {cold['gb_s']:.2f} GB/s, upstream "
                        f"{cold['upstream_x']:.2f}x in {cold['upstream_gets']:.0f} GETs, "
                        f"response ended {cold['response_end_s']:.2f} s, committed "
                        f"{cold['commit_s']:.2f} s, CPU {cold['cpu_s_gib']:.2f} s/GiB (upstream "
                        f"{cold['upstream_cpu_s_gib']:.2f}); warm {warm['gb_s']:.2f} GB/s, CPU "
                        f"{warm['cpu_s_gib']:.2f} s/GiB"
                    )
                    srv.stop()
            for run in range(settings.runs):
                order = SERVERS if run % 2 == 0 else SERVERS[::-1]
                for name in order:
                    budget(f"herd run {run + 1}")
                    srv = servers[name]
                    flush_disk()  # no run pays for the previous one's unwritten data
                    srv.fresh()
                    mark = uplog.mark()
                    out = profile / f"herd-{name}.folded" if profile and run == 0 else None
                    cpu = CpuMeter({"server": srv.pid}).start()
                    with py_spy(srv.pid, out if name == "regproxy" else None):
                        total = herd(
                            srv.blob_url(content.herd),
                            content.herd_size,
                            settings.herd_clients,
                            herd_timeout,
                        )
                    committed = srv.committed(content.herd)
                    limit = time.monotonic() + 120
                    while not committed() and time.monotonic() < limit:
                        time.sleep(0.05)
                    uplog.settle(quiet=1.0, limit=60)
                    served = settings.herd_clients * content.herd_size / GiB
                    herd_cpu = cpu.used()["server"]
                    hits = uplog.since(mark)
                    h = {
                        "total_s": total,
                        "upstream_x": blob_bytes(hits, content.herd) / content.herd_size,
                        "upstream_gets": sum(
                            1 for hit in hits if hit.method == "GET" and content.herd in hit.path
                        ),
                        "rss_mb": srv.peak_rss_mb(),
                        "cpu_s_gib": herd_cpu / served,
                    }
                    fig.add(f"herd/{name}", h)
                    say(
                        f"  herd {run + 1} {name:<9} {settings.herd_clients} x "
                        f"{settings.herd_size // MiB} MiB in {total:.2f} s, upstream "
                        f"{h['upstream_x']:.2f}x in {h['upstream_gets']:.0f} GETs, "
                        f"peak RSS {h['rss_mb']:.1f} MB, CPU {h['cpu_s_gib']:.2f} s per GiB served"
                    )
                    srv.stop()
            # (d) manifests by tag, both servers fresh and primed with one GET
            for srv in servers.values():
                srv.fresh()
                status, _, body = request(
                    srv.port, "GET", srv.tag_path(), headers={"Accept": ACCEPT}
                )
                if status != 200:
                    raise BenchError(f"{srv.name}: GET by tag answered {status}: {body[:200]!r}")
            script, csv = tmp / "done.lua", tmp / "ab.csv"
            script.write_text(WRK_DONE)

            def load(method: str, url: str, conc: int, seconds: float) -> dict[str, float]:
                headers = {"Accept": ACCEPT}
                if method == "GET":
                    return run_wrk(url, conc, seconds, headers, script)
                return run_ab_head(url, conc, seconds, headers, csv)

            for method in ("GET", "HEAD"):
                for conc in settings.concurrency:
                    for name in SERVERS:
                        budget(f"manifest {method} c={conc}")
                        srv = servers[name]
                        url = srv.tag_url()
                        load(method, url, conc, settings.warmup)
                        for _ in range(settings.wrk_runs):
                            mark = uplog.mark()
                            cpu = CpuMeter({"server": srv.pid}).start()
                            r = load(method, url, conc, settings.wrk_seconds)
                            r["cpu_us_req"] = cpu.used()["server"] / r["requests"] * 1e6
                            uplog.settle(quiet=0.2, limit=5)
                            hits = uplog.since(mark)
                            r["upstream_per_req"] = len(hits) / r["requests"]
                            r["upstream_manifest_per_req"] = (
                                sum(1 for h in hits if "/manifests/" in h.path) / r["requests"]
                            )
                            fig.add(f"tag {method} c={conc}/{name}", r)
                            mix = kinds.setdefault(f"tag {method} c={conc}/{name}", {})
                            for hit in hits:
                                kind = f"{hit.method} {request_kind(hit.path)}"
                                mix[kind] = mix.get(kind, 0) + 1
                        key = f"tag {method} c={conc}/{name}"
                        say(
                            f"  manifest {method:<4} c={conc:<3} {name:<9} "
                            f"{fig.median(key, 'req_s'):>8.0f} req/s, p99 "
                            f"{fig.median(key, 'p99_ms'):6.2f} ms, CPU "
                            f"{fig.median(key, 'cpu_us_req'):.0f} us/req, upstream "
                            f"{fig.median(key, 'upstream_per_req'):.2f}/req {kinds.get(key) or ''}"
                        )
            tag_rss = {name: servers[name].peak_rss_mb() for name in SERVERS}
        except BaseException:
            print_log_tails({srv.name: srv.log() for srv in servers.values()})
            raise
        finally:
            for srv in servers.values():
                with contextlib.suppress(Exception):
                    srv.stop()
            upstream.stop()
    medians = {
        key: {name: statistics.median(r[name] for r in runs) for name in runs[0]}
        for key, runs in fig.runs.items()
    }
    worst = {
        key: {name: max(r[name] for r in runs) for name in runs[0]}
        for key, runs in fig.runs.items()
    }
    return {
        **run_summary(started_at, load_start),
        "settings": asdict(settings),
        "tag_phase_peak_rss_mb": tag_rss,
        "medians": medians,
        "worst": worst,
        "upstream_requests_in_tag_cells": kinds,
        "runs": fig.runs,
    }


# --- report ---------------------------------------------------------------------------------------
def render(result: dict[str, Any]) -> str:
    s = result["settings"]
    med, worst = result["medians"], result["worst"]
    big, hsz = s["big_size"] // MiB, s["herd_size"] // MiB
    rows: list[tuple[str, str, float, float, str]] = []  # label, fmt, regproxy, registry, goal

    def row(label: str, key: str, name: str, fmt: str, goal: str = "") -> None:
        a = med.get(f"{key}/regproxy", {}).get(name, float("nan"))
        b = med.get(f"{key}/registry", {}).get(name, float("nan"))
        rows.append((label, fmt, a, b, goal))

    row(f"(a) cold {big} MiB: client GB/s", "cold", "gb_s", ".3f", f">= {GOAL_COLD_RATIO}x")
    row("(a) cold: upstream bytes (x blob)", "cold", "upstream_x", ".2f", "regproxy 1x")
    row("(a) cold: upstream blob GETs", "cold", "upstream_gets", ".0f")
    row("(a) cold: response ended (s)", "cold", "response_end_s", ".3f")
    row("(a) cold: blob committed (s)", "cold", "commit_s", ".3f")
    row("(a) cold: commit - end (s)", "cold", "lag_s", "+.3f", "regproxy <= 0")
    row("(a) cold: server CPU s/GiB", "cold", "cpu_s_gib", ".2f", f"regproxy <= {GOAL_COLD_CPU}")
    row("(a) cold: upstream's CPU s/GiB", "cold", "upstream_cpu_s_gib", ".2f")
    row("(a) cold: peak RSS (MB)", "cold", "rss_mb", ".1f")
    row(f"(b) warm {big} MiB: client GB/s", "warm", "gb_s", ".3f")
    row("(b) warm: server CPU s/GiB", "warm", "cpu_s_gib", ".2f")
    n = s["herd_clients"]
    row(f"(c) herd {n} x {hsz} MiB: total (s)", "herd", "total_s", ".2f", "<= 1x")
    row("(c) herd: upstream bytes (x blob)", "herd", "upstream_x", ".2f", "regproxy 1x")
    row("(c) herd: upstream blob GETs", "herd", "upstream_gets", ".0f")
    row("(c) herd: peak RSS (MB)", "herd", "rss_mb", ".1f", f"regproxy < {GOAL_RSS_MB:g}")
    row("(c) herd: server CPU s/GiB served", "herd", "cpu_s_gib", ".2f")
    for method in ("GET", "HEAD"):
        for conc in s["concurrency"]:
            key = f"tag {method} c={conc}"
            row(f"(d) {key}: req/s", key, "req_s", ".0f", f">= {GOAL_TAG_RATIO:g}x")
            row(f"(d) {key}: p99 (ms)", key, "p99_ms", ".2f")
            row(f"(d) {key}: server CPU us/req", key, "cpu_us_req", ".0f")
            row(f"(d) {key}: upstream req/req", key, "upstream_per_req", ".3f")
    head = f"{'figure':<40} {'regproxy':>10} {'registry':>10} {'ratio':>8}  goal"
    lines = [head, "-" * (len(head) + 16)]
    if s.get("keys"):
        keys = ", ".join(f"{k}={v}" for k, v in s["keys"].items())
        lines.insert(0, f"regproxy's config, beside the defaults: {keys}")
    for label, fmt, a, b, goal in rows:
        ratio = a / b if b else float("inf")
        spec = f">+10{fmt[1:]}" if fmt.startswith("+") else f">10{fmt}"
        lines.append(f"{label:<40} {a:{spec}} {b:{spec}} {ratio:>7.2f}x  {goal}")

    def rp(key: str, name: str, table: dict[str, Any] = med) -> float:
        return float(table.get(f"{key}/regproxy", {}).get(name, float("nan")))

    def peer(key: str, name: str) -> float:
        return float(med.get(f"{key}/registry", {}).get(name, float("nan")))

    def verdict(ok: bool, text: str) -> str:
        return f"  {'ok  ' if ok else 'MISS'} {text}"

    cold_ratio = rp("cold", "gb_s") / peer("cold", "gb_s")
    herd_ratio = rp("herd", "total_s") / peer("herd", "total_s")
    verdicts = [
        verdict(
            cold_ratio >= GOAL_COLD_RATIO,
            f"cold pull {cold_ratio:.2f}x the peer's GB/s (goal >= {GOAL_COLD_RATIO}x)",
        ),
        verdict(
            rp("cold", "cpu_s_gib") <= GOAL_COLD_CPU,
            f"cold pull CPU {rp('cold', 'cpu_s_gib'):.2f} s/GiB, the peer's "
            f"{peer('cold', 'cpu_s_gib'):.2f} (goal <= {GOAL_COLD_CPU})",
        ),
        verdict(
            rp("cold", "upstream_x", worst) == 1.0 and rp("herd", "upstream_x", worst) == 1.0,
            f"upstream bytes, worst run: cold {rp('cold', 'upstream_x', worst):.2f}x, herd "
            f"{rp('herd', 'upstream_x', worst):.2f}x the blob (goal exactly 1x)",
        ),
        verdict(
            rp("cold", "lag_s", worst) <= GOAL_COMMIT_SLACK_S,
            f"blob committed {rp('cold', 'lag_s', worst):+.3f} s after the response ended, "
            f"worst run (goal: by the end, {GOAL_COMMIT_SLACK_S * 1000:.0f} ms poll slack)",
        ),
        verdict(
            herd_ratio <= GOAL_HERD_TIME_RATIO,
            f"herd done in {herd_ratio:.2f}x the peer's time (goal <= {GOAL_HERD_TIME_RATIO:g}x)",
        ),
        verdict(
            rp("herd", "rss_mb", worst) < GOAL_RSS_MB,
            f"herd peak RSS {rp('herd', 'rss_mb', worst):.1f} MB, worst run "
            f"(goal < {GOAL_RSS_MB:g} MB)",
        ),
    ]
    for method in ("GET", "HEAD"):
        for conc in s["concurrency"]:
            key = f"tag {method} c={conc}"
            ratio = rp(key, "req_s") / peer(key, "req_s")
            verdicts.append(
                verdict(
                    ratio >= GOAL_TAG_RATIO,
                    f"manifest {method} by tag c={conc}: {ratio:.1f}x the peer's req/s "
                    f"(goal >= {GOAL_TAG_RATIO:g}x)",
                )
            )
    lines += [
        "",
        f"(a)-(c): medians of {s['runs']} runs, each on a freshly started server with an empty "
        "store; (d): medians of",
        f"{s['wrk_runs']} x {s['wrk_seconds']:g} s wrk runs (-t1, after a {s['warmup']:g} s "
        "warm-up) on servers primed with one GET. Times in (a) count from the",
        "request start; 'committed' = first poll (5 ms) that saw the blob in the store. "
        "Upstream figures come from the",
        "upstream's access log. ratio = regproxy/registry (for times and bytes lower is better).",
        f"{result['machine']['cpus']} CPUs, Python {result['machine']['python']}, kernel "
        f"{result['machine']['kernel']}, {result['seconds']:g} s in all, load average (1 min) "
        f"at start/end {result['loadavg_1m_start_end'][0]}/{result['loadavg_1m_start_end'][1]}",
        "",
        "goals (issue 3):",
        *verdicts,
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 64/32 MiB blobs, 1 run each")
    p.add_argument("--json", action="store_true", help="write results to benchmarks/results/")
    p.add_argument("--runs", type=int, help="fresh-store runs of (a)-(c) (default 3; --quick 1)")
    p.add_argument("--big-mib", type=int, help="cold/warm blob size (default 1024; --quick 64)")
    p.add_argument("--herd-mib", type=int, help="herd blob size (default 256; --quick 32)")
    p.add_argument("--seconds", type=float, help="seconds per wrk run (default 1)")
    p.add_argument(
        "--wait-calm",
        type=float,
        default=0,
        metavar="S",
        help="first wait up to S seconds (max 600) for the 1-min load to drop below --calm-load",
    )
    p.add_argument("--calm-load", type=float, default=1.0, help="load threshold (default 1.0)")
    p.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="py-spy record regproxy during the first cold pull and herd into DIR/*.folded "
        "(collapsed stacks: speedscope or flamegraph.pl draw them)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a regproxy config key for its runs, e.g. storage.drop_behind_above=512MiB",
    )
    args = p.parse_args(argv)
    settings = (
        Settings(64 * MiB, 32 * MiB, 16, 1, 1, 1, 0.5, (1, 8, 32), 300)
        if args.quick
        else Settings(GiB, 256 * MiB, 16, 3, 3, 1, 1, (1, 8, 32), 600)
    )
    settings.keys = dict(kv.split("=", 1) for kv in args.set)
    if args.runs:
        settings.runs = max(1, min(args.runs, 10))
    if args.big_mib:
        settings.big_size = max(1, min(args.big_mib, 8192)) * MiB
    if args.herd_mib:
        settings.herd_size = max(1, min(args.herd_mib, 2048)) * MiB
    if args.seconds:
        settings.wrk_seconds = max(1.0, min(args.seconds, 30.0))
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    if args.wait_calm:
        wait_calm(min(args.wait_calm, 600), args.calm_load)
    try:
        result = bench(settings, profile=args.profile)
    except BenchError as exc:
        print(f"bench_pull: {exc}", file=sys.stderr)
        return 1
    report(render(result), result, "pull" if args.json else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
