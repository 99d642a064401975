#!/bin/sh
# Soak test: N minutes (default 30) of mixed MODE faults while sensors stream; reports the
# number of acknowledged events lost (must be 0) and the duplicates. Not part of CI.
#   scripts/soak.sh            # 30 minutes
#   scripts/soak.sh 5          # 5 minutes
#   SOAK_SEED=123 scripts/soak.sh 5   # replay a fault sequence
set -eu
cd "$(dirname "$0")/.."
SOAK_MINUTES="${1:-30}" exec cargo test --release --test soak -- --ignored --nocapture
