#!/usr/bin/env bash
# Coverage-guided fuzzing of every decoder (the cargo-fuzz crate in fuzz/,
# libFuzzer, nightly toolchain). Runs each target for SECONDS_PER_TARGET
# seconds (first argument or environment; default 60), one target at a
# time with one fuzzing process (-jobs=1 -workers=1), then prints each
# target's executions and crashes. TARGETS="frame update" picks targets
# (default: all). Interesting inputs are added to fuzz/corpus/<target>/
# (minimise with `cargo +nightly fuzz cmin <target>` before committing);
# crashing inputs go to fuzz/artifacts/<target>/. Exits 1 if any target
# crashed. The onnx_* and sensor_window targets build tract (minutes, cold).
# Builds keep debug assertions and overflow checks; SANITIZER (default
# none: our code has no `unsafe`, and AddressSanitizer costs several times
# the executions) may be `address`.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
seconds="${1:-${SECONDS_PER_TARGET:-60}}"
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-$HOME/.cache/fedge/fuzz-target}"
all="frame device_msg agg_msg update update_body partial codec_spec model_blob params_f32le model_delta residual sensor_window onnx_import onnx_train"
targets="${TARGETS:-$all}"

command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked

# The cargo feature a target needs (see fuzz/Cargo.toml).
feature() {
    case "$1" in
        residual) echo device ;;
        sensor_window | onnx_import | onnx_train) echo engine ;;
        *) echo "" ;;
    esac
}
features=""
for t in $targets; do
    f="$(feature "$t")"
    if [ "$f" = engine ] || { [ "$f" = device ] && [ -z "$features" ]; }; then
        features="$f"
    fi
done
(cd fuzz && cargo +nightly fuzz build --sanitizer "${SANITIZER:-none}" \
    ${features:+--features "$features"} --target-dir "$CARGO_TARGET_DIR")
bin="$CARGO_TARGET_DIR/x86_64-unknown-linux-gnu/release"

# Limits on one input: ONNX models are larger and slower than frames.
max_len() {
    case "$1" in
        onnx_import | onnx_train) echo 16384 ;;
        *) echo 4096 ;;
    esac
}

summary="$(mktemp)"
failed=0
for t in $targets; do
    corpus="$root/fuzz/corpus/$t"
    artifacts="$root/fuzz/artifacts/$t"
    mkdir -p "$corpus" "$artifacts"
    work="$(mktemp -d)"
    touch "$work/start"
    rc=0
    # -jobs=1 runs the fuzzer in one child process that logs to fuzz-0.log.
    (cd "$work" && "$bin/$t" "$corpus" -jobs=1 -workers=1 \
        -max_total_time="$seconds" -max_len="$(max_len "$t")" -timeout=10 \
        -rss_limit_mb=2048 -print_final_stats=1 -artifact_prefix="$artifacts/" \
        > "$work/main.log" 2>&1) || rc=$?
    log="$work/fuzz-0.log"
    [ -f "$log" ] || log="$work/main.log"
    execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)"
    crashes="$(find "$artifacts" -type f -newer "$work/start" | wc -l)"
    if [ "$rc" -ne 0 ] || [ "$crashes" -ne 0 ]; then
        failed=1
        echo "== $t: exit $rc, $crashes new artifacts in $artifacts; last lines of its log:"
        tail -40 "$log"
    fi
    printf "%-14s %12s executions %3s crashes\n" "$t" "${execs:-?}" "$crashes" >> "$summary"
    tail -1 "$summary"
    rm -rf "$work"
done
echo "== fuzzed ${seconds}s per target"
cat "$summary"
rm -f "$summary"
exit "$failed"
