"""Import of a large bundle: peak RSS and rate of ``regproxy import`` (issue: air-gapped content).

Builds an OCI archive holding one image with a layer of ``--mib`` MiB of random bytes (streamed
to disk, never held in memory), imports it into a fresh store with ``regproxy import`` in a child
process, and prints the child's peak RSS (ru_maxrss) and the import rate; then imports it again
(idempotent: nothing new). Goal: peak RSS under 150 MB for a 1 GiB bundle.

    python -m benchmarks.bench_import            # 1 GiB
    python -m benchmarks.bench_import --mib 256  # smaller
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHUNK = 1 << 20


def build_bundle(out: Path, mib: int) -> None:
    """An OCI archive with one image: a random layer of ``mib`` MiB, streamed."""
    work = out.parent / "layer.bin"
    h = hashlib.sha256()
    with open(work, "wb") as f:
        for _ in range(mib):
            b = os.urandom(CHUNK)
            h.update(b)
            f.write(b)
    layer = "sha256:" + h.hexdigest()
    cfg = json.dumps(
        {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [layer]}}
    ).encode()
    cfg_d = "sha256:" + hashlib.sha256(cfg).hexdigest()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": cfg_d,
                "size": len(cfg),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": layer,
                    "size": mib * CHUNK,
                }
            ],
        }
    ).encode()
    m_d = "sha256:" + hashlib.sha256(manifest).hexdigest()
    index = json.dumps(
        {
            "schemaVersion": 2,
            "manifests": [
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": m_d,
                    "size": len(manifest),
                    "annotations": {"org.opencontainers.image.ref.name": "docker.io/bench/big:1"},
                }
            ],
        }
    ).encode()
    import io

    with tarfile.open(out, "w") as tar:

        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        add("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        tar.add(work, arcname=f"blobs/sha256/{layer[7:]}")
        add(f"blobs/sha256/{cfg_d[7:]}", cfg)
        add(f"blobs/sha256/{m_d[7:]}", manifest)
        add("index.json", index)
    work.unlink()


def run_import(cfg: Path, bundle: Path) -> tuple[float, float, float, str]:
    """(seconds, peak RSS MB of the child, its CPU seconds, its summary line)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    before = usage.ru_maxrss
    cpu_before = usage.ru_utime + usage.ru_stime
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "regproxy", "--config", str(cfg), "import", str(bundle)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO,
        check=True,
    )
    secs = time.monotonic() - t0
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    peak = usage.ru_maxrss  # KiB, max over children
    if peak <= before:
        print("  (ru_maxrss did not grow: the figure is a previous child's maximum)")
    cpu = usage.ru_utime + usage.ru_stime - cpu_before  # the child's, all its threads
    return secs, peak / 1024, cpu, proc.stdout.strip().splitlines()[0]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=1024, help="layer size in MiB (default 1024)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-import-") as tmp:
        root = Path(tmp)
        bundle = root / "bundle.tar"
        print(f"building a {args.mib} MiB bundle ...")
        build_bundle(bundle, args.mib)
        cfg = root / "cfg.yaml"
        cfg.write_text(
            f"storage: {{root: {root / 'store'}}}\ncontent: {{sync: {{enable: false}}}}\n"
        )
        secs, rss, cpu, summary = run_import(cfg, bundle)
        size = bundle.stat().st_size
        print(
            f"import:  {secs:6.1f} s  {size / secs / 2**20:7.0f} MiB/s  peak RSS {rss:6.1f} MB  "
            f"CPU {cpu / (size / 2**30):.2f} s/GiB (start-up included) | {summary}"
        )
        secs2, _, _, summary2 = run_import(cfg, bundle)
        print(f"again:   {secs2:6.1f} s  (idempotent)                    | {summary2}")
        ok = rss < 150
        print(f"goal: peak RSS < 150 MB for the bundle: {'ok' if ok else 'MISS'} ({rss:.1f} MB)")
        return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
