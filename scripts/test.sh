#!/usr/bin/env bash
# The test command: builds everything (CUDA code too, where nvcc exists) and runs every CPU test, then
# the same tests under AddressSanitizer + UndefinedBehaviorSanitizer. GPU tests report "skipped" here.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
source scripts/env.sh
cmake --preset default
cmake --build --preset default
ctest --preset default
if [[ "${SPECDIFF_SKIP_ASAN:-0}" != 1 ]]; then
  cmake --preset asan
  cmake --build --preset asan
  ctest --preset asan
fi
