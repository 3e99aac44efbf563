#!/usr/bin/env bash
# Build the offline release archive: dist/regproxy-<version>-linux-x86_64.tar.gz
#
# It holds regproxy's wheel and every dependency as wheels for CPython 3.11 and 3.12 on x86_64
# Linux (manylinux2014), pip's own wheel (install.sh needs no pip on the host), the systemd unit
# and sysusers file, the default config, install.sh, uninstall.sh, the licences of everything
# bundled and a SHA256SUMS. README.md, "Install on a host without internet", tells how to use it.
#
# Reproducible: the same checkout, constraints file and SOURCE_DATE_EPOCH (default: the commit
# time of HEAD) give the same archive bytes. Versions come from scripts/release/constraints.txt
# (also the build backend's); --update-constraints resolves the newest and rewrites that file.
#
# Downloads are cached (REGPROXY_WHEEL_CACHE, default ~/.cache/regproxy-release-wheels): with a
# warm cache the build needs no network at all; with a cold one it needs the package index.
#
#   scripts/build-release.sh [--out DIR] [--version V] [--update-constraints]
#     --out DIR      where the archive goes (default: dist/)
#     --version V    build as version V (a test's "newer release"; the checkout is not changed)
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
OUT="$REPO/dist"
VERSION=""
UPDATE=0
PYTHONS="3.11 3.12"
PLATFORM="manylinux2014_x86_64"
CONSTRAINTS="$REPO/scripts/release/constraints.txt"
CACHE="${REGPROXY_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/regproxy-release-wheels}"
PY="${PYTHON:-python3}"

die() { echo "build-release: $*" >&2; exit 1; }
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="$(mkdir -p "$2" && cd "$2" && pwd)"; shift 2 ;;
    --version) VERSION="$2"; shift 2 ;;
    --update-constraints) UPDATE=1; shift ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done

if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
  SOURCE_DATE_EPOCH="$(git -C "$REPO" log -1 --format=%ct 2>/dev/null || echo 315532800)"
fi
export SOURCE_DATE_EPOCH
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
umask 022

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$CACHE"

# --- the source: the checkout's tracked and new files (no build/ or egg-info leftovers) ---
SRC="$WORK/src"
mkdir -p "$SRC"
if git -C "$REPO" rev-parse --git-dir >/dev/null 2>&1; then
  (cd "$REPO" && git ls-files -z -co --exclude-standard | xargs -0 -r sh -c \
    'for f; do [ -e "$f" ] && printf "%s\0" "$f"; done' sh | tar -c --null -T - -f -) | tar -x -C "$SRC" -f -
else
  (cd "$REPO" && tar -c -f - pyproject.toml README.md regproxy config systemd scripts) | tar -x -C "$SRC" -f -
fi
chmod -R u+rwX,go+rX,go-w "$SRC"
if [ -n "$VERSION" ]; then
  sed -i "s/^__version__ = .*/__version__ = \"$VERSION\"/" "$SRC/regproxy/__init__.py"
fi
VERSION="$("$PY" -c 'import ast,sys; t=ast.parse(open(sys.argv[1]).read()); print(next(n.value.value for n in t.body if isinstance(n, ast.Assign) and n.targets[0].id == "__version__"))' "$SRC/regproxy/__init__.py")"
NAME="regproxy-$VERSION-linux-x86_64"

# --- constraints: pinned versions of every dependency, pip and the build backend ---
download() {  # download PYVER DEST [pip args...]: binary wheels for CPython PYVER on x86_64
  local pyver="$1" dest="$2"; shift 2
  "$PY" -m pip download -q --only-binary=:all: --platform "$PLATFORM" --implementation cp \
    --python-version "$pyver" -d "$dest" "$@"
}
name_version() { for f in "$@"; do basename "$f" | cut -d- -f1,2 | sed 's/-/==/'; done; }

if [ "$UPDATE" = 1 ]; then
  echo "build-release: resolving the newest versions (needs the package index)"
  mkdir -p "$WORK/resolve" "$WORK/newest-backend"
  "$PY" -m pip download -q --no-deps --only-binary=:all: -d "$WORK/newest-backend" setuptools
  backend="$(name_version "$WORK"/newest-backend/*.whl)"
  echo "$backend" > "$WORK/backend.txt"
  PIP_CONSTRAINT="$WORK/backend.txt" "$PY" -m pip wheel -q --no-deps -w "$WORK/rp" "$SRC"
  for pyver in $PYTHONS; do
    download "$pyver" "$WORK/resolve/$pyver" "$WORK"/rp/regproxy-*.whl pip
  done
  rm -f "$WORK"/rp/*.whl
  {
    echo "# Versions bundled by scripts/build-release.sh (dependencies, pip, build backend)."
    echo "# Regenerate with: scripts/build-release.sh --update-constraints"
    { name_version "$WORK"/resolve/*/*.whl | grep -v '^regproxy=='; echo "$backend"; } | sort -u -f
  } > "$WORK/constraints.txt"
  dupes="$(grep -v '^#' "$WORK/constraints.txt" | cut -d= -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)"
  [ -z "$dupes" ] || die "3.11 and 3.12 resolve different versions of: $dupes"
  cp "$WORK/constraints.txt" "$CONSTRAINTS"
  echo "build-release: wrote $CONSTRAINTS"
fi
[ -f "$CONSTRAINTS" ] || die "$CONSTRAINTS is missing (run with --update-constraints)"
export PIP_CONSTRAINT="$CONSTRAINTS"

# --- the build backend, pinned, unpacked once into the cache ---
BACKEND="$(grep -i '^setuptools==' "$CONSTRAINTS")" || die "no setuptools== line in $CONSTRAINTS"
BACKEND_DIR="$CACHE/backend-${BACKEND#*==}"
if [ ! -f "$BACKEND_DIR/.complete" ]; then
  echo "build-release: fetching $BACKEND into $CACHE"
  rm -rf "$BACKEND_DIR"
  "$PY" -m pip install -q --root-user-action=ignore --no-deps --only-binary=:all: --target "$BACKEND_DIR" "$BACKEND" \
    || die "cannot download $BACKEND (is the package index reachable?)"
  touch "$BACKEND_DIR/.complete"
fi

# --- regproxy's own wheel: the PEP 517 hook of that backend alone (-S: nothing else on the
# path), file times from SOURCE_DATE_EPOCH ---
mkdir -p "$WORK/rp"
(cd "$SRC" && "$PY" -S -c 'import sys; sys.path.insert(0, sys.argv[1])
import setuptools.build_meta as backend
backend.build_wheel(sys.argv[2])' "$BACKEND_DIR" "$WORK/rp" >"$WORK/backend.log" 2>&1) \
  || { cat "$WORK/backend.log" >&2; die "building regproxy's wheel failed"; }
RPWHEEL="$(ls "$WORK"/rp/regproxy-*.whl)"

STAGE="$WORK/$NAME"
mkdir -p "$STAGE/wheels"
for pyver in $PYTHONS; do
  # regproxy is given as its file: never resolved from an index (a namesake there is not ours)
  if ! download "$pyver" "$WORK/dl-$pyver" --isolated --no-index --find-links "$CACHE" \
      -c "$CONSTRAINTS" "$RPWHEEL" pip >/dev/null 2>&1; then
    echo "build-release: fetching wheels for CPython $pyver into $CACHE"
    download "$pyver" "$CACHE" -c "$CONSTRAINTS" "$RPWHEEL" pip \
      || die "cannot download the wheels for CPython $pyver (is the package index reachable?)"
    rm -f "$CACHE"/regproxy-*.whl
    download "$pyver" "$WORK/dl-$pyver" --isolated --no-index --find-links "$CACHE" \
      -c "$CONSTRAINTS" "$RPWHEEL" pip
  fi
  cp "$WORK/dl-$pyver"/*.whl "$STAGE/wheels/"
done
for f in "$STAGE"/wheels/*.whl; do
  n="$(basename "$f" | cut -d- -f1 | tr 'A-Z-' 'a-z_')"
  [ "$n" = regproxy ] || grep -qi "^$(basename "$f" | cut -d- -f1)==" "$CONSTRAINTS" \
    || echo "build-release: WARNING: $(basename "$f") is not pinned in $CONSTRAINTS (run --update-constraints)" >&2
done

# --- the rest of the archive ---
install -m 0755 "$SRC/scripts/release/install.sh" "$SRC/scripts/release/uninstall.sh" "$STAGE/"
install -D -m 0644 "$SRC/systemd/regproxy.service" "$STAGE/systemd/regproxy.service"
install -D -m 0644 "$SRC/systemd/regproxy.sysusers" "$STAGE/systemd/regproxy.sysusers"
install -D -m 0644 "$SRC/config/regproxy.yaml" "$STAGE/config/regproxy.yaml"
install -m 0644 "$SRC/README.md" "$STAGE/README.md"
echo "$VERSION" > "$STAGE/VERSION"
"$PY" "$SRC/scripts/release/licenses.py" "$STAGE/wheels" "$STAGE/licenses"
(cd "$STAGE" && find . -type f ! -name SHA256SUMS -printf '%P\n' | LC_ALL=C sort \
  | xargs -d '\n' sha256sum > SHA256SUMS)
find "$STAGE" -type d -exec chmod 0755 {} +
find "$STAGE" -type f ! -name '*.sh' -exec chmod 0644 {} +

mkdir -p "$OUT"
tar -C "$WORK" --sort=name --mtime="@$SOURCE_DATE_EPOCH" --owner=0 --group=0 --numeric-owner \
  --format=gnu -cf - "$NAME" | gzip -n -9 > "$OUT/$NAME.tar.gz.tmp"
mv "$OUT/$NAME.tar.gz.tmp" "$OUT/$NAME.tar.gz"
echo "$OUT/$NAME.tar.gz"
