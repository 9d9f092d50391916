#!/usr/bin/env bash
# The main job: builds the optimised demo and runs it on the default model (models/mnist-sd3).
# Arguments go to specdiff-demo; try --help.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
source scripts/env.sh
cmake --preset release -DSPECDIFF_CUDA=OFF >/dev/null
cmake --build --preset release --target specdiff-demo
exec build/release/examples/demo/specdiff-demo "$@"
