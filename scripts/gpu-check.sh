#!/usr/bin/env bash
# GPU check of the CUDA backend, for a machine with an H100/H200 (or any sm_90 card; set SPECDIFF_CUDA_ARCH
# for another): builds the CUDA tests and benchmarks (Release), runs the microbenchmarks (bench/cuda: issue
# 12's accelerator step, row movers, LSE column sums), the `gpu` tests, the host suite, then the gpu suites
# again under compute-sanitizer (memcheck on all, racecheck on one suite, synccheck on the graph suites),
# and writes logs, bench.jsonl and a markdown summary (printed last: card, driver, commit, every step and
# every gpu suite with its result, the benchmark headline and table) to $OUT, or build/gpu-check.
#
# Only tests/cuda and bench/cuda are configured (a small driver project generated in the build folder), so
# the check needs nvcc, CMake and doctest, not the host engine's dependencies. A machine without the doctest
# package can use a copy of the header: put doctest/doctest.h under .deps/ at the repository root (ignored
# by git) or point SPECDIFF_DOCTEST_INCLUDE_DIR at its parent folder.
#
# Budget: each step has its own cap (seconds, below) and never more than what is left of
# SPECDIFF_GPU_CHECK_BUDGET seconds (default 380), so the whole check stays under about 6.5 minutes and the
# summary is always written. The benchmarks and tests run before the sanitizers, which get what is left.
# SPECDIFF_GPU_CHECK_JOBS sets the build's parallelism (default: every core).
set -uo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${OUT:-$root/build/gpu-check}
build=${SPECDIFF_GPU_CHECK_BUILD:-$root/build/gpu-check-build}
arch=${SPECDIFF_CUDA_ARCH:-90}
budget=${SPECDIFF_GPU_CHECK_BUDGET:-380}
jobs=${SPECDIFF_GPU_CHECK_JOBS:-$(nproc 2>/dev/null || echo 4)}
mkdir -p "$out" "$build/driver"
began=$SECONDS
summary=()   # markdown rows
failed=0

left() { echo $((budget - (SECONDS - began))); }

# step NAME LOG CAP COMMAND...: runs with a timeout of CAP seconds or what is left of the budget, whichever
# is less, and records the outcome.
step() {
  local name=$1 log=$2 cap=$3
  shift 3
  local t0=$SECONDS limit
  limit=$(left)
  ((cap < limit)) && limit=$cap
  if ((limit < 10)); then
    summary+=("| $name | not run: budget spent | 0 |")
    failed=1
    return 1
  fi
  timeout --kill-after=5 "$limit" "$@" >"$out/$log" 2>&1
  local rc=$?
  local result="ok"
  if ((rc == 124 || rc == 137)); then result="TIMED OUT after ${limit}s"; failed=1
  elif ((rc == 77)); then result="SKIPPED (no usable GPU)"; failed=1
  elif ((rc != 0)); then result="FAILED (exit $rc)"; failed=1
  fi
  summary+=("| $name | $result ($log) | $((SECONDS - t0)) |")
  return $rc
}

card=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1)
commit="$(git -C "$root" rev-parse HEAD 2>/dev/null || echo unknown)$(git -C "$root" status --porcelain --untracked-files=no 2>/dev/null | grep -q . && echo ' (tracked files modified)')"
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $commit"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || echo "nvidia-smi: not available"
  nvcc --version 2>&1 | tail -2 || echo "nvcc: not on PATH"
  cmake --version | head -1
  command -v compute-sanitizer || echo "compute-sanitizer: not on PATH"
} >"$out/environment.log" 2>&1

# doctest: the system package, else a copy that travelled with the tree.
doctest_dir=${SPECDIFF_DOCTEST_INCLUDE_DIR:-}
if [[ -z $doctest_dir && ! -f /usr/include/doctest/doctest.h && -f $root/.deps/doctest/doctest.h ]]; then doctest_dir=$root/.deps; fi

cat >"$build/driver/CMakeLists.txt" <<CMAKE
cmake_minimum_required(VERSION 3.25)
project(specdiff_gpu_check LANGUAGES CXX CUDA)
set(SPECDIFF_CUDA ON)
set(SPECDIFF_WERROR ON)
list(APPEND CMAKE_MODULE_PATH "$root/cmake")
include(SpecdiffWarnings)
add_library(specdiff INTERFACE)
add_library(specdiff::specdiff ALIAS specdiff)
target_include_directories(specdiff INTERFACE "$root/include")
target_compile_features(specdiff INTERFACE cxx_std_20)
find_package(CUDAToolkit REQUIRED)
include(specdiffCuda)
add_library(specdiff_cuda INTERFACE)
add_library(specdiff::cuda ALIAS specdiff_cuda)
specdiff_cuda_usage_requirements(specdiff_cuda specdiff)
enable_testing()
add_subdirectory("$root/tests/cuda" tests-cuda)
add_subdirectory("$root/bench/cuda" bench-cuda)
CMAKE

generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
configure_args=(-S "$build/driver" -B "$build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES="$arch")
[[ -n $doctest_dir ]] && configure_args+=(-DSPECDIFF_DOCTEST_INCLUDE_DIR="$doctest_dir")
command -v nvcc >/dev/null || { [[ -x /usr/local/cuda/bin/nvcc ]] && configure_args+=(-DCMAKE_CUDA_COMPILER=/usr/local/cuda/bin/nvcc); }

tests=$build/tests-cuda/specdiff_cuda_tests
bench=$build/bench-cuda/specdiff_cuda_bench
sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)

# Caps (seconds): configure 120, build 200, benchmarks 60 (about 20 s expected), gpu tests 150 (120 per suite),
# host tests 30, memcheck 120, racecheck 45, synccheck 60; the budget (380) cuts the last ones short if the
# build was slow. The benchmarks run first: their numbers are what a short device session is for.
if step "configure (Release, sm_$arch)" configure.log 120 cmake "${configure_args[@]}" &&
   step "build tests + bench" build.log 200 cmake --build "$build" --target specdiff_cuda_tests specdiff_cuda_bench -j "$jobs"; then
  ctest --test-dir "$build" -N -L gpu >"$out/gpu-suites.log" 2>&1
  step "microbenchmarks" bench.log 60 "$bench" --runs 20 --json "$out/bench.jsonl"
  step "ctest -L gpu" tests.log 150 ctest --test-dir "$build" -L gpu --output-on-failure --no-tests=error --timeout 120
  if grep -q "(Skipped)" "$out/tests.log"; then  # ctest exits 0 when tests skip: say so, and fail the check
    summary[-1]="| ctest -L gpu | SKIPPED: no usable GPU (tests.log) | 0 |"
    failed=1
  fi
  step "host tests (cuda/host)" host-tests.log 30 "$tests" --test-suite=host
  if [[ -n $sanitizer ]]; then
    step "compute-sanitizer memcheck, all gpu suites" memcheck.log 120 \
      "$sanitizer" --tool memcheck --error-exitcode 99 --print-limit 20 "$tests" --gpu \
      --test-suite=scorers,attention,lse,classifier,rows,cache_store,graph,accelerator,accelerator_graph,accelerator_errors,rows_bf16,modules_bf16
    step "compute-sanitizer racecheck, classifier determinism" racecheck.log 45 \
      "$sanitizer" --tool racecheck --error-exitcode 99 --print-limit 20 "$tests" --gpu --test-suite=classifier \
      --test-case="classification is deterministic and reuses its workspace"
    step "compute-sanitizer synccheck, graph suites" synccheck.log 60 \
      "$sanitizer" --tool synccheck --error-exitcode 99 --print-limit 20 "$tests" --gpu --test-suite=graph,accelerator_graph
  else
    summary+=("| compute-sanitizer | not found on PATH or in /usr/local/cuda/bin | 0 |")
    failed=1
  fi
fi

# One row per gpu suite from ctest's log: name, result (Passed, Failed, Skipped, Timeout, ...), seconds.
suite_rows() {
  [[ -s $out/tests.log ]] || return 0
  awk '
  /^ *[0-9]+\/[0-9]+ Test +#[0-9]+: / {
    line = $0; sub(/^ *[0-9]+\/[0-9]+ Test +#[0-9]+: /, "", line)
    name = line; sub(/ .*/, "", name)
    rest = substr(line, length(name) + 1); sub(/^ *\.*/, "", rest); gsub(/\*/, "", rest)
    secs = ""
    if (match(rest, / +[0-9.]+ sec.*$/)) { secs = substr(rest, RSTART); rest = substr(rest, 1, RSTART - 1); sub(/^ +/, "", secs); sub(/ sec.*/, "", secs) }
    printf "| %s | %s | %s |\n", name, rest, secs
  }' "$out/tests.log"
}

{
  echo "# SpecDiff CUDA GPU check"
  echo
  echo "| | |"
  echo "|---|---|"
  echo "| card | ${card:-unknown (nvidia-smi not available)} |"
  echo "| driver | ${driver:-unknown} |"
  echo "| commit | $commit |"
  echo "| result | $( ((failed)) && echo 'FAILED (a step failed, timed out or was skipped)' || echo 'passed' ) |"
  echo "| total | $((SECONDS - began)) s of a $budget s budget |"
  echo
  echo "| step | result (log) | seconds |"
  echo "|---|---|---:|"
  printf '%s\n' "${summary[@]}"
  echo
  echo "## GPU suites (tests.log)"
  echo
  listed=$(grep -c "Test *#" "$out/gpu-suites.log" 2>/dev/null)
  echo "ctest -N -L gpu lists ${listed:-0} suites."
  echo
  echo "| suite | result | seconds |"
  echo "|---|---|---:|"
  rows=$(suite_rows)
  if [[ -n $rows ]]; then echo "$rows"; else echo "| (none ran) | see the steps above | |"; fi
  echo
  echo "## Microbenchmarks (bench.log, bench.jsonl)"
  echo
  if [[ -s $out/bench.log ]]; then cat "$out/bench.log"; else echo "not run"; fi
  echo
  echo '```'
  cat "$out/environment.log"
  echo '```'
  echo
  echo "logs in $out"
} >"$out/summary.md"
cat "$out/summary.md"
exit $failed
