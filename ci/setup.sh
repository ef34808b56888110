#!/usr/bin/env bash
# Installs what a fresh machine needs to build and test fedge. Idempotent:
# each step checks before it installs. Called by ci/test.sh and ci/demo.sh.
set -euo pipefail

# Rust components for the checks in the suite.
for c in rustfmt clippy; do
    if ! rustup component list --installed 2>/dev/null | grep -q "^$c"; then
        rustup component add "$c"
    fi
done

# The rest is for the test suite only (`bash ci/setup.sh suite`, called by
# ci/test.sh); the main command needs nothing more than Rust.
if [ "${1:-}" != "suite" ]; then
    exit 0
fi

# Debian packages the suite uses:
#   mesa-vulkan-drivers, libvulkan1: lavapipe, Mesa's software Vulkan driver,
#     so the wgpu executor's tests run on machines without a GPU;
#   gcc-aarch64-linux-gnu, libc6-dev-arm64-cross: the linker for the
#     cross-built aarch64 device binary; qemu-user: runs it here.
need=()
for p in mesa-vulkan-drivers libvulkan1 gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if [ "${#need[@]}" -gt 0 ]; then
    echo "== installing ${need[*]}"
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

# Rust targets for the cross-built device binary (targets/).
for t in aarch64-unknown-linux-gnu; do
    if ! rustup target list --installed 2>/dev/null | grep -qx "$t"; then
        rustup target add "$t"
    fi
done
