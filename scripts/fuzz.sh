#!/usr/bin/env bash
# Builds the fuzz targets in fuzz/ and runs each for SECONDS (default 30). Fails when a target
# finds a crash; the crashing input is left in fuzz/artifacts/<target>/.
#
# Stable Rust only: instead of cargo-fuzz (which wants nightly for its sanitizer flags), the
# targets are built with the SanitizerCoverage passes libFuzzer needs, passed as plain codegen
# flags, and the binaries that libfuzzer-sys links are run directly.
#
# Usage: scripts/fuzz.sh [SECONDS] [TARGET...]
set -euo pipefail

cd "$(dirname "$0")/../fuzz"

seconds="${1:-30}"
shift || true
targets=("$@")
if [ "${#targets[@]}" -eq 0 ]; then
    targets=(decode_packets decode_payloads decode_link decode_session)
fi

host="$(rustc -vV | sed -n 's/^host: //p')"
# --target keeps these flags off build scripts and proc macros, which must not be instrumented.
export RUSTFLAGS="-Cpasses=sancov-module \
 -Cllvm-args=-sanitizer-coverage-level=4 \
 -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
 -Cllvm-args=-sanitizer-coverage-pc-table \
 -Cllvm-args=-sanitizer-coverage-trace-compares \
 --cfg fuzzing"
# Not --locked: fuzz/Cargo.lock follows tunnel-proto, whose dependencies may change.
echo "== building fuzz targets (${host}, release with debug assertions)"
cargo build --release --target "$host" --bins

failed=()
for target in "${targets[@]}"; do
    bin="target/${host}/release/${target}"
    corpus="corpus/${target}"
    artifacts="artifacts/${target}/"
    mkdir -p "$corpus" "$artifacts"
    echo "== fuzzing ${target} for ${seconds}s (corpus ${corpus})"
    # -timeout: one input taking over 10 s is a hang; -rss_limit_mb bounds memory blow-ups.
    if ! "$bin" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=16384 \
        -print_final_stats=1 -artifact_prefix="$artifacts" "$corpus" 2>"artifacts/${target}.log"; then
        tail -n 60 "artifacts/${target}.log"
        echo "!! ${target}: crash found; input saved under fuzz/${artifacts}" >&2
        echo "!! keep it as a test: copy it to fuzz/regressions/${target}/ and run" \
            "cargo test -p tunnel-proto --test fuzz_corpus" >&2
        failed+=("$target")
    else
        grep -E '^(stat::number_of_executed_units|stat::peak_rss_mb|#[0-9]+ +DONE)' \
            "artifacts/${target}.log" || tail -n 3 "artifacts/${target}.log"
    fi
done

if [ "${#failed[@]}" -ne 0 ]; then
    echo "fuzzing failed: ${failed[*]}" >&2
    exit 1
fi
echo "fuzzing: ${#targets[@]} targets ran ${seconds}s each without a crash"
