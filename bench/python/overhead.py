#!/usr/bin/env python3
"""The package's overhead on torch CPU (issue 29's performance bar): the library's share of a cached step, and the
forecast's wall speedup against its FLOP ratio, on one shipped SD3 model (default mnist-sd3).

- Library share of a cached step: every transformer call of a timed run is timed (the hook's whole call: Python,
  the C++ library, the network); the library's seconds in that call (`plan_step`, `compute_tokens`, `complete_step`,
  `record_speculation`, as specdiff.diffusers.stats counts them) over the call's wall time, for the cached steps:
  SpecDiff's partial steps (cache rate 0.9) and the forecast's skipped steps. A skipped forecast step runs no network,
  so its share is large by construction; its absolute cost is also given against a full step.
- Forecast wall speedup: full compute and the setting run alternately (full, setting, setting, full, ... so that a
  drift in machine load hits both sides equally), after one warm-up run of each; the speedup is the ratio of the
  medians, with the spread (min-max of the per-pair ratios). FLOP ratio: torch's FlopCounterMode over a whole run.

    .venv/bin/python bench/python/overhead.py --threads 2 --repeats 6
"""
import argparse
import pathlib
import statistics
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import compare as C  # noqa: E402  (the shared harness: the same noise, labels, loop)
import specdiff.diffusers as sd  # noqa: E402


def per_call(p, runner):
    """One run with every transformer call timed: [(wall s, library s, partial?, network called?)]."""
    m = p.model
    inner = m.forward
    steps = []

    def timed(*a, **k):
        lib, part, calls = runner.library_seconds, runner.partial_calls, runner.model_calls
        t0 = time.perf_counter()
        out = inner(*a, **k)
        wall = time.perf_counter() - t0
        if len(steps) == 0 or runner.model_calls < calls:  # step 0: the runner zeroed its counters for the new run
            lib, part, calls = 0.0, 0, 0
        steps.append((wall, runner.library_seconds - lib, runner.partial_calls > part, runner.model_calls > calls))
        return out

    m.forward = timed
    try:
        p.sample()
    finally:
        m.forward = inner  # the hook registry's forward again
    return steps


def alternate(p, config, repeats):
    """Full and the setting alternately (ABBA order); returns (full seconds, setting seconds) lists."""
    full, mine = [], []

    def run_full():
        t0 = time.perf_counter()
        p.sample()
        full.append(time.perf_counter() - t0)

    def run_mine():
        sd.enable(p.model, config, scheduler=p.scheduler)
        try:
            t0 = time.perf_counter()
            p.sample()
            mine.append(time.perf_counter() - t0)
        finally:
            sd.disable(p.model)

    run_full(), run_mine()  # warm-up, not kept
    full.clear(), mine.clear()
    for i in range(repeats):
        for f in ((run_full, run_mine) if i % 2 == 0 else (run_mine, run_full)):
            f()
    return full, mine


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(C.ROOT / "models" / "mnist-sd3"))
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=6, help="timed runs per side (alternating)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (set explicitly)")
    ap.add_argument("--intervals", type=int, nargs="*", default=[2, 3, 4, 6])
    ap.add_argument("--markdown", help="also write the tables here")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    p = C.Problem(pathlib.Path(a.model), a.samples, a.steps, a.seed)
    p.sample()
    full_flops = C.counted_run(p)[0]
    lines = [f"{p.folder.name}, {a.samples} samples, {a.steps} steps, CFG {p.guidance}, torch {torch.__version__} CPU, "
             f"{torch.get_num_threads()} threads, {a.repeats} timed runs per side", ""]

    lines += ["| cached step | steps | wall ms (median) | library ms (median) | library share median (min-max) |",
              "| --- | ---: | ---: | ---: | ---: |"]
    full_call = []
    for name, config, pick in [
            ("SpecDiff cr=0.9, partial step", sd.SpecDiffConfig(guidance_scale=p.guidance), lambda s: s[2]),
            ("forecast N=3 learned, skipped step", sd.ForecastConfig(interval=3, learned=p.folder / "learned_forecast_N3.json"),
             lambda s: not s[3])]:
        runner = sd.enable(p.model, config, scheduler=p.scheduler)
        try:
            p.sample()  # warm-up
            steps = [s for _ in range(a.repeats) for s in per_call(p, runner)]
        finally:
            sd.disable(p.model)
        cached = [s for s in steps if pick(s)]
        full_call += [s[0] for s in steps if s[3] and not s[2]]
        shares = [s[1] / s[0] for s in cached]
        lines.append(f"| {name} | {len(cached)} | {1e3 * statistics.median(s[0] for s in cached):.2f} | "
                     f"{1e3 * statistics.median(s[1] for s in cached):.3f} | {100 * statistics.median(shares):.2f}% "
                     f"({100 * min(shares):.2f}-{100 * max(shares):.2f}%) |")
    lines.append(f"| (a full step with the hook, for scale) | {len(full_call)} | {1e3 * statistics.median(full_call):.2f} | | |")

    lines += ["", "| forecast | FLOP ratio | full s median (min-max) | setting s median (min-max) | wall speedup | speedup / FLOP ratio | per-pair ratio min-max |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for n in a.intervals:
        learned = p.folder / f"learned_forecast_N{n}.json"
        if not learned.exists():
            continue
        config = sd.ForecastConfig(interval=n, learned=learned)
        sd.enable(p.model, config, scheduler=p.scheduler)
        try:
            ratio = full_flops / C.counted_run(p)[0]
        finally:
            sd.disable(p.model)
        full, mine = alternate(p, config, a.repeats)
        speed = statistics.median(full) / statistics.median(mine)
        pairs = [f / m for f, m in zip(full, mine)]
        lines.append(f"| N={n} learned | {ratio:.2f}x | {statistics.median(full):.3f} ({min(full):.3f}-{max(full):.3f}) | "
                     f"{statistics.median(mine):.3f} ({min(mine):.3f}-{max(mine):.3f}) | {speed:.2f}x | {speed / ratio:.2f} | "
                     f"{min(pairs):.2f}-{max(pairs):.2f}x |")
        print(lines[-1], file=sys.stderr)
    text = "\n".join(lines)
    print(text)
    if a.markdown:
        pathlib.Path(a.markdown).write_text(text + "\n")


if __name__ == "__main__":
    main()
