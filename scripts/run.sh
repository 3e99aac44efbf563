#!/usr/bin/env bash
# Set up regproxy in a virtualenv (.venv) and run the daemon on the shipped default config.
# Works as a normal user: the store then goes to ~/.local/state/regproxy. Extra args go to serve.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/regproxy ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check .
fi
exec .venv/bin/regproxy --config "${REGPROXY_CONFIG:-config/regproxy.yaml}" serve "$@"
