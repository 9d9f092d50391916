#!/usr/bin/env bash
# The test command: builds everything (CUDA code too, where nvcc exists) and runs every CPU test, then
# the same tests under AddressSanitizer + UndefinedBehaviorSanitizer. GPU tests report "skipped" here. Between the
# two, the Python package's tests (scripts/python-test.sh; SPECDIFF_SKIP_PYTHON=1 skips them).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
source scripts/env.sh
cmake --preset default
cmake --build --preset default
ctest --preset default
# The Python package (python/, docs/python.md): its tests compare against build/default's specdiff-pyref.
if [[ "${SPECDIFF_SKIP_PYTHON:-0}" != 1 ]]; then
  scripts/python-test.sh
fi
if [[ "${SPECDIFF_SKIP_ASAN:-0}" != 1 ]]; then
  cmake --preset asan
  cmake --build --preset asan
  ctest --preset asan
fi
