#!/usr/bin/env bash
# Remove regproxy installed by install.sh: the service, the unit, the sysusers file and
# /opt/regproxy. The config (/etc/regproxy) and the store (/var/lib/regproxy) stay unless
# --purge is given; the system user stays (remove it with userdel regproxy if you want).
#
#   ./uninstall.sh [--prefix DIR] [--no-systemd] [--purge]
set -euo pipefail

PREFIX=""
SYSTEMD=1
PURGE=0
say() { echo "regproxy uninstall: $*"; }
die() { echo "regproxy uninstall: error: $*" >&2; exit 1; }
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) [ $# -ge 2 ] || die "--prefix needs a directory"; PREFIX="${2%/}"; shift 2 ;;
    --no-systemd) SYSTEMD=0; shift ;;
    --purge) PURGE=1; shift ;;
    -h|--help) sed -n '2,6p' "$0"; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done

OPT="$PREFIX/opt/regproxy"
UNIT="$PREFIX/etc/systemd/system/regproxy.service"
if [ "$SYSTEMD" = 1 ]; then
  [ "$(id -u)" = 0 ] || die "run as root (or with --prefix DIR --no-systemd)"
  if [ -d /run/systemd/system ]; then
    systemctl disable --now --quiet regproxy.service 2>/dev/null || true
  fi
fi
rm -f "$UNIT" "$PREFIX/usr/lib/sysusers.d/regproxy.conf"
if [ "$SYSTEMD" = 1 ] && [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
rm -rf "$OPT"
say "removed $OPT, the unit and the sysusers file"
if [ "$PURGE" = 1 ]; then
  rm -rf "$PREFIX/etc/regproxy" "$PREFIX/var/lib/regproxy"
  say "purged $PREFIX/etc/regproxy and $PREFIX/var/lib/regproxy"
else
  say "kept the config $PREFIX/etc/regproxy and the store $PREFIX/var/lib/regproxy (--purge removes them)"
fi
