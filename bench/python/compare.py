#!/usr/bin/env python3
"""Side by side in diffusers: SpecDiff's methods (specdiff.diffusers) against diffusers' own cache hooks on a shipped
SD3 model, same noise (the engine's Philox, sample k = stream k of --seed), same labels (k % 10), the SD3 pipeline's
loop with CFG. Per setting: FLOP ratio (torch's FlopCounterMode over the whole run, the speculative pass included, in
a separate untimed run), PSNR / SSIM of the final images against full compute (clamped to [-1, 1]), wall time as the
median of --repeats timed runs with a full-compute run timed right before each (the speedup is the median of those
pairs' ratios), and for the SpecDiff methods the share of the run spent in the C++ library's calls.

    .venv/bin/python bench/python/compare.py --model models/mnist-sd3 --samples 4 --repeats 3 --markdown out.md

cache-dit's DBCache rows (with and without its TaylorSeer calibrator) run when `import cache_dit` works; otherwise one
row says why. To keep the venv's torch and diffusers as they are, cache-dit 1.5.3 was used from its unpacked wheel
(`pip download --no-deps cache-dit==1.5.3`, unzip, PYTHONPATH=<that folder>); its other needs (packaging, pyyaml,
transformers) are already in the venv. `pip install cache-dit` would also pull CUDA wheels and triton.
"""
import argparse
import json
import math
import pathlib
import statistics
import sys
import time

import numpy as np
import torch

import specdiff
import specdiff.diffusers as sd

ROOT = pathlib.Path(__file__).resolve().parents[2]


class Problem:
    def __init__(self, folder: pathlib.Path, samples: int, steps: int, seed: int):
        from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
        from safetensors.numpy import load_file

        self.folder = folder
        self.steps = steps
        self.model = SD3Transformer2DModel.from_pretrained(str(folder / "transformer")).eval()
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(folder))
        emb = load_file(str(folder / "class_embeddings.safetensors"))
        classes = emb["pooled"].shape[0] - 1
        labels = [k % classes for k in range(samples)]
        c = self.model.config
        shape = (samples, c.in_channels, c.sample_size, c.sample_size)
        self.noise = torch.from_numpy(np.array(specdiff.sample_latents(samples, int(np.prod(shape[1:])), seed))).reshape(shape)
        ctx, pooled = torch.from_numpy(emb["context"]), torch.from_numpy(emb["pooled"])
        null = [classes] * samples
        self.context = torch.cat([ctx[null], ctx[labels]])
        self.pooled = torch.cat([pooled[null], pooled[labels]])
        sampling = folder / "sampling.json"
        self.guidance = json.loads(sampling.read_text()).get("guidance_scale", 4.0) if sampling.exists() else 4.0
        self.step_index = 0
        self.before_run = None  # a peer's per-run reset (what its pipeline wrapper would do at each call), or None

    def sample(self) -> torch.Tensor:
        from diffusers.hooks.hooks import CacheContext, _set_cache_context  # what a pipeline's cache_context() sets

        if self.before_run is not None:
            self.before_run()
        self.scheduler.set_timesteps(self.steps)
        lat = self.noise.clone()
        with torch.no_grad():
            for i, t in enumerate(self.scheduler.timesteps):
                self.step_index = i
                self.current_t = float(t)
                inp = torch.cat([lat, lat])
                _set_cache_context(self.model, CacheContext("cond_uncond", step_index=i, num_inference_steps=self.steps, timestep=t,
                                                            sigma=float(self.scheduler.sigmas[i])))
                try:
                    v = self.model(hidden_states=inp, timestep=t.expand(inp.shape[0]), encoder_hidden_states=self.context,
                                   pooled_projections=self.pooled, return_dict=False)[0]
                finally:
                    _set_cache_context(self.model, None)
                vu, vc = v.chunk(2)
                v = vu + self.guidance * (vc - vu)
                lat = self.scheduler.step(v, t, lat, return_dict=False)[0]
        return lat


def psnr(a, b):
    a, b = np.clip(a, -1, 1), np.clip(b, -1, 1)
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(4.0 / mse)  # peak-to-peak 2


def ssim(a, b):
    """Mean SSIM over samples and channels, 7x7 uniform windows, data range 2 (images in [-1, 1])."""
    a, b = np.clip(a, -1, 1).astype(np.float64), np.clip(b, -1, 1).astype(np.float64)
    c1, c2, w = (0.01 * 2) ** 2, (0.03 * 2) ** 2, 7

    def box(x):
        k = np.lib.stride_tricks.sliding_window_view(x, (w, w), axis=(-2, -1))
        return k.mean(axis=(-2, -1))

    ma, mb = box(a), box(b)
    va, vb, cov = box(a * a) - ma * ma, box(b * b) - mb * mb, box(a * b) - ma * mb
    s = ((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma * ma + mb * mb + c1) * (va + vb + c2))
    return float(s.mean())


def settings(p: Problem, only):
    """(name, enable(), disable()) per setting. Each enable returns a callable giving the run's library seconds."""
    from diffusers.hooks import FirstBlockCacheConfig, PyramidAttentionBroadcastConfig, TaylorSeerCacheConfig
    from diffusers.hooks import apply_first_block_cache, apply_pyramid_attention_broadcast, apply_taylorseer_cache
    from diffusers.hooks import HookRegistry

    m = p.model
    learned = {n: p.folder / f"learned_forecast_N{n}.json" for n in (2, 3, 4, 6)}

    def ours(config):
        def on():
            sd.enable(m, config, scheduler=p.scheduler)
            return lambda: sd.stats(m)["library_seconds"]

        return on, lambda: sd.disable(m)

    def fresh_children():  # diffusers caches the list of child registries at the first context set: drop it
        HookRegistry.check_if_exists_or_initialize(m)._child_registries_cache = None

    def theirs(apply):
        def on():
            apply()
            fresh_children()
            return lambda: None

        def off():  # the hooks sit on the model and its blocks: remove every one by name
            for module in m.modules():
                r = getattr(module, "_diffusers_hook", None)
                if r is not None:
                    for name in list(r.hooks):
                        r.remove_hook(name, recurse=False)
            fresh_children()
        return on, off

    g = p.guidance
    out = [
        ("specdiff cr=0.9", *ours(sd.SpecDiffConfig(guidance_scale=g))),
        ("specdiff cr=0.7", *ours(sd.SpecDiffConfig(guidance_scale=g, cache_rate=0.7))),
        ("specdiff-adaptive", *ours(sd.SpecDiffAdaptiveConfig(guidance_scale=g))),
    ]
    for n in (2, 3, 4, 6):
        if learned[n].exists():
            out.append((f"forecast N={n} learned", *ours(sd.ForecastConfig(interval=n, learned=learned[n]))))
    out.append(("forecast N=3 taylor", *ours(sd.ForecastConfig(interval=3, c3="taylor"))))
    for th in (0.05, 0.1, 0.2):
        out.append((f"diffusers FirstBlockCache th={th}", *theirs(lambda th=th: apply_first_block_cache(m, FirstBlockCacheConfig(threshold=th)))))
    for iv in (3, 5):
        out.append((f"diffusers TaylorSeerCache interval={iv}",
                    *theirs(lambda iv=iv: apply_taylorseer_cache(m, TaylorSeerCacheConfig(cache_interval=iv, disable_cache_before_step=3,
                                                                                        taylor_factors_dtype=torch.float32)))))
    out.append(("diffusers PAB range=2",
                *theirs(lambda: apply_pyramid_attention_broadcast(m, PyramidAttentionBroadcastConfig(
                    spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(100, 800),
                    current_timestep_callback=lambda: p.current_t)))))
    out += cache_dit_settings(p)
    if only:
        out = [s for s in out if any(o in s[0] for o in only)]
    return out


def cache_dit_settings(p: Problem):
    """cache-dit's DBCache, with and without its TaylorSeer calibrator, through its one-line API. cache-dit registers
    SD3 under the pipeline class (StableDiffusion3Pipeline) only, so on the bare transformer it takes the BlockAdapter
    that cache-dit's own SD3 registration builds (caching/block_adapters/adapters.py: transformer_blocks,
    ForwardPattern.Pattern_1). Each run starts with cache_dit.refresh_context(transformer, num_inference_steps=steps),
    cache-dit's documented transformer-only flow (what its pipeline wrapper does per call); without it the context
    carries over from run to run and the same noise gives a different image each run (seen: 47.2 / 51.6 / 48.8 dB).
    Defaults (cache-dit 1.5.3, caching/cache_contexts/cache_config.py lines 28-47): F8B0, residual_diff_threshold 0.08,
    8 warm-up steps; TaylorSeerCalibratorConfig (calibrators/__init__.py line 128): order 1. The mnist-sd3 transformer
    has 4 blocks, fewer than F8, so the defaults are also run with F1B0 (cache-dit's fastest documented F/B setting)."""
    try:
        import cache_dit
        from cache_dit import DBCacheConfig, TaylorSeerCalibratorConfig
    except Exception as e:  # not installed, or not importable against this torch/diffusers
        msg = f"cache-dit not importable: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"

        def failing():
            raise RuntimeError(msg)
        return [("cache-dit DBCache", failing, lambda: None)]
    import logging

    logging.getLogger("cache_dit").setLevel(logging.WARNING)
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("cache_dit"):
            logging.getLogger(name).setLevel(logging.WARNING)
    m = p.model

    def run(cache, calibrator):
        def on():
            adapter = cache_dit.BlockAdapter(transformer=m, blocks=m.transformer_blocks,
                                             forward_pattern=cache_dit.ForwardPattern.Pattern_1, check_forward_pattern=True)
            cache_dit.enable_cache(adapter, cache_config=cache, calibrator_config=calibrator)
            p.before_run = lambda: cache_dit.refresh_context(m, num_inference_steps=p.steps)
            return lambda: None

        def off():
            p.before_run = None
            cache_dit.disable_cache(m)
        return on, off

    def db(f, b, r=0.08):
        return DBCacheConfig(Fn_compute_blocks=f, Bn_compute_blocks=b, residual_diff_threshold=r, num_inference_steps=p.steps)

    ts, ts_no_enc = TaylorSeerCalibratorConfig, lambda: TaylorSeerCalibratorConfig(enable_encoder_calibrator=False)
    grid = [("defaults F8B0 R0.08", (8, 0, 0.08), None), ("defaults F8B0 R0.08 + TaylorSeer", (8, 0, 0.08), ts),
            ("F1B0 R0.08", (1, 0, 0.08), None), ("F1B0 R0.08 + TaylorSeer", (1, 0, 0.08), ts),
            ("F1B0 R0.08 + TaylorSeer (encoder calibrator off)", (1, 0, 0.08), ts_no_enc),
            ("F1B0 R0.16", (1, 0, 0.16), None), ("F1B0 R0.16 + TaylorSeer (encoder calibrator off)", (1, 0, 0.16), ts_no_enc),
            ("F1B1 R0.08", (1, 1, 0.08), None), ("F1B1 R0.08 + TaylorSeer", (1, 1, 0.08), ts)]
    return [(f"cache-dit DBCache {tag}", *run(db(*fbr), cal() if cal else None)) for tag, fbr, cal in grid]


def flops_of(p: Problem) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        p.sample()
    return float(counter.get_total_flops())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "models" / "mnist-sd3"))
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--only", nargs="*", default=[], help="settings whose name contains one of these")
    ap.add_argument("--markdown", help="also write the table here")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    p = Problem(pathlib.Path(a.model), a.samples, a.steps, a.seed)
    full = p.sample().numpy()
    full_flops = flops_of(p)
    rows = []
    for name, on, off in settings(p, a.only):
        try:
            library = on()
        except Exception as e:  # a peer that does not apply to this model
            rows.append((name, None, None, None, None, None, f"not applicable: {e}"))
            print(f"{name}: not applicable: {e}", file=sys.stderr)
            continue
        try:
            flops = flops_of(p)
            x = p.sample().numpy()
            ratios, method_s, full_s, lib_share = [], [], [], []
            for _ in range(a.repeats):
                off()
                t0 = time.perf_counter()
                p.sample()
                tf = time.perf_counter() - t0
                library = on()
                t0 = time.perf_counter()
                p.sample()
                tm = time.perf_counter() - t0
                lib = library()
                ratios.append(tf / tm)
                method_s.append(tm)
                full_s.append(tf)
                if lib is not None:
                    lib_share.append(lib / tm)
        except Exception as e:  # a peer that fails on this model (reported, not hidden)
            off()
            msg = f"fails: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
            rows.append((name, None, None, None, None, None, msg))
            print(f"{name}: {msg}", file=sys.stderr)
            continue
        off()
        row = (name, full_flops / flops, psnr(x, full), ssim(x, full), statistics.median(ratios),
               statistics.median(lib_share) if lib_share else None,
               f"{statistics.median(method_s):.2f} s vs full {statistics.median(full_s):.2f} s")
        rows.append(row)
        print(row, file=sys.stderr)
    head = (f"{p.folder.name}, {a.samples} samples, {a.steps} steps, CFG {p.guidance}, seed {a.seed}, torch {torch.__version__} CPU, "
            f"{torch.get_num_threads()} threads, {a.repeats} timed pairs")
    lines = [head, "", "| setting | FLOP ratio | PSNR dB | SSIM | wall speedup | library share | wall |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for name, fr, ps, ss, sp, lib, note in rows:
        if fr is None:
            lines.append(f"| {name} | – | – | – | – | – | {note} |")
            continue
        lines.append(f"| {name} | {fr:.2f}x | {ps:.1f} | {ss:.3f} | {sp:.2f}x | {'' if lib is None else f'{100 * lib:.1f}%'} | {note} |")
    text = "\n".join(lines)
    print(text)
    if a.markdown:
        pathlib.Path(a.markdown).write_text(text + "\n")


if __name__ == "__main__":
    main()
