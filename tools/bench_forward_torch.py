#!/usr/bin/env python3
"""Times one full forward of diffusers' SD3Transformer2DModel on the same config as bench/forward/bench_forward.cpp
(random weights, float32, CPU, torch.inference_mode), with the same thread count.

Pinned environment: torch==2.5.1 (CPU), diffusers==0.31.0.
Run:  /work/venv/bin/python tools/bench_forward_torch.py --threads 2 --batch 2
"""
import argparse
import json
import time

import torch
from diffusers import SD3Transformer2DModel


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--latent", type=int, default=64)
    ap.add_argument("--context", type=int, default=77)
    ap.add_argument("--qk-norm", action="store_true")
    ap.add_argument("--config", help="a diffusers transformer config.json (replaces the shape options)")
    ap.add_argument("--subset", type=float, default=0.0, help="accepted for run.sh; torch has no token-subset forward")
    ap.add_argument("--gemms", action="store_true", help="accepted for run.sh")
    ap.add_argument("--peak", type=float, default=0.0, help="accepted for run.sh")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    if a.config:
        with open(a.config) as f:
            cfg = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
        if "--latent" not in __import__("sys").argv:
            a.latent = cfg["sample_size"]
        model = SD3Transformer2DModel.from_config(cfg).eval()
        a.layers, a.heads, a.head_dim = cfg["num_layers"], cfg["num_attention_heads"], cfg["attention_head_dim"]
    else:
        model = SD3Transformer2DModel(sample_size=a.latent, patch_size=2, in_channels=16, out_channels=16,
                                      num_layers=a.layers, attention_head_dim=a.head_dim, num_attention_heads=a.heads,
                                      joint_attention_dim=4096, caption_projection_dim=a.heads * a.head_dim,
                                      pooled_projection_dim=2048, pos_embed_max_size=max(96, a.latent // 2),
                                      qk_norm="rms_norm" if a.qk_norm else None).eval()
    c = model.config
    x = torch.randn(a.batch, c.in_channels, a.latent, a.latent)
    ctx = torch.randn(a.batch, a.context, c.joint_attention_dim)
    pooled = torch.randn(a.batch, c.pooled_projection_dim)
    t = torch.full((a.batch,), 500.0)
    times = []
    with torch.inference_mode():
        for i in range(a.warmup + a.reps):
            t0 = time.perf_counter()
            model(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t, return_dict=False)
            if i >= a.warmup:
                times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    print(f"torch forward: layers {a.layers} hidden {a.heads * a.head_dim} tokens {(a.latent // c.patch_size) ** 2} context "
          f"{a.context} batch {a.batch} threads {a.threads}: median {times[len(times) // 2]:.1f} ms, min {times[0]:.1f} ms "
          f"({a.reps} reps; torch {torch.__version__})")
    print(f"RESULT median_ms={times[len(times) // 2]:.3f} min_ms={times[0]:.3f}")


if __name__ == "__main__":
    main()
