#!/usr/bin/env bash
# A two-level tree of aggregators as separate processes over loopback QUIC:
# one root and three leaf `fedge-aggregator serve` processes, and twelve
# `fedge-device run` processes (four per leaf) training the zoo MLP on
# their own MNIST shards. Then the same twelve devices (same keys, seeds,
# shards and plan) against one aggregator. Every device takes part in
# every round, and both federations take the plain sample-weighted mean,
# so the tree must publish the same models as the lone aggregator, to
# float tolerance: the script prints both runs' held-out accuracy
# (MNIST 8000..10000) and the largest difference between their final
# models, and fails if the accuracies differ by more than 0.01.
#
# Environment: ROUNDS (5), EPOCHS (local epochs, 1), PER_DEVICE (training
# samples per device, 600).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/fedge/target}"
export RUST_LOG="${RUST_LOG:-warn}"
ROUNDS="${ROUNDS:-5}"
EPOCHS="${EPOCHS:-1}"
PER_DEVICE="${PER_DEVICE:-600}"
LEAVES=3
PER_LEAF=4
DEVICES=$((LEAVES * PER_LEAF))
bash ci/setup.sh
cargo build --workspace --locked
bin="$CARGO_TARGET_DIR/debug"
work="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; [ -n "${KEEP:-}" ] || rm -rf "$work"' EXIT

"$bin/fedge-aggregator" model import models/mlp.onnx --out "$work/mlp.fedge" >/dev/null

# What every aggregator here shares: the plan, and plain sample-weighted
# FedAvg with no share cap over a closed fleet (equal to a tree's mean).
common() {
    cat <<TOML
i_know_this_is_unsafe = true
[plan]
local_epochs = $EPOCHS
batch_size = 32
learning_rate = 0.05
momentum = 0.9
codec = "dense-f32"
[weights]
stake = { kind = "constant" }
samples = { kind = "linear" }
max_share = 1.0
allow_unknown = true
[strategy]
combine = { kind = "mean" }
TOML
}

# Starts `serve` with config $1 and state directory $2, output in $2.out;
# waits until it listens.
serve() {
    local config=$1 dir=$2
    shift 2
    RUST_LOG=info "$bin/fedge-aggregator" serve --config "$config" --listen 127.0.0.1:0 \
        --state-dir "$dir" --model "$work/mlp.fedge" "$@" >"$dir.out" 2>"$dir.log" &
    for _ in $(seq 300); do grep -q '^fingerprint' "$dir.out" 2>/dev/null && return; sleep 0.1; done
    echo "aggregator $dir did not start:" >&2
    cat "$dir.log" >&2
    exit 1
}

# Device $1 (its key, seed and MNIST shard) against the aggregator whose
# output is $2.out, with state in $3.
device() {
    local i=$1 agg=$2 dir=$3
    local addr pin
    addr="$(sed -n 's/^listening //p' "$agg.out")"
    pin="$(sed -n 's/^fingerprint //p' "$agg.out")"
    mkdir -p "$dir"
    "$bin/fedge-device" run --aggregator "$addr" --pin "$pin" --state-dir "$dir" \
        --data mnist --range "$((i * PER_DEVICE))..$(((i + 1) * PER_DEVICE))" --seed "$i" \
        >"$dir.out" 2>"$dir.log" &
}

# The same device keys in both runs: each device's state directory is
# copied from one made once.
for i in $(seq 0 $((DEVICES - 1))); do
    "$bin/fedge-device" identity --state-dir "$work/keys/dev$i" >/dev/null
done
fresh_device_dir() {
    rm -rf "$2"
    cp -r "$work/keys/dev$1" "$2"
}

final_of() { sed -n 's/.*final_version=//p' "$1.out"; }

accuracy() {
    "$bin/fedge-device" train --model "$1" --epochs 0 --train 0..32 --test 8000..10000 |
        awk '$1 == "0" { print $4 }'
}

echo "== a tree: 1 root, $LEAVES leaves, $PER_LEAF devices each, $ROUNDS rounds"
start=$(date +%s)
leaf_keys=""
for l in $(seq 0 $((LEAVES - 1))); do
    k="$("$bin/fedge-aggregator" leaf-key --state-dir "$work/leaf$l")"
    leaf_keys="$leaf_keys\"$k\", "
done
{
    common
    cat <<TOML
[rounds]
rounds = $ROUNDS
devices_per_round = $LEAVES
min_devices = $LEAVES
over_selection = 1.0
selection_window_ms = 0
retry_window_ms = [100, 300]
[tree.leaves]
keys = [${leaf_keys%, }]
device_weight_max = $((PER_DEVICE * EPOCHS))
devices_max = $PER_LEAF
TOML
} >"$work/root.toml"
serve "$work/root.toml" "$work/root"
root_addr="$(sed -n 's/^listening //p' "$work/root.out")"
root_pin="$(sed -n 's/^fingerprint //p' "$work/root.out")"
echo "root on $root_addr"
for l in $(seq 0 $((LEAVES - 1))); do
    {
        common
        cat <<TOML
[rounds]
devices_per_round = $PER_LEAF
min_devices = $PER_LEAF
over_selection = 1.0
retry_window_ms = [100, 300]
[tree.parent]
address = "$root_addr"
pin = "$root_pin"
TOML
    } >"$work/leaf$l.toml"
    serve "$work/leaf$l.toml" "$work/leaf$l"
    echo "leaf $l on $(sed -n 's/^listening //p' "$work/leaf$l.out")"
    for j in $(seq 0 $((PER_LEAF - 1))); do
        i=$((l * PER_LEAF + j))
        fresh_device_dir "$i" "$work/tree-dev$i"
        device "$i" "$work/leaf$l" "$work/tree-dev$i"
    done
done
wait
tree_secs=$(($(date +%s) - start))
tree_final="$(final_of "$work/root")"
for l in $(seq 0 $((LEAVES - 1))); do
    leaf_final="$(final_of "$work/leaf$l")"
    [ "$leaf_final" = "$tree_final" ] || { echo "leaf $l ended on $leaf_final, the root on $tree_final" >&2; exit 1; }
done

echo "== one aggregator, the same $DEVICES devices, $ROUNDS rounds"
start=$(date +%s)
{
    common
    cat <<TOML
[rounds]
rounds = $ROUNDS
devices_per_round = $DEVICES
min_devices = $DEVICES
over_selection = 1.0
retry_window_ms = [100, 300]
TOML
} >"$work/single.toml"
serve "$work/single.toml" "$work/single"
for i in $(seq 0 $((DEVICES - 1))); do
    fresh_device_dir "$i" "$work/single-dev$i"
    device "$i" "$work/single" "$work/single-dev$i"
done
wait
single_secs=$(($(date +%s) - start))
single_final="$(final_of "$work/single")"

# Round -> published version (12 hex digits), from an aggregator's log.
published() {
    sed 's/\x1b\[[0-9;]*m//g' "$1.log" |
        sed -n 's/.*model published round_id=\([0-9]*\) .*version=\([0-9a-f]*\).*/\1 \2/p'
}
model_of() { ls "$1/models/$2"*.fedge; }
published "$work/single" >"$work/single.rounds"
published "$work/root" >"$work/tree.rounds"
echo "initial model: held-out accuracy $(accuracy "$work/mlp.fedge")"
printf '%5s %10s %10s %14s %14s\n' round one_acc tree_acc max_abs_diff max_rel_diff
while read -r round single_v; do
    tree_v="$(awk -v r="$round" '$1 == r { print $2 }' "$work/tree.rounds")"
    a="$(model_of "$work/single" "$single_v")"
    b="$(model_of "$work/root" "$tree_v")"
    read -r _ _ _ abs _ rel < <("$bin/fedge-aggregator" model diff "$a" "$b")
    single_acc="$(accuracy "$a")"
    tree_acc="$(accuracy "$b")"
    printf '%5s %10s %10s %14s %14s\n' "$round" "$single_acc" "$tree_acc" "$abs" "$rel"
done <"$work/single.rounds"
echo "one aggregator: $ROUNDS rounds in ${single_secs} s; tree (1 root + $LEAVES leaves): ${tree_secs} s"
[ "$(wc -l <"$work/tree.rounds")" -eq "$ROUNDS" ] || { echo "the root published $(wc -l <"$work/tree.rounds") rounds, not $ROUNDS" >&2; exit 1; }
awk -v a="$tree_acc" -v b="$single_acc" 'BEGIN { d = a - b; if (d < 0) d = -d; exit !(d <= 0.01) }' ||
    { echo "the tree's final accuracy is outside the lone aggregator's band" >&2; exit 1; }
