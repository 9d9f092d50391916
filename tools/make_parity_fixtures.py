#!/usr/bin/env python3
"""Makes the diffusers parity fixtures for the C++ SD3 engine (tests/data/parity/<variant>/).

Pinned environment (the /work/venv used to make the committed fixtures):
    torch==2.5.1 (CPU), diffusers==0.31.0, safetensors==0.4.5, numpy==1.26.4

Each variant is a tiny SD3Transformer2DModel whose every weight (and the pos_embed buffer) is random, so no
layer is an identity or a zero and a wrong term in the C++ forward changes its output. Saved per variant:
    config.json, diffusion_pytorch_model.safetensors   the model, in save_pretrained layout; the reference
                                                       outputs come from diffusers loading these very files
    io.safetensors   inputs and diffusers' outputs (float32):
        latents [B,C,H,W], context [B,L,J], pooled [B,P],
        t0, t1 [B] and out_t0, out_t1 [B,C_out,H,W]: the transformer at two timestep pairs;
        with sampling: noise, neg_context, neg_pooled, sigmas, timesteps, sample (8-step CFG result),
        sigmas_mu, timesteps_mu (a 5-step dynamic-shift schedule, mu = 0.7);
        probe_img, probe_ctx [B,N]: at t0, per image token, the column sums of head-averaged attention
        probabilities over the image queries / the context queries, summed over layers;
        attn_img.{l}, attn_ctx.{l}, mlp_img.{l}, mlp_ctx.{l}: at t0, each block's module outputs before the
        gate (attention after to_out / to_add_out, feed-forward), the values the C++ read-back hooks return.
Variants:
    rms    qk_norm "rms_norm", 3 blocks, 2 heads x 16, F32 weights, 8-step CFG sampling (shift 3, guidance 4.5)
    plain  qk_norm null, 2 blocks, 3 heads x 8, out_channels 3 != in_channels 4, weights stored alternately as
           F16 and BF16 (the values are rounded first, so diffusers and the engine see the same numbers)
    long   qk_norm null, 2 blocks, 2 heads x 32, F16 weights, a 40x36 latent (20x18 = 360 image tokens, more than one
           256-key block of the engine's attention) from a 21x21 table, 6 context tokens
    mmditx SD3.5-medium's MMDiT-X blocks: dual_attention_layers (0, 2) of 3 (a second, image-only attention, attn2,
           in the first block and in the context_pre_only last one, not in the middle one), qk_norm "rms_norm",
           2 heads x 16, F32 weights; also attn2_img.{l}, the image-only attention's output (after attn2.to_out)
Besides the variants: flux/, a tiny random FluxTransformer2DModel (2 double-stream + 2 single-stream blocks,
guidance embedding) with diffusers' forward on packed latents at two timestep pairs (io.safetensors: latents,
context, pooled, guidance, img_ids, txt_ids, t0/t1, out_t0/out_t1, parameter_count); flux_schedule.safetensors: the FLUX pipeline's timestep schedules (FluxPipeline's sigmas
linspace(1, 1/n, n) and calculate_shift's mu, through retrieve_timesteps into FLUX.1-dev's scheduler config) for
a few (steps, image tokens): sigmas.{i}, timesteps.{i}, mu.{i}, steps.{i}, seq_len.{i}.
rms, plain and mmditx use a non-square 6x10 latent (3x5 patches of 2) cropped from a 7x7 position table, 5 context tokens.

Run:  /work/venv/bin/python tools/make_parity_fixtures.py [--out tests/data/parity] [--only long|flux_schedule]
"""
import argparse
import json
import math
import os

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from diffusers.models.attention_processor import JointAttnProcessor2_0
from safetensors.torch import save_file

VARIANTS = {
    "rms": dict(
        config=dict(sample_size=6, patch_size=2, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=16,
                    num_attention_heads=2, joint_attention_dim=20, caption_projection_dim=32, pooled_projection_dim=12,
                    pos_embed_max_size=7, qk_norm="rms_norm"),
        dtypes=[torch.float32], sample=True, seed=1234),
    "plain": dict(
        config=dict(sample_size=6, patch_size=2, in_channels=4, out_channels=3, num_layers=2, attention_head_dim=8,
                    num_attention_heads=3, joint_attention_dim=20, caption_projection_dim=24, pooled_projection_dim=12,
                    pos_embed_max_size=7, qk_norm=None),
        dtypes=[torch.float16, torch.bfloat16], sample=False, seed=4321),
    "long": dict(
        config=dict(sample_size=36, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=32,
                    num_attention_heads=2, joint_attention_dim=20, caption_projection_dim=64, pooled_projection_dim=12,
                    pos_embed_max_size=21, qk_norm=None),
        dtypes=[torch.float16], sample=False, seed=2468, size=(40, 36, 6)),
    "mmditx": dict(
        config=dict(sample_size=6, patch_size=2, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=16,
                    num_attention_heads=2, joint_attention_dim=20, caption_projection_dim=32, pooled_projection_dim=12,
                    pos_embed_max_size=7, qk_norm="rms_norm", dual_attention_layers=(0, 2)),
        dtypes=[torch.float32], sample=False, seed=8642),
}
BATCH, HEIGHT, WIDTH, CONTEXT = 2, 6, 10, 5  # the default latent size and context length
TIMESTEPS = ([1000.0, 562.5], [271.25, 3.0])
STEPS, SHIFT, GUIDANCE = 8, 3.0, 4.5


def randomize(model, gen):
    """Overwrites every parameter and buffer with random values (diffusers zero-inits nothing here, but make
    sure: norms get 1 + noise, everything else N(0, 1/fan_in), the position table N(0, 0.25))."""
    state = {}
    for name, t in model.state_dict().items():
        if name.endswith("pos_embed.pos_embed"):
            v = 0.5 * torch.randn(t.shape, generator=gen)
        elif ".norm_" in name and name.endswith(".weight") and t.dim() == 1:
            v = 1.0 + 0.2 * torch.randn(t.shape, generator=gen)
        elif t.dim() >= 2:
            fan_in = math.prod(t.shape[1:])
            v = torch.randn(t.shape, generator=gen) / math.sqrt(fan_in)
        else:  # biases: fan_in of the owning weight
            owner = model.state_dict()[name[: -len("bias")] + "weight"]
            v = torch.randn(t.shape, generator=gen) / math.sqrt(math.prod(owner.shape[1:]))
        state[name] = v
    return state


class ProbingJointAttnProcessor(JointAttnProcessor2_0):
    """diffusers' joint attention, plus a record of the attention each image key receives (the probe)."""

    def __init__(self, record):
        super().__init__()
        self.record = record

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        # MMDiT-X's attn2 (no context) is not in the probe: the engine's probe is the joint attention's.
        if self.record.get("on") and encoder_hidden_states is not None:
            b, n = hidden_states.shape[:2]
            heads = attn.heads

            def split(x):
                return x.view(b, -1, heads, x.shape[-1] // heads).transpose(1, 2)

            q, k = split(attn.to_q(hidden_states)), split(attn.to_k(hidden_states))
            cq, ck = split(attn.add_q_proj(encoder_hidden_states)), split(attn.add_k_proj(encoder_hidden_states))
            if attn.norm_q is not None:
                q, k, cq, ck = attn.norm_q(q), attn.norm_k(k), attn.norm_added_q(cq), attn.norm_added_k(ck)
            q, k = torch.cat([q, cq], 2), torch.cat([k, ck], 2)
            probs = torch.softmax((q.double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1]), -1)
            received = probs.mean(1)[:, :, :n]  # head average, image keys only: [b, queries, n]
            self.record["img"] += received[:, :n].sum(1)
            self.record["ctx"] += received[:, n:].sum(1)
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)


def make_variant(name, spec, out_root):
    HEIGHT, WIDTH, CONTEXT = spec.get("size", (globals()["HEIGHT"], globals()["WIDTH"], globals()["CONTEXT"]))
    out = os.path.join(out_root, name)
    os.makedirs(out, exist_ok=True)
    gen = torch.Generator().manual_seed(spec["seed"])
    model = SD3Transformer2DModel(**spec["config"])
    state = randomize(model, gen)

    # Store weights in the variant's dtypes (cycled over tensors); round first so both sides see the same values.
    stored = {}
    for i, (k, v) in enumerate(sorted(state.items())):
        dt = spec["dtypes"][i % len(spec["dtypes"])]
        stored[k] = v.to(dt).contiguous()
    model.save_config(out)
    save_file(stored, os.path.join(out, "diffusion_pytorch_model.safetensors"))

    # The reference: diffusers loading exactly those files.
    ref = SD3Transformer2DModel.from_pretrained(out, torch_dtype=torch.float32).eval()
    for k, v in ref.state_dict().items():  # every tensor really came from the file
        assert torch.equal(v, stored[k].to(torch.float32)), k

    cfg = spec["config"]
    io = {}
    io["latents"] = torch.randn(BATCH, cfg["in_channels"], HEIGHT, WIDTH, generator=gen)
    io["context"] = torch.randn(BATCH, CONTEXT, cfg["joint_attention_dim"], generator=gen)
    io["pooled"] = torch.randn(BATCH, cfg["pooled_projection_dim"], generator=gen)
    # Probe and module outputs at t0 (read-back references).
    n_img = (HEIGHT // cfg["patch_size"]) * (WIDTH // cfg["patch_size"])
    record = {"on": False, "img": torch.zeros(BATCH, n_img, dtype=torch.float64),
              "ctx": torch.zeros(BATCH, n_img, dtype=torch.float64)}
    ref.set_attn_processor(ProbingJointAttnProcessor(record))
    modules = {}
    handles = []
    for l, block in enumerate(ref.transformer_blocks):
        def keep(key):
            def hook(_module, _inputs, output):
                if record["on"]:
                    modules[key] = output
            return hook
        def keep_attn(l, last):
            def hook(_module, _inputs, output):
                if record["on"]:
                    modules[f"attn_img.{l}"] = output[0]
                    if not last:
                        modules[f"attn_ctx.{l}"] = output[1]
            return hook
        handles.append(block.attn.register_forward_hook(keep_attn(l, block.context_pre_only)))
        if block.attn2 is not None:
            handles.append(block.attn2.register_forward_hook(keep(f"attn2_img.{l}")))
        handles.append(block.ff.register_forward_hook(keep(f"mlp_img.{l}")))
        if block.ff_context is not None:
            handles.append(block.ff_context.register_forward_hook(keep(f"mlp_ctx.{l}")))

    with torch.no_grad():
        for i, ts in enumerate(TIMESTEPS):
            record["on"] = i == 0
            t = torch.tensor(ts, dtype=torch.float32)
            io[f"t{i}"] = t
            io[f"out_t{i}"] = ref(hidden_states=io["latents"], encoder_hidden_states=io["context"],
                                  pooled_projections=io["pooled"], timestep=t, return_dict=False)[0]
        record["on"] = False
        for h in handles:
            h.remove()
        io["probe_img"], io["probe_ctx"] = record["img"], record["ctx"]
        io.update(modules)

        if spec["sample"]:
            # The SD3 pipeline's denoising loop, written out: batch [uncond; cond], v = v_u + g (v_c - v_u).
            sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SHIFT)
            sched.set_timesteps(STEPS)
            noise = torch.randn(BATCH, cfg["in_channels"], HEIGHT, WIDTH, generator=gen)
            neg_context = torch.randn(BATCH, CONTEXT, cfg["joint_attention_dim"], generator=gen)
            neg_pooled = torch.randn(BATCH, cfg["pooled_projection_dim"], generator=gen)
            ctx = torch.cat([neg_context, io["context"]])
            pooled = torch.cat([neg_pooled, io["pooled"]])
            latents = noise.clone()
            for t in sched.timesteps:
                model_in = torch.cat([latents] * 2)
                v = ref(hidden_states=model_in, encoder_hidden_states=ctx, pooled_projections=pooled,
                        timestep=t.expand(model_in.shape[0]), return_dict=False)[0]
                v_u, v_c = v.chunk(2)
                v = v_u + GUIDANCE * (v_c - v_u)
                latents = sched.step(v, t, latents, return_dict=False)[0]
            io.update(noise=noise, neg_context=neg_context, neg_pooled=neg_pooled, sigmas=sched.sigmas.clone(),
                      timesteps=sched.timesteps.clone(), sample=latents)
            io["guidance"] = torch.tensor([GUIDANCE])
            io["shift"] = torch.tensor([SHIFT])
            dyn = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, use_dynamic_shifting=True)
            dyn.set_timesteps(5, mu=0.7)
            io["sigmas_mu"], io["timesteps_mu"] = dyn.sigmas.clone(), dyn.timesteps.clone()

    save_file({k: v.to(torch.float32).contiguous() for k, v in io.items()}, os.path.join(out, "io.safetensors"),
              metadata={"torch": torch.__version__, "diffusers": __import__("diffusers").__version__})
    print(name, "->", out, {k: tuple(v.shape) for k, v in io.items()})


FLUX_CONFIG = dict(patch_size=1, in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=16,
                   num_attention_heads=2, joint_attention_dim=12, pooled_projection_dim=10, guidance_embeds=True,
                   axes_dims_rope=(4, 6, 6))


def make_flux(out_root):
    """A tiny random FluxTransformer2DModel (2 double-stream and 2 single-stream blocks, guidance embedding,
    rotary dims (4, 6, 6) over 16-float heads) and diffusers' forward on packed latents of a 3 x 5 token grid
    with 5 text tokens, at two timestep pairs; parameter_count for the loader's check."""
    from diffusers import FluxTransformer2DModel

    out = os.path.join(out_root, "flux")
    os.makedirs(out, exist_ok=True)
    gen = torch.Generator().manual_seed(9753)
    model = FluxTransformer2DModel(**FLUX_CONFIG)
    state = randomize(model, gen)
    model.save_config(out)
    save_file({k: v.contiguous() for k, v in sorted(state.items())}, os.path.join(out, "diffusion_pytorch_model.safetensors"))
    ref = FluxTransformer2DModel.from_pretrained(out, torch_dtype=torch.float32).eval()
    for k, v in ref.state_dict().items():
        assert torch.equal(v, state[k]), k
    rows, cols, text = 3, 5, 5
    io = {"latents": torch.randn(BATCH, rows * cols, FLUX_CONFIG["in_channels"], generator=gen),
          "context": torch.randn(BATCH, text, FLUX_CONFIG["joint_attention_dim"], generator=gen),
          "pooled": torch.randn(BATCH, FLUX_CONFIG["pooled_projection_dim"], generator=gen),
          "guidance": torch.tensor([3.5, 1.0])}
    img_ids = torch.zeros(rows, cols, 3)  # FluxPipeline._prepare_latent_image_ids: (0, row, column)
    img_ids[..., 1] += torch.arange(rows)[:, None]
    img_ids[..., 2] += torch.arange(cols)[None, :]
    io["img_ids"], io["txt_ids"] = img_ids.reshape(rows * cols, 3), torch.zeros(text, 3)
    def run(latents, t):
        return ref(hidden_states=latents, encoder_hidden_states=io["context"], pooled_projections=io["pooled"],
                   timestep=t, img_ids=io["img_ids"], txt_ids=io["txt_ids"], guidance=io["guidance"], return_dict=False)[0]

    with torch.no_grad():
        for i, ts in enumerate(TIMESTEPS):
            t = torch.tensor(ts) / 1000  # the pipeline passes t / 1000; the model scales by 1000
            io[f"t{i}"], io[f"timestep{i}"] = t, torch.tensor([ts])
            # t0: also each block's output (the hidden states the next block reads), captured by forward hooks
            handles = []
            if i == 0:
                def keep(name):
                    def hook(_module, _inputs, output):
                        if isinstance(output, tuple):  # FluxTransformerBlock: (context, image)
                            io[name + "_context"], io[name + "_image"] = output[0].clone(), output[1].clone()
                        else:  # FluxSingleTransformerBlock: [context; image]
                            io[name + "_context"] = output[:, :text].clone()
                            io[name + "_image"] = output[:, text:].clone()
                    return hook
                handles = [b.register_forward_hook(keep(f"double{k}")) for k, b in enumerate(ref.transformer_blocks)]
                handles += [b.register_forward_hook(keep(f"single{k}")) for k, b in enumerate(ref.single_transformer_blocks)]
            io[f"out_t{i}"] = run(io["latents"], t)
            for h in handles:
                h.remove()
        # The FLUX pipeline's loop (FluxPipeline.__call__ without the VAE): sigmas linspace(1, 1/n, n), mu from the
        # token count, guidance through the embedding, Euler steps by the scheduler.
        from diffusers import FlowMatchEulerDiscreteScheduler
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps
        steps = 4
        mu = calculate_shift(rows * cols, FLUX_SCHEDULER["base_image_seq_len"], FLUX_SCHEDULER["max_image_seq_len"],
                             FLUX_SCHEDULER["base_shift"], FLUX_SCHEDULER["max_shift"])
        sched = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)
        timesteps, _ = retrieve_timesteps(sched, steps, sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
        x = io["latents"].clone()
        for ts in timesteps:
            x = sched.step(run(x, ts.expand(BATCH) / 1000), ts, x, return_dict=False)[0]
        io["sample_out"], io["sample_steps"], io["sample_mu"] = x, torch.tensor([steps]), torch.tensor([mu])
        # FluxPipeline's latent packing (2 x 2 patches into tokens), on a non-square 3-channel latent
        from diffusers import FluxPipeline
        io["pack_in"] = torch.randn(2, 3, 4, 6, generator=gen)
        io["pack_out"] = FluxPipeline._pack_latents(io["pack_in"], 2, 3, 4, 6)
    io["parameter_count"] = torch.tensor([sum(p.numel() for p in ref.parameters())])
    save_file({k: (v if v.dtype == torch.int64 else v.to(torch.float32)).contiguous() for k, v in io.items()},
              os.path.join(out, "io.safetensors"),
              metadata={"torch": torch.__version__, "diffusers": __import__("diffusers").__version__})
    print("flux ->", out, {k: tuple(v.shape) for k, v in io.items()})


# FLUX.1-dev's scheduler/scheduler_config.json (the values its pipeline reads for calculate_shift)
FLUX_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                      base_image_seq_len=256, max_image_seq_len=4096)
FLUX_SCHEDULES = [(28, 1024), (4, 4096), (1, 256), (50, 576), (7, 64)]  # (steps, image tokens)


def make_flux_schedule(out_root):
    """The FLUX pipeline's schedule, computed by its own code (pipeline_flux.calculate_shift, retrieve_timesteps)."""
    import numpy as np
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    out = {}
    for i, (steps, seq_len) in enumerate(FLUX_SCHEDULES):
        sched = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)
        sigmas = np.linspace(1.0, 1 / steps, steps)  # FluxPipeline.__call__
        mu = calculate_shift(seq_len, sched.config.base_image_seq_len, sched.config.max_image_seq_len,
                             sched.config.base_shift, sched.config.max_shift)
        timesteps, n = retrieve_timesteps(sched, steps, "cpu", None, sigmas, mu=mu)
        assert n == steps
        out[f"sigmas.{i}"], out[f"timesteps.{i}"] = sched.sigmas.clone(), timesteps.clone()
        out[f"mu.{i}"] = torch.tensor([mu], dtype=torch.float64)
        out[f"steps.{i}"], out[f"seq_len.{i}"] = torch.tensor([steps]), torch.tensor([seq_len])
    path = os.path.join(out_root, "flux_schedule.safetensors")
    save_file({k: v.contiguous() for k, v in out.items()}, path,
              metadata={"torch": torch.__version__, "diffusers": __import__("diffusers").__version__})
    print("flux_schedule ->", path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "data", "parity"))
    ap.add_argument("--only", choices=sorted(VARIANTS) + ["flux", "flux_schedule"], help="make this variant only")
    args = ap.parse_args()
    torch.manual_seed(0)
    for name, spec in VARIANTS.items():
        if args.only in (None, name):
            make_variant(name, spec, args.out)
    if args.only in (None, "flux"):
        make_flux(args.out)
    if args.only in (None, "flux_schedule"):
        make_flux_schedule(args.out)


if __name__ == "__main__":
    main()
