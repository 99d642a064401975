#!/usr/bin/env bash
# modehub vs Mosquitto (bridge) and the hub's own ceilings, in one invocation (issues 7, 12).
#
#   benches/compare.sh [--quick] [any option of `modehub-bench compare`, see --help]
#   benches/compare.sh --only home          # just the home profile (50 sensors, 5 events/s, 5 min)
#   benches/compare.sh --only scale         # just memory per configured device (1/20/100/1000)
#
# Builds the release binaries (the hub, and the harness in bench/), installs Debian's mosquitto
# if it is missing, then runs `modehub-bench compare` interleaved (A B A B ...) and prints one
# table of medians with the ratio modehub / peer. Timing figures are reported, never asserted.
# Every process it starts is stopped on exit, also after an error or Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
  echo "== installing mosquitto (Debian package)" >&2
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq >/dev/null
  # The package's post-install tries to start a service; there is no init system here, and we
  # start our own instances anyway.
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq mosquitto mosquitto-clients >/dev/null
fi
MOSQUITTO=$(command -v mosquitto || echo /usr/sbin/mosquitto)
export PATH="$PATH:/usr/sbin:/usr/bin"

echo "== building (release)" >&2
cargo build --release --quiet -p modehub -p modehub-bench --bins

WORK=target/bench-work
mkdir -p "$WORK"
PIDFILE="$WORK/pids"
: >"$PIDFILE"
cleanup() {
  # Only the processes this run started (the bench writes each child's PID here).
  if [ -s "$PIDFILE" ]; then
    while read -r pid; do
      [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
    done <"$PIDFILE"
  fi
  rm -f "$PIDFILE"
}
trap cleanup EXIT INT TERM

target/release/modehub-bench compare \
  --mosquitto-bin "$MOSQUITTO" \
  --work "$WORK" \
  --pidfile "$PIDFILE" \
  "$@"
