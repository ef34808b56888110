#!/usr/bin/env bash
# Aggregator CPU per round and peak RSS: Flower's server against fedge's on
# the same task (issue #18). 20 device processes, 10 per round, the zoo's
# MNIST MLP, dense float32 updates, loopback; see ci/flower/compare.py.
# Flower runs twice: `start_server` (gRPC, one server process) and its
# current deployment (SuperLink + SuperExec + ServerApp, HTTP; app/).
#
#   bash ci/flower-compare.sh [--keep-venv] [--help] [compare.py options...]
#
# Builds the release binaries (cargo build --release --locked), makes a
# throwaway virtual environment with a pinned flwr and numpy from PyPI
# (no torch: the Flower clients train in numpy), runs both federations
# one after the other, writes results/flower-compare.json (--out) and prints a
# table. Not part of ci/test.sh: it downloads from PyPI.
#
# Environment: FLOWER_VENV (default /tmp/fedge-flower-venv; removed at
# the end unless --keep-venv), FLWR_VERSION (1.42.0), NUMPY_VERSION
# (2.4.6), CARGO_TARGET_DIR (~/.cache/fedge/target).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/fedge/target}"
venv="${FLOWER_VENV:-/tmp/fedge-flower-venv}"
flwr_version="${FLWR_VERSION:-1.42.0}"
numpy_version="${NUMPY_VERSION:-2.4.6}"
keep_venv=0
args=()
for arg in "$@"; do
    case "$arg" in
    --keep-venv) keep_venv=1 ;;
    -h | --help)
        sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
        echo "compare.py options (python3 ci/flower/compare.py --help):"
        echo "  --rounds N (20) --clients N (20) --per-round N (10) --per-client N (400)"
        echo "  --local-epochs N (2) --batch N (32) --lr F (0.05) --momentum F (0.9)"
        echo "  --repeat N (1: runs of each, alternating; the table shows medians)"
        echo "  --only both|flower|fedge --flower-mode start_server|superlink|both"
        echo "  --flower-insecure (start_server without TLS)"
        echo "  --superlink-idle-s S (0: the SuperLink's CPU with SuperNodes connected, no run)"
        echo "  --timeout-s S (900 per server run) --out FILE (results/flower-compare.json)"
        echo "  --keep DIR (keep the runs' logs and state there)"
        exit 0
        ;;
    *) args+=("$arg") ;;
    esac
done
cleanup() {
    if [ "$keep_venv" = 0 ]; then rm -rf "$venv"; fi
}
trap cleanup EXIT

cargo build --release --locked -p fedge-aggregator-cli -p fedge-device \
    --bin fedge-aggregator --bin fedge-device

if ! "$venv/bin/python" -c "import flwr, sys; sys.exit(flwr.__version__ != '$flwr_version')" 2>/dev/null; then
    rm -rf "$venv"
    python3 -m venv "$venv"
    echo "installing flwr $flwr_version and numpy $numpy_version into $venv" >&2
    "$venv/bin/pip" install -q --no-cache-dir --disable-pip-version-check \
        "flwr==$flwr_version" "numpy==$numpy_version"
fi
PYTHONDONTWRITEBYTECODE=1 timeout 7200 "$venv/bin/python" ci/flower/compare.py \
    --fedge-bin "$CARGO_TARGET_DIR/release" "${args[@]+"${args[@]}"}"
