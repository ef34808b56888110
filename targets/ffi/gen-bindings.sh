#!/usr/bin/env bash
# Builds the fedge-ffi cdylib and generates its Kotlin, Swift and Python
# bindings in UniFFI library mode into targets/ffi/bindings/.
#
#   targets/ffi/gen-bindings.sh           regenerate the checked-in bindings
#   targets/ffi/gen-bindings.sh --check   regenerate into a temporary
#                                         directory and fail if the
#                                         checked-in files are stale
#
# Kotlin (bindings/kotlin) and Swift (bindings/swift, with the C header
# fedge_ffiFFI.h and its modulemap) are checked in; Python is generated
# into bindings/python, which git ignores (the tests generate their own).
# Generation is not formatted (--no-format), so the output does not depend
# on whether ktlint or swiftformat is installed.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$root"

mode=write
case "${1:-}" in
    "") ;;
    --check) mode=check ;;
    *)
        echo "usage: $0 [--check]" >&2
        exit 2
        ;;
esac

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/fedge/target}"
# The generator and the library, built together (one feature set): the
# workspace's test build, which builds both, so that after `cargo test
# --workspace` (ci/test.sh) this rebuilds nothing; `cargo build -p
# fedge-ffi` alone resolves other features and recompiles tract and wgpu.
cargo test --workspace --locked --no-run
# The cdylib that build made: `cargo test` leaves it in debug/deps/ (only
# `cargo build` copies it up to debug/, so a copy there may be stale).
case "$(uname -s)" in
    Darwin) lib="$CARGO_TARGET_DIR/debug/deps/libfedge_ffi.dylib" ;;
    *) lib="$CARGO_TARGET_DIR/debug/deps/libfedge_ffi.so" ;;
esac
[ -f "$lib" ] || { echo "error: $lib was not built" >&2; exit 1; }
bindgen="$CARGO_TARGET_DIR/debug/uniffi-bindgen"

generate() { # out_dir
    local out="$1"
    rm -rf "$out/kotlin" "$out/swift" "$out/python"
    for lang in kotlin swift python; do
        "$bindgen" generate --library "$lib" --language "$lang" --no-format \
            --out-dir "$out/$lang"
    done
}

if [ "$mode" = write ]; then
    generate "$here/bindings"
    echo "bindings written to $here/bindings/{kotlin,swift,python}"
    exit 0
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
generate "$tmp"
stale=0
for lang in kotlin swift; do
    if ! diff -ru "$here/bindings/$lang" "$tmp/$lang"; then
        stale=1
    fi
done
if [ "$stale" -ne 0 ]; then
    echo "error: the checked-in bindings are stale; run targets/ffi/gen-bindings.sh and commit targets/ffi/bindings" >&2
    exit 1
fi
echo "checked-in Kotlin and Swift bindings are current"
