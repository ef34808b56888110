#!/usr/bin/env bash
# The LoRA experiment of the README ("LoRA: adapters on a frozen model"):
# pretrain a zoo model centrally on the roles of the play that are NOT in
# the federation, then federate over the 50 roles with the most text (one
# device each), full fine-tuning against LoRA.
# Usage: bash ci/lora-experiment.sh [OUT_DIR]   (needs python3)
#   MODEL=char (default): the character MLP, models/char_model.onnx
#   MODEL=transformer: the causal transformer, models/char_transformer.onnx
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/fedge/target}"
export RUST_LOG="${RUST_LOG:-warn}"
model="${MODEL:-char}"
out="${1:-lora-experiment-$model}"
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

case "$model" in
char)
    onnx=models/char_model.onnx
    # 44,142 windows of 32 characters every 7.
    pretrain=(--stride 7 --train 0..40000 --test 40000..44000 --epochs 4 --batch 64
        --lr 0.002 --lr-decay 0.7 --optimizer adam)
    fed=(--local-epochs 2)
    full=(--learning-rate 0.01)
    lora=(--lora 'rank=8,alpha=16,targets=fc*' --learning-rate 0.01)
    ;;
transformer)
    onnx=models/char_transformer.onnx
    # 9,656 windows of 32 characters every 32: the transformer learns the
    # next character at every position, so its windows need not overlap.
    pretrain=(--stride 32 --train 0..9000 --test 9000..9650 --epochs 8 --batch 32
        --lr 0.002 --lr-decay 0.75 --optimizer adam)
    # A task takes minutes on a shared 2-core machine: a 20-minute deadline.
    fed=(--local-epochs 1 --optimizer adam --round-deadline-ms 1200000)
    full=(--learning-rate 0.0003)
    lora=(--lora 'rank=4,alpha=8,targets=blocks.*' --learning-rate 0.001)
    ;;
*)
    echo "MODEL must be char or transformer, not $model" >&2
    exit 2
    ;;
esac

"$bin/fedge-device" train --model "$onnx" --data "text:$out/pretrain.txt" "${pretrain[@]}" \
    --out "$out/pretrained.onnx" --json "$out/pretrain.json"

run() {
    local name=$1
    shift
    "$bin/fedge-aggregator" simulate --model "$out/pretrained.onnx" --data shakespeare \
        --partition role --devices 50 --devices-per-round 10 --rounds 20 \
        --train-samples 30000 "${fed[@]}" \
        --out-dir "$out/$name" "$@" | tee "$out/$name.log"
}
run full --codec dense-f32 "${full[@]}"
run lora --codec dense-f32 "${lora[@]}"
if [ "$model" = char ]; then
    run full-q8 --codec q8 "${full[@]}"
    run lora-q8 --codec q8 "${lora[@]}"
fi
