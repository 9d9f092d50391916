#!/usr/bin/env bash
# Runs the engine and PyTorch forward timings on the same config and thread count, interleaved, and prints the
# ratio of medians and the median (with range) of each round's ratio (torch / engine: > 1 means the engine is
# faster). The per-round ratio compares runs made a few seconds apart: on a machine whose speed drifts from one
# minute to the next (a shared VM), it is the number to quote.
# Usage: bench/forward/run.sh [BUILD_DIR] [extra args for both, e.g. --threads 2 --batch 2 --reps 5]
# Env: PYTHON (default /work/venv/bin/python), ROUNDS (default 2).
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
build="${1:-$root/build/engine}"
shift || true
python="${PYTHON:-/work/venv/bin/python}"
rounds="${ROUNDS:-2}"
engine="$build/bench/forward/sd3_bench_forward"
[[ -x "$engine" ]] || { echo "build $engine first (cmake --build $build --target sd3_bench_forward)" >&2; exit 1; }
median() { sed -n 's/^RESULT median_ms=\([0-9.]*\).*/\1/p'; }
ours=(); theirs=()
for ((r = 0; r < rounds; ++r)); do
  o="$("$engine" "$@")"; echo "$o" | head -1; ours+=("$(echo "$o" | median)")
  t="$("$python" "$root/tools/bench_forward_torch.py" "$@")"; echo "$t" | head -1; theirs+=("$(echo "$t" | median)")
done
python3 - "${ours[@]}" -- "${theirs[@]}" <<'PY'
import sys, statistics
args = sys.argv[1:]; k = args.index("--")
ours, theirs = [float(x) for x in args[:k]], [float(x) for x in args[k + 1:]]
o, t = statistics.median(ours), statistics.median(theirs)
r = [b / a for a, b in zip(ours, theirs)]
print(f"engine {o:.1f} ms, torch {t:.1f} ms, torch/engine = {t / o:.2f}x (medians over {len(ours)} rounds); "
      f"per round {statistics.median(r):.2f}x ({min(r):.2f}-{max(r):.2f})")
PY
