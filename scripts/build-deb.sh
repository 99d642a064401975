#!/usr/bin/env bash
# Builds the Debian package of modehub with cargo-deb (metadata: [package.metadata.deb] in
# Cargo.toml, maintainer scripts in debian/).
#
#   scripts/build-deb.sh                              # this machine's arch, release profile
#   scripts/build-deb.sh --target aarch64-unknown-linux-gnu   # cross (after scripts/build-pi.sh gnu)
#   scripts/build-deb.sh --profile dev --no-build     # reuse target/debug/modehub (CI)
#
# Generated into target/deb-assets/ first (so nothing is kept twice in the tree):
#   modehub.service  systemd/modehub.service with the binary at /usr/bin/modehub
#   config.toml      config/modehub.example.toml with its example [[device]] commented out, so a
#                    fresh install does not start until a real device is added
#   man/*.1.gz       the man pages, from the clap definitions (`modehub man`, host build)
# The .deb lands in dist/. Installs cargo-deb (cargo install --locked) if it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never
target="" profile="release" build=yes
while [ $# -gt 0 ]; do
  case "$1" in
    --target) target="$2"; shift 2 ;;
    --profile) profile="$2"; shift 2 ;;
    --no-build) build=no; shift ;;
    *) echo "usage: $0 [--target TRIPLE] [--profile NAME] [--no-build]" >&2; exit 2 ;;
  esac
done
if ! cargo deb --version >/dev/null 2>&1; then
  echo "== cargo install cargo-deb"
  cargo install --locked cargo-deb
fi

assets=target/deb-assets
rm -rf "$assets"; mkdir -p "$assets/man"
sed -e 's#/usr/local/bin/modehub#/usr/bin/modehub#g' \
    -e 's#^\# Installed by scripts/install.sh.*#\# Installed by the modehub Debian package (binary /usr/bin/modehub, config /etc/modehub/config.toml,#' \
    systemd/modehub.service > "$assets/modehub.service"
{
  echo "# No device is configured yet, so the service does not start. Add one with"
  echo "#   sudo modehub device add NAME --mode-id ID      (it asks for the API key)"
  echo "# (or uncomment and fill in the [[device]] table below), then: sudo modehub doctor"
  echo "#"
  awk '/^\[\[device\]\]/ { dev = 1 } dev && /^$/ { dev = 0 } { print (dev ? "# " $0 : $0) }' \
    config/modehub.example.toml
} > "$assets/config.toml"
grep -q '^\[\[device\]\]' "$assets/config.toml" && { echo "FAIL: starter config still has a device" >&2; exit 1; }
# Man pages are the same on every arch: generate them with a host build.
cargo run -q --locked -- man --out-dir "$assets/man"
gzip -9n "$assets"/man/*.1

args=(--locked --profile "$profile" --output dist/)
[ -n "$target" ] && args+=(--target "$target")
[ "$build" = no ] && args+=(--no-build)
mkdir -p dist
echo "== cargo deb ${args[*]}"
deb=$(cargo deb "${args[@]}" | tail -n 1)
echo "$deb"
printf '%s: %d bytes (installed size %s KB)\n' "$deb" "$(stat -c %s "$deb")" \
  "$(dpkg-deb -f "$deb" Installed-Size)"
