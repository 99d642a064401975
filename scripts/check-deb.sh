#!/usr/bin/env bash
# CI check of the Debian package on this (amd64) machine, as root; no running systemd needed.
#
#   scripts/check-deb.sh [DEB]     # default: builds one from target/debug/modehub (build-deb.sh)
#
# lintian (no errors allowed), dpkg -i, then: files, the modehub user, permissions, the unit
# (systemd-analyze verify), the service not started without a device, `modehub check-config`
# and a short `modehub run` from the installed paths as the modehub user against the emulator
# (one event published with mosquitto_pub must arrive), an upgrade that keeps config and outbox,
# a Mosquitto on the hub's port detected and explained, `dpkg -r` keeping /var/lib/modehub and
# `dpkg -P` removing it. Installs lintian, mosquitto and mosquitto-clients if missing.
# It installs and purges the package modehub on this machine: do not run it where modehub is
# installed for real.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never
[ "$(id -u)" -eq 0 ] || { echo "run as root (it installs a package)" >&2; exit 1; }
fail() { echo "FAIL: $*" >&2; exit 1; }

need=()
command -v lintian >/dev/null || need+=(lintian)
command -v mosquitto_pub >/dev/null || need+=(mosquitto-clients)
[ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
command -v curl >/dev/null || need+=(curl)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

deb="${1:-}"
if [ -z "$deb" ]; then
  cargo build -q --locked --bin modehub
  deb=$(scripts/build-deb.sh --profile dev --no-build 2>&1 | grep '\.deb$' | tail -n 1)
fi
[ -f "$deb" ] || fail "no package: $deb"
echo "== $deb: $(stat -c %s "$deb") bytes"

echo "== lintian"
lintian --fail-on error --tag-display-limit 0 "$deb" | tee /tmp/modehub-lintian.txt || fail "lintian reported errors"
echo "lintian: $(grep -c '^E:' /tmp/modehub-lintian.txt || true) errors, $(grep -c '^W:' /tmp/modehub-lintian.txt || true) warnings"

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  dpkg -P modehub >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
dpkg -P modehub >/dev/null 2>&1 || true

echo "== dpkg -i (fresh)"
dpkg -i "$deb" | tee "$work/install.log"
grep -q "starts once /etc/modehub/config.toml lists a device\|systemd is not running" "$work/install.log" \
  || fail "postinst did not explain that the service waits for a device"

echo "== files, user, permissions"
for f in /usr/bin/modehub /usr/lib/systemd/system/modehub.service /etc/modehub/config.toml \
         /usr/share/man/man1/modehub.1.gz /usr/share/man/man1/modehub-run.1.gz \
         /usr/share/doc/modehub/copyright /usr/share/doc/modehub/examples/modehub.example.toml; do
  [ -e "$f" ] || fail "$f missing"
done
dpkg-query -W -f='${Conffiles}\n' modehub | grep -q /etc/modehub/config.toml || fail "config.toml is not a conffile"
getent passwd modehub | grep -q ':/usr/sbin/nologin$' || fail "no modehub system user with nologin"
id -nG modehub | grep -qw dialout || fail "modehub is not in dialout"
perm() { [ "$(stat -c '%a %U:%G' "$1")" = "$2" ] || fail "$1 is $(stat -c '%a %U:%G' "$1"), want $2"; }
perm /etc/modehub/config.toml "640 root:modehub"
perm /etc/modehub/keys "700 modehub:modehub"
perm /var/lib/modehub "700 modehub:modehub"
perm /usr/bin/modehub "755 root:root"
/usr/bin/modehub check-config --config /etc/modehub/config.toml >/dev/null 2>&1 \
  && fail "the starter config passes check-config (it must have no device)"
man -l /usr/share/man/man1/modehub.1.gz >/dev/null 2>&1 || zcat /usr/share/man/man1/modehub.1.gz | grep -q '^.TH' || fail "man page unreadable"
grep -q '^ExecStart=/usr/bin/modehub run' /usr/lib/systemd/system/modehub.service || fail "unit runs another binary"
out=$(systemd-analyze verify /usr/lib/systemd/system/modehub.service 2>&1 || true)
if printf '%s\n' "$out" | grep -i modehub; then fail "systemd-analyze verify reported problems"; fi
echo "ok"

echo "== check-config and a short run from the installed paths, against the emulator"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
http=$(free_port); mqtt=$(free_port); local=$(free_port); ops=$(free_port)
printf 'project_id = 1\n[[home]]\nid = 42\n[[device]]\nid = 100\napi_key = "v1.deb-check-key"\nhome_id = 42\nname = "dev0"\n' > "$work/seed.toml"
/usr/bin/modehub emulator --seed "$work/seed.toml" --http "127.0.0.1:$http" --mqtt "127.0.0.1:$mqtt" > "$work/emulator.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$http/_emulator/stats" >/dev/null && break; sleep 0.1; done
# Point the installed config at the emulator and add one device with `modehub device add`.
sed -i -e "s#^listen = \"127.0.0.1:1883\"#listen = \"127.0.0.1:$local\"#" \
       -e "s#^api_url .*#api_url = \"http://127.0.0.1:$http\"#" \
       -e "s#^mqtt_url .*#mqtt_url = \"mqtt://127.0.0.1:$mqtt\"#" \
       -e "s#^listen = \"127.0.0.1:9464\"#listen = \"127.0.0.1:$ops\"#" /etc/modehub/config.toml
grep -q "^listen = \"127.0.0.1:$ops\"" /etc/modehub/config.toml || fail "the starter config has no [ops] listen to point elsewhere"
printf 'v1.deb-check-key\npw0\n' | /usr/bin/modehub device add dev0 --mode-id 100 --home-id 42 --local-password \
  || fail "modehub device add failed"
perm /etc/modehub/keys/dev0 "600 modehub:modehub"
perm /etc/modehub/config.toml "640 root:modehub"
runuser -u modehub -- /usr/bin/modehub check-config --config /etc/modehub/config.toml || fail "check-config (as modehub) failed"
/usr/bin/modehub doctor --config /etc/modehub/config.toml > "$work/doctor.txt" || { cat "$work/doctor.txt"; fail "modehub doctor found a problem"; }
grep -q '^\[ok\]   device-key:dev0' "$work/doctor.txt" || { cat "$work/doctor.txt"; fail "doctor did not check dev0's key"; }
# setpriv execs the hub itself (runuser would stay in between and turn SIGTERM into a kill).
# umask 077 as the unit's UMask=0077.
(umask 077; exec setpriv --reuid modehub --regid modehub --init-groups /usr/bin/modehub run --config /etc/modehub/config.toml) > "$work/hub.log" 2>&1 &
hub=$!; pids+=($hub)
for _ in $(seq 300); do curl -sf "http://127.0.0.1:$ops/healthz" >/dev/null && break; sleep 0.1; done
curl -sf "http://127.0.0.1:$ops/healthz" >/dev/null || { cat "$work/hub.log"; fail "the installed hub did not become healthy"; }
curl -sf "http://127.0.0.1:$ops/" | grep -q '<title>modehub</title>' || fail "no status page at /"
mosquitto_pub -h 127.0.0.1 -p "$local" -u dev0 -P pw0 -q 1 -t /devices/dev0/event \
  -m '{"eventType":"deb-check","eventData":{"ok":true}}'
got=""
for _ in $(seq 300); do
  got=$(curl -sf "http://127.0.0.1:$http/_emulator/events?device=100" || true)
  echo "$got" | grep -q deb-check && break; sleep 0.1
done
echo "$got" | grep -q deb-check || { cat "$work/hub.log"; fail "the event did not reach the emulator"; }
kill -TERM "$hub"; wait "$hub" || { cat "$work/hub.log"; fail "the hub did not exit 0 on SIGTERM"; }
[ -f /var/lib/modehub/hub.db ] || fail "no outbox in /var/lib/modehub"
perm /var/lib/modehub/hub.db "600 modehub:modehub"
echo "ok: event arrived, hub stopped cleanly"

echo "== upgrade (dpkg -i again): config and outbox kept"
sum=$(md5sum < /etc/modehub/config.toml)
dpkg -i "$deb" > "$work/upgrade.log" 2>&1 || { cat "$work/upgrade.log"; fail "upgrade failed"; }
[ "$(md5sum < /etc/modehub/config.toml)" = "$sum" ] || fail "upgrade changed /etc/modehub/config.toml"
[ -f /var/lib/modehub/hub.db ] && [ -f /etc/modehub/keys/dev0 ] || fail "upgrade lost the outbox or a key"
perm /etc/modehub/config.toml "640 root:modehub"
echo "ok"

echo "== a Mosquitto on the hub's port is detected and explained"
/usr/sbin/mosquitto -p "$local" > "$work/mosquitto.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do ss -Hltn "sport = :$local" | grep -q . && break; sleep 0.1; done
dpkg-reconfigure -fnoninteractive modehub > "$work/reconf.log" 2>&1 || true
cat "$work/reconf.log"
grep -q "already taken by mosquitto" "$work/reconf.log" || fail "the Mosquitto on port $local was not reported"
grep -q "systemctl disable --now mosquitto" "$work/reconf.log" || fail "no fix for the Mosquitto conflict"
kill "${pids[-1]}"
echo "ok"

echo "== dpkg -r keeps /etc/modehub and /var/lib/modehub; dpkg -P removes them"
dpkg -r modehub >/dev/null
[ ! -e /usr/bin/modehub ] || fail "binary still there after remove"
[ -f /var/lib/modehub/hub.db ] && [ -f /etc/modehub/config.toml ] || fail "remove deleted config or outbox"
dpkg -P modehub >/dev/null
[ ! -e /var/lib/modehub ] && [ ! -e /etc/modehub ] || fail "purge left /var/lib/modehub or /etc/modehub"
echo "deb OK"
