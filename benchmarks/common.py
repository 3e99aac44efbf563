"""What bench_serve and bench_pull share: plain HTTP, tool checks, wrk runs, /proc figures,
the machine summary and the report's printing."""

from __future__ import annotations

import http.client
import json
import os
import platform
import shutil
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
KiB, MiB, GiB = 1024, 1024 * 1024, 1024 * 1024 * 1024
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"

# wrk prints one JSON line at the end of a run (latencies in microseconds).
WRK_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '\\nBENCH {"requests":%d,"bytes":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,' ..
    '"max_us":%d,"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}\\n',
    summary.requests, summary.bytes, summary.duration,
    latency:percentile(50), latency:percentile(99), latency.max,
    e.connect, e.read, e.write, e.status, e.timeout))
end
"""


class BenchError(RuntimeError):
    pass


def request(
    port: int,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    timeout: float = 300,
    tls: ssl.SSLContext | None = None,
) -> tuple[int, http.client.HTTPMessage, bytes]:
    conn = (
        http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        if tls is None
        else http.client.HTTPSConnection("127.0.0.1", port, timeout=timeout, context=tls)
    )
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()
    finally:
        conn.close()


def push_blob(
    port: int, repo: str, digest: str, body: bytes | Path, tls: ssl.SSLContext | None = None
) -> None:
    """POST then PUT ?digest= with the whole body (a file is streamed): what every registry
    accepts."""
    status, headers, text = request(port, "POST", f"/v2/{repo}/blobs/uploads/", tls=tls)
    if status != 202:
        raise BenchError(f"POST upload on :{port} answered {status}: {text[:200]!r}")
    location = headers.get("Location") or headers.get("location") or ""
    if location.startswith("http"):
        location = "/" + location.split("/", 3)[3]
    sep = "&" if "?" in location else "?"
    url = f"{location}{sep}digest={digest}"
    if isinstance(body, Path):
        size = body.stat().st_size
        with open(body, "rb") as f:
            status, _, text = request(
                port,
                "PUT",
                url,
                body=f,
                headers={"Content-Length": str(size), "Content-Type": "application/octet-stream"},
                tls=tls,
            )
    else:
        status, _, text = request(
            port,
            "PUT",
            url,
            body=body,
            headers={"Content-Type": "application/octet-stream"},
            tls=tls,
        )
    if status != 201:
        raise BenchError(f"PUT upload on :{port} answered {status}: {text[:200]!r}")


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM (``5`` > clear_refs, Linux >= 4.0; needs to own the process)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def check_tools(prog: str, tools: dict[str, str]) -> None:
    """Exit with an install hint when a tool (key) is not on PATH; values are Debian packages."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise SystemExit(
            f"{prog}: missing {', '.join(missing)} on PATH; install with "
            f"`apt-get install -y {' '.join(tools[t] for t in missing)}` (Debian) and run again"
        )


def status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise BenchError(f"no {key} in /proc/{pid}/status")


def peak_rss_mb(pid: int) -> float:
    return status_kb(pid, "VmHWM") / 1024


def run_wrk(
    url: str,
    concurrency: int,
    seconds: float,
    headers: dict[str, str],
    script: Path,
    env: dict[str, str] | None = None,
) -> dict[str, float]:
    """One wrk run with ``script`` = WRK_DONE; any error counted by wrk is a BenchError.
    ``env``: added to wrk's environment (:meth:`TestCA.go_order_env`)."""
    cmd = ["wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s"]
    cmd += ["--timeout", "5s", "--latency", "-s", str(script)]
    for k, v in headers.items():
        cmd += ["-H", f"{k}: {v}"]
    cmd.append(url)
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=seconds + 30,
        check=False,
        env={**os.environ, **env} if env else None,
    )
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH ")), None)
    if proc.returncode != 0 or line is None:
        raise BenchError(f"wrk failed ({proc.returncode}): {proc.stdout}\n{proc.stderr}")
    r = json.loads(line[len("BENCH ") :])
    errors = r["connect"] + r["read"] + r["write"] + r["status"] + r["timeout"]
    if errors or not r["requests"]:
        raise BenchError(f"wrk saw errors against {url}: {r}")
    secs = r["duration_us"] / 1e6
    return {
        "req_s": r["requests"] / secs,
        "gb_s": r["bytes"] / secs / 1e9,
        "p50_ms": r["p50_us"] / 1000,
        "p99_ms": r["p99_us"] / 1000,
        "max_ms": r["max_us"] / 1000,
        "requests": r["requests"],
        "bytes": r["bytes"],
        "seconds": secs,
    }


@dataclass(frozen=True)
class TestCA:
    """A throw-away CA and a server certificate for 127.0.0.1 signed by it (made by openssl)."""

    ca: Path
    cert: Path
    key: Path

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))

    def go_order_env(self) -> dict[str, str]:
        """The environment that makes an OpenSSL client (wrk, curl) offer the TLS 1.3 suites in
        the order Go clients (containerd, skopeo) do on hosts with AES instructions: AES-128-GCM
        first. OpenSSL's own order starts with AES-256-GCM; a server that follows the client's
        order (regproxy) would then spend ~45% more on encryption than for its real clients."""
        return {"OPENSSL_CONF": str(self.cert.parent / "go-order.cnf")}


def make_test_ca(directory: Path) -> TestCA:
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = directory / "ca.pem", directory / "ca.key"
    cert, key, csr = directory / "server.pem", directory / "server.key", directory / "server.csr"
    ext = directory / "server.ext"
    ext.write_text(
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
        "keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n"
    )
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    signed = ["-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial", "-days", "2"]
    steps = [
        ["req", "-x509", *ec, "-days", "2", "-subj", "/CN=regproxy bench CA", "-keyout"],
        ["req", *ec, "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(csr)],
        ["x509", "-req", "-in", str(csr), *signed, "-extfile", str(ext), "-out", str(cert)],
    ]
    steps[0] += [str(ca_key), "-out", str(ca)]
    for args in steps:
        proc = subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise BenchError(f"openssl {args[0]} failed: {proc.stderr.strip()}")
    (directory / "go-order.cnf").write_text(GO_ORDER_CNF)
    return TestCA(ca, cert, key)


#: the TLS 1.3 suites in the order Go clients offer them on hosts with AES instructions
GO_SUITES = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
#: an OpenSSL configuration for clients: TLS 1.3 suites in Go's order (see TestCA.go_order_env)
GO_ORDER_CNF = f"""openssl_conf = default_conf
[default_conf]
ssl_conf = ssl_sect
[ssl_sect]
system_default = system_default_sect
[system_default_sect]
Ciphersuites = {GO_SUITES}
"""


_TICK: float = 1.0 / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) the process has used so far, all its threads included (the
    thread group's figures in ``/proc/PID/stat``), plus that of its waited-for children."""
    # the command name (field 2) may hold spaces and parentheses: split after its last ")"
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state): utime, stime, cutime, cstime are fields 14-17
    return sum(int(f) for f in fields[11:15]) * _TICK


class CpuMeter:
    """CPU seconds of some processes over a stretch of time: ``start()``, then ``used()``."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = dict(pids)
        self._at: dict[str, float] = {}

    def start(self) -> CpuMeter:
        self._at = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        return self

    def used(self) -> dict[str, float]:
        return {name: cpu_seconds(pid) - self._at[name] for name, pid in self.pids.items()}


def with_keys(config: dict[str, Any], keys: dict[str, str]) -> dict[str, Any]:
    """``config`` with dotted ``keys`` set (``storage.drop_behind_above``)."""
    for dotted, value in keys.items():
        *path, last = dotted.split(".")
        at = config
        for part in path:
            at = at.setdefault(part, {})
        at[last] = value
    return config


def load_1m() -> float:
    return round(os.getloadavg()[0], 2)


def run_summary(started_at: float, load_start: float) -> dict[str, Any]:
    """The head of a result: load average at start/end, when, how long, which machine."""
    return {
        "loadavg_1m_start_end": [load_start, load_1m()],
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started_at)),
        "seconds": round(time.time() - started_at, 1),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "kernel": platform.release(),
        },
    }


def print_log_tails(logs: dict[str, str]) -> None:
    """The last 2000 characters of each server's log (name -> whole log) on stderr."""
    for name, log in logs.items():
        tail = log[-2000:]
        if tail:
            print(f"--- {name} log (tail) ---\n{tail}", file=sys.stderr)


def report(text: str, result: dict[str, Any], json_prefix: str | None) -> None:
    """Print the rendered report; with a prefix also write the result to RESULTS_DIR."""
    print()
    print(text)
    if json_prefix is not None:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        out = RESULTS_DIR / f"{json_prefix}-{time.strftime('%Y%m%d-%H%M%S')}.json"
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {out}")
