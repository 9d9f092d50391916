#!/usr/bin/env python3
"""Side by side in diffusers: SpecDiff's methods (specdiff.diffusers) against diffusers' own cache hooks and cache-dit
on a shipped model (models/mnist-sd3, models/canvas-sd3: SD3Transformer2DModel; models/mnist-flux:
FluxTransformer2DModel), same noise (the engine's Philox, sample k = stream k of --seed), same labels (k % 10), the
pipeline's loop with CFG as one batch [uncond; cond].

Per setting: FLOP ratio (torch's FlopCounterMode over the whole run, the speculative pass included), PSNR / SSIM of
the final images against full compute (the C++ tools' quality::mean_psnr / mean_ssim, bound as
specdiff._core.image_quality, on images clamped to [-1, 1]), class accuracy (the model's shipped classifier, as the
C++ tools' class_accuracy), and with --repeats > 0 the wall speedup: full compute and the setting timed alternately
(full then setting, then setting then full, ...) after the untimed run, the speedup the median of the pairs' ratios;
for the SpecDiff methods also the share of the run spent in the C++ library's calls. The images are those of the
FLOP-counting run (FlopCounterMode only observes).

    .venv/bin/python bench/python/compare.py --model models/mnist-sd3 --samples 4 --repeats 3 --threads 2 --markdown out.md
    .venv/bin/python bench/python/compare.py --model models/canvas-sd3 --seed 2000 --samples 16 --repeats 0 --csv docs/results/python_canvas-sd3_2000.csv

cache-dit's DBCache rows (with and without its TaylorSeer calibrator) run when `import cache_dit` works; otherwise one
row says why. To keep the venv's torch and diffusers as they are, cache-dit 1.5.3 was used from its unpacked wheel
(`pip download --no-deps cache-dit==1.5.3`, unzip, PYTHONPATH=<that folder>); its other needs (packaging, pyyaml,
transformers) are already in the venv. `pip install cache-dit` would also pull CUDA wheels and triton.
"""
import argparse
import contextlib
import csv
import io
import json
import pathlib
import re
import statistics
import sys
import time

import numpy as np
import torch

import specdiff
import specdiff.diffusers as sd

ROOT = pathlib.Path(__file__).resolve().parents[2]


def model_kind(folder: pathlib.Path) -> str:
    """'flux' when the transformer's config is a FluxTransformer2DModel's, else 'sd3'."""
    config = json.loads((folder / "transformer" / "config.json").read_text())
    return "flux" if "num_single_layers" in config else "sd3"


class Classifier:
    """The model folder's digit classifier (classifier.json + classifier.safetensors: conv2d, relu, maxpool2d, flatten,
    linear, as examples/quality's digit_classifier reads them) run by torch; accuracy on the clamped images, as the C++
    tools' class_accuracy measures it."""

    def __init__(self, folder: pathlib.Path):
        from safetensors.torch import load_file

        self.spec = json.loads((folder / "classifier.json").read_text())
        self.weights = load_file(str(folder / "classifier.safetensors"))

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        x = images.clamp(-1, 1)
        w = self.weights
        for layer in self.spec["layers"]:
            t = layer["type"]
            if t == "conv2d":
                x = F.conv2d(x, w[layer["weight"]], w[layer["bias"]], stride=layer.get("stride", 1), padding=layer.get("padding", 0))
            elif t == "relu":
                x = F.relu(x)
            elif t == "maxpool2d":
                x = F.max_pool2d(x, layer["kernel"], layer.get("stride", layer["kernel"]))
            elif t == "flatten":
                x = x.flatten(1)
            elif t == "linear":
                x = F.linear(x, w[layer["weight"]], w[layer["bias"]])
            else:
                raise ValueError(f"classifier.json: layer type {t!r} unknown")
        return x.argmax(dim=1)

    def accuracy(self, images: torch.Tensor, labels) -> float:
        return float((self.predict(images) == torch.tensor(labels)).float().mean())


class Problem:
    """The C++ demo's batch on a shipped model, in diffusers' objects: noise from the engine's generator, labels
    k % classes, the class-embedding rows, CFG as one batch [uncond; cond]. SD3: the SD3 pipeline's loop. FLUX: FluxPipeline's
    layout and schedule (the noise image packed 2x2, sigmas linspace(1, 1/n, n) with the dynamic shift, the transformer
    called with t / 1000), as python/tests runs it."""

    def __init__(self, folder: pathlib.Path, samples: int, steps: int, seed: int):
        from diffusers import FlowMatchEulerDiscreteScheduler
        from safetensors.numpy import load_file

        self.folder = folder
        self.steps = steps
        self.seed = seed
        self.kind = model_kind(folder)
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(folder))
        emb = load_file(str(folder / "class_embeddings.safetensors"))
        classes = emb["pooled"].shape[0] - 1
        self.labels = [k % classes for k in range(samples)]
        self.classifier = Classifier(folder)
        size = self.classifier.spec["input"]["height"]
        channels = self.classifier.spec["input"]["channels"]
        self.image_shape = (samples, channels, size, size)
        image = torch.from_numpy(np.array(specdiff.sample_latents(samples, channels * size * size, seed))).reshape(self.image_shape)
        if self.kind == "flux":
            from diffusers import FluxPipeline, FluxTransformer2DModel
            from diffusers.pipelines.flux.pipeline_flux import calculate_shift

            self.model = FluxTransformer2DModel.from_pretrained(str(folder / "transformer")).eval()
            self.noise = FluxPipeline._pack_latents(image, samples, channels, size, size)
            self.img_ids = FluxPipeline._prepare_latent_image_ids(samples, size // 2, size // 2, "cpu", torch.float32)
            c = self.scheduler.config
            self.mu = calculate_shift(self.noise.shape[1], c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
        else:
            from diffusers import SD3Transformer2DModel

            self.model = SD3Transformer2DModel.from_pretrained(str(folder / "transformer")).eval()
            self.noise = image
        ctx, pooled = torch.from_numpy(emb["context"]), torch.from_numpy(emb["pooled"])
        self.txt_ids = torch.zeros(ctx.shape[1], 3)
        null = [classes] * samples
        self.context = torch.cat([ctx[null], ctx[self.labels]])
        self.pooled = torch.cat([pooled[null], pooled[self.labels]])
        sampling = folder / "sampling.json"
        self.guidance = json.loads(sampling.read_text()).get("guidance_scale", 4.0) if sampling.exists() else 4.0
        self.step_index = 0
        self.run_steps = steps  # a "fewer steps" setting changes this
        self.before_run = None  # a peer's per-run reset (what its pipeline wrapper would do at each call), or None

    def set_timesteps(self, steps):
        if self.kind == "flux":
            self.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=self.mu)
        else:
            self.scheduler.set_timesteps(steps)

    def sample(self) -> torch.Tensor:
        from diffusers.hooks.hooks import CacheContext, _set_cache_context  # what a pipeline's cache_context() sets

        if self.before_run is not None:
            self.before_run()
        steps = self.run_steps
        self.set_timesteps(steps)
        lat = self.noise.clone()
        with torch.no_grad():
            for i, t in enumerate(self.scheduler.timesteps):
                self.step_index = i
                self.current_t = float(t)
                inp = torch.cat([lat, lat])
                _set_cache_context(self.model, CacheContext("cond_uncond", step_index=i, num_inference_steps=steps, timestep=t,
                                                            sigma=float(self.scheduler.sigmas[i])))
                try:
                    if self.kind == "flux":
                        v = self.model(hidden_states=inp, timestep=t.expand(inp.shape[0]).to(inp.dtype) / 1000,
                                       encoder_hidden_states=self.context, pooled_projections=self.pooled, img_ids=self.img_ids,
                                       txt_ids=self.txt_ids, return_dict=False)[0]
                    else:
                        v = self.model(hidden_states=inp, timestep=t.expand(inp.shape[0]), encoder_hidden_states=self.context,
                                       pooled_projections=self.pooled, return_dict=False)[0]
                finally:
                    _set_cache_context(self.model, None)
                vu, vc = v.chunk(2)
                v = vu + self.guidance * (vc - vu)
                lat = self.scheduler.step(v, t, lat, return_dict=False)[0]
        return lat

    def images(self, lat: torch.Tensor) -> torch.Tensor:
        """The classifier's images [N, C, H, W] of final latents (FLUX: unpacked as FluxPipeline unpacks them)."""
        if self.kind == "flux":
            from diffusers import FluxPipeline

            lat = FluxPipeline._unpack_latents(lat, self.image_shape[2], self.image_shape[3], 1)
        return lat.clamp(-1, 1).contiguous()


def quality(p: Problem, reference: torch.Tensor, lat: torch.Tensor):
    """PSNR dB, SSIM (quality::mean_psnr / mean_ssim on the clamped images, data range 2) and class accuracy."""
    ref, img = p.images(reference), p.images(lat)
    ps, ss = specdiff._core.image_quality(ref.numpy(), img.numpy(), 2.0)
    return ps, ss, p.classifier.accuracy(img, p.labels)


def settings(p: Problem, only):
    """(name, family, enable(), disable()) per setting. Each enable returns a callable giving the run's library seconds."""
    from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig, PyramidAttentionBroadcastConfig, TaylorSeerCacheConfig
    from diffusers.hooks import FasterCacheConfig, apply_faster_cache, apply_mag_cache
    from diffusers.hooks import apply_first_block_cache, apply_pyramid_attention_broadcast, apply_taylorseer_cache
    from diffusers.hooks import HookRegistry

    m = p.model
    learned = {n: p.folder / f"learned_forecast_N{n}.json" for n in range(2, 9)}

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

    def fewer(n):
        def on():
            p.run_steps = n
            return lambda: None

        def off():
            p.run_steps = p.steps
        return on, off

    g = p.guidance
    out = [
        ("specdiff cr=0.9", "specdiff", *ours(sd.SpecDiffConfig(guidance_scale=g))),
        ("specdiff cr=0.7", "specdiff", *ours(sd.SpecDiffConfig(guidance_scale=g, cache_rate=0.7))),
        ("specdiff-adaptive", "specdiff", *ours(sd.SpecDiffAdaptiveConfig(guidance_scale=g))),
    ]
    for th in (0.2, 0.4):  # the package's step-level methods (the library's gate; the C++ demo's --method fbcache / teacache)
        out.append((f"specdiff FBCache th={th}", "specdiff FBCache", *ours(sd.FBCacheConfig(threshold=th))))
    for th in (0.6, 1.0):
        out.append((f"specdiff TeaCache th={th}", "specdiff TeaCache", *ours(sd.TeaCacheConfig(threshold=th))))
    for n in (2, 3, 4, 6):
        if learned[n].exists():
            out.append((f"forecast N={n} learned", "forecast learned", *ours(sd.ForecastConfig(interval=n, learned=learned[n]))))
    for n in (2, 3):
        out.append((f"forecast N={n} taylor", "forecast taylor", *ours(sd.ForecastConfig(interval=n, c3="taylor"))))
    for n in (14, 9, 7):
        out.append((f"fewer steps {n}", "fewer steps", *fewer(n)))
    for th in (0.05, 0.2):
        out.append((f"diffusers FirstBlockCache th={th}", "diffusers FirstBlockCache",
                    *theirs(lambda th=th: apply_first_block_cache(m, FirstBlockCacheConfig(threshold=th)))))
    for iv, lite in ((2, False), (3, False), (2, True), (3, True), (4, True), (6, True)):
        out.append((f"diffusers TaylorSeerCache interval={iv}{' lite' if lite else ''}", "diffusers TaylorSeerCache",
                    *theirs(lambda iv=iv, lite=lite: apply_taylorseer_cache(m, TaylorSeerCacheConfig(
                        cache_interval=iv, disable_cache_before_step=3, taylor_factors_dtype=torch.float32, use_lite_mode=lite)))))
    out.append(("diffusers PAB range=2", "diffusers PAB",
                *theirs(lambda: apply_pyramid_attention_broadcast(m, PyramidAttentionBroadcastConfig(
                    spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(100, 800),
                    current_timestep_callback=lambda: p.current_t)))))
    ratios = {}

    def mag(th):
        def apply():
            if "r" not in ratios:
                ratios["r"] = mag_ratios(p)
            apply_mag_cache(m, MagCacheConfig(threshold=th, num_inference_steps=p.steps, mag_ratios=ratios["r"]))
        return apply

    for th in (0.06, 0.24):
        out.append((f"diffusers MagCache th={th} (ratios calibrated on seed {p.seed + 1})", "diffusers MagCache", *theirs(mag(th))))
    out.append(("diffusers FasterCache (defaults, current_timestep_callback)", "diffusers FasterCache",
                *theirs(lambda: apply_faster_cache(m, FasterCacheConfig(current_timestep_callback=lambda: p.current_t)))))
    out += cache_dit_settings(p)
    if only:
        out = [s for s in out if any(o in s[0] for o in only)]
    return out


def mag_ratios(p: Problem):
    """MagCache's per-step magnitude ratios for this model, from diffusers' own calibration mode (MagCacheConfig(
    calibrate=True): one full run, the ratios printed at its end) on other noise (the run's seed + 1)."""
    from diffusers.hooks import MagCacheConfig, apply_mag_cache

    other = Problem(p.folder, len(p.labels), p.steps, p.seed + 1)
    apply_mag_cache(other.model, MagCacheConfig(calibrate=True, num_inference_steps=p.steps))
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        other.sample()
    found = re.findall(r"\[([^\[\]]+)\]", text.getvalue())
    if not found:
        raise RuntimeError("MagCache calibration printed no ratios")
    return [float(x) for x in found[-1].split(",")]


def cache_dit_settings(p: Problem):
    """cache-dit's DBCache, with and without its TaylorSeer calibrator, through its one-line API. cache-dit registers
    SD3 and FLUX under their pipeline classes only, so on the bare transformer it takes the BlockAdapter that
    cache-dit's own registration builds (caching/block_adapters/adapters.py: SD3 `transformer_blocks`,
    ForwardPattern.Pattern_1; FLUX [transformer_blocks, single_transformer_blocks], Pattern_1 both). Each run starts
    with cache_dit.refresh_context(transformer, num_inference_steps=steps), cache-dit's documented transformer-only flow
    (what its pipeline wrapper does per call); without it the context carries over from run to run and the same noise
    gives a different image each run (seen: 47.2 / 51.6 / 48.8 dB). Defaults (cache-dit 1.5.3,
    caching/cache_contexts/cache_config.py lines 28-47): F8B0, residual_diff_threshold 0.08, 8 warm-up steps;
    TaylorSeerCalibratorConfig (calibrators/__init__.py line 128): order 1. The shipped transformers have 4 (SD3) or
    2 + 4 (FLUX) blocks, fewer than F8, so the defaults are also run with F1B0 / F1B1."""
    try:
        import cache_dit
        from cache_dit import DBCacheConfig, TaylorSeerCalibratorConfig
    except Exception as e:  # not installed, or not importable against this torch/diffusers
        msg = f"cache-dit not importable: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"

        def failing():
            raise RuntimeError(msg)
        return [("cache-dit DBCache", "cache-dit", failing, lambda: None)]
    import logging

    logging.getLogger("cache_dit").setLevel(logging.WARNING)
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("cache_dit"):
            logging.getLogger(name).setLevel(logging.WARNING)
    m = p.model

    def run(cache, calibrator):
        def on():
            if p.kind == "flux":
                adapter = cache_dit.BlockAdapter(transformer=m, blocks=[m.transformer_blocks, m.single_transformer_blocks],
                                                 forward_pattern=[cache_dit.ForwardPattern.Pattern_1, cache_dit.ForwardPattern.Pattern_1],
                                                 check_forward_pattern=True)
            else:
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
            ("F1B0 R0.24", (1, 0, 0.24), None), ("F1B0 R0.24 + TaylorSeer (encoder calibrator off)", (1, 0, 0.24), ts_no_enc),
            ("F1B1 R0.08", (1, 1, 0.08), None), ("F1B1 R0.08 + TaylorSeer", (1, 1, 0.08), ts)]
    return [(f"cache-dit DBCache {tag}", "cache-dit DBCache" + (" + TaylorSeer" if cal else ""), *run(db(*fbr), cal() if cal else None))
            for tag, fbr, cal in grid]


def counted_run(p: Problem):
    """One run under torch's FlopCounterMode: (FLOPs, final latents)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        lat = p.sample()
    return float(counter.get_total_flops()), lat


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "models" / "mnist-sd3"))
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="timed (full, setting) pairs per setting; 0: no timing")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (set explicitly)")
    ap.add_argument("--only", nargs="*", default=[], help="settings whose name contains one of these")
    ap.add_argument("--markdown", help="also write the table here")
    ap.add_argument("--csv", help="also write the rows here")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    p = Problem(pathlib.Path(a.model), a.samples, a.steps, a.seed)
    full_flops, full = counted_run(p)
    full_acc = p.classifier.accuracy(p.images(full), p.labels)
    rows = []
    for name, family, on, off in settings(p, a.only):
        try:
            library = on()
        except Exception as e:  # a peer that does not apply to this model
            msg = f"fails at enable: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            rows.append(dict(setting=name, family=family, note=msg))
            print(f"{name}: {msg}", file=sys.stderr)
            with contextlib.suppress(Exception):
                off()
            continue
        try:
            flops, x = counted_run(p)
            ratios, method_s, full_s, lib_share = [], [], [], []
            for i in range(a.repeats):
                def timed_full():
                    off()
                    t0 = time.perf_counter()
                    p.sample()
                    full_s.append(time.perf_counter() - t0)

                def timed_setting():
                    nonlocal library
                    library = on()
                    t0 = time.perf_counter()
                    p.sample()
                    method_s.append(time.perf_counter() - t0)
                    lib = library()
                    if lib is not None:
                        lib_share.append(lib / method_s[-1])
                    off()
                if i % 2 == 0:
                    timed_full(), timed_setting()
                else:
                    timed_setting(), timed_full()
                ratios.append(full_s[-1] / method_s[-1])
        except Exception as e:  # a peer that fails on this model (reported, not hidden)
            with contextlib.suppress(Exception):
                off()
            msg = f"fails: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            rows.append(dict(setting=name, family=family, note=msg))
            print(f"{name}: {msg}", file=sys.stderr)
            continue
        if not a.repeats:
            off()
        ps, ss, acc = quality(p, full, x)
        row = dict(setting=name, family=family, flop_ratio=full_flops / flops, psnr_db=ps, ssim=ss, class_acc=acc)
        if ratios:
            row.update(wall_speedup=statistics.median(ratios), wall_speedup_min=min(ratios), wall_speedup_max=max(ratios),
                       setting_s=statistics.median(method_s), full_s=statistics.median(full_s))
        if lib_share:
            row["library_share"] = statistics.median(lib_share)
        rows.append(row)
        print(row, file=sys.stderr)
    head = (f"{p.folder.name}, {a.samples} samples, {a.steps} steps, CFG {p.guidance}, seed {a.seed}, torch {torch.__version__} CPU, "
            f"{torch.get_num_threads()} threads, {a.repeats} timed pairs; full compute's class accuracy {full_acc:.3f}")
    lines = [head, "", "| setting | FLOP ratio | PSNR dB | SSIM | class acc | wall speedup (min-max) | library share |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if "flop_ratio" not in r:
            lines.append(f"| {r['setting']} | – | – | – | – | {r['note']} | |")
            continue
        wall = (f"{r['wall_speedup']:.2f}x ({r['wall_speedup_min']:.2f}-{r['wall_speedup_max']:.2f})" if "wall_speedup" in r else "")
        lib = f"{100 * r['library_share']:.1f}%" if "library_share" in r else ""
        lines.append(f"| {r['setting']} | {r['flop_ratio']:.2f}x | {r['psnr_db']:.2f} | {r['ssim']:.3f} | {r['class_acc']:.3f} | {wall} | {lib} |")
    text = "\n".join(lines)
    print(text)
    if a.markdown:
        pathlib.Path(a.markdown).write_text(text + "\n")
    if a.csv:
        fields = ["model", "seed", "samples", "steps", "threads", "setting", "family", "flop_ratio", "psnr_db", "ssim", "class_acc",
                  "full_class_acc", "wall_speedup", "wall_speedup_min", "wall_speedup_max", "setting_s", "full_s", "library_share", "note"]
        with open(a.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            for r in rows:
                out = dict(model=p.folder.name, seed=a.seed, samples=a.samples, steps=a.steps, threads=torch.get_num_threads(),
                           full_class_acc=round(full_acc, 4))
                out.update({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})
                w.writerow(out)


if __name__ == "__main__":
    main()
