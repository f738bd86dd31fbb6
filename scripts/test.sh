#!/usr/bin/env bash
# Runs every test of the workspace: the end-to-end tests in tests/ start the binaries from
# target/debug, so those are built first.
#
# SIM_SEEDS (seeds per randomized simulator test, default 200) and the other SIM_* variables
# of tunnel-proto/tests/simulator.rs pass through.
set -euo pipefail

cd "$(dirname "$0")/.."
export SIM_SEEDS="${SIM_SEEDS:-200}"

echo "== cargo build --workspace --bins"
cargo build --workspace --bins
echo "== cargo test --workspace (SIM_SEEDS=${SIM_SEEDS})"
cargo test --workspace
