#!/usr/bin/env bash
# Builds the libFuzzer targets of fuzz/ with clang (ASan + UBSan + libFuzzer) and runs each for a
# bounded time from its seed corpus (fuzz/corpus/<target>/, copied to a scratch corpus so the
# committed seeds stay as they are), with fuzz/<target>.dict as its dictionary when there is
# one. Exits non-zero when a target crashes, hangs, leaks or runs out of memory, printing each
# reproducer's path and its bytes in base64 (so that a CI log keeps it: decode with
# `base64 -d > repro`); rerun one with
#   build/fuzz/fuzz/<target> <reproducer>
# A reproducer that shows a real bug becomes a test in tests/unit/fuzz_regressions_test.cc.
# The reproducers of the previous run of a target are kept in
# <build-dir>/fuzz-runs/<target>/artifacts.previous/.
#
# Usage: scripts/fuzz.sh [--time SECONDS] [--build-dir DIR] [--jobs N] [TARGET...]
#   --time       seconds per target (default 20; the small decoders uri_fuzzer and
#                serverset_member_fuzzer get half, which they saturate in)
#   --build-dir  build directory (default build/fuzz)
#   --jobs       build jobs, and targets fuzzed at the same time (default: nproc)
#   TARGET       run only these targets (default: all)
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=20
build_dir=build/fuzz
jobs=$(nproc)
targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --time) seconds=$2; shift 2 ;;
    --build-dir) build_dir=$2; shift 2 ;;
    --jobs) jobs=$2; shift 2 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    -*) echo "fuzz.sh: unknown option $1" >&2; exit 2 ;;
    *) targets+=("$1"); shift ;;
  esac
done
# In this order, two at a time (CI: 2 cores), the default 20 s each takes 70 s: three pairs of
# 20 s, then serverset_member_fuzzer beside uri_fuzzer (10 s each).
all_targets=(mux_frame_fuzzer mux_session_fuzzer thrift_reply_fuzzer http_response_fuzzer
             thrift_transport_fuzzer admin_request_fuzzer serverset_member_fuzzer uri_fuzzer)
# Seconds for target $1.
target_seconds() {
  case "$1" in
    uri_fuzzer|serverset_member_fuzzer) echo $(( seconds > 1 ? seconds / 2 : 1 )) ;;
    *) echo "$seconds" ;;
  esac
}
[ ${#targets[@]} -eq 0 ] && targets=("${all_targets[@]}")

bash scripts/install-deps.sh

echo "=== fuzz: build ($build_dir) ==="
cmake -G Ninja -S . -B "$build_dir" -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_BUILD_TYPE=Debug \
  -DSCALES_FUZZ=ON -DSCALES_BUILD_TESTS=OFF -DSCALES_BUILD_TOOLS=OFF -DSCALES_BUILD_EXAMPLES=OFF >/dev/null
cmake --build "$build_dir" -j "$jobs" --target "${targets[@]}"

work="$build_dir/fuzz-runs"
# Runs one target; its exit status lands in $work/<target>/rc.
run_target() {
  local t=$1 dir="$work/$1"
  # -timeout: one input taking 10 s is a hang; -rss_limit_mb bounds memory (ASan's quarantine
  # included) and -malloc_limit_mb any single allocation; every finding exits non-zero.
  local rc=0 dict=()
  [ -f "fuzz/$t.dict" ] && dict=(-dict="fuzz/$t.dict")
  "$build_dir/fuzz/$t" -max_total_time="$(target_seconds "$t")" -timeout=10 -rss_limit_mb=2048 \
    -malloc_limit_mb=512 -print_final_stats=1 -artifact_prefix="$dir/artifacts/" "${dict[@]}" \
    "$dir/corpus" >"$dir/log" 2>&1 || rc=$?
  echo "$rc" >"$dir/rc"
}

# As many targets at a time as there are jobs (each fuzzer uses one core).
running=0
for t in "${targets[@]}"; do
  dir="$work/$t"
  # A fresh scratch corpus and log; the last run's reproducers are kept aside, not deleted.
  rm -rf "$dir/corpus" "$dir/log" "$dir/rc" "$dir/artifacts.previous"
  [ -d "$dir/artifacts" ] && mv "$dir/artifacts" "$dir/artifacts.previous"
  mkdir -p "$dir/corpus" "$dir/artifacts"
  cp fuzz/corpus/"$t"/* "$dir/corpus/"
  echo "=== fuzz: $t for $(target_seconds "$t")s ==="
  run_target "$t" &
  running=$((running + 1))
  if [ "$running" -ge "$jobs" ]; then
    wait -n || true
    running=$((running - 1))
  fi
done
wait || true

failed=()
for t in "${targets[@]}"; do
  dir="$work/$t"
  if [ "$(cat "$dir/rc" 2>/dev/null || echo 1)" != 0 ]; then
    failed+=("$t")
    echo "--- $t: log tail ---"
    tail -n 60 "$dir/log"
    for a in "$dir"/artifacts/*; do
      [ -e "$a" ] || continue
      echo "fuzz.sh: $t: reproducer $a (run: $build_dir/fuzz/$t $a)"
      # The bytes themselves, for when the build directory is gone (a CI job's).
      echo "fuzz.sh: $t: $(basename "$a") base64: $(base64 -w0 "$a")"
    done
  else
    echo "$t: $(grep -E '^#[0-9]+[[:space:]]+DONE' "$dir/log" || echo done)"
  fi
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "=== fuzz: FAILED: ${failed[*]} (logs in $work/<target>/log) ==="
  exit 1
fi
echo "=== fuzz: ${#targets[@]} target(s) ran without a finding ==="
