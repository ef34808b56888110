#!/usr/bin/env bash
# The cross-built aarch64 device binary, run under qemu-user, trains zoo
# models on shipped data and must reach the same losses as the native
# build (relative tolerance 1e-3: NEON and AVX kernels sum in different
# orders). Part of the test suite (ci/test.sh), for aarch64.
#
#   bash targets/qemu-check.sh [TARGET]   aarch64-unknown-linux-gnu (default)
#                                         or armv7-unknown-linux-gnueabihf
#                                         (needs gcc-arm-linux-gnueabihf,
#                                         libc6-dev-armhf-cross, qemu-user)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/fedge/target}"
export RUST_LOG="${RUST_LOG:-error}"
target="${1:-aarch64-unknown-linux-gnu}"
case "$target" in
    aarch64-unknown-linux-gnu) qemu=qemu-aarch64 sysroot=/usr/aarch64-linux-gnu arch=AArch64 ;;
    armv7-unknown-linux-gnueabihf) qemu=qemu-arm sysroot=/usr/arm-linux-gnueabihf arch=ARM ;;
    *) echo "error: no qemu check for $target" >&2; exit 2 ;;
esac
bash targets/build.sh "$target"
cross="$CARGO_TARGET_DIR/$target/device/fedge-device"
# The native reference binary comes from the suite's own build: the same
# package selection, features and dev-dependencies as `cargo test
# --workspace`, so after the suite this rebuilds nothing. A narrower build
# (`-p fedge-device --bin fedge-device`) resolves features differently
# (serde, smallvec, memchr, ...) and recompiles tract and wgpu; even
# `cargo build --workspace --bins` differs (no dev-dependencies: proptest's
# regex-syntax features drop out) and recompiles fedge-proto's build
# dependencies and every fedge crate.
cargo test --workspace --locked --quiet --no-run
native="$CARGO_TARGET_DIR/debug/fedge-device"
command -v "$qemu" >/dev/null || { echo "error: $qemu missing (\`bash ci/setup.sh suite\` installs qemu-user)" >&2; exit 1; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
readelf -h "$cross" | grep -q "Machine: *$arch" || { echo "error: $cross is not an $arch binary" >&2; exit 1; }

check() {
    local name="$1"; shift
    "$native" train "$@" --json "$work/$name-native.json" > /dev/null
    "$qemu" -L "$sysroot" "$cross" train "$@" --json "$work/$name-qemu.json" > /dev/null
    python3 - "$name" "$work/$name-native.json" "$work/$name-qemu.json" "$target" <<'PY'
import json, sys
name, a, b, target = sys.argv[1], json.load(open(sys.argv[2])), json.load(open(sys.argv[3])), sys.argv[4]
worst = 0.0
for ea, eb in zip(a["epochs"], b["epochs"], strict=True):
    for k in ("train_loss", "test_loss"):
        x, y = ea[k], eb[k]
        rel = abs(x - y) / max(1.0, abs(x))
        worst = max(worst, rel)
        print(f"{name} epoch {ea['epoch']} {k}: native {x:.6f} {target}/qemu {y:.6f} (rel diff {rel:.2e})")
        if not rel <= 1e-3:
            sys.exit(f"{name}: {k} differs beyond 1e-3")
print(f"{name}: worst relative loss difference {worst:.2e} (tolerance 1e-3)")
PY
}

check mlp --model models/mlp.onnx --train 0..512 --test 9000..9256 --epochs 2 --batch 32 --seed 1
check small_cnn --model models/small_cnn.onnx --train 0..256 --test 9000..9128 --epochs 1 --batch 32 --seed 1
echo "qemu check passed ($target)"
