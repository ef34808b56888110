#!/usr/bin/env bash
# Cross-builds the device binary, size-tuned (the `device` profile: fat
# LTO, one codegen unit, panic=abort, stripped), and checks its size.
#
#   bash targets/build.sh [TARGET]      TARGET defaults to aarch64-unknown-linux-gnu
#
# Targets: aarch64-unknown-linux-gnu (Raspberry Pi 4/5, Jetson),
# armv7-unknown-linux-gnueabihf (older Pis), aarch64-linux-android (needs
# an NDK in $ANDROID_NDK_HOME). Installs what it needs (Rust target, Debian
# cross gcc). Prints the binary's path and stripped size; fails when the
# size is over the budget (FEDGE_SIZE_BUDGET_MB, default 15).
#
# FEDGE_DEVICE_FEATURES picks extra cargo features of fedge-device
# (default: none, the engine with the tract CPU executor only);
# `FEDGE_DEVICE_FEATURES=gpu` adds the wgpu executor for boards with a
# Vulkan GPU (Jetson), about 6 MiB more. The `engine` feature is always on:
# the binary needs it.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${1:-aarch64-unknown-linux-gnu}"
budget_mb="${FEDGE_SIZE_BUDGET_MB:-15}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/fedge/target}"

SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
apt_need() {
    local need=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
    done
    if [ "${#need[@]}" -gt 0 ]; then
        echo "== installing ${need[*]}"
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
    fi
}

case "$target" in
    aarch64-unknown-linux-gnu)
        apt_need gcc-aarch64-linux-gnu libc6-dev-arm64-cross
        strip_tool=aarch64-linux-gnu-strip ;;
    armv7-unknown-linux-gnueabihf)
        apt_need gcc-arm-linux-gnueabihf libc6-dev-armhf-cross
        strip_tool=arm-linux-gnueabihf-strip ;;
    aarch64-linux-android)
        ndk="${ANDROID_NDK_HOME:-${ANDROID_NDK_ROOT:-}}"
        if [ -z "$ndk" ] || [ ! -d "$ndk" ]; then
            echo "error: aarch64-linux-android needs the Android NDK: set ANDROID_NDK_HOME (see targets/README.md)" >&2
            exit 2
        fi
        api="${ANDROID_API:-24}"
        bin="$ndk/toolchains/llvm/prebuilt/linux-x86_64/bin"
        export CARGO_TARGET_AARCH64_LINUX_ANDROID_LINKER="$bin/aarch64-linux-android$api-clang"
        export CC_aarch64_linux_android="$CARGO_TARGET_AARCH64_LINUX_ANDROID_LINKER"
        export AR_aarch64_linux_android="$bin/llvm-ar"
        strip_tool="$bin/llvm-strip" ;;
    *)
        echo "error: unknown target $target (aarch64-unknown-linux-gnu, armv7-unknown-linux-gnueabihf, aarch64-linux-android)" >&2
        exit 2 ;;
esac

if ! rustup target list --installed | grep -qx "$target"; then
    rustup target add "$target"
fi

features="${FEDGE_DEVICE_FEATURES:-}"
echo "== cargo build --profile device --target $target -p fedge-device --bin fedge-device --no-default-features --features 'engine,$features'"
cargo build --locked --profile device --target "$target" -p fedge-device --bin fedge-device \
    --no-default-features --features "engine,$features"
bin="$CARGO_TARGET_DIR/$target/device/fedge-device"
# The profile strips already; strip again with the target's tool in case a
# toolchain left sections behind (a no-op when there are none).
"$strip_tool" "$bin" 2>/dev/null || true
bytes=$(stat -c %s "$bin")
mb=$(awk "BEGIN { printf \"%.2f\", $bytes / 1048576 }")
echo "fedge-device for $target (features: ${features:-none}): $bin"
echo "stripped size: $bytes bytes ($mb MiB); budget $budget_mb MiB"
if [ "$bytes" -gt $((budget_mb * 1048576)) ]; then
    echo "error: the stripped binary is over the $budget_mb MiB budget" >&2
    exit 1
fi
