#!/usr/bin/env bash
# GPU check of the CUDA backend and the GPU engine, for a machine with an H100/H200 (or any sm_90 card; set
# SPECDIFF_CUDA_ARCH for another): builds the CUDA tests and benchmarks (Release), runs the microbenchmarks
# (bench/cuda: issue 12's accelerator step, row movers, LSE column sums), the GPU engine's benchmark
# (specdiff-gpu-bench: SD3-medium shapes and mnist-sd3 end to end), the `gpu` tests (the device library's suites and
# the engine's), the host suite, then gpu suites again under compute-sanitizer (memcheck, racecheck on one
# suite, synccheck on the graph suites), and writes logs, bench.jsonl, gpu-bench.json and a markdown summary
# (printed last: card, driver, commit, every step and every gpu suite with its result, the benchmark headlines and
# tables) to $OUT, or build/gpu-check.
#
# A small driver project generated in the build folder configures tests/cuda and bench/cuda (nvcc, CMake and
# doctest only) and, when Eigen3, nlohmann_json and CLI11 are found, the engine (examples/engine, engine_cuda,
# methods, quality), tests/engine_cuda and bench/gpu_engine. A device machine without those packages gets them from
# .deps/: run scripts/gpu-deps.sh here and carry .deps (the device tool's `carry`); .deps is put first on
# CMAKE_PREFIX_PATH when it exists. (An older .deps with only doctest/doctest.h still serves the CUDA suites, and
# SPECDIFF_DOCTEST_INCLUDE_DIR may point at a folder holding doctest/doctest.h.)
#
# Budget: each step has its own cap (seconds, below) and never more than what is left of
# SPECDIFF_GPU_CHECK_BUDGET seconds (default 470), so the whole check stays under 8 minutes and the summary is
# always written. The benchmarks and tests run before the sanitizers, which get what is left. SPECDIFF_GPU_BENCH_ARGS
# replaces the engine benchmark's size flags (default: --shapes sd3-medium --repeats 5; `--shapes small` when time is
# short). SPECDIFF_GPU_CHECK_JOBS sets the build's parallelism (default: every core).
set -uo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${OUT:-$root/build/gpu-check}
build=${SPECDIFF_GPU_CHECK_BUILD:-$root/build/gpu-check-build}
arch=${SPECDIFF_CUDA_ARCH:-90}
budget=${SPECDIFF_GPU_CHECK_BUDGET:-470}
bench_args=${SPECDIFF_GPU_BENCH_ARGS:---shapes sd3-medium --repeats 5}
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
# The engine's header-only dependencies: the system's, or those of scripts/gpu-deps.sh.
prefix_args=()
[[ -d $root/.deps/lib/cmake ]] && prefix_args=(-DCMAKE_PREFIX_PATH="$root/.deps" -DSD3_STB_INCLUDE_DIR="$root/.deps/include/stb")

cat >"$build/driver/CMakeLists.txt" <<CMAKE
cmake_minimum_required(VERSION 3.25)
project(specdiff_gpu_check LANGUAGES CXX CUDA)
set(SPECDIFF_CUDA ON)
# Warnings stay warnings here: CI holds the tree to -Werror on its compilers; a device machine's newer compiler
# warning about something new must not cost the session its only run.
set(SPECDIFF_WERROR OFF)
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
# The GPU engine, when its header-only dependencies are found (the system's or .deps/).
find_package(Eigen3 3.4 QUIET NO_MODULE)
find_package(nlohmann_json 3 QUIET)
find_package(CLI11 QUIET)
find_package(doctest QUIET)
if(Eigen3_FOUND AND nlohmann_json_FOUND AND CLI11_FOUND AND doctest_FOUND)
  option(SD3_NATIVE "" OFF)
  add_subdirectory("$root/examples/engine" engine)
  add_subdirectory("$root/examples/quality" quality)
  add_subdirectory("$root/examples/methods" methods)
  add_subdirectory("$root/examples/engine_cuda" engine-cuda)
  add_subdirectory("$root/tests/engine_cuda" tests-engine-cuda)
  add_subdirectory("$root/bench/gpu_engine" bench-gpu-engine)
  file(WRITE "\${CMAKE_BINARY_DIR}/engine-built" "yes")
else()
  message(WARNING "GPU engine not configured: Eigen3 \${Eigen3_FOUND}, nlohmann_json \${nlohmann_json_FOUND}, CLI11 \${CLI11_FOUND}, doctest \${doctest_FOUND} (run scripts/gpu-deps.sh and carry .deps)")
  file(REMOVE "\${CMAKE_BINARY_DIR}/engine-built")
endif()
CMAKE

generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
configure_args=(-S "$build/driver" -B "$build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES="$arch")
[[ -n $doctest_dir ]] && configure_args+=(-DSPECDIFF_DOCTEST_INCLUDE_DIR="$doctest_dir")
configure_args+=("${prefix_args[@]}")
command -v nvcc >/dev/null || { [[ -x /usr/local/cuda/bin/nvcc ]] && configure_args+=(-DCMAKE_CUDA_COMPILER=/usr/local/cuda/bin/nvcc); }

tests=$build/tests-cuda/specdiff_cuda_tests
bench=$build/bench-cuda/specdiff_cuda_bench
engine_tests=$build/tests-engine-cuda/sd3_engine_cuda_tests
gpu_bench=$build/bench-gpu-engine/specdiff-gpu-bench
sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)

# Caps (seconds): configure 120, build 300 (one parallel build of everything: about 40 translation units),
# benchmarks 60 (about 20 s expected), engine benchmark 120 (about 60 s expected), gpu tests 150 (120 per suite), host tests 30, memcheck 100 + 60 (engine), racecheck 45, synccheck 60;
# the budget (470) cuts the last ones short if the build was slow. The benchmarks run first: their numbers are what
# a short device session is for.
targets=(specdiff_cuda_tests specdiff_cuda_bench)
engine=0
if step "configure (Release, sm_$arch)" configure.log 120 cmake "${configure_args[@]}"; then
  if [[ -f $build/engine-built ]]; then engine=1; targets+=(sd3_engine_cuda_tests specdiff-gpu-bench)
  else summary+=("| GPU engine | NOT CONFIGURED: Eigen3 / nlohmann_json / CLI11 / doctest missing (configure.log; run scripts/gpu-deps.sh, carry .deps) | 0 |"); failed=1
  fi
fi
if [[ -f $build/CMakeCache.txt ]] && step "build tests + bench" build.log 300 cmake --build "$build" --target "${targets[@]}" -j "$jobs"; then
  ctest --test-dir "$build" -N -L gpu >"$out/gpu-suites.log" 2>&1
  step "microbenchmarks" bench.log 60 "$bench" --runs 20 --json "$out/bench.jsonl"
  # shellcheck disable=SC2086  # the flags are words
  ((engine)) && step "engine benchmark (specdiff-gpu-bench $bench_args)" gpu-bench.log 120 "$gpu_bench" $bench_args --model "$root/models/mnist-sd3" --json "$out/gpu-bench.json"
  step "ctest -L gpu" tests.log 150 ctest --test-dir "$build" -L gpu --output-on-failure --no-tests=error --timeout 120
  if grep -q "(Skipped)" "$out/tests.log"; then  # ctest exits 0 when tests skip: say so, and fail the check
    summary[-1]="| ctest -L gpu | SKIPPED: no usable GPU (tests.log) | 0 |"
    failed=1
  fi
  step "host tests (cuda/host)" host-tests.log 30 "$tests" --test-suite=host
  ((engine)) && step "host tests (cuda/engine_host)" engine-host-tests.log 30 "$engine_tests" --test-suite=engine_host
  if [[ -n $sanitizer ]]; then
    step "compute-sanitizer memcheck, all gpu suites" memcheck.log 100 \
      "$sanitizer" --tool memcheck --error-exitcode 99 --print-limit 20 "$tests" --gpu \
      --test-suite=scorers,attention,lse,classifier,rows,cache_store,graph,accelerator,accelerator_graph,accelerator_errors,rows_bf16,modules_bf16
    ((engine)) && step "compute-sanitizer memcheck, engine partial + errors" memcheck-engine.log 60 \
      "$sanitizer" --tool memcheck --error-exitcode 99 --print-limit 20 "$engine_tests" --gpu --test-suite=engine_partial,engine_errors
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
  echo "## GPU engine benchmark (gpu-bench.log, gpu-bench.json)"
  echo
  echo '```'
  if [[ -s $out/gpu-bench.log ]]; then grep -v '^ \|^{\|^}' "$out/gpu-bench.log" | head -40; else echo "not run"; fi
  echo '```'
  echo
  echo '```'
  cat "$out/environment.log"
  echo '```'
  echo
  echo "logs in $out"
} >"$out/summary.md"
cat "$out/summary.md"
exit $failed
