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
cargo run --locked --quiet -p fedge-aggregator --bin fedge-aggregator -- simulate "$@"
