#!/usr/bin/env bash
# Runs an aggregator and three device processes over loopback QUIC for two
# rounds and prints what happened. Devices send known updates
# (--known-update), so the final model can be checked by hand:
# 0.5 + 2 x (0.5*1 + 1.0*2 + 2.0*4) / 7 = 3.5 on every parameter. That
# needs plain sample-weighted FedAvg with open enrolment, which `serve`
# refuses by default (see `serve --help`): the demo's config says so.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/fedge/target}"
bash ci/setup.sh
cargo build --workspace --locked
bin="$CARGO_TARGET_DIR/debug"
work="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

"$bin/fedge-aggregator" model init --tensors "w=784x10,b=10" --value 0.5 --out "$work/initial.fedge"
cat >"$work/closed-fleet.toml" <<'TOML'
i_know_this_is_unsafe = true
[weights]
stake = { kind = "constant" }
samples = { kind = "linear" }
max_share = 1.0
allow_unknown = true
[strategy]
combine = { kind = "mean" }
TOML
"$bin/fedge-aggregator" serve --config "$work/closed-fleet.toml" --listen 127.0.0.1:0 \
    --state-dir "$work/agg" --model "$work/initial.fedge" \
    --rounds 2 --devices-per-round 3 --min-devices 3 >"$work/agg.out" &
for _ in $(seq 100); do grep -q '^fingerprint' "$work/agg.out" 2>/dev/null && break; sleep 0.1; done
addr="$(sed -n 's/^listening //p' "$work/agg.out")"
pin="$(sed -n 's/^fingerprint //p' "$work/agg.out")"
echo "aggregator on $addr, certificate fingerprint $pin"
i=0
for u in "0.5 1" "1.0 2" "2.0 4"; do
    set -- $u
    "$bin/fedge-device" run --aggregator "$addr" --pin "$pin" --state-dir "$work/dev$i" \
        --known-update "$1" --samples "$2" --seed "$i" &
    i=$((i + 1))
done
wait
cat "$work/agg.out"
final="$(sed -n 's/.*final_version=//p' "$work/agg.out")"
"$bin/fedge-aggregator" model info "$work/agg/models/$final.fedge" | head -3
