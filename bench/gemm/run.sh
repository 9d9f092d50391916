#!/usr/bin/env bash
# Runs every GEMM candidate executable built (bench/gemm/CMakeLists.txt) ROUNDS times, alternating, one thread
# each, and prints a markdown table: per shape, each candidate's median GFLOP/s over the rounds' medians and its
# fraction of the core's FP32 FMA peak (measured once, by sd3::gemm::measure_peak_gflops, and given to all).
# Usage: bench/gemm/run.sh [BUILD_DIR]   Env: ROUNDS (default 3), REPS (default 7), OPENBLAS_CORETYPE (passed on:
# Debian's OpenBLAS 0.3.21 takes a CPU it does not know, such as Sapphire Rapids, for Prescott; SKYLAKEX is its
# AVX-512 kernel) and BLIS_ARCH_TYPE (BLIS 0.9 picks haswell here; skx is its AVX-512 kernel). The candidate
# names carry the kernel each library picked.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
build="${1:-$root/build/release}"
rounds="${ROUNDS:-3}" reps="${REPS:-7}"
dir="$build/bench/gemm"
[[ -x "$dir/sd3_gemm_candidates" ]] || { echo "build $dir/sd3_gemm_candidates first" >&2; exit 1; }
exes=()
for e in sd3_gemm_candidates sd3_gemm_candidates_openblas sd3_gemm_candidates_blis sd3_gemm_candidates_onednn; do
  [[ -x "$dir/$e" ]] && exes+=("$dir/$e")
done
peak="$("$dir/sd3_gemm_candidates" --reps 1 | sed -n 's/^peak \([0-9.]*\).*/\1/p')"
out="$(mktemp)"
trap 'rm -f "$out"' EXIT
for ((r = 0; r < rounds; ++r)); do
  for e in "${exes[@]}"; do
    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 BLIS_NUM_THREADS=1 "$e" --reps "$reps" --peak "$peak" | grep '^RESULT' >> "$out"
  done
done
python3 - "$out" "$peak" "$rounds" <<'PY'
import collections, statistics, sys
rows, peak, rounds = collections.defaultdict(dict), float(sys.argv[2]), sys.argv[3]
per = collections.defaultdict(list)
order = []
for line in open(sys.argv[1]):
    f = dict(kv.split("=", 1) for kv in line.split()[1:])
    key = (f["model"], f["layer"], f["rows"], f["depth"], f["outputs"])
    if key not in order:
        order.append(key)
    per[(key, f["candidate"])].append(float(f["gflops"]))
cands = []
for (_, c) in per:
    if c not in cands:
        cands.append(c)
print(f"One thread; FP32 FMA peak {peak:.1f} GFLOP/s; median GFLOP/s over {rounds} rounds (% of peak)\n")
print("| model | layer | rows x depth -> outputs | " + " | ".join(cands) + " |")
print("|---|---|---|" + "---|" * len(cands))
for key in order:
    cells = []
    for c in cands:
        v = per.get((key, c))
        cells.append(f"{statistics.median(v):.0f} ({100 * statistics.median(v) / peak:.0f}%)" if v else "-")
    print(f"| {key[0]} | {key[1]} | {key[2]} x {key[3]} -> {key[4]} | " + " | ".join(cells) + " |")
PY
