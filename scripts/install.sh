#!/usr/bin/env bash
# Installs modehub as a systemd service on a Raspberry Pi (or any Debian-like system).
#
#   sudo scripts/install.sh [BINARY]     # BINARY: default dist/modehub-<this machine's target>
#   sudo scripts/install.sh --uninstall  # removes the service and binary; keeps config and data
#
# What it does (and nothing else):
#   /usr/local/bin/modehub                   the binary (0755 root)
#   system user and group `modehub`, member of `dialout` (serial ports); no login shell, no home
#   /etc/modehub/                            0755 root:root
#   /etc/modehub/config.toml                 0640 root:modehub, from config/modehub.example.toml
#                                            ONLY if absent: an existing config is never touched
#   /etc/modehub/config.toml.example         the current example, for comparing after upgrades
#   /etc/modehub/keys/                       0700 modehub:modehub; existing key files -> 0600 modehub
#   /var/lib/modehub/                        0700 modehub:modehub (hub.db; systemd keeps it so)
#   /etc/systemd/system/modehub.service      0644, then daemon-reload + enable (not start)
# Re-running it upgrades the binary and unit in place. ROOT=/some/dir installs into a staging
# tree instead of / (for packaging and for testing this script).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="${ROOT:-}"
[ "$(id -u)" -eq 0 ] || { echo "error: run as root: sudo $0 $*" >&2; exit 1; }
BIN_DST="$ROOT/usr/local/bin/modehub"
UNIT_DST="$ROOT/etc/systemd/system/modehub.service"
systemd_running() { [ -z "$ROOT" ] && [ -d /run/systemd/system ]; }

if [ "${1:-}" = "--uninstall" ]; then
  if systemd_running; then systemctl disable --now modehub.service || true; fi
  rm -f "$UNIT_DST" "$BIN_DST"
  if systemd_running; then systemctl daemon-reload; fi
  echo "modehub removed. Kept: $ROOT/etc/modehub (config, keys) and $ROOT/var/lib/modehub (data)."
  echo "Delete them and the 'modehub' user yourself if you want them gone."
  exit 0
fi

bin="${1:-}"
if [ -z "$bin" ]; then
  case "$(uname -m)" in
    aarch64|arm64) cands="aarch64-unknown-linux-gnu aarch64-unknown-linux-musl" ;;
    armv7l|armv8l) cands="armv7-unknown-linux-gnueabihf armv7-unknown-linux-musleabihf armv7-unknown-linux-gnueabihf.2.28" ;;
    x86_64) cands="x86_64-unknown-linux-gnu" ;;
    *) cands="" ;;
  esac
  for t in $cands; do [ -x "dist/modehub-$t" ] && { bin="dist/modehub-$t"; break; }; done
  [ -n "$bin" ] || [ ! -x target/release/modehub ] || bin=target/release/modehub
  [ -n "$bin" ] || { echo "error: no binary for $(uname -m) in dist/; build one (scripts/build-pi.sh) or pass its path" >&2; exit 1; }
fi
[ -x "$bin" ] || { echo "error: $bin is not an executable file" >&2; exit 1; }
if [ -z "$ROOT" ]; then
  "$bin" --version >/dev/null 2>&1 || {
    echo "error: $bin does not run on this machine ($(uname -m)); wrong target? For Pi OS older than Bookworm use a musl build." >&2
    exit 1
  }
fi

user_args=()
[ -n "$ROOT" ] && user_args=(--root "$ROOT")
getent_in_root() { # db name
  if [ -n "$ROOT" ]; then grep -q "^$2:" "$ROOT/etc/$1"; else getent "$1" "$2" >/dev/null; fi
}
getent_in_root group modehub || groupadd "${user_args[@]}" --system modehub
getent_in_root group dialout || groupadd "${user_args[@]}" --system dialout
if ! getent_in_root passwd modehub; then
  useradd "${user_args[@]}" --system --gid modehub --groups dialout \
    --home-dir /var/lib/modehub --no-create-home --shell /usr/sbin/nologin \
    --comment "modehub edge gateway" modehub
else
  usermod "${user_args[@]}" -a -G dialout modehub
fi

# Numeric ids, so that a ROOT staging tree's own user database is used.
uid=$(awk -F: '$1=="modehub" { print $3 }' "$ROOT/etc/passwd")
gid=$(awk -F: '$1=="modehub" { print $3 }' "$ROOT/etc/group")

install -D -m 0755 -o root -g root "$bin" "$BIN_DST"
install -d -m 0755 -o root -g root "$ROOT/etc/modehub"
install -d -m 0700 -o "$uid" -g "$gid" "$ROOT/etc/modehub/keys"
for k in "$ROOT"/etc/modehub/keys/*; do
  [ -f "$k" ] || continue
  chown "$uid:$gid" "$k"; chmod 0600 "$k"
done
install -m 0644 -o root -g root config/modehub.example.toml "$ROOT/etc/modehub/config.toml.example"
fresh=no
if [ ! -e "$ROOT/etc/modehub/config.toml" ]; then
  install -m 0640 -o root -g "$gid" config/modehub.example.toml "$ROOT/etc/modehub/config.toml"
  fresh=yes
fi
install -d -m 0700 -o "$uid" -g "$gid" "$ROOT/var/lib/modehub"
install -D -m 0644 -o root -g root systemd/modehub.service "$UNIT_DST"

echo "installed $("$bin" --version 2>/dev/null || echo modehub) to $BIN_DST"
if systemd_running; then
  systemctl daemon-reload
  systemctl enable modehub.service
  if [ "$fresh" = yes ]; then
    echo "Next: edit /etc/modehub/config.toml (devices, MODE keys; keys can go in /etc/modehub/keys/NAME, mode 0600),"
    echo "      check it:  sudo -u modehub modehub check-config --config /etc/modehub/config.toml"
    echo "      start it:  sudo systemctl start modehub && modehub status"
  else
    echo "Existing /etc/modehub/config.toml kept. Apply the new binary: sudo systemctl restart modehub"
  fi
else
  echo "systemd is not running here (or ROOT is set): unit installed, not enabled."
fi
