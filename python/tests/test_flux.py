"""SpecDiff (token-level), SpecDiff-adaptive and the forecast on FluxTransformer2DModel (mnist-flux) against the C++ demo's: same noise image packed as
FluxPipeline packs it, same labels, FluxPipeline's schedule. Tolerance: relative L2 of the final packed latents < 1e-4,
as on SD3."""
import numpy as np
import pytest
import torch

import specdiff.diffusers as sd
from conftest import MODELS, SAMPLES, check_step_level, cpp_latents, rel_l2

TOL = 1e-4


def run(problem, config):
    sd.enable(problem.model, config, scheduler=problem.scheduler)
    try:
        return problem.sample()
    finally:
        sd.disable(problem.model)


def test_plain_diffusers_flux_loop_matches_the_engine(flux_full, tmp_path):
    ref = cpp_latents(tmp_path, "mnist-flux", "full", SAMPLES, 28)
    err = rel_l2(flux_full.numpy(), ref)
    print(f"mnist-flux plain diffusers loop vs engine: relative L2 {err:.3g}")
    assert err < TOL


@pytest.mark.parametrize(
    "config, options",
    [
        (lambda: sd.ForecastConfig(learned=MODELS / "mnist-flux" / "learned_forecast_N3.json"), {}),
        (lambda: sd.ForecastConfig(interval=3, c3="taylor", order=2), {"interval": 3, "c3": "taylor", "order": 2}),
        (lambda: sd.ForecastConfig(interval=2, learned=MODELS / "mnist-flux" / "learned_forecast_N2.json"), {"interval": 2}),
    ],
    ids=["forecast-learned", "forecast-taylor2", "forecast-learned-N2"],
)
def test_flux_forecast_matches_the_cpp_demo(flux_problem, flux_full, tmp_path, config, options):
    x = run(flux_problem, config())
    ref = cpp_latents(tmp_path, "mnist-flux", "forecast", SAMPLES, 28, **options)
    err = rel_l2(x.numpy(), ref)
    print(f"mnist-flux forecast {options}: relative L2 {err:.3g}")
    assert err < TOL, f"forecast {options}: relative L2 {err:.3g} against the C++ demo"
    assert not torch.equal(x, flux_full)  # it did skip steps


def test_flux_forecast_interval_one_is_the_plain_loop_bit_for_bit(flux_problem, flux_full):
    """interval 1: every step full, the output rows handed back unchanged: the plain loop exactly."""
    assert torch.equal(run(flux_problem, sd.ForecastConfig(interval=1, c3="latest")), flux_full)


def test_flux_forecast_skips_the_transformer(flux_problem):
    sd.enable(flux_problem.model, sd.ForecastConfig(interval=3, c3="taylor"), scheduler=flux_problem.scheduler)
    try:
        flux_problem.sample()
        calls = sd.stats(flux_problem.model)["model_calls"]
    finally:
        sd.disable(flux_problem.model)
    assert 0 < calls < flux_problem.steps


@pytest.mark.parametrize(
    "method, config, options",
    [
        ("specdiff", lambda g: sd.SpecDiffConfig(guidance_scale=g), {}),
        ("specdiff", lambda g: sd.SpecDiffConfig(guidance_scale=g, cache_rate=0.7, spec_steps=3, c3="latest"),
         {"cache_rate": 0.7, "spec_steps": 3, "c3": "latest"}),
        ("specdiff-adaptive", lambda g: sd.SpecDiffAdaptiveConfig(guidance_scale=g), {}),
    ],
    ids=["specdiff", "specdiff-cr0.7-latest", "specdiff-adaptive"],
)
def test_flux_specdiff_matches_the_cpp_demo(flux_problem, flux_full, tmp_path, method, config, options):
    """Token-level: the C1 tokens through every double- and single-stream block against the cached rotated keys and
    values, the probe from the SDPA log-sum-exp over all six blocks."""
    x = run(flux_problem, config(flux_problem.guidance))
    ref = cpp_latents(tmp_path, "mnist-flux", method, SAMPLES, 28, **options)
    err = rel_l2(x.numpy(), ref)
    print(f"mnist-flux {method} {options}: relative L2 {err:.3g}")
    assert err < TOL, f"{method} {options}: relative L2 {err:.3g} against the C++ demo"
    assert not torch.equal(x, flux_full)


def test_flux_specdiff_partial_steps_and_cache_rate_zero(flux_problem, flux_full):
    sd.enable(flux_problem.model, sd.SpecDiffConfig(guidance_scale=flux_problem.guidance), scheduler=flux_problem.scheduler)
    try:
        flux_problem.sample()
        assert sd.stats(flux_problem.model)["partial_calls"] > 0
    finally:
        sd.disable(flux_problem.model)
    assert torch.equal(run(flux_problem, sd.SpecDiffConfig(cache_rate=0.0, guidance_scale=flux_problem.guidance)), flux_full)


def test_flux_disable_restores_the_model(flux_problem, flux_full):
    m = flux_problem.model
    processors = [b.attn.processor for b in m.transformer_blocks] + [b.attn.processor for b in m.single_transformer_blocks]
    state = {k: v.clone() for k, v in m.state_dict().items()}
    run(flux_problem, sd.ForecastConfig(interval=3, c3="taylor"))
    run(flux_problem, sd.SpecDiffConfig(guidance_scale=flux_problem.guidance))
    assert [b.attn.processor for b in m.transformer_blocks] + [b.attn.processor for b in m.single_transformer_blocks] == processors
    assert "forward" not in m.__dict__ and not hasattr(m, "_diffusers_hook")
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in state.items())
    assert torch.equal(flux_problem.sample(), flux_full)


def test_flux_calibrate_forecast_fits_a_usable_table(flux_problem, flux_full):
    """calibrate_forecast on a pipeline-like object whose transformer is FLUX: the rows are the packed output."""

    class Loop:
        transformer = flux_problem.model
        scheduler = flux_problem.scheduler

        def __call__(self):
            return flux_problem.sample()

    table = sd.calibrate_forecast(Loop(), [{}], sd.ForecastConfig(interval=3))
    assert table.steps == flux_problem.steps
    x = run(flux_problem, sd.ForecastConfig(interval=3, learned=table))
    assert rel_l2(x.numpy(), flux_full.numpy()) < 0.1
    assert not torch.equal(x, flux_full)


@pytest.mark.parametrize(
    "method, config, options",
    [
        ("fbcache", lambda: sd.FBCacheConfig(threshold=0.4), {"threshold": 0.4}),
        ("teacache", lambda: sd.TeaCacheConfig(threshold=1.0), {"threshold": 1.0}),
    ],
    ids=["fbcache-0.4", "teacache-1.0"],
)
def test_flux_step_level_method_matches_the_cpp_demo(flux_problem, flux_full, tmp_path, method, config, options):
    """FBCache and TeaCache on FLUX: the double- then single-stream blocks are the blocks (block 0 the first double-stream
    one, as in the engine); the gate's skipped steps, and so the images, equal the C++ demo's."""
    check_step_level(flux_problem, flux_full, tmp_path, "mnist-flux", method, config(), options, TOL)


@pytest.mark.parametrize("config", [sd.FBCacheConfig(threshold=0.0), sd.TeaCacheConfig(threshold=0.0)], ids=["fbcache", "teacache"])
def test_flux_step_level_threshold_zero_is_the_plain_loop_bit_for_bit(flux_problem, flux_full, config):
    assert torch.equal(run(flux_problem, config), flux_full)
