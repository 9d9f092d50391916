"""Bad input: each a Python exception naming the thing, and the model left as it was."""
import math

import pytest
import torch

import specdiff.diffusers as sd
from conftest import MODELS


def snapshot(model):
    procs = [b.attn.processor for b in model.transformer_blocks] if hasattr(model, "transformer_blocks") else []
    registry = getattr(model, "_diffusers_hook", None)
    hooks = list(registry.hooks) if registry is not None else []
    return procs, hooks, hasattr(model, "_specdiff_runner")


@pytest.mark.parametrize(
    "config, name",
    [
        (sd.SpecDiffConfig(cache_rate=1.0, guidance_scale=4.0), "cache_rate"),
        (sd.SpecDiffConfig(cache_rate=float("nan"), guidance_scale=4.0), "cache_rate"),
        (sd.SpecDiffConfig(spec_steps=-1, guidance_scale=4.0), "spec_steps"),
        (sd.SpecDiffConfig(c3="cubic", guidance_scale=4.0), "c3"),
        (sd.SpecDiffConfig(c3="learned", guidance_scale=4.0), "learned"),
        (sd.SpecDiffConfig(dense_steps=(3, -2), guidance_scale=4.0), "dense_steps"),
        (sd.SpecDiffConfig(), "guidance_scale"),
        (sd.SpecDiffAdaptiveConfig(error_budget=-0.1, guidance_scale=4.0), "error_budget"),
        (sd.ForecastConfig(interval=0, c3="latest"), "interval"),
        (sd.ForecastConfig(order=3, c3="taylor"), "order"),
        (sd.ForecastConfig(), "learned"),
        (sd.ForecastConfig(learned="/nonexistent/weights.json"), "learned"),
        (sd.FBCacheConfig(threshold=-0.1), "threshold"),
        (sd.FBCacheConfig(max_skips=-2), "max_skips"),
        (sd.TeaCacheConfig(rescale="cubic"), "rescale"),
        ("specdiff", "config"),
    ],
)
def test_config_out_of_range(sd3_problem, config, name):
    before = snapshot(sd3_problem.model)
    with pytest.raises(sd.SpecDiffError, match=name):
        sd.enable(sd3_problem.model, config, scheduler=sd3_problem.scheduler)
    assert snapshot(sd3_problem.model) == before


def test_unsupported_model_class():
    with pytest.raises(sd.SpecDiffError, match="Linear is not supported"):
        sd.enable(torch.nn.Linear(2, 2), sd.ForecastConfig(c3="latest"))
    from diffusers import FluxTransformer2DModel

    flux = FluxTransformer2DModel.from_pretrained(str(MODELS / "mnist-flux" / "transformer"))
    with pytest.raises(sd.SpecDiffError, match="config.guidance_scale"):
        sd.enable(flux, sd.SpecDiffConfig())  # FLUX is supported; a bare transformer still needs the CFG scale
    assert "forward" not in flux.__dict__ and not hasattr(flux, "_diffusers_hook")
    with pytest.raises(sd.SpecDiffError, match="transformer"):
        sd.enable(object(), sd.ForecastConfig(c3="latest"))


def test_model_already_using_another_cache(sd3_problem):
    from diffusers import SD3Transformer2DModel
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

    m = SD3Transformer2DModel.from_pretrained(str(MODELS / "mnist-sd3" / "transformer"))
    apply_first_block_cache(m, FirstBlockCacheConfig(threshold=0.05))
    before = snapshot(m)
    with pytest.raises(sd.SpecDiffError, match="already uses"):
        sd.enable(m, sd.ForecastConfig(c3="latest"), scheduler=sd3_problem.scheduler)
    assert snapshot(m) == before


def test_enabled_twice_and_disabled_twice(sd3_problem):
    m = sd3_problem.model
    sd.enable(m, sd.ForecastConfig(c3="latest"), scheduler=sd3_problem.scheduler)
    try:
        with pytest.raises(sd.SpecDiffError, match="already enabled"):
            sd.enable(m, sd.ForecastConfig(c3="latest"), scheduler=sd3_problem.scheduler)
    finally:
        sd.disable(m)
    with pytest.raises(sd.SpecDiffError, match="not enabled"):
        sd.disable(m)


def test_wrong_dtype():
    from diffusers import SD3Transformer2DModel

    m = SD3Transformer2DModel.from_pretrained(str(MODELS / "mnist-sd3" / "transformer")).to(torch.bfloat16)
    before = snapshot(m)
    with pytest.raises(sd.SpecDiffError, match="dtype"):
        sd.enable(m, sd.ForecastConfig(c3="latest"))
    assert snapshot(m) == before


def test_wrong_tensors_at_call_time(sd3_problem):
    m, sched = sd3_problem.model, sd3_problem.scheduler
    sched.set_timesteps(4)
    sd.enable(m, sd.ForecastConfig(c3="latest"), scheduler=sched)
    try:
        x = torch.zeros(2, 1, 32, 32, dtype=torch.float64)
        ctx, pooled = sd3_problem.context[:2], sd3_problem.pooled[:2]
        with pytest.raises(sd.SpecDiffError, match="hidden_states: dtype"):
            m(hidden_states=x, timestep=sched.timesteps[0].expand(2), encoder_hidden_states=ctx, pooled_projections=pooled)
        with pytest.raises(sd.SpecDiffError, match="timestep"):
            m(hidden_states=x.float(), timestep=torch.full((2,), 123.25), encoder_hidden_states=ctx, pooled_projections=pooled)
        with pytest.raises(sd.SpecDiffError, match="step 2"):
            m(hidden_states=x.float(), timestep=sched.timesteps[2].expand(2), encoder_hidden_states=ctx, pooled_projections=pooled)
    finally:
        sd.disable(m)
