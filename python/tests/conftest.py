"""Shared helpers of the Python package's tests: the shipped models loaded by diffusers, the C++ demo's batch
(noise from the engine's generator, labels k % classes, the class-embedding rows), a plain diffusers sampling loop,
and the C++ reference (specdiff-pyref, built by the repository's CMake build: scripts/test.sh builds it first)."""
import os
import pathlib
import subprocess

import numpy as np
import pytest
import torch

import specdiff

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODELS = ROOT / "models"


def pyref_binary() -> pathlib.Path:
    env = os.environ.get("SPECDIFF_PYREF")
    candidates = [pathlib.Path(env)] if env else []
    candidates += [ROOT / "build" / d / "python" / "reference" / "specdiff-pyref" for d in ("default", "h29")]
    for c in candidates:
        if c.is_file():
            return c
    pytest.fail("specdiff-pyref not found: build it first (cmake --build --preset default --target specdiff-pyref) or set SPECDIFF_PYREF")


def cpp_latents(tmp_path, model: str, method: str, samples: int, steps: int, seed: int = 0, **options) -> np.ndarray:
    out = tmp_path / f"{model}-{method}.raw"
    cmd = [str(pyref_binary()), "--model", str(MODELS / model), "--method", method, "--samples", str(samples), "--steps", str(steps),
           "--seed", str(seed), "--out", str(out)]
    for k, v in options.items():
        cmd += ["--" + k.replace("_", "-"), str(v)]
    subprocess.run(cmd, check=True, capture_output=True)
    return np.fromfile(out, dtype=np.float32)


class Problem:
    """The demo's batch on a shipped SD3 model, in diffusers' objects."""

    def __init__(self, name: str, samples: int, steps: int, seed: int = 0):
        from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
        from safetensors.numpy import load_file
        import json

        folder = MODELS / name
        self.model = SD3Transformer2DModel.from_pretrained(str(folder / "transformer")).eval()
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(folder))
        self.steps = steps
        emb = load_file(str(folder / "class_embeddings.safetensors"))
        classes = emb["pooled"].shape[0] - 1
        labels = [k % classes for k in range(samples)]
        c = self.model.config
        self.shape = (samples, c.in_channels, c.sample_size, c.sample_size)
        per = int(np.prod(self.shape[1:]))
        self.noise = torch.from_numpy(np.array(specdiff.sample_latents(samples, per, seed))).reshape(self.shape)
        ctx = torch.from_numpy(emb["context"])
        pooled = torch.from_numpy(emb["pooled"])
        null = [classes] * samples
        self.context = torch.cat([ctx[null], ctx[labels]])
        self.pooled = torch.cat([pooled[null], pooled[labels]])
        self.guidance = json.loads((folder / "sampling.json").read_text()).get("guidance_scale", 4.0)

    def sample(self) -> torch.Tensor:
        """The SD3 pipeline's loop: CFG batch [uncond; cond], guided velocity, the scheduler's Euler step."""
        self.scheduler.set_timesteps(self.steps)
        lat = self.noise.clone()
        with torch.no_grad():
            for t in self.scheduler.timesteps:
                inp = torch.cat([lat, lat])
                v = self.model(hidden_states=inp, timestep=t.expand(inp.shape[0]), encoder_hidden_states=self.context,
                               pooled_projections=self.pooled, return_dict=False)[0]
                vu, vc = v.chunk(2)
                v = vu + self.guidance * (vc - vu)
                lat = self.scheduler.step(v, t, lat, return_dict=False)[0]
        return lat


def rel_l2(a, b) -> float:
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def check_step_level(problem, full, tmp_path, model: str, method: str, config, options, tol=1e-4):
    """FBCache / TeaCache through specdiff.diffusers against specdiff-pyref --method <method> on the same batch: the
    final latents within tol relative L2, and some step skipped (the images differ from full compute's)."""
    import specdiff.diffusers as sd

    sd.enable(problem.model, config, scheduler=problem.scheduler)
    try:
        x = problem.sample()
        skipped = sd.stats(problem.model)["partial_calls"]
    finally:
        sd.disable(problem.model)
    ref = cpp_latents(tmp_path, model, method, SAMPLES, problem.steps, **options)
    err = rel_l2(x.numpy(), ref)
    print(f"{model} {method} {options}: {skipped} skipped steps, relative L2 {err:.3g}")
    assert err < tol, f"{method} {options}: relative L2 {err:.3g} against the C++ demo"
    assert skipped > 0 and not torch.equal(x, full)


SAMPLES = 2  # the C++ reference draws the same noise per sample whatever the batch (Philox stream k)


@pytest.fixture(scope="session")
def sd3_problem():
    return Problem("mnist-sd3", samples=SAMPLES, steps=28)


@pytest.fixture(scope="session")
def sd3_full(sd3_problem):
    """The plain diffusers loop's final latents (no specdiff)."""
    return sd3_problem.sample()


class FluxProblem:
    """The demo's batch on mnist-flux in FluxPipeline's layout: the same noise image as SD3's, packed 2x2 into tokens
    (FluxPipeline._pack_latents), FluxPipeline's schedule (sigmas linspace(1, 1/n, n), mu from calculate_shift of the
    image tokens), the transformer called with timestep / 1000, CFG as one batch [uncond; cond] as the C++ demo runs it."""

    def __init__(self, name: str, samples: int, steps: int, seed: int = 0):
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift
        from safetensors.numpy import load_file
        import json

        folder = MODELS / name
        self.model = FluxTransformer2DModel.from_pretrained(str(folder / "transformer")).eval()
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(folder))
        self.steps = steps
        emb = load_file(str(folder / "class_embeddings.safetensors"))
        classes = emb["pooled"].shape[0] - 1
        labels = [k % classes for k in range(samples)]
        channels = self.model.config.in_channels // 4
        size = 32  # the image side (models/mnist-flux/README.md); the token grid is 16 x 16
        image = torch.from_numpy(np.array(specdiff.sample_latents(samples, channels * size * size, seed))).reshape(samples, channels, size, size)
        self.noise = FluxPipeline._pack_latents(image, samples, channels, size, size)
        self.img_ids = FluxPipeline._prepare_latent_image_ids(samples, size // 2, size // 2, "cpu", torch.float32)
        ctx = torch.from_numpy(emb["context"])
        pooled = torch.from_numpy(emb["pooled"])
        self.txt_ids = torch.zeros(ctx.shape[1], 3)
        null = [classes] * samples
        self.context = torch.cat([ctx[null], ctx[labels]])
        self.pooled = torch.cat([pooled[null], pooled[labels]])
        self.guidance = json.loads((folder / "sampling.json").read_text()).get("guidance_scale", 4.0)
        c = self.scheduler.config
        self.mu = calculate_shift(self.noise.shape[1], c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)

    def sample(self) -> torch.Tensor:
        self.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / self.steps, self.steps), mu=self.mu)
        lat = self.noise.clone()
        with torch.no_grad():
            for t in self.scheduler.timesteps:
                inp = torch.cat([lat, lat])
                v = self.model(hidden_states=inp, timestep=t.expand(inp.shape[0]).to(inp.dtype) / 1000, encoder_hidden_states=self.context,
                               pooled_projections=self.pooled, img_ids=self.img_ids, txt_ids=self.txt_ids, return_dict=False)[0]
                vu, vc = v.chunk(2)
                v = vu + self.guidance * (vc - vu)
                lat = self.scheduler.step(v, t, lat, return_dict=False)[0]
        return lat


@pytest.fixture(scope="session")
def flux_problem():
    return FluxProblem("mnist-flux", samples=SAMPLES, steps=28)


@pytest.fixture(scope="session")
def flux_full(flux_problem):
    """The plain diffusers loop's final (packed) latents on mnist-flux (no specdiff)."""
    return flux_problem.sample()
