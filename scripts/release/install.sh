#!/usr/bin/env bash
# Install or upgrade regproxy from this offline archive; no network is used.
#
#   ./install.sh [--with-bundle FILE]... [--prefix DIR] [--no-systemd] [--python PYTHON]
#   ./install.sh --rollback [--prefix DIR] [--no-systemd]
#
# Creates a virtualenv in /opt/regproxy/<version> from the bundled wheels only, checks the
# config with the new version, imports the bundles, points /opt/regproxy/current at it, installs
# the systemd unit, the sysusers file and (when absent) /etc/regproxy/regproxy.yaml, and starts or
# restarts the service. Config and store are never replaced; the version that was current stays
# for --rollback (and is switched back to by itself when the new one does not start).
#
#   --with-bundle FILE  import an OCI archive / docker-archive (regproxy import) before the start
#   --prefix DIR        install under DIR (DIR/opt, DIR/etc, and DIR/var/lib/regproxy as the
#                       store of a new config): for tests and image builds
#   --no-systemd        no systemctl, systemd-sysusers or runuser (containers, tests); the unit
#                       and sysusers files are still installed
#   --python PYTHON     the interpreter to use (default: python3, python3.12, python3.11 on PATH)
#   --rollback          make the previous version current again (and restart the service)
set -euo pipefail
umask 022  # the venv must be readable by the service's user whatever root's umask is

HERE="$(cd "$(dirname "$0")" && pwd)"
VERSION="$(cat "$HERE/VERSION")"
PREFIX=""
SYSTEMD=1
ROLLBACK=0
PYTHON=""
BUNDLES=()

say() { echo "regproxy install: $*"; }
die() { echo "regproxy install: error: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) [ $# -ge 2 ] || die "--prefix needs a directory"; PREFIX="${2%/}"; shift 2 ;;
    --no-systemd) SYSTEMD=0; shift ;;
    --rollback) ROLLBACK=1; shift ;;
    --python) [ $# -ge 2 ] || die "--python needs a path"; PYTHON="$2"; shift 2 ;;
    --with-bundle) [ $# -ge 2 ] || die "--with-bundle needs a file"; BUNDLES+=("$2"); shift 2 ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done
if [ -n "$PREFIX" ]; then
  mkdir -p "$PREFIX"
  PREFIX="$(cd "$PREFIX" && pwd)"
fi

OPT="$PREFIX/opt/regproxy"
CONF="$PREFIX/etc/regproxy/regproxy.yaml"
UNIT="$PREFIX/etc/systemd/system/regproxy.service"
SYSUSERS="$PREFIX/usr/lib/sysusers.d/regproxy.conf"
STATE="$PREFIX/var/lib/regproxy"

if [ "$SYSTEMD" = 1 ]; then
  [ "$(id -u)" = 0 ] || die "run as root (or with --prefix DIR --no-systemd)"
  [ -d /run/systemd/system ] || die "systemd is not running on this host: use --no-systemd"
fi

# ---------------------------------------------------------------------------------------------
setlink() {  # setlink NAME TARGET: atomically point $OPT/NAME at TARGET (a version directory)
  ln -sfn "$2" "$OPT/.$1.new"
  mv -Tf "$OPT/.$1.new" "$OPT/$1"
}

linked() { [ -L "$OPT/$1" ] && readlink "$OPT/$1" || true; }

service() {  # restart the service on the current version; 0 when it is up
  [ "$SYSTEMD" = 1 ] || return 0
  # 9>&-: the install lock is ours, not for anything systemctl may leave running
  systemctl daemon-reload 9>&-
  systemctl enable --quiet regproxy.service 9>&-
  systemctl restart regproxy.service 9>&-
}

as_service_user() {  # run a command as the service does: its user, its $STATE_DIRECTORY
  if [ "$SYSTEMD" = 1 ]; then
    # StateDirectory=regproxy: the unit's default storage.root, which a plain runuser lacks
    runuser -u regproxy -- env STATE_DIRECTORY="$STATE" "$@"
  else
    "$@"
  fi
}

rollback() {
  local cur prev
  cur="$(linked current)"
  prev="$(linked previous)"
  [ -n "$prev" ] || die "nothing to roll back to: $OPT/previous does not exist"
  [ -x "$OPT/$prev/bin/regproxy" ] || die "$OPT/$prev/bin/regproxy is missing: cannot roll back"
  setlink current "$prev"
  [ -z "$cur" ] || setlink previous "$cur"
  if ! service; then
    die "regproxy $prev did not start after the rollback (journalctl -u regproxy)"
  fi
  say "rolled back from ${cur:-nothing} to $prev (install.sh --rollback again returns to ${cur:-it})"
}

if [ "$ROLLBACK" = 1 ]; then
  mkdir -p "$OPT"
  exec 9>"$OPT/.lock"
  flock -n 9 || die "another install.sh is running ($OPT/.lock)"
  rollback
  exit 0
fi

# --- 1. the archive is whole, and a Python that can run it is here ---------------------------
(cd "$HERE" && sha256sum --quiet --strict -c SHA256SUMS) \
  || die "the archive is damaged (SHA256SUMS does not match); copy it again"

PY=""
find_python() {
  local cands c path out rc ver found=""
  if [ -n "$PYTHON" ]; then cands="$PYTHON"; else cands="python3 python3.12 python3.11"; fi
  for c in $cands; do
    if ! path="$(command -v "$c" 2>/dev/null)"; then
      found="$found  $c: not found"$'\n'
      continue
    fi
    out="$("$path" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3]); import venv' 2>/dev/null)" \
      && rc=0 || rc=$?
    ver="$(printf '%s\n' "$out" | head -n1)"
    case "$ver" in
      3.11.*|3.12.*)
        if [ "$rc" = 0 ]; then PY="$path"; return 0; fi
        found="$found  $path: Python $ver without its venv module"$'\n' ;;
      [0-9]*) found="$found  $path: Python $ver (this archive has wheels for 3.11 and 3.12)"$'\n' ;;
      *) found="$found  $path: does not run"$'\n' ;;
    esac
  done
  echo "regproxy install: error: regproxy $VERSION needs Python 3.11 or 3.12 with its venv module; found:" >&2
  printf '%s' "$found" >&2
  echo "Install it from the host's OS packages (Debian 12, Ubuntu 24.04: apt-get install python3;" >&2
  echo "RHEL/Rocky/Alma 9: dnf install python3.11), or name one with --python PATH." >&2
  exit 1
}
find_python

for b in "${BUNDLES[@]}"; do
  [ -f "$b" ] && [ -r "$b" ] || die "bundle $b: no such readable file"
done

mkdir -p "$OPT"
exec 9>"$OPT/.lock"
flock -n 9 || die "another install.sh is running ($OPT/.lock)"

# --- 2. the new version's virtualenv, from the bundled wheels only ---------------------------
VENV="$OPT/$VERSION"
ASIDE="$OPT/.$VERSION.replaced"
rm -rf "$ASIDE"
if [ -e "$VENV" ]; then mv "$VENV" "$ASIDE"; fi
undo() {  # put back what step 2 moved aside; nothing else was changed yet
  rm -rf "$VENV"
  if [ -e "$ASIDE" ]; then mv "$ASIDE" "$VENV"; fi
}
trap 'undo' EXIT

say "installing regproxy $VERSION with $PY into $VENV"
"$PY" -m venv --without-pip "$VENV"
PIPWHL="$(ls "$HERE"/wheels/pip-*.whl | head -n1)"
"$VENV/bin/python" "$PIPWHL/pip" install --isolated --no-index --find-links "$HERE/wheels" \
  --no-cache-dir --disable-pip-version-check --no-warn-script-location -q "regproxy==$VERSION" \
  || die "pip could not install regproxy $VERSION from $HERE/wheels (nothing was changed)"
REGPROXY="$VENV/bin/regproxy"

# --- 3. user, unit, config (a config that is there is kept) -----------------------------------
install -D -m 0644 "$HERE/systemd/regproxy.sysusers" "$SYSUSERS"
if [ "$SYSTEMD" = 1 ]; then
  systemd-sysusers "$SYSUSERS" 2>/dev/null \
    || id regproxy >/dev/null 2>&1 \
    || useradd --system --home-dir /var/lib/regproxy --shell /usr/sbin/nologin regproxy \
    || die "could not create the system user regproxy"
fi
if [ ! -e "$CONF" ]; then
  install -d -m 0755 "$(dirname "$CONF")"
  if [ -n "$PREFIX" ]; then
    sed "s|^  # root: /var/lib/regproxy\$|  root: $STATE|" "$HERE/config/regproxy.yaml" > "$CONF.new"
  else
    cp "$HERE/config/regproxy.yaml" "$CONF.new"
  fi
  chmod 0640 "$CONF.new"
  if [ "$SYSTEMD" = 1 ]; then chgrp regproxy "$CONF.new"; fi
  mv "$CONF.new" "$CONF"
  say "installed the default config $CONF"
else
  say "keeping the config $CONF"
fi
if ! err="$("$REGPROXY" --config "$CONF" check-config 2>&1 >/dev/null)"; then
  die "regproxy $VERSION does not accept $CONF: $err (nothing was changed)"
fi
if [ "$SYSTEMD" = 1 ]; then
  install -d -m 0750 -o regproxy -g regproxy "$STATE"
fi

# --- 4. content the host comes up with: imported before the service (re)starts ----------------
for b in "${BUNDLES[@]}"; do
  say "importing $b"
  as_service_user "$REGPROXY" --config "$CONF" import "$b" \
    || die "importing $b failed (regproxy $VERSION was not made current)"
done

# --- 5. switch: current -> this version, previous -> the one it replaces ----------------------
mkdir -p "$(dirname "$UNIT")"
sed "s|^ExecStart=[^ ]*regproxy |ExecStart=$OPT/current/bin/regproxy |; s|/etc/regproxy/regproxy.yaml|$CONF|" \
  "$HERE/systemd/regproxy.service" > "$UNIT.new"
mv "$UNIT.new" "$UNIT"
OLD="$(linked current)"
trap - EXIT
rm -rf "$ASIDE"
setlink current "$VERSION"
if [ -n "$OLD" ] && [ "$OLD" != "$VERSION" ]; then setlink previous "$OLD"; fi

if ! service; then
  if [ -n "$OLD" ] && [ "$OLD" != "$VERSION" ]; then
    setlink current "$OLD"
    setlink previous "$VERSION"
    service || true
    die "regproxy $VERSION did not start (journalctl -u regproxy); switched back to $OLD"
  fi
  die "regproxy $VERSION did not start (journalctl -u regproxy)"
fi

# --- 6. keep the current and the previous version, nothing older ------------------------------
PREV="$(linked previous)"
for d in "$OPT"/*/; do
  d="${d%/}"
  [ -L "$d" ] && continue  # current, previous
  v="$(basename "$d")"
  if [ "$v" != "$VERSION" ] && [ "$v" != "$PREV" ] && [ -x "$d/bin/regproxy" ]; then
    rm -rf "$d"
    say "removed regproxy $v (neither current nor previous)"
  fi
done

say "regproxy $VERSION is current in $OPT (previous: ${PREV:-none}); config $CONF"
if [ "$SYSTEMD" = 1 ]; then
  say "service regproxy.service (re)started: systemctl status regproxy"
else
  say "start it with: $OPT/current/bin/regproxy --config $CONF serve"
fi
