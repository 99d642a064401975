#!/usr/bin/env bash
# Builds modehub for the Raspberry Pi on a plain Debian/Ubuntu machine (no containers).
#
#   scripts/build-pi.sh            # all four builds below
#   scripts/build-pi.sh gnu        # glibc builds only (Pi OS Bookworm or newer: glibc >= 2.34)
#   scripts/build-pi.sh musl       # static builds only (any Pi OS release)
#   scripts/build-pi.sh deb        # the gnu builds, then their .deb packages (arm64, armhf)
#
# gnu:  aarch64-unknown-linux-gnu, armv7-unknown-linux-gnueabihf — rustup targets + Debian's
#       cross linkers (gcc-aarch64-linux-gnu, gcc-arm-linux-gnueabihf and their libc dev packages).
# musl: aarch64-unknown-linux-musl, armv7-unknown-linux-musleabihf — cargo-zigbuild with zig from
#       PyPI (`pip install ziglang`); one static file, no glibc needed. If rustup cannot install
#       the armv7 musl standard library (some mirrors do not carry it), the armv7 "static" build
#       falls back to armv7-unknown-linux-gnueabihf linked against glibc 2.28 by zig, which runs
#       on every Pi OS since Buster.
#
# It installs what is missing (apt-get, rustup, pip, cargo install; sudo when not root).
# Binaries land in dist/modehub-<target> (stripped by the release profile); sizes are printed.
# SQLite is bundled and TLS is rustls, so no target C libraries are needed beyond libc.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never
what="${1:-all}"
case "$what" in all|gnu|musl|deb) ;; *) echo "usage: $0 [all|gnu|musl|deb]" >&2; exit 2 ;; esac

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
apt_install() {
  local missing=()
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "== apt-get install ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
}
add_target() { # prints nothing on success; returns 1 if rustup cannot install it
  rustup target list --installed | grep -qx "$1" && return 0
  echo "== rustup target add $1"
  rustup target add "$1" >/dev/null 2>&1 || { echo "   (rustup cannot install $1 here)"; return 1; }
}
mkdir -p dist
built=()
record() { # target path
  cp "$2" "dist/modehub-$1"
  built+=("$1")
}

if [ "$what" != musl ]; then
  apt_install gcc-aarch64-linux-gnu libc6-dev-arm64-cross gcc-arm-linux-gnueabihf libc6-dev-armhf-cross
  # Linker and C compiler (for the bundled SQLite) per target; env vars, so nothing global changes.
  export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
  export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
  export CARGO_TARGET_ARMV7_UNKNOWN_LINUX_GNUEABIHF_LINKER=arm-linux-gnueabihf-gcc
  export CC_armv7_unknown_linux_gnueabihf=arm-linux-gnueabihf-gcc AR_armv7_unknown_linux_gnueabihf=arm-linux-gnueabihf-ar
  for t in aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf; do
    add_target "$t" || continue
    echo "== cargo build --release --target $t"
    time cargo build --release --locked --target "$t"
    record "$t" "target/$t/release/modehub"
    # The .deb (scripts/build-deb.sh, cargo-deb) of this build: Pi OS Bookworm or newer.
    if [ "$what" = deb ] || [ "$what" = all ]; then
      scripts/build-deb.sh --target "$t" --no-build
    fi
  done
fi

if [ "$what" != gnu ] && [ "$what" != deb ]; then
  # zig links these itself: the Debian gcc settings of the glibc builds must not leak in
  # (they would link the glibc-2.28 build against this machine's newer glibc).
  unset CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER CC_aarch64_unknown_linux_gnu AR_aarch64_unknown_linux_gnu
  unset CARGO_TARGET_ARMV7_UNKNOWN_LINUX_GNUEABIHF_LINKER CC_armv7_unknown_linux_gnueabihf AR_armv7_unknown_linux_gnueabihf
  if ! python3 -m ziglang version >/dev/null 2>&1; then
    echo "== pip install ziglang"
    python3 -m pip install --quiet ziglang
  fi
  if ! cargo zigbuild --help >/dev/null 2>&1; then
    echo "== cargo install cargo-zigbuild"
    cargo install --locked cargo-zigbuild
  fi
  for t in aarch64-unknown-linux-musl armv7-unknown-linux-musleabihf; do
    build="$t"
    if ! add_target "$t"; then
      if [ "$t" = armv7-unknown-linux-musleabihf ]; then
        add_target armv7-unknown-linux-gnueabihf || continue
        build="armv7-unknown-linux-gnueabihf.2.28"
        echo "   falling back to $build (glibc 2.28 symbols: Pi OS Buster and newer)"
      else
        continue
      fi
    fi
    echo "== cargo zigbuild --release --target $build"
    # A separate target dir keeps zig-linked objects apart from the Debian-gcc ones.
    time cargo zigbuild --release --locked --target "$build" --target-dir target/zig
    record "$build" "target/zig/${build%%.2.28}/release/modehub"
    if [ "$build" != "$t" ]; then
      need=$(objdump -T "dist/modehub-$build" | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -1)
      [ "$need" = GLIBC_2.28 ] || [ "$(printf '%s\nGLIBC_2.28\n' "$need" | sort -V | tail -1)" = GLIBC_2.28 ] \
        || { echo "FAIL: $build needs $need" >&2; exit 1; }
      echo "   $build needs at most $need"
    fi
  done
fi

echo
echo "== built (stripped sizes)"
for t in "${built[@]}"; do
  f="dist/modehub-$t"
  printf '%-40s %9d bytes  %s\n' "$t" "$(stat -c %s "$f")" "$(file -b "$f" | cut -d, -f1-2,5- | cut -c1-90)"
done
ls -l dist/*.deb 2>/dev/null || true
[ ${#built[@]} -gt 0 ] || { echo "nothing was built" >&2; exit 1; }
