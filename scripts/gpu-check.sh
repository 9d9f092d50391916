#!/usr/bin/env bash
# The device check of the CUDA backend and the GPU engine, for a machine with an H100/H200 (or any sm_90 card; set
# SPECDIFF_CUDA_ARCH for another). One device session has about 15 minutes, machine start included, and at most 600 s
# per command, so the check runs in the order that makes a cut-short run still tell the most:
#
#   preflight           toolkit, driver, card, CMake, host compiler, ninja, compute-sanitizer, doctest/.deps; picks
#                       a fallback CMake (.deps/cmake, scripts/gpu-deps.sh --cmake) when the system's is missing or
#                       older than 3.25; no GPU or no nvcc turns the steps below into "skipped" with the reason
#   configure           the driver project (Release, sm_$arch), library and, when its dependencies are found, engine
#   build-library       specdiff_cuda_tests alone: an engine compile error cannot cost the library suites their run
#   test-library        ctest: the library's gpu/* suites and cuda/host
#   build-engine        sd3_engine_cuda_tests
#   test-engine         ctest: gpu/engine_* suites, cuda/engine_host, cuda/engine_link, cuda/warnings_policy
#   memcheck            compute-sanitizer memcheck on the library's gpu suites
#   racecheck           compute-sanitizer racecheck on the classifier's determinism case
#   synccheck           compute-sanitizer synccheck on the graph suites
#   memcheck-fa2        compute-sanitizer memcheck on gpu/engine_fa2 (the new attention kernels, never run before)
#   build-bench         specdiff_cuda_bench and specdiff-gpu-bench
#   bench-micro         specdiff_cuda_bench --quick (bench.jsonl, written line by line)
#   bench-engine        specdiff-gpu-bench, a small first-run configuration (gpu-bench.json, rewritten after each part)
#
# summary.md (in $OUT, else build/gpu-check) is rewritten after every step and on TERM/INT/HUP, so a run cut short
# still returns its summary; the step that was running reads INTERRUPTED. (SIGKILL cannot be trapped: the budget keeps
# the whole check well inside the device tool's limit.) Exit status: 0 when every step passed, 1 when any failed, was
# skipped or timed out, 2 for a dry run.
#
# Environment:
#   SPECDIFF_COMMIT            the commit being checked (.git does not travel to the device machine; docs/cuda.md
#                              gives the command line that passes it). Else `git rev-parse HEAD`, else "unknown".
#   SPECDIFF_GPU_CHECK_BUDGET  seconds for the whole check (default 480); each step also has its own cap (below).
#   SPECDIFF_GPU_CHECK_STEPS   comma-separated subset of the steps above, in this order (default: all). A second
#                              command on a still-warm machine can continue where the first stopped: the build folder
#                              (build/gpu-check-build, ignored by git) stays there between calls.
#   SPECDIFF_GPU_CHECK_DRY_RUN 1: run nothing, record every step as skipped with the command it would have run (and
#                              write the summary after each); SPECDIFF_GPU_CHECK_DRY_RUN_SLEEP=S makes each dry step
#                              take S seconds, so a test can cut the check mid-step (tests/engine_cuda/gpu_check_dry_run.sh).
#   SPECDIFF_GPU_BENCH_ARGS    the engine benchmark's flags (default: the small first-run configuration below).
#   SPECDIFF_GPU_CHECK_JOBS    build parallelism (default: every core). SPECDIFF_GPU_CHECK_BUILD: the build folder.
#
# Dependencies: nvcc, CMake >= 3.25 and doctest build the library suites; Eigen3, nlohmann_json and CLI11 as well the
# engine. A device machine without them gets them from .deps/: run scripts/gpu-deps.sh here and carry .deps.
set -uo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${OUT:-$root/build/gpu-check}
build=${SPECDIFF_GPU_CHECK_BUILD:-$root/build/gpu-check-build}
arch=${SPECDIFF_CUDA_ARCH:-90}
budget=${SPECDIFF_GPU_CHECK_BUDGET:-480}
dry=${SPECDIFF_GPU_CHECK_DRY_RUN:-0}
dry_sleep=${SPECDIFF_GPU_CHECK_DRY_RUN_SLEEP:-0}
all_steps=preflight,configure,build-library,test-library,build-engine,test-engine,memcheck,racecheck,synccheck,memcheck-fa2,build-bench,bench-micro,bench-engine
wanted=",${SPECDIFF_GPU_CHECK_STEPS:-$all_steps},"
# The first device run's benchmark: small shapes (4 blocks, 1024 + 77 tokens), 3 repeats, mnist-sd3 with 4 images
# and 20 steps. The full SD3-medium table (--shapes sd3-medium --repeats 5) is for a second session.
bench_args=${SPECDIFF_GPU_BENCH_ARGS:---shapes small --repeats 3 --warmup 1 --samples 4 --steps 20}
jobs=${SPECDIFF_GPU_CHECK_JOBS:-$(nproc 2>/dev/null || echo 4)}
mkdir -p "$out" "$build/driver" || exit 1
began=$SECONDS
rows=()           # markdown rows of the steps done
failed=0
current=""        # the step running now (for the trap)
current_t0=0
child=""
gpu_reason=""     # why device steps cannot run ("" when a GPU is usable)
build_reason=""   # why nothing can be built ("" when nvcc and CMake are usable)
engine_reason=""  # why the engine steps cannot run
cmake_bin=""
sanitizer=""

steps_given=${SPECDIFF_GPU_CHECK_STEPS:-}
for s in ${steps_given//,/ }; do
  [[ ,$all_steps, == *",$s,"* ]] || { echo "gpu-check: SPECDIFF_GPU_CHECK_STEPS names '$s'; the steps are $all_steps" >&2; exit 1; }
done

if [[ -n ${SPECDIFF_COMMIT:-} ]]; then commit="$SPECDIFF_COMMIT (SPECDIFF_COMMIT)"
elif c=$(git -C "$root" rev-parse HEAD 2>/dev/null); then
  commit="$c$(git -C "$root" status --porcelain --untracked-files=no 2>/dev/null | grep -q . && echo ' (tracked files modified)')"
else commit="unknown (.git did not travel: pass SPECDIFF_COMMIT)"
fi

left() { echo $((budget - (SECONDS - began))); }
wants() { [[ $wanted == *",$1,"* ]]; }

# One row per ctest test from a ctest log: name, result, seconds.
suite_rows() {
  [[ -s $1 ]] || return 0
  awk '
  /^ *[0-9]+\/[0-9]+ Test +#[0-9]+: / {
    line = $0; sub(/^ *[0-9]+\/[0-9]+ Test +#[0-9]+: /, "", line)
    name = line; sub(/ .*/, "", name)
    rest = substr(line, length(name) + 1); sub(/^ *\.*/, "", rest); gsub(/\*/, "", rest)
    secs = ""
    if (match(rest, / +[0-9.]+ sec.*$/)) { secs = substr(rest, RSTART); rest = substr(rest, 1, RSTART - 1); sub(/^ +/, "", secs); sub(/ sec.*/, "", secs) }
    printf "| %s | %s | %s |\n", name, rest, secs
  }' "$1"
}

write_summary() {
  local state=$1 tmp="$out/summary.md.tmp"
  {
    echo "# SpecDiff CUDA GPU check"
    echo
    echo "| | |"
    echo "|---|---|"
    echo "| card | ${card:-unknown} |"
    echo "| driver | ${driver:-unknown} |"
    echo "| commit | $commit |"
    echo "| state | $state |"
    echo "| result so far | $( ((failed)) && echo 'FAILED (a step failed, timed out or was skipped)' || echo 'no failure' ) |"
    echo "| elapsed | $((SECONDS - began)) s of a $budget s budget |"
    ((dry)) && echo "| mode | DRY RUN: nothing was run |"
    echo
    echo "| step | result (log) | seconds |"
    echo "|---|---|---:|"
    ((${#rows[@]})) && printf '%s\n' "${rows[@]}"
    [[ -n $current ]] && echo "| $current | RUNNING when this summary was written | $((SECONDS - current_t0)) |"
    echo
    echo "## Suites"
    echo
    echo "| test | result | seconds |"
    echo "|---|---|---:|"
    local r
    r=$(suite_rows "$out/test-library.log"; suite_rows "$out/test-engine.log")
    if [[ -n $r ]]; then echo "$r"; else echo "| (none ran) | see the steps above | |"; fi
    echo
    echo "## Microbenchmarks (bench-micro.log, bench.jsonl)"
    echo
    if [[ -s $out/bench-micro.log ]]; then grep -v '^SKIPPED' "$out/bench-micro.log" | head -80; else echo "not run"; fi
    echo
    echo "## GPU engine benchmark (bench-engine.log, gpu-bench.json)"
    echo
    echo '```'
    if [[ -s $out/bench-engine.log ]]; then grep -v '^ \|^{\|^}' "$out/bench-engine.log" | head -40; else echo "not run"; fi
    echo '```'
    echo
    echo "## Preflight (preflight.log)"
    echo
    echo '```'
    [[ -s $out/preflight.log ]] && cat "$out/preflight.log"
    echo '```'
    echo
    echo "logs in $out"
  } >"$tmp" 2>/dev/null && mv -f "$tmp" "$out/summary.md"
}

# shellcheck disable=SC2317  # called by the traps below
on_signal() {
  local sig=$1
  [[ -n $child ]] && kill -TERM "$child" 2>/dev/null
  if [[ -n $current ]]; then
    rows+=("| $current | INTERRUPTED by SIG$sig after $((SECONDS - current_t0)) s | $((SECONDS - current_t0)) |")
    current=""
  fi
  failed=1
  write_summary "interrupted by SIG$sig"
  cat "$out/summary.md"
  exit 1
}
trap 'on_signal TERM' TERM
trap 'on_signal INT' INT
trap 'on_signal HUP' HUP

# record NAME RESULT SECONDS: a row, then the summary on disk.
last_seconds=0
record() {
  rows+=("| $1 | $2 | $3 |")
  last_seconds=$3
  current=""
  write_summary "running"
}

# skip NAME REASON
skip() {
  failed=1
  record "$1" "SKIPPED: $2" 0
}

# step NAME CAP COMMAND...: runs COMMAND (log: $out/NAME.log) with a timeout of CAP seconds or what is left of the
# budget, whichever is less; records the outcome and rewrites the summary. Returns the command's status.
step() {
  local name=$1 cap=$2
  shift 2
  local limit
  limit=$(left)
  ((cap < limit)) && limit=$cap
  if ((dry)); then
    current=$name current_t0=$SECONDS
    write_summary "running"
    if ((dry_sleep > 0)); then sleep "$dry_sleep" & child=$!; wait "$child"; child=""; fi
    failed=1
    record "$name" "SKIPPED: dry run$dry_note (would run, cap ${limit}s: $*)" 0
    return 77
  fi
  if ((limit < 10)); then
    failed=1
    record "$name" "NOT RUN: budget spent" 0
    return 1
  fi
  current=$name current_t0=$SECONDS
  write_summary "running"
  # In the background and waited for: bash runs a trap only between commands, and `wait` is one it interrupts.
  timeout --kill-after=5 "$limit" "$@" >"$out/$name.log" 2>&1 &
  child=$!
  wait "$child"
  local rc=$?
  child=""
  local result="ok ($name.log)"
  if ((rc == 124 || rc == 137)); then result="TIMED OUT after ${limit}s ($name.log)"; failed=1
  elif ((rc == 77)); then result="SKIPPED: no usable GPU ($name.log)"; failed=1
  elif ((rc != 0)); then result="FAILED (exit $rc; $name.log)"; failed=1
  fi
  record "$name" "$result" $((SECONDS - current_t0))
  return $rc
}

# A ctest step: fails when a test was skipped (ctest exits 0 on skips).
ctest_step() {
  local name=$1
  step "$@"
  local rc=$?
  if ((rc == 0)) && grep -q "(Skipped)\|\*\*\*Skipped" "$out/$name.log" 2>/dev/null; then
    rows[-1]="| $name | SKIPPED: ctest reported tests skipped (no usable GPU?; $name.log) | $last_seconds |"
    failed=1
    write_summary "running"
    return 77
  fi
  return $rc
}

# --- preflight --------------------------------------------------------------------------------------------------
version_ge() { [[ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -1)" == "$2" ]]; }  # $1 >= $2
preflight() {
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $commit"
  echo "host: $(uname -srm), $(nproc 2>/dev/null) cores"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,compute_cap --format=csv 2>&1 | sed 's/^/nvidia-smi: /'
    card=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
    driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1)
    [[ -z $card ]] && gpu_reason="nvidia-smi lists no GPU"
  else
    gpu_reason="no nvidia-smi (no NVIDIA driver on this machine)"
  fi
  local nvcc_bin
  nvcc_bin=$(command -v nvcc || { [[ -x /usr/local/cuda/bin/nvcc ]] && echo /usr/local/cuda/bin/nvcc; } || true)
  if [[ -n $nvcc_bin ]]; then
    echo "nvcc: $nvcc_bin, $("$nvcc_bin" --version 2>&1 | grep -o 'release [0-9.]*, V[0-9.]*' | head -1)"
    local cuda_version
    cuda_version=$("$nvcc_bin" --version 2>&1 | grep -o 'release [0-9.]*' | head -1 | cut -d' ' -f2)
    [[ $cuda_version != 13.0 ]] && echo "note: CUDA $cuda_version; the tree is compiled with 13.0 in CI (warnings are not errors here)"
  else
    build_reason="no nvcc on PATH or in /usr/local/cuda/bin"
  fi
  # CMake >= 3.25: the system's, else the wheel carried in .deps (scripts/gpu-deps.sh --cmake), unpacked here.
  local c v wheel
  local wheels=("$root"/.deps/cmake-wheel/cmake-*.whl)
  wheel=""
  [[ -f ${wheels[0]} ]] && wheel=${wheels[0]}
  for c in "$(command -v cmake || true)" "$build/cmake-fallback/cmake/data/bin/cmake" "$root/.deps/cmake/bin/cmake" wheel; do
    if [[ $c == wheel ]]; then
      [[ -n $wheel ]] || continue
      echo "unpacking $wheel"
      rm -rf "$build/cmake-fallback" && mkdir -p "$build/cmake-fallback"
      if command -v unzip >/dev/null; then unzip -q "$wheel" -d "$build/cmake-fallback"
      else python3 -m zipfile -e "$wheel" "$build/cmake-fallback"
      fi
      chmod +x "$build"/cmake-fallback/cmake/data/bin/* 2>/dev/null
      c=$build/cmake-fallback/cmake/data/bin/cmake
    fi
    [[ -n $c && -x $c ]] || continue
    v=$("$c" --version 2>/dev/null | head -1 | grep -o '[0-9][0-9.]*' | head -1)
    echo "cmake: $c, $v"
    if [[ -n $v ]] && version_ge "$v" 3.25; then cmake_bin=$c; break; fi
    echo "  older than 3.25: not used"
  done
  [[ -z $cmake_bin && -z $build_reason ]] && build_reason="no CMake >= 3.25 (system, or .deps/cmake-wheel: run scripts/gpu-deps.sh --cmake here, carry .deps)"
  [[ -n $cmake_bin ]] && echo "using cmake: $cmake_bin"
  local cxx=${CXX:-$(command -v c++ || command -v g++ || true)}
  if [[ -n $cxx ]]; then echo "host compiler: $cxx, $("$cxx" --version 2>&1 | head -1)"
  else [[ -z $build_reason ]] && build_reason="no host C++ compiler"
  fi
  command -v ninja >/dev/null && echo "ninja: $(ninja --version)" || echo "ninja: not found (Unix Makefiles)"
  sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
  echo "compute-sanitizer: ${sanitizer:-not found}"
  if [[ -f /usr/include/doctest/doctest.h ]]; then echo "doctest: system"
  elif [[ -f $root/.deps/doctest/doctest.h ]]; then echo "doctest: .deps"
  else echo "doctest: not found (run scripts/gpu-deps.sh here and carry .deps)"; [[ -z $build_reason ]] && build_reason="no doctest (system or .deps)"
  fi
  local dep
  for dep in eigen3 nlohmann CLI; do
    if [[ -d /usr/include/$dep || -d $root/.deps/include/$dep ]]; then echo "$dep: found"
    else echo "$dep: not found"; engine_reason="the engine's header-only dependencies are missing (run scripts/gpu-deps.sh, carry .deps)"
    fi
  done
  [[ -n $gpu_reason ]] && echo "device steps: skipped ($gpu_reason)"
  [[ -n $build_reason ]] && echo "build steps: skipped ($build_reason)"
  return 0
}

card="" driver=""
if wants preflight; then
  current=preflight current_t0=$SECONDS
  preflight >"$out/preflight.log" 2>&1
  result="ok (preflight.log)"
  [[ -n $gpu_reason ]] && result="ok, no GPU: $gpu_reason (preflight.log)"
  [[ -n $build_reason ]] && { result="FAILED: $build_reason (preflight.log)"; failed=1; }
  record preflight "$result" $((SECONDS - current_t0))
else
  preflight >"$out/preflight.log" 2>&1
fi
cmake_bin=${cmake_bin:-cmake}

# --- the driver project -----------------------------------------------------------------------------------------
doctest_dir=${SPECDIFF_DOCTEST_INCLUDE_DIR:-}
if [[ -z $doctest_dir && ! -f /usr/include/doctest/doctest.h && -f $root/.deps/doctest/doctest.h ]]; then doctest_dir=$root/.deps; fi
prefix_args=()
[[ -d $root/.deps/lib/cmake ]] && prefix_args=(-DCMAKE_PREFIX_PATH="$root/.deps" -DSD3_STB_INCLUDE_DIR="$root/.deps/include/stb")

cat >"$build/driver/CMakeLists.txt" <<CMAKE
cmake_minimum_required(VERSION 3.25)
project(specdiff_gpu_check LANGUAGES CXX CUDA)
set(SPECDIFF_CUDA ON)
# Warnings stay warnings here: CI holds the tree to -Werror on its compilers; a device machine's newer compiler
# warning about something new must not cost the session its only run (cmake/SpecdiffWarnings.cmake reads this).
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

ctest_bin="$(dirname "$cmake_bin")/ctest"
[[ -x $ctest_bin ]] || ctest_bin=ctest
lib_tests=$build/tests-cuda/specdiff_cuda_tests
engine_tests=$build/tests-engine-cuda/sd3_engine_cuda_tests
micro_bench=$build/bench-cuda/specdiff_cuda_bench
gpu_bench=$build/bench-gpu-engine/specdiff-gpu-bench
library_suites=scorers,attention,lse,classifier,rows,cache_store,graph,accelerator,accelerator_graph,accelerator_errors,rows_bf16,modules_bf16

# gate NAME [needs...]: whether step NAME runs; records it skipped (with the reason) when it cannot.
#   needs: build (nvcc + CMake), gpu, engine, sanitizer, configured, built:<path>
dry_note=""
gate() {
  local name=$1 need
  shift
  wants "$name" || return 1
  dry_note=""
  if ((dry)); then  # nothing runs; say what would stop the step on this machine as well
    for need in "$@"; do
      case $need in
        build) [[ -n $build_reason ]] && dry_note+="; here also: $build_reason" ;;
        gpu) [[ -n $gpu_reason && $gpu_reason != "dry run" ]] && dry_note+="; here also: no usable GPU ($gpu_reason)" ;;
        engine) [[ -n $engine_reason ]] && dry_note+="; here also: $engine_reason" ;;
        sanitizer) [[ -z $sanitizer ]] && dry_note+="; here also: no compute-sanitizer" ;;
      esac
    done
    return 0
  fi
  for need in "$@"; do
    case $need in
      build) [[ -z $build_reason ]] || { skip "$name" "$build_reason"; return 1; } ;;
      gpu) [[ -z $gpu_reason ]] || { skip "$name" "no usable GPU: $gpu_reason"; return 1; } ;;
      engine)
        [[ -z $engine_reason ]] || { skip "$name" "$engine_reason"; return 1; }
        [[ -f $build/engine-built ]] || { skip "$name" "the engine was not configured (configure.log)"; return 1; } ;;
      sanitizer) [[ -n $sanitizer ]] || { skip "$name" "compute-sanitizer not found on PATH or in /usr/local/cuda/bin"; return 1; } ;;
      configured) [[ -f $build/CMakeCache.txt ]] || { skip "$name" "not configured (configure.log)"; return 1; } ;;
      built:*) [[ -x ${need#built:} ]] || { skip "$name" "${need#built:} was not built"; return 1; } ;;
    esac
  done
  return 0
}

# Caps (seconds) on a 16-core device machine, release builds without ccache: configure 90, library build 240 (five
# translation units, CUB-heavy: the slowest one bounds it, whatever the cores), library suites 120, engine build 240
# (transformer.cu, sampler.cu, attention_check.cu and the CPU engine), engine suites 120, memcheck 90, racecheck 40,
# synccheck 40, memcheck of the fa2 suite 45, bench build 120, microbenchmarks 45, engine benchmark 90. Their sum exceeds the budget on purpose: the
# budget cuts the last steps short, never the first.
gate configure build && step configure 90 "$cmake_bin" "${configure_args[@]}"
gate build-library build configured && step build-library 240 "$cmake_bin" --build "$build" --target specdiff_cuda_tests -j "$jobs"
gate test-library gpu configured built:"$lib_tests" &&
  ctest_step test-library 120 "$ctest_bin" --test-dir "$build" -R '^(gpu/|cuda/host$)' -E '^gpu/engine_' \
    --output-on-failure --no-tests=error --timeout 100
gate build-engine build configured engine && step build-engine 240 "$cmake_bin" --build "$build" --target sd3_engine_cuda_tests -j "$jobs"
gate test-engine gpu configured engine built:"$engine_tests" &&
  ctest_step test-engine 120 "$ctest_bin" --test-dir "$build" -R '^(gpu/engine_|cuda/engine_|cuda/warnings_policy$)' \
    --output-on-failure --no-tests=error --timeout 100
gate memcheck gpu sanitizer built:"$lib_tests" &&
  step memcheck 90 "${sanitizer:-compute-sanitizer}" --tool memcheck --error-exitcode 99 --print-limit 20 "$lib_tests" --gpu --test-suite="$library_suites"
gate racecheck gpu sanitizer built:"$lib_tests" &&
  step racecheck 40 "${sanitizer:-compute-sanitizer}" --tool racecheck --error-exitcode 99 --print-limit 20 "$lib_tests" --gpu --test-suite=classifier \
    --test-case="classification is deterministic and reuses its workspace"
gate synccheck gpu sanitizer built:"$lib_tests" &&
  step synccheck 40 "${sanitizer:-compute-sanitizer}" --tool synccheck --error-exitcode 99 --print-limit 20 "$lib_tests" --gpu --test-suite=graph,accelerator_graph
gate memcheck-fa2 gpu sanitizer engine built:"$engine_tests" &&
  step memcheck-fa2 45 "${sanitizer:-compute-sanitizer}" --tool memcheck --error-exitcode 99 --print-limit 20 "$engine_tests" --gpu --test-suite=engine_fa2
bench_targets=(specdiff_cuda_bench)
[[ -f $build/engine-built ]] && bench_targets+=(specdiff-gpu-bench)
gate build-bench build configured && step build-bench 120 "$cmake_bin" --build "$build" --target "${bench_targets[@]}" -j "$jobs"
gate bench-micro gpu built:"$micro_bench" && step bench-micro 45 "$micro_bench" --quick --runs 5 --json "$out/bench.jsonl"
# shellcheck disable=SC2086  # the flags are words
gate bench-engine gpu engine built:"$gpu_bench" &&
  step bench-engine 90 "$gpu_bench" $bench_args --model "$root/models/mnist-sd3" --json "$out/gpu-bench.json"

trap - TERM INT HUP
write_summary "finished"
cat "$out/summary.md"
((dry)) && exit 2
exit $failed
