#!/usr/bin/env bash
# Builds every cargo-fuzz target and runs each for a bounded time.
# The toolchain is stable: RUSTC_BOOTSTRAP=1 lets it take the sanitizer
# flags cargo-fuzz passes. FUZZ_SECONDS (default 20) bounds each target.
set -euo pipefail
cd "$(dirname "$0")"
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi
export RUSTC_BOOTSTRAP=1
seconds="${FUZZ_SECONDS:-20}"
cargo fuzz build -O
for target in $(cargo fuzz list); do
  echo "=== fuzz $target (${seconds}s)"
  cargo fuzz run -O "$target" -- -max_total_time="$seconds" -rss_limit_mb=2048
done
echo "fuzz: all targets ran ${seconds}s without a crash"
