#!/usr/bin/env bash
# Reproduces the README's attack table: final MNIST accuracy for each
# aggregator under each attack with 20% attackers (20 devices, 10 per
# round, 10 rounds of at most 8 s, Dirichlet(0.5), q8 updates). Writes
# attack-table.tsv. STAKES=uniform gives every device the same stake;
# DEADLINE_MS (default 8000) bounds each round, which bounds the runs in
# which training diverges (devices then skip rounds and rounds end at the
# deadline).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/fedge/target}"
export RUST_LOG="${RUST_LOG:-error}"
cargo build --locked --quiet -p fedge-aggregator-cli --bin fedge-aggregator
bin="$CARGO_TARGET_DIR/debug/fedge-aggregator"
out="${1:-attack-table.tsv}"
printf "aggregator\tnone\tsign-flip\tscaling\tgaussian\tlabel-flip\talie\n" > "$out"
for agg in mean median trimmed-mean multi-krum centered-clipping clip; do
    row="$agg"
    for attack in none sign-flip scaling gaussian label-flip alie; do
        work="$(mktemp -d)"
        if [ "$attack" = none ]; then
            args=(--attackers 0)
        else
            args=(--attackers 0.2 --attack "$attack")
        fi
        "$bin" simulate --stakes "${STAKES:-zipf:1.0}" --codec q8 --rounds 10 --round-deadline-ms "${DEADLINE_MS:-8000}" --aggregator "$agg" "${args[@]}" --out-dir "$work" > /dev/null
        acc="$(sed -n 's/.*"final_accuracy": \([0-9.]*\).*/\1/p' "$work/results.json")"
        row="$row\t$acc"
        rm -rf "$work"
    done
    printf "$row\n" >> "$out"
    printf "$row\n"
done
