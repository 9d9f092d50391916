#!/usr/bin/env bash
# The main job: builds the optimised demo and runs it on the default model (models/mnist-sd3).
# Arguments go to specdiff-demo; try --help. A leading `--ranks N` runs it under `mpirun -n N`
# (add --sequence-parallel to split each sample's tokens over the ranks; docs/scale-out.md).
set -euo pipefail
cd "$(dirname "$0")/.."
ranks=0
if [[ $# -ge 1 && $1 == --ranks ]]; then
  if [[ $# -lt 2 || ! $2 =~ ^[1-9][0-9]*$ ]]; then
    echo "scripts/demo.sh: --ranks: expected a positive integer, got '${2-}'" >&2
    exit 2
  fi
  ranks=$2
  shift 2
fi
scripts/setup.sh
source scripts/env.sh
cmake --preset release -DSPECDIFF_CUDA=OFF >/dev/null
cmake --build --preset release --target specdiff-demo
demo=build/release/examples/demo/specdiff-demo
if [[ $ranks -eq 0 ]]; then
  exec "$demo" "$@"
fi
launcher=(mpirun -n "$ranks")
# Open MPI refuses root and more ranks than cores unless told (CI containers run as root on 2 cores).
if mpirun --version 2>/dev/null | grep -q "Open MPI"; then
  launcher+=(--allow-run-as-root --oversubscribe)
fi
exec "${launcher[@]}" "$demo" "$@"
