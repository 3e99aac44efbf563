#!/usr/bin/env bash
# Install what the tests need (Debian peers, Python deps) and run the whole suite.
# Used by README ("run the tests") and by .ci/run. Needs root (or sudo) for apt-get.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
PKGS="docker-registry skopeo containerd apache2-utils systemd ca-certificates openssl zstd curl chromium chromium-driver iproute2 prometheus"
missing=""
for p in $PKGS; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends $missing
fi

python3 -m pip install -q --disable-pip-version-check -e '.[test]'
ruff check regproxy tests benchmarks
ruff format --check regproxy tests benchmarks
mypy
python3 -m pytest "$@"
