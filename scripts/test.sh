#!/usr/bin/env bash
# Builds scales and runs the whole test suite: unit and integration tests (real nginx and the
# scales test server on 127.0.0.1), then the same suite under AddressSanitizer +
# UndefinedBehaviorSanitizer, then the ThreadSanitizer set (tests/CMakeLists.txt), then each libFuzzer
# target for a bounded time.
# Installs missing Debian packages first. Usage: scripts/test.sh [--quick]  (--quick: no sanitizers)
set -euo pipefail
cd "$(dirname "$0")/.."

quick=0
[ "${1:-}" = "--quick" ] && quick=1

bash scripts/install-deps.sh

jobs=$(nproc)
# Compile-cache hits across checkouts: paths below the checkout are hashed relative to it, so a
# clean clone reuses what any other checkout on the machine already compiled.
export CCACHE_BASEDIR="$PWD" CCACHE_NOHASHDIR=true
run_suite() {
  local preset=$1
  echo "=== build: $preset ==="
  cmake --preset "$preset" >/dev/null
  cmake --build --preset "$preset" -j "$jobs"
  echo "=== test: $preset ==="
  ctest --preset "$preset" -j "$jobs"
}

run_suite release
echo "=== bench smoke ==="
bench/run --quick --build-dir build/release   # every comparison once, briefly (issue 7)
if [ "$quick" = 0 ]; then
  run_suite asan
  run_suite tsan
  echo "=== fuzz ==="
  bash scripts/fuzz.sh   # libFuzzer targets of fuzz/, 20 s each
fi
echo "=== all tests passed ==="
