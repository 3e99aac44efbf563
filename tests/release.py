"""Helpers of the release tests: build the offline archive, unpack it, find interpreters.

``scripts/build-release.sh`` needs the package index only while its wheel cache
(``~/.cache/regproxy-release-wheels``) is cold: an unreachable index then FAILS the tests that
use the ``release_builds`` fixture; they never skip.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest

import regproxy
from tests.images import Image, make_image, write_layout
from tests.peers import REPO_ROOT, skopeo

BUILD = REPO_ROOT / "scripts" / "build-release.sh"
VERSION = regproxy.__version__
NEWER = f"{VERSION}.post1"  # the "next release": same tree, built with --version
IMAGE = "docker.io/team/app:v1"
PORT = 30003  # the real port: the namespace has nothing else listening
#: what install.sh sees: a plain host's PATH and nothing of this machine's pip config
HOST_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
}


def run(cmd: list[str], timeout: float = 300, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, **kw)


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, (
        f"{proc.args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    )
    return proc.stdout


@dataclass
class Builds:
    first: Path  # VERSION
    again: Path  # VERSION, built a second time from the same cache
    newer: Path  # NEWER


def build(out: Path, *args: str) -> Path:
    """One build; with a cold cache it downloads (and fails if the index is unreachable)."""
    proc = run([str(BUILD), "--out", str(out), *args], timeout=600, cwd=REPO_ROOT)
    ok(proc)
    return Path(proc.stdout.strip().splitlines()[-1])


def make_builds(tmp_path_factory: pytest.TempPathFactory) -> Builds:
    """What the ``release_builds`` fixture (tests/conftest.py) gives, once per session."""
    root = tmp_path_factory.mktemp("release")
    return Builds(
        first=build(root / "a"),
        again=build(root / "b"),
        newer=build(root / "c", "--version", NEWER),
    )


def unpack(archive: Path, into: Path) -> Path:
    into.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="tar")
    (top,) = into.iterdir()
    return top


def python(minor: int) -> str | None:
    """A CPython 3.<minor> on this machine (Debian's, else pyenv's), or None."""
    cands = [shutil.which(f"python3.{minor}") or "", f"/usr/bin/python3.{minor}"]
    cands += sorted(
        glob.glob(os.path.expanduser(f"~/.pyenv/versions/3.{minor}.*/bin/python3.{minor}"))
    )
    probe = "import sys, venv; print(sys.version_info[1])"
    for c in cands:
        if c and os.access(c, os.X_OK) and run([c, "-c", probe]).stdout.strip() == str(minor):
            return c
    return None


def make_bundle(tmp: Path) -> tuple[Image, Path]:
    """A one-image OCI archive (what --with-bundle takes) naming IMAGE, made by skopeo."""
    img = make_image(layer_sizes=(300_000,))
    write_layout(tmp / "layout", {"v1": img})
    bundle = tmp / "bundle.tar"
    skopeo("copy", f"oci:{tmp / 'layout'}:v1", f"oci-archive:{bundle}:{IMAGE}")
    return img, bundle
