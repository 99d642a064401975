#!/usr/bin/env bash
# modehub vs Mosquitto (bridge) and the hub's own ceilings, in one invocation (issue 7).
#
#   benches/compare.sh [--quick] [any option of examples/bench_compare.rs, see --help]
#
# Builds the release binaries (hub + bench examples), installs Debian's mosquitto if it is
# missing, then runs examples/bench_compare interleaved (A B A B ...) and prints one table of
# medians with the ratio modehub / peer. Timing figures are reported, never asserted. Every
# process it starts is stopped on exit, also after an error or Ctrl-C.
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
cargo build --release --quiet --bin modehub --example bench_compare --example rumqttd_alone --example outbox_alone

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

target/release/examples/bench_compare \
  --mosquitto-bin "$MOSQUITTO" \
  --work "$WORK" \
  --pidfile "$PIDFILE" \
  "$@"
