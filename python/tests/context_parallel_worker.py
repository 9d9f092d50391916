"""One rank of test_context_parallel.py (run under torch.distributed.run with the gloo backend): the learned forecast on
mnist-flux with diffusers' Ulysses context parallelism against the same forecast in one process, and the refusals.
Writes rank<r>.json with the numbers into the folder given as argv[1]."""
import json
import pathlib
import sys

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import specdiff.diffusers as sd  # noqa: E402
from conftest import MODELS, FluxProblem, rel_l2  # noqa: E402


def main():
    out = pathlib.Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank, ranks = dist.get_rank(), dist.get_world_size()
    if torch.accelerator.device_count() == 0:  # diffusers' enable_parallelism takes rank % device_count (0 on a CPU-only torch)
        torch.accelerator.device_count = lambda: 1
    from diffusers import ContextParallelConfig

    torch.set_num_threads(1)
    p = FluxProblem("mnist-flux", samples=2, steps=28)
    config = sd.ForecastConfig(learned=MODELS / "mnist-flux" / "learned_forecast_N3.json")
    plain = p.sample()
    sd.enable(p.model, config, scheduler=p.scheduler)
    forecast = p.sample()
    calls_one = sd.stats(p.model)["model_calls"]
    # enable_parallelism after specdiff's enable: its split hook now wraps specdiff's; the call is refused by name
    p.model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=ranks))
    try:
        p.sample()
        late = "accepted"
    except sd.SpecDiffError as e:
        late = str(e)
    sd.disable(p.model)
    plain_cp = p.sample()
    try:
        sd.enable(p.model, sd.SpecDiffConfig(guidance_scale=p.guidance), scheduler=p.scheduler)
        token_level = "accepted"
        sd.disable(p.model)
    except sd.SpecDiffError as e:
        token_level = str(e)
    sd.enable(p.model, config, scheduler=p.scheduler)
    forecast_cp = p.sample()
    calls_cp = sd.stats(p.model)["model_calls"]
    sd.disable(p.model)
    after = p.sample()
    gathered = [torch.empty_like(forecast_cp) for _ in range(ranks)]
    dist.all_gather(gathered, forecast_cp)
    result = {
        "ranks": ranks,
        "plain_cp_vs_one": rel_l2(plain_cp.numpy(), plain.numpy()),
        "forecast_cp_vs_one": rel_l2(forecast_cp.numpy(), forecast.numpy()),
        "forecast_vs_plain": rel_l2(forecast.numpy(), plain.numpy()),
        "ranks_equal": all(torch.equal(g, gathered[0]) for g in gathered),
        "calls_one": calls_one,
        "calls_cp": calls_cp,
        "disable_restores": bool(torch.equal(after, plain_cp)),
        "late_enable_parallelism": late,
        "token_level": token_level,
        "finite": bool(np.isfinite(forecast_cp.numpy()).all()),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
