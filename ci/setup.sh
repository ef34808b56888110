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
