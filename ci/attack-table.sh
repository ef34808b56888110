#!/usr/bin/env bash
# Reproduces the README's attack tables: final held-out MNIST accuracy for
# each combiner under each attack with 20% attackers (20 devices of which
# the last 4 attack, 10 per round, 10 rounds, Dirichlet(0.5), q8 updates,
# seed 1), weighted as `serve` weights by default (`simulate --defaults
# serve`: sqrt stake, sample claims ignored, 20% share cap, no weight
# for unknown keys). Each row replaces the combiner (and the clipping);
# the `serve` row is serve's defaults as they are (20% trimmed mean after
# adaptive clipping at 2x the previous round's median norm).
#
# One table per stake distribution: STAKES="uniform zipf:1.0" (the default)
# makes both. Writes, under OUT (default attack-table/), for each table
# STAKES.tsv (accuracy and seconds of every cell) and STAKES.md (the
# README's table), and prints each row as it finishes and each table's
# wall time. A cell whose federation stalled (every device gave up
# training a poisoned model) shows its last published accuracy and
# "stalled at round N". DEADLINE_MS (default 5000) bounds each round;
# ROUNDS (default 10) the run; WINDOW_MS (default 300: most devices paced
# away come back within it, the rest take the slots still free after it)
# is each round's check-in window
# (serve's default, 2000, would add over a second to every round).
#
# `ci/attack-table.sh figures [OUT]` instead runs the issue's figures (20
# honest devices, 20 rounds, seed 1, equal stakes, rounds of at most
# DEADLINE_MS, default 10000): clean and 1-of-20 liar runs on serve's old
# and new defaults, and 13 slot-hogging keys beside the 20 honest devices,
# with serve's check-in window unless WINDOW_MS is set; it writes
# OUT/figures.md (default attack-table/).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/fedge/target}"
export RUST_LOG="${RUST_LOG:-error}"
export RUST_BACKTRACE=0
cargo build --workspace --locked --quiet
# A private copy: a build running beside the table cannot swap the binary.
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
bin="$tmp/fedge-aggregator"
cp "$CARGO_TARGET_DIR/debug/fedge-aggregator" "$bin"

mode=table
if [ "${1:-}" = figures ]; then
    mode=figures
    shift
fi
out="${1:-attack-table}"
mkdir -p "$out"
rounds="${ROUNDS:-10}"
deadline="${DEADLINE_MS:-5000}"
aggs=(mean median trimmed-mean multi-krum centered-clipping clip serve)
attacks=(none sign-flip scaling gaussian label-flip alie liar zero replay)

declare -A agg_title=(
    [mean]="mean (FedAvg)"
    [median]="coordinate median"
    [trimmed-mean]="trimmed mean (20%)"
    [multi-krum]="Multi-Krum (f=2, keep 8)"
    [centered-clipping]="centered clipping (tau 1)"
    [clip]="adaptive norm clipping + mean"
    [serve]="**serve defaults** (clip x2 + trimmed mean)"
)
declare -A attack_title=(
    [none]="no attack" [sign-flip]="sign-flip" [scaling]="scaling x10"
    [gaussian]="gaussian" [label-flip]="label-flip" [alie]="ALIE"
    [liar]="liar (10^12 samples, -10x)" [zero]="zero" [replay]="replay"
)

# One cell: prints "ACCURACY SECONDS NOTE" (NOTE "-" or "stalled@N").
cell() {
    local stakes="$1" agg="$2" attack="$3" work="$tmp/cell"
    rm -rf "$work"
    local args=(--defaults serve --stakes "$stakes" --codec q8 --rounds "$rounds"
        --round-deadline-ms "$deadline" --selection-window-ms "${WINDOW_MS:-300}"
        --seed 1 --out-dir "$work")
    [ "$agg" = serve ] || args+=(--aggregator "$agg")
    if [ "$attack" = none ]; then
        args+=(--attackers 0)
    else
        args+=(--attackers 0.2 --attack "$attack")
    fi
    local t0=$SECONDS
    "$bin" simulate "${args[@]}" > "$tmp/cell.log" 2>&1 || true
    local secs=$((SECONDS - t0))
    if [ ! -f "$work/results.json" ]; then
        echo "simulate failed ($agg, $attack):" >&2
        tail -5 "$tmp/cell.log" >&2
        echo "nan $secs failed"
        return
    fi
    python3 - "$work/results.json" "$secs" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
note = f"stalled@{len(r['rounds'])}" if r.get("stalled") else "-"
print(f"{r['final_accuracy']:.4f} {sys.argv[2]} {note}")
EOF
}

table() {
    local stakes="$1" name="${1%%:*}"
    local tsv="$out/$name.tsv" md="$out/$name.md" t0=$SECONDS
    printf "aggregator" > "$tsv"
    printf "| aggregator |" > "$md"
    local sep="|---|"
    for attack in "${attacks[@]}"; do
        printf "\t%s\t%s_s" "$attack" "$attack" >> "$tsv"
        printf " %s |" "${attack_title[$attack]}" >> "$md"
        sep+="---:|"
    done
    printf "\n" >> "$tsv"
    printf "\n%s\n" "$sep" >> "$md"
    echo "stakes $stakes: ${#aggs[@]} aggregators x ${#attacks[@]} attacks, $rounds rounds of at most $deadline ms"
    for agg in "${aggs[@]}"; do
        local row="$agg" mdrow="| ${agg_title[$agg]} |" times=""
        for attack in "${attacks[@]}"; do
            read -r acc secs note < <(cell "$stakes" "$agg" "$attack")
            row+="\t$acc$([ "$note" = - ] || echo " $note")\t$secs"
            local pct
            pct="$(python3 -c "import sys; a=float(sys.argv[1]); print('n/a' if a != a else f'{100*a:.2f}%')" "$acc")"
            [ "$note" = - ] || pct+=" ($note)"
            mdrow+=" $pct |"
            times+=" ${secs}s"
        done
        printf "%b\n" "$row" >> "$tsv"
        echo "$mdrow" >> "$md"
        echo "$mdrow  [$times ]"
    done
    echo "stakes $stakes: table in $((SECONDS - t0)) s ($md)"
}

# One figure: NAME, a description, then simulate's flags; prints its row.
figure() {
    local name="$1" what="$2" work="$out/figure-$1"
    shift 2
    rm -rf "$work"
    local t0=$SECONDS
    local window=()
    [ -z "${WINDOW_MS:-}" ] || window=(--selection-window-ms "$WINDOW_MS")
    "$bin" simulate --rounds 20 --seed 1 --stakes uniform "${window[@]}" \
        --round-deadline-ms "${DEADLINE_MS:-10000}" "$@" --out-dir "$work" \
        > "$out/figure-$name.log" 2>&1 || true
    python3 - "$work/results.json" "$what" "$((SECONDS - t0))" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
rows = r["rounds"]
parts = [x["participants"] for x in rows]
state = f"stalled after {len(rows)} published" if r["stalled"] else f"{r['rounds_published']} published"
if r["rounds_aborted"]:
    state += f", {len(r['rounds_aborted'])} aborted"
span = f"{min(parts)}-{max(parts)}" if parts else "-"
print(f"| {sys.argv[2]} | {100 * r['final_accuracy']:.2f}% | {state} | {span} | {sys.argv[3]} s |")
EOF
}

if [ "$mode" = figures ]; then
    md="$out/figures.md"
    {
        echo "| run | final accuracy | rounds | updates per published round | wall |"
        echo "|---|---:|---|---|---:|"
    } > "$md"
    figure clean-serve "clean, serve defaults" --defaults serve >> "$md"
    figure clean-legacy "clean, old serve defaults" --defaults legacy >> "$md"
    figure liar-legacy "1 of 20 liar (10^12 samples, -10x), old defaults" \
        --defaults legacy --attackers 0.05 --attack liar >> "$md"
    figure liar-serve "1 of 20 liar (10^12 samples, -10x), serve defaults" \
        --defaults serve --attackers 0.05 --attack liar >> "$md"
    figure hog-serve "13 staked hogging keys + 20 honest, serve defaults" \
        --defaults serve --attacker-devices 13 --attacker-stake 1 --attack hog >> "$md"
    figure hog-fresh-serve "13 fresh hogging keys + 20 honest, serve defaults" \
        --defaults serve --attacker-devices 13 --attack hog >> "$md"
    figure hog-legacy "13 fresh hogging keys + 20 honest, old defaults" \
        --defaults legacy --attacker-devices 13 --attack hog >> "$md"
    cat "$md"
    exit 0
fi

for stakes in ${STAKES:-uniform zipf:1.0}; do
    table "$stakes"
done
