#!/usr/bin/env bash
# The whole test suite: formatting, lints, and every test in the workspace.
# This is the README's test command; .ci/run calls it.
set -euo pipefail
cd "$(dirname "$0")/.."
# A target directory outside the clone, reused between runs when present;
# the suite also passes from nothing.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/fedge/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
bash ci/setup.sh suite
# A private PostgreSQL server for the store and crash tests' PostgreSQL
# half (they fail, not skip, without FEDGE_TEST_PG_URL); stopped on exit.
echo "== PostgreSQL for the store tests"
trap 'bash ci/pg.sh stop' EXIT
pg_env=$(bash ci/pg.sh start)
eval "$pg_env"
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy --all-targets -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test"
cargo test --workspace --locked
echo "== FFI bindings (Kotlin, Swift, C header) are current"
bash targets/ffi/gen-bindings.sh --check
echo "== aarch64 device binary: size budget, and the same losses under qemu as native"
bash targets/qemu-check.sh
