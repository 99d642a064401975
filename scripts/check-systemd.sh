#!/usr/bin/env bash
# Verifies systemd/modehub.service with systemd-analyze: `verify` must be clean, and
# `security` prints the exposure score (lower is better; the unit aims for < 2.5 "OK").
# Installs Debian's `systemd` package if systemd-analyze is missing. Needs no running systemd.
#   scripts/check-systemd.sh [--max-exposure N]   (fail if the score is above N; default 2.5)
set -euo pipefail
cd "$(dirname "$0")/.."
max="2.5"
[ "${1:-}" = "--max-exposure" ] && max="$2"
if ! command -v systemd-analyze >/dev/null; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq systemd
fi
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
# verify wants the ExecStart binary to exist; point a copy of the unit at a stand-in.
mkdir -p "$work/bin"; printf '#!/bin/sh\n' > "$work/bin/modehub"; chmod +x "$work/bin/modehub"
sed "s#/usr/local/bin/modehub#$work/bin/modehub#g" systemd/modehub.service > "$work/modehub.service"

echo "== systemd-analyze verify"
out=$(systemd-analyze verify "$work/modehub.service" 2>&1 || true)
# Lines about other units on this machine (or the missing system bus in a container) are not ours.
ours=$(printf '%s\n' "$out" | grep -i "modehub" || true)
if [ -n "$ours" ]; then
  printf '%s\n' "$ours"
  echo "FAIL: systemd-analyze verify reported problems in modehub.service" >&2
  exit 1
fi
echo "clean"

echo "== systemd-analyze security (offline)"
sec=$(systemd-analyze security --offline=yes "$work/modehub.service" 2>&1 || true)
printf '%s\n' "$sec" | grep -E '^ *✗' | sed 's/^/  /' | head -40 || true
score=$(printf '%s\n' "$sec" | grep -oE 'exposure level for .*: [0-9.]+' | grep -oE '[0-9.]+$' | tail -1)
level=$(printf '%s\n' "$sec" | grep -oE 'exposure level for .*' | tail -1)
echo "$level"
[ -n "$score" ] || { echo "FAIL: no score from systemd-analyze security" >&2; exit 1; }
awk -v s="$score" -v m="$max" 'BEGIN { exit !(s <= m) }' || {
  echo "FAIL: exposure $score is above $max" >&2; exit 1; }
echo "systemd unit OK (exposure $score <= $max)"
