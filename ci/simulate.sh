#!/usr/bin/env bash
# The main job: a federated training simulation over real QUIC on the
# shipped data (MNIST, 20 devices with Dirichlet(0.5) labels, 10 per round,
# compressed updates, token-weighted FedAvg). Extra arguments go to
# `fedge-aggregator simulate` (try --help).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/fedge/target}"
export RUST_LOG="${RUST_LOG:-warn}"
bash ci/setup.sh
# Build with cargo's progress shown (a cold build compiles tract and
# takes a while), then run the binary.
echo "== building fedge (the first build takes 10-15 minutes on 2 cores; later runs start in seconds)"
# The whole workspace, as attack-table.sh builds it: one feature set, so
# switching between them rebuilds nothing.
cargo build --workspace --locked
exec "$CARGO_TARGET_DIR/debug/fedge-aggregator" simulate "$@"
