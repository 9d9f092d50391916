#!/usr/bin/env bash
# GPU check of the CUDA backend, for a machine with an H100/H200 (or any sm_90 card; set SPECDIFF_CUDA_ARCH
# for another): builds the CUDA tests and benchmarks (Release), runs the `gpu` tests, runs them again under
# compute-sanitizer (memcheck on all, racecheck on one suite), runs the microbenchmarks, and writes logs
# and a markdown summary (printed last) to $OUT, or build/gpu-check when OUT is unset.
#
# Only tests/cuda and bench/cuda are configured (a small driver project generated in the build folder), so
# the check needs nvcc, CMake and doctest, not the host engine's dependencies. A machine without the doctest
# package can use a copy of the header: put doctest/doctest.h under .deps/ at the repository root (ignored
# by git) or point SPECDIFF_DOCTEST_INCLUDE_DIR at its parent folder.
#
# Budget: about 6 minutes on a 16-core box; each step gets a timeout from what is left of
# SPECDIFF_GPU_CHECK_BUDGET seconds (default 340), so the summary is always written.
set -uo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${OUT:-$root/build/gpu-check}
build=${SPECDIFF_GPU_CHECK_BUILD:-$root/build/gpu-check-build}
arch=${SPECDIFF_CUDA_ARCH:-90}
budget=${SPECDIFF_GPU_CHECK_BUDGET:-340}
jobs=$(nproc 2>/dev/null || echo 4)
mkdir -p "$out" "$build/driver"
began=$SECONDS
summary=()   # markdown rows
failed=0

left() { echo $((budget - (SECONDS - began))); }

# step NAME LOG COMMAND...: runs with a timeout from the remaining budget, records the outcome.
step() {
  local name=$1 log=$2
  shift 2
  local t0=$SECONDS limit
  limit=$(left)
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

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $(git -C "$root" rev-parse HEAD 2>/dev/null || echo unknown) $(git -C "$root" status --porcelain 2>/dev/null | grep -q . && echo '(dirty tree)')"
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

if step "configure (Release, sm_$arch)" configure.log cmake "${configure_args[@]}" &&
   step "build tests + bench" build.log cmake --build "$build" --target specdiff_cuda_tests specdiff_cuda_bench -j "$jobs"; then
  step "ctest -L gpu" tests.log ctest --test-dir "$build" -L gpu --output-on-failure --no-tests=error
  if grep -q "(Skipped)" "$out/tests.log"; then  # ctest exits 0 when tests skip: say so, and fail the check
    summary[-1]="| ctest -L gpu | SKIPPED: no usable GPU (tests.log) | 0 |"
    failed=1
  fi
  step "host tests (cuda/host)" host-tests.log "$tests" --test-suite=host
  if [[ -n $sanitizer ]]; then
    step "compute-sanitizer memcheck, all gpu suites" memcheck.log \
      "$sanitizer" --tool memcheck --error-exitcode 99 --print-limit 20 "$tests" --gpu \
      --test-suite=scorers,attention,classifier,rows,cache_store,graph,accelerator,accelerator_graph,accelerator_errors,rows_bf16
    step "compute-sanitizer racecheck, classifier determinism" racecheck.log \
      "$sanitizer" --tool racecheck --error-exitcode 99 --print-limit 20 "$tests" --gpu --test-suite=classifier \
      --test-case="classification is deterministic and reuses its workspace"
    step "compute-sanitizer synccheck, graph suites" synccheck.log \
      "$sanitizer" --tool synccheck --error-exitcode 99 --print-limit 20 "$tests" --gpu --test-suite=graph,accelerator_graph
  else
    summary+=("| compute-sanitizer | not found on PATH or in /usr/local/cuda/bin | 0 |")
    failed=1
  fi
  step "microbenchmarks" bench.log "$bench" --runs 50
fi

{
  echo "# SpecDiff CUDA GPU check"
  echo
  echo '```'
  cat "$out/environment.log"
  echo '```'
  echo
  echo "| step | result (log) | seconds |"
  echo "|---|---|---:|"
  printf '%s\n' "${summary[@]}"
  echo
  echo "total: $((SECONDS - began)) s, logs in $out"
  if [[ -s $out/bench.log ]]; then
    echo
    echo "## Microbenchmarks (bench.log)"
    echo
    cat "$out/bench.log"
  fi
} >"$out/summary.md"
cat "$out/summary.md"
exit $failed
