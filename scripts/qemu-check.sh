#!/usr/bin/env bash
# Proves the Pi builds run: each ARM binary under qemu-user answers --version and checks
# config/modehub.example.toml; the aarch64 one also runs as a hub (20 devices) against the MODE
# emulator running natively, and one event published with mosquitto_pub arrives in the cloud.
#
#   scripts/qemu-check.sh            # uses dist/modehub-* from scripts/build-pi.sh (builds if none)
#
# Prints: startup time to READY=1 (a fake NOTIFY_SOCKET), idle RSS of the qemu'd hub, sizes.
# Serial ports are not exercised: qemu-user 7.2 lacks the TCGETS2 ioctl (serial tests run natively).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
need=()
command -v qemu-aarch64 >/dev/null || need+=(qemu-user)
command -v mosquitto_pub >/dev/null || need+=(mosquitto-clients)
command -v curl >/dev/null || need+=(curl)
for p in libc6-arm64-cross libc6-armhf-cross; do dpkg -s "$p" >/dev/null 2>&1 || need+=("$p"); done
if [ ${#need[@]} -gt 0 ]; then
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}"
fi
ls dist/modehub-* >/dev/null 2>&1 || scripts/build-pi.sh

qemu_for() { case "$1" in aarch64-*) echo qemu-aarch64;; armv7-*) echo qemu-arm;; esac; }
sysroot_for() { case "$1" in aarch64-*) echo /usr/aarch64-linux-gnu;; armv7-*) echo /usr/arm-linux-gnueabihf;; esac; }
fail() { echo "FAIL: $*" >&2; exit 1; }

echo "== --version and check-config under qemu-user"
for f in dist/modehub-*; do
  t=${f#dist/modehub-}
  q=$(qemu_for "$t"); [ -n "$q" ] || continue
  v=$($q -L "$(sysroot_for "$t")" "$f" --version) || fail "$t --version"
  $q -L "$(sysroot_for "$t")" "$f" check-config --config config/modehub.example.toml >/dev/null \
    || fail "$t check-config"
  printf '%-40s %-16s check-config OK  %9d bytes\n' "$t" "$v" "$(stat -c %s "$f")"
done

hub_bin=""
# QEMU_HUB_TARGET=aarch64-unknown-linux-musl runs the hub from the static build instead.
for t in ${QEMU_HUB_TARGET:-} aarch64-unknown-linux-gnu aarch64-unknown-linux-musl; do
  [ -x "dist/modehub-$t" ] && { hub_bin="dist/modehub-$t"; hub_t=$t; break; }
done
[ -n "$hub_bin" ] || fail "no aarch64 binary in dist/"

echo "== aarch64 hub ($hub_t, qemu) against the native emulator"
cargo build -q --bin modehub            # the native emulator (debug build is enough)
native=target/debug/modehub
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
http=$(free_port); mqtt=$(free_port); local=$(free_port); ops=$(free_port)
n=20
{
  echo 'project_id = 1'; echo '[[home]]'; echo 'id = 42'
  for i in $(seq 0 $((n-1))); do
    printf '[[device]]\nid = %d\napi_key = "v1.qemu-key-%d"\nhome_id = 42\nname = "dev%d"\n' $((100+i)) "$i" "$i"
  done
} > "$work/seed.toml"
{
  printf '[hub]\ndata_dir = "%s/data"\n' "$work"
  printf '[local.mqtt]\nlisten = "127.0.0.1:%d"\n' "$local"
  printf '[cloud]\napi_url = "http://127.0.0.1:%d"\nmqtt_url = "mqtt://127.0.0.1:%d"\n' "$http" "$mqtt"
  printf '[ops]\nlisten = "127.0.0.1:%d"\n' "$ops"
  for i in $(seq 0 $((n-1))); do
    printf '[[device]]\nname = "dev%d"\nmode_id = %d\nhome_id = 42\napi_key = "v1.qemu-key-%d"\nlocal_password = "pw%d"\n' "$i" $((100+i)) "$i" "$i"
  done
} > "$work/hub.toml"
"$native" emulator --seed "$work/seed.toml" --http "127.0.0.1:$http" --mqtt "127.0.0.1:$mqtt" \
  > "$work/emulator.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$http/_emulator/stats" >/dev/null && break; sleep 0.1; done

# A fake service manager: records when READY=1 arrives.
python3 - "$work/notify.sock" "$work/notify.log" <<'PY' &
import socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); s.bind(sys.argv[1])
with open(sys.argv[2], "a", buffering=1) as out:
    while True:
        m = s.recv(4096).decode(errors="replace").replace("\n", " ")
        out.write(f"{time.time():.3f} {m}\n")
PY
pids+=($!)
for _ in $(seq 50); do [ -S "$work/notify.sock" ] && break; sleep 0.1; done

start=$(date +%s.%N)
NOTIFY_SOCKET="$work/notify.sock" WATCHDOG_USEC=3000000 \
  qemu-aarch64 -L /usr/aarch64-linux-gnu "$hub_bin" run --config "$work/hub.toml" > "$work/hub.log" 2>&1 &
hub=$!; pids+=($hub)
for _ in $(seq 600); do grep -q READY=1 "$work/notify.log" 2>/dev/null && break; sleep 0.05; done
grep -q READY=1 "$work/notify.log" || { cat "$work/hub.log"; fail "no READY=1 from the qemu'd hub"; }
ready=$(grep -m1 READY=1 "$work/notify.log" | cut -d' ' -f1)
startup=$(awk -v a="$start" -v b="$ready" 'BEGIN { printf "%.0f", (b - a) * 1000 }')

mosquitto_pub -h 127.0.0.1 -p "$local" -u dev0 -P pw0 -q 1 -t /devices/dev0/event \
  -m '{"eventType":"qemu-check","eventData":{"arch":"aarch64"}}'
got=""
for _ in $(seq 300); do
  got=$(curl -sf "http://127.0.0.1:$http/_emulator/events?device=100" || true)
  echo "$got" | grep -q qemu-check && break; sleep 0.1
done
echo "$got" | grep -q qemu-check || { cat "$work/hub.log"; fail "the event did not reach the emulator"; }
echo "event arrived in the emulator: $(echo "$got" | grep -o '"eventType":"qemu-check"[^}]*}' | head -1)"
for _ in $(seq 300); do
  curl -sf "http://127.0.0.1:$ops/healthz" >/dev/null && break; sleep 0.1
done
curl -sf "http://127.0.0.1:$ops/healthz" | head -1 | sed 's/^/healthz: /'
grep -q WATCHDOG=1 "$work/notify.log" || sleep 2
grep -q WATCHDOG=1 "$work/notify.log" || fail "no watchdog ping"
sleep 3
rss=$(awk '/VmRSS/ { print $2 }' "/proc/$hub/status")
echo "startup to READY=1 under qemu: ${startup} ms; idle RSS of the qemu process ($n devices): ${rss} kB"
echo "last STATUS: $(grep -o 'STATUS=[^=]*' "$work/notify.log" | tail -1)"

kill -TERM "$hub"
code=0; wait "$hub" || code=$?
[ "$code" -eq 0 ] || { cat "$work/hub.log"; fail "hub exited $code after SIGTERM"; }
grep -q STOPPING=1 "$work/notify.log" || fail "no STOPPING=1"
echo "SIGTERM: STOPPING=1 sent, exit 0"
echo "qemu check OK"
