#!/usr/bin/env python3
"""Train models/mnist-flux: a tiny class-conditional FLUX transformer on real MNIST digits, in pixel space.

The FLUX twin of models/mnist-sd3 (tools/train_default_model.py, whose data, split, class table, classifier
and Philox helpers this script imports rather than copies). Same images (MNIST 28x28 padded with background
-1 to 32x32), same 4500-image training split, same classifier; the network is diffusers'
FluxTransformer2DModel (0.31.0): double-stream blocks, then single-stream blocks, 3-axis RoPE.

Layout, exactly as diffusers' FluxPipeline (0.31.0) does it for latents:
  packing   FluxPipeline._pack_latents: [B, C, H, W] -> view [B, C, H/2, 2, W/2, 2] -> permute (0, 2, 4, 1, 3, 5)
            -> [B, (H/2)(W/2), C*4]; with C = 1, H = W = 32: [B, 256, 4], token r*16 + c holds the pixels
            (2r, 2c), (2r, 2c+1), (2r+1, 2c), (2r+1, 2c+1) in that order (channel index = c*4 + dy*2 + dx).
  img_ids   FluxPipeline._prepare_latent_image_ids(B, 32, 32): [256, 3] float, row r*16 + c = (0, r, c).
  txt_ids   zeros [4, 3] (one row per context token), as FluxPipeline.encode_prompt builds them.
  timestep  the transformer takes sigma in [0, 1] (the pipeline passes t / 1000; the model multiplies by 1000).

Sub-commands (into --out, default models/mnist-flux; log to --log, default docs/train_log_flux.txt):
  setup      copy the classifier (classifier.safetensors, classifier.json) and fd_reference.safetensors from
             models/mnist-sd3: the images are the same, so is the judge
  diffusion  train the FLUX transformer + class table (rectified flow) until --budget-min of wall clock has
             passed, saving the EMA weights every --save-every-min minutes
  evaluate   sample (FLUX-style Euler, CFG with the null class) and report the classifier's accuracy, for every
             --schedules x --cfgs; --dump FILE also writes a small reference run (4 samples, 4 steps) for a fixture
  finalize   write scheduler_config.json (diffusers FlowMatchEulerDiscreteScheduler) for --schedules[0] and
             sampling.json with --cfgs[0]
  all        setup, diffusion, evaluate (schedules dynamic and shift:3, cfg 4)

Schedules (--schedules): "dynamic" is FluxPipeline's: sigmas = linspace(1, 1/n, n), mu = calculate_shift(256
image tokens, 256, 4096, 0.5, 1.15) = 0.5, FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
.set_timesteps(sigmas=..., mu=mu) through diffusers' retrieve_timesteps; "shift:S" is the scheduler's own
sigmas with a fixed shift S (use_dynamic_shifting=False, set_timesteps(n)), as models/mnist-sd3 samples.
"""
import argparse
import json
import os
import shutil
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_default_model as base  # noqa: E402  (data, split, class table, classifier, Philox noise)

REPO = base.REPO
NUM_CLASSES, NULL_CLASS = base.NUM_CLASSES, base.NULL_CLASS
IMAGE_SIZE = base.IMAGE_SIZE  # 32
IMAGE_TOKENS = (IMAGE_SIZE // 2) ** 2  # 256
CONTEXT_TOKENS = base.CONTEXT_TOKENS  # 4
SD3_FOLDER = os.path.join(REPO, "models", "mnist-sd3")
# FLUX.1's scheduler settings for the resolution-dependent shift (calculate_shift).
BASE_SEQ_LEN, MAX_SEQ_LEN, BASE_SHIFT, MAX_SHIFT = 256, 4096, 0.5, 1.15
DUMP_LABELS = (0, 3, 7, 9)
DUMP_STEPS = 4

log = base.log


# ------------------------------------------------------------------------------------------ layout
def pack(x):
    """[B, C, H, W] -> [B, (H/2)(W/2), C*4], diffusers' FluxPipeline._pack_latents."""
    from diffusers import FluxPipeline

    b, c, h, w = x.shape
    return FluxPipeline._pack_latents(x, b, c, h, w)


def unpack(tokens, height=IMAGE_SIZE, width=IMAGE_SIZE):
    """[B, (H/2)(W/2), C*4] -> [B, C, H, W], FluxPipeline._unpack_latents (its vae_scale_factor is the pixels
    per token side, 16 for FLUX.1; here 2)."""
    from diffusers import FluxPipeline

    return FluxPipeline._unpack_latents(tokens, height, width, 2)


def image_ids():
    """[256, 3]: row r*16 + c = (0, r, c), diffusers' FluxPipeline._prepare_latent_image_ids(_, 32, 32)."""
    from diffusers import FluxPipeline

    return FluxPipeline._prepare_latent_image_ids(1, IMAGE_SIZE, IMAGE_SIZE, "cpu", torch.float32)


def text_ids():
    return torch.zeros(CONTEXT_TOKENS, 3)


# ------------------------------------------------------------------------------------------- model
def make_transformer(args):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=args.layers, num_single_layers=args.single_layers,
        attention_head_dim=args.head_dim, num_attention_heads=args.heads,
        joint_attention_dim=base.JOINT_ATTENTION_DIM, pooled_projection_dim=base.POOLED_DIM,
        guidance_embeds=False, axes_dims_rope=tuple(args.rope_axes))


save_diffusion = base.save_diffusion  # the diffusers-format transformer and the class table, replaced atomically


def load_diffusion(out_dir):
    from diffusers import FluxTransformer2DModel

    return base.load_diffusion(out_dir, FluxTransformer2DModel)


def velocity(transformer, x_packed, sigma, context, pooled):
    """One transformer call: packed latents [B, 256, 4], sigma [B] in [0, 1] -> velocity [B, 256, 4]."""
    return transformer(hidden_states=x_packed, encoder_hidden_states=context, pooled_projections=pooled,
                       timestep=sigma, img_ids=image_ids(), txt_ids=text_ids(), return_dict=False)[0]


# ---------------------------------------------------------------------------------------- sampling
def make_scheduler(schedule):
    """'dynamic' (FLUX.1-dev's scheduler config) or 'shift:S' (fixed shift S)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    common = dict(num_train_timesteps=1000, base_image_seq_len=BASE_SEQ_LEN, max_image_seq_len=MAX_SEQ_LEN,
                  base_shift=BASE_SHIFT, max_shift=MAX_SHIFT)
    if schedule == "dynamic":
        return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, **common)
    if schedule.startswith("shift:"):
        return FlowMatchEulerDiscreteScheduler(shift=float(schedule.split(":", 1)[1]), use_dynamic_shifting=False,
                                               **common)
    raise ValueError(f"unknown schedule {schedule!r} (dynamic or shift:S)")


def set_schedule(scheduler, steps):
    """FluxPipeline's timesteps with dynamic shifting; the scheduler's own sigmas for a fixed shift."""
    if scheduler.config.use_dynamic_shifting:
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

        c = scheduler.config
        sigmas = np.linspace(1.0, 1 / steps, steps)
        mu = calculate_shift(IMAGE_TOKENS, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
        retrieve_timesteps(scheduler, steps, "cpu", None, sigmas, mu=mu)
    else:
        scheduler.set_timesteps(steps)
    return scheduler.timesteps


@torch.no_grad()
def sample(transformer, conditioner, labels, noise_packed, steps, cfg, schedule, trace=None):
    """FLUX-style Euler (diffusers' FlowMatchEulerDiscreteScheduler.step) with classifier-free guidance:
    v = v_uncond + cfg (v_cond - v_uncond), batch = [uncond; cond]. Returns packed latents [B, 256, 4]."""
    scheduler = make_scheduler(schedule)
    timesteps = set_schedule(scheduler, steps)
    x = noise_packed.clone()
    context, pooled = conditioner(torch.cat([torch.full_like(labels, NULL_CLASS), labels]))
    for i, t in enumerate(timesteps):
        sigma = (t / 1000).expand(2 * len(x))
        v_uncond, v_cond = velocity(transformer, torch.cat([x, x]), sigma, context, pooled).chunk(2)
        if trace is not None and i == 0:
            trace["v_uncond_step0"], trace["v_cond_step0"] = v_uncond.clone(), v_cond.clone()
        x = scheduler.step(v_uncond + cfg * (v_cond - v_uncond), t, x, return_dict=False)[0]
    if trace is not None:
        trace["timesteps"], trace["sigmas"] = timesteps.clone(), scheduler.sigmas.clone()
    return x


def accuracy(args, transformer, conditioner, per_class, steps, cfg, schedule, seed):
    """The classifier's accuracy on per_class samples of each digit; noise torch.randn [N, 1, 32, 32] from
    `seed` (the same draws as tools/train_default_model.py's evaluate), packed."""
    classifier = base.load_classifier(args.out)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
    noise = torch.randn(len(labels), 1, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))
    x = unpack(sample(transformer, conditioner, labels, pack(noise), steps, cfg, schedule))
    with torch.no_grad():
        pred = classifier(x.clamp(-1, 1)).argmax(1)
    return (pred == labels).float().mean().item(), x


# ----------------------------------------------------------------------------------------- commands
def cmd_setup(args):
    os.makedirs(args.out, exist_ok=True)
    for name in ("classifier.safetensors", "classifier.json", "fd_reference.safetensors"):
        shutil.copyfile(os.path.join(SD3_FOLDER, name), os.path.join(args.out, name))
    log(args, f"copied classifier.safetensors, classifier.json, fd_reference.safetensors from {SD3_FOLDER}")


def cmd_diffusion(args):
    torch.manual_seed(args.seed)
    digits, labels = base.load_mnist_5k()
    train, _ = base.split_indices()
    x_train, y_train = digits[train], labels[train]
    recipe = base.RECIPES["mnist"]
    transformer, conditioner = make_transformer(args), base.ClassConditioner()
    n_t = sum(p.numel() for p in transformer.parameters())
    n_c = sum(p.numel() for p in conditioner.parameters())
    os.makedirs(args.out, exist_ok=True)

    def loss_of(net, x_t, target, s, context, pooled):  # in the packed token layout, as FluxPipeline feeds the model
        return F.mse_loss(velocity(net, pack(x_t), s, context, pooled), pack(target))

    def checkpoint(ema_t, ema_c, it):
        acc, _ = accuracy(args, ema_t.eval(), ema_c, 2, 14, 4.0, "dynamic", 7)
        log(args, f"checkpoint at iter {it}: quick accuracy (20 samples, 14 steps, cfg 4, dynamic) {acc:.2f}")

    base.train_rectified_flow(
        args, transformer, conditioner, (make_transformer(args), base.ClassConditioner()), recipe.place, x_train,
        y_train,
        f"diffusion (FLUX): {args.layers} double + {args.single_layers} single blocks, {args.heads} heads x "
        f"{args.head_dim}, rope {args.rope_axes}, {n_t} transformer + {n_c} class-table parameters, batch "
        f"{args.batch}, lr {args.lr}, budget {args.budget_min} min, logit-normal s, label drop {args.label_drop}",
        loss_of, save_diffusion, checkpoint)


def cmd_evaluate(args):
    torch.manual_seed(args.seed)
    transformer, conditioner = load_diffusion(args.out)
    if args.dump:
        dump_reference(args, transformer, conditioner)
    if args.per_class <= 0:
        return
    for schedule in args.schedules:
        for cfg in args.cfgs:
            t0 = time.time()
            acc, x = accuracy(args, transformer, conditioner, args.per_class, args.steps, cfg, schedule, args.seed)
            log(args, f"python sampling: schedule {schedule} cfg {cfg} steps {args.steps} per_class {args.per_class} "
                      f"seed {args.seed}: classifier accuracy {acc:.3f} ({time.time() - t0:.0f} s)")
            if args.grid:
                base.save_grid(x, args.per_class, os.path.join(args.grid, f"flux_{schedule.replace(':', '')}_cfg{cfg}.png"))


def dump_reference(args, transformer, conditioner):
    """A small run for a C++ fixture: 4 samples (labels DUMP_LABELS), 4 steps, --schedules[0], --cfgs[0]; the
    initial noise is specdiff's Philox latents (train_default_model.philox_latents(--seed, 4), [4, 1, 32, 32])
    packed to [4, 256, 4]."""
    schedule, cfg = args.schedules[0], args.cfgs[0]
    labels = torch.tensor(DUMP_LABELS, dtype=torch.int64)
    noise = pack(base.philox_latents(args.seed, len(labels)))
    trace = {}
    x = sample(transformer, conditioner, labels, noise, DUMP_STEPS, cfg, schedule, trace)
    tensors = {"noise": noise, "labels": labels, "img_ids": image_ids(), "txt_ids": text_ids(), "latents": x,
               "images": unpack(x), "timesteps": trace["timesteps"], "sigmas": trace["sigmas"],
               "v_uncond_step0": trace["v_uncond_step0"], "v_cond_step0": trace["v_cond_step0"],
               "guidance_scale": torch.tensor([cfg], dtype=torch.float64)}
    os.makedirs(os.path.dirname(os.path.abspath(args.dump)), exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, args.dump, metadata={
        "model": os.path.relpath(args.out, REPO), "schedule": schedule, "steps": str(DUMP_STEPS),
        "guidance_scale": str(cfg), "noise": f"Philox latents, seed {args.seed}, streams 0..3, [4,1,32,32] packed",
        "packing": "FluxPipeline._pack_latents: [B,1,32,32] -> [B,256,4], token r*16+c, channel dy*2+dx",
        "timestep": "transformer input = timesteps / 1000 (sigma)",
        "cfg": "v = v_uncond + g (v_cond - v_uncond); uncond = class 10; batch [uncond; cond]"})
    log(args, f"dump: {args.dump} ({len(labels)} samples, labels {list(DUMP_LABELS)}, {DUMP_STEPS} steps, "
              f"schedule {schedule}, cfg {cfg}, Philox seed {args.seed})")


def cmd_finalize(args):
    schedule, cfg = args.schedules[0], args.cfgs[0]
    make_scheduler(schedule).save_config(args.out)
    with open(os.path.join(args.out, "sampling.json"), "w") as f:
        json.dump({"guidance_scale": cfg}, f, indent=2)
        f.write("\n")
    log(args, f"wrote scheduler_config.json (schedule {schedule}) and sampling.json (guidance_scale {cfg})")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["setup", "diffusion", "evaluate", "finalize", "all"])
    parser.add_argument("--out", default=os.path.join(REPO, "models", "mnist-flux"))
    parser.add_argument("--log", default=os.path.join(REPO, "docs", "train_log_flux.txt"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=2, help="double-stream blocks")
    parser.add_argument("--single-layers", type=int, default=4, help="single-stream blocks")
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--rope-axes", type=int, nargs=3, default=[8, 28, 28])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=6e-4)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--label-drop", type=float, default=0.1)
    parser.add_argument("--budget-min", type=float, default=55.0, help="wall-clock minutes of training")
    parser.add_argument("--save-every-min", type=float, default=5.0)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--schedules", nargs="+", default=["dynamic", "shift:3"],
                        help="evaluate: 'dynamic' (FluxPipeline, mu = 0.5) and/or 'shift:S'; finalize: the first")
    parser.add_argument("--cfgs", type=float, nargs="+", default=[4.0])
    parser.add_argument("--grid", default="", help="folder for sample grids (evaluate)")
    parser.add_argument("--dump", default="", help="evaluate: write a 4-sample, 4-step reference run here")
    args = parser.parse_args()
    if sum(args.rope_axes) != args.head_dim:
        parser.error(f"--rope-axes {args.rope_axes} must sum to --head-dim {args.head_dim}")
    torch.set_num_threads(args.threads)
    os.makedirs(os.path.dirname(os.path.abspath(args.log)), exist_ok=True)
    log(args, f"$ {' '.join(sys.argv)}  (torch {torch.__version__}, threads {torch.get_num_threads()})")
    if args.command in ("setup", "all"):
        cmd_setup(args)
    if args.command in ("diffusion", "all"):
        cmd_diffusion(args)
    if args.command in ("evaluate", "all"):
        cmd_evaluate(args)
    if args.command == "finalize":
        cmd_finalize(args)


if __name__ == "__main__":
    main()
