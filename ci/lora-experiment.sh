#!/usr/bin/env bash
# The LoRA experiment of the README ("LoRA: adapters on a frozen model"):
# pretrain the zoo's character model centrally on the roles of the play
# that are NOT in the federation, then federate over the 50 roles with
# the most text (one device each), full fine-tuning against LoRA.
# Usage: bash ci/lora-experiment.sh [OUT_DIR]   (needs python3)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/fedge/target}"
export RUST_LOG="${RUST_LOG:-warn}"
out="${1:-lora-experiment}"
mkdir -p "$out"
cargo build --workspace --locked
bin="$CARGO_TARGET_DIR/debug"

# The speeches of every role but the 50 with the most text (the rule of
# fedge_engine::data::speeches_by_role and split_by_role), plus the
# characters they lack, so that the vocabulary is the whole play's.
python3 - "$out/pretrain.txt" <<'PY'
import sys
text = open("models/data/tinyshakespeare/input.txt").read()
order, by = [], {}
for para in text.split("\n\n"):
    para = para.strip("\n")
    if "\n" not in para:
        continue
    head, body = para.split("\n", 1)
    name = head[:-1] if head.endswith(":") else ""
    if not name or ":" in name or not body.strip():
        continue
    if name not in by:
        order.append(name)
        by[name] = ""
    by[name] += body + "\n"
roles = sorted(order, key=lambda r: (-len(by[r]), r))
rest = "".join(by[r] for r in roles[50:])
missing = "".join(c for c in sorted(set(text)) if c not in set(rest))
open(sys.argv[1], "w").write(rest + missing + "\n")
print(f"{len(roles) - 50} roles outside the federation, {len(rest)} characters")
PY

"$bin/fedge-device" train --model models/char_model.onnx --data "text:$out/pretrain.txt" \
    --train 0..40000 --test 40000..44000 --epochs 4 --batch 64 --lr 0.002 --lr-decay 0.7 \
    --optimizer adam --out "$out/pretrained.onnx" --json "$out/pretrain.json"

run() {
    local name=$1
    shift
    "$bin/fedge-aggregator" simulate --model "$out/pretrained.onnx" --data shakespeare \
        --partition role --devices 50 --devices-per-round 10 --rounds 20 \
        --train-samples 30000 --local-epochs 2 --learning-rate 0.01 \
        --out-dir "$out/$name" "$@" | tee "$out/$name.log"
}
run full --codec dense-f32
run full-q8 --codec q8
run lora8 --codec dense-f32 --lora 'rank=8,alpha=16,targets=fc*'
run lora8-q8 --codec q8 --lora 'rank=8,alpha=16,targets=fc*'
