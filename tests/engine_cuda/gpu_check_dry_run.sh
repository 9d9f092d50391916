#!/usr/bin/env bash
# ctest cuda/gpu_check_dry_run (issue 32): scripts/gpu-check.sh as the device would run it, with nothing run
# (SPECDIFF_GPU_CHECK_DRY_RUN=1): every step is reported skipped with a reason and the summary is written; then the
# same check cut by SIGTERM in the middle of a step (each dry step sleeping 1 s) still leaves a summary that names
# the interrupted step. Takes about 4 s; builds nothing.
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail() { echo "FAIL: $*" >&2; [[ -f $tmp/${2:-a}/summary.md ]] && cat "$tmp/${2:-a}/summary.md" >&2; exit 1; }

OUT=$tmp/a SPECDIFF_GPU_CHECK_BUILD=$tmp/a-build SPECDIFF_GPU_CHECK_DRY_RUN=1 SPECDIFF_COMMIT=dry-run-test \
  "$root/scripts/gpu-check.sh" >"$tmp/a.out" 2>&1
rc=$?
((rc == 2)) || fail "a dry run exits 2, got $rc" a
summary=$tmp/a/summary.md
[[ -f $summary ]] || fail "no summary.md" a
grep -q "| commit | dry-run-test (SPECDIFF_COMMIT) |" "$summary" || fail "the commit passed in is not in the summary" a
grep -q "| state | finished |" "$summary" || fail "the summary does not say finished" a
grep -q "^| preflight | ok" "$summary" || fail "preflight did not run" a
for s in configure build-library test-library build-engine test-engine memcheck racecheck synccheck memcheck-fa2 build-bench bench-micro bench-engine; do
  grep -q "^| $s | SKIPPED: dry run" "$summary" || fail "step $s is not reported skipped with its reason" a
done
[[ -e $tmp/a-build/CMakeCache.txt ]] && fail "a dry run configured something" a

# A cut: SIGTERM while a step runs.
OUT=$tmp/b SPECDIFF_GPU_CHECK_BUILD=$tmp/b-build SPECDIFF_GPU_CHECK_DRY_RUN=1 SPECDIFF_GPU_CHECK_DRY_RUN_SLEEP=1 \
  "$root/scripts/gpu-check.sh" >"$tmp/b.out" 2>&1 &
pid=$!
sleep 2.5
kill -TERM "$pid"
wait "$pid"
rc=$?
((rc == 1)) || fail "a cut check exits 1, got $rc" b
summary=$tmp/b/summary.md
[[ -f $summary ]] || fail "no summary after SIGTERM" b
grep -q "| state | interrupted by SIGTERM |" "$summary" || fail "the summary does not say it was interrupted" b
grep -q "INTERRUPTED by SIGTERM" "$summary" || fail "no step is marked interrupted" b
grep -q "^| configure | SKIPPED: dry run" "$summary" || fail "the steps done before the cut are missing" b
echo "gpu-check dry run and cut: ok"
