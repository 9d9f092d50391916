"""SpecDiff's methods on diffusers' SD3 and FLUX transformers, in one line (docs/python.md).

    import specdiff.diffusers as sd
    sd.enable(pipe, sd.SpecDiffConfig(cache_rate=0.9))   # or sd.ForecastConfig(learned=...), sd.SpecDiffAdaptiveConfig()
    image = pipe(prompt).images[0]
    sd.disable(pipe)

What runs where: every decision (scores, token plans, levels, cache stores, C3 approximators, schedules, the free
verification, learned weights) is the C++ library's (``specdiff._core``, the same headers and compositions as the C++
demo's methods); PyTorch runs the network. The transformer's forward is replaced through diffusers' ``HookRegistry``
and its attention through attention processors: a partial step runs the C1 image tokens (and every context token)
through every block against the keys and values cached for the other image tokens, and the attention each image
token received is read from the log-sum-exp that torch's SDPA kernel returns (a second, transposed SDPA call over
the keys; no attention matrix is formed).
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

from . import _core

__all__ = [
    "SpecDiffConfig",
    "SpecDiffAdaptiveConfig",
    "ForecastConfig",
    "FBCacheConfig",
    "TeaCacheConfig",
    "enable",
    "disable",
    "calibrate_forecast",
    "SpecDiffError",
]

_HOOK_NAME = "specdiff"
# diffusers' context-parallel hooks (hooks/context_parallel.py: _CONTEXT_PARALLEL_INPUT/OUTPUT_HOOK_TEMPLATE): not a cache
_CP_HOOK_PREFIXES = ("cp_input---", "cp_output---")


def _parallel(model) -> bool:
    """Whether diffusers' enable_parallelism() (context or tensor parallelism) is on for the model."""
    return getattr(model, "_parallel_config", None) is not None
_C3_RULES = ("specdiff", "latest", "taylor", "learned")


class SpecDiffError(ValueError):
    """Bad input to enable()/disable()/calibrate_forecast(): the message names the argument and the value."""


# --- configs ------------------------------------------------------------------------------------------------------


def _check_range(name: str, value, lo, hi, lo_open=False, hi_open=False):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) if hi != math.inf else (
        isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value))
    if ok:
        ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        lb = "(" if lo_open else "["
        rb = ")" if hi_open else "]"
        raise SpecDiffError(f"{name}: {value!r} is out of range; allowed: {lb}{lo}, {hi}{rb}")


def _check_int(name: str, value, lo, hi=None):
    if not isinstance(value, int) or isinstance(value, bool) or value < lo or (hi is not None and value > hi):
        raise SpecDiffError(f"{name}: {value!r} is out of range; allowed: integers {lo} to {hi if hi is not None else 'any'}")


@dataclass
class SpecDiffConfig:
    """SpecDiff at token level (the C++ demo's ``--method specdiff``; defaults are its 28-step settings).

    cache_rate: share of image tokens not computed on a partial step, [0, 1).
    spec_steps: steps of the speculative pass (every token, the attention recorded); 0 = none (score his·star).
    reuse_mass: share of the cached tokens' score mass reused (C2) rather than approximated (C3).
    warmup_steps: dense steps at the start. refresh_interval: a dense step every this many steps (0 = none).
    dense_steps: further dense steps (those past the run's steps are dropped).
    starvation_scale: the staleness weight in the score.
    share_cfg_plan: the two CFG halves share one plan (when the batch is [uncond; cond]).
    c3: how C3 rows are filled: 'specdiff' (the paper's mix of the last three), 'latest', 'taylor', 'learned'.
    learned: c3='learned': a learned-weights file (path) or a LearnedTable fitted for this run's timesteps.
    guidance_scale: the CFG scale the speculative pass samples with; None = the pipeline's (enable(pipe)) or 1.
    error_budget, max_partial_steps, cache_rate_buckets, bucket_error_step: SpecDiff-adaptive's knobs (see there).
    """

    cache_rate: float = 0.9
    spec_steps: int = 2
    reuse_mass: float = 0.10
    warmup_steps: int = 2
    refresh_interval: int = 0
    dense_steps: Sequence[int] = (14,)
    starvation_scale: float = 1.0
    share_cfg_plan: bool = True
    c3: str = "specdiff"
    learned: Any = None
    guidance_scale: Optional[float] = None
    error_budget: float = math.inf
    max_partial_steps: int = 0
    cache_rate_buckets: Sequence[float] = ()
    bucket_error_step: float = 0.1

    method = "specdiff"

    def validate(self) -> None:
        _check_range("cache_rate", self.cache_rate, 0.0, 1.0, hi_open=True)
        _check_int("spec_steps", self.spec_steps, 0, 1000)
        _check_range("reuse_mass", self.reuse_mass, 0.0, 1.0)
        _check_int("warmup_steps", self.warmup_steps, 0, 100000)
        _check_int("refresh_interval", self.refresh_interval, 0, 100000)
        for i, s in enumerate(self.dense_steps):
            _check_int(f"dense_steps[{i}]", s, 0, 100000)
        _check_range("starvation_scale", self.starvation_scale, 0.0, 1e6)
        if self.c3 not in _C3_RULES:
            raise SpecDiffError(f"c3: {self.c3!r} is not a C3 rule; allowed: {', '.join(_C3_RULES)}")
        if self.c3 == "learned" and self.learned is None:
            raise SpecDiffError("learned: c3='learned' needs learned weights (a file path or a LearnedTable)")
        if self.guidance_scale is not None:
            _check_range("guidance_scale", self.guidance_scale, 0.0, 1e4)
        _check_range("error_budget", self.error_budget, 0.0, math.inf)
        _check_int("max_partial_steps", self.max_partial_steps, 0, 100000)
        for i, c in enumerate(self.cache_rate_buckets):
            _check_range(f"cache_rate_buckets[{i}]", c, 0.0, 1.0, hi_open=True)
        _check_range("bucket_error_step", self.bucket_error_step, 0.0, 1e6, lo_open=True)


@dataclass
class SpecDiffAdaptiveConfig(SpecDiffConfig):
    """SpecDiff-adaptive (``--method specdiff-adaptive``): SpecDiff plus a dense step as soon as the error the
    accelerator verified for free since the last dense step exceeds ``error_budget`` (default 0.05)."""

    error_budget: float = 0.05
    method = "specdiff-adaptive"


@dataclass
class ForecastConfig:
    """Output forecasting between full steps (``--method forecast``, L2P's structure): full steps are the warm-up
    and then every ``interval``-th; on the others the whole network is skipped and every token's output is the C3
    rule's forecast from its outputs at the last full steps.

    interval: full-step interval (>= 1). warmup_steps: full steps at the start (>= 1); None (the default) takes the
    C++ method's default for the interval (3 for interval <= 2, else 2: docs/results.md), as ``--method forecast`` does.
    c3: 'learned' (per-step least-squares weights: ``learned`` or calibrate_forecast()), 'taylor' (TaylorSeer's
    rule, ``order`` 1 or 2, over step indices when variable='step' as diffusers' TaylorSeerCache, or over the
    timestep), 'latest' (FORA at the output).
    learned: a learned-weights file (path) or a LearnedTable fitted for this run's timesteps and interval.
    """

    interval: int = 3
    warmup_steps: Optional[int] = None
    c3: str = "learned"
    learned: Any = None
    order: int = 1
    variable: str = "step"

    method = "forecast"

    def validate(self) -> None:
        _check_int("interval", self.interval, 1, 100000)
        if self.warmup_steps is not None:
            _check_int("warmup_steps", self.warmup_steps, 1, 100000)
        if self.c3 not in ("learned", "taylor", "latest"):
            raise SpecDiffError(f"c3: {self.c3!r} is not a forecast rule; allowed: learned, taylor, latest")
        if self.c3 == "learned" and self.learned is None:
            raise SpecDiffError("learned: c3='learned' needs learned weights (a file path, a LearnedTable, or calibrate_forecast())")
        _check_int("order", self.order, 1, 2)
        if self.variable not in ("step", "timestep"):
            raise SpecDiffError(f"variable: {self.variable!r}; allowed: step, timestep")


@dataclass
class FBCacheConfig:
    """First-Block Cache (the C++ demo's ``--method fbcache``, diffusers' FirstBlockCache / cache-dit's DBCache F1B0):
    every step runs the first block; while the relative L1 change of its residual against the last computed step's
    stays below ``threshold`` the other blocks are skipped and their residual from the last computed step is added.
    The gate is the library's (specdiff::relative_change_gate); SD3 and FLUX transformers (FLUX: the double- then
    single-stream blocks are the blocks).

    threshold: >= 0 (0 switches skipping off). warmup_steps: steps always computed at the start (the first always is).
    max_consecutive_skips, max_skips: -1 = no limit."""

    threshold: float = 0.05
    warmup_steps: int = 0
    max_consecutive_skips: int = -1
    max_skips: int = -1

    method = "fbcache"

    def validate(self) -> None:
        _check_range("threshold", self.threshold, 0.0, math.inf)
        _check_int("warmup_steps", self.warmup_steps, 0, 100000)
        _check_int("max_consecutive_skips", self.max_consecutive_skips, -1, 100000)
        _check_int("max_skips", self.max_skips, -1, 100000)

    def gate(self):
        return _core.StepGate(float(self.threshold), self.warmup_steps, self.max_consecutive_skips, self.max_skips, False, False, "identity")


@dataclass
class TeaCacheConfig:
    """TeaCache (``--method teacache``): per step, the relative L1 change of block 0's timestep-modulated input
    LN(x)(1 + scale_msa) + shift_msa against the previous step's, rescaled (``rescale``: 'teacache_flux', the authors'
    FLUX polynomial, as the C++ method; or 'identity') and accumulated; while the sum stays below ``threshold`` the
    whole network is skipped and the last computed step's residual added. The first and last steps compute. The gate
    is the library's (specdiff::relative_change_gate); SD3 and FLUX transformers (FLUX: block 0 is the first double-stream
    block)."""

    threshold: float = 0.6
    rescale: str = "teacache_flux"
    max_consecutive_skips: int = -1

    method = "teacache"

    def validate(self) -> None:
        _check_range("threshold", self.threshold, 0.0, math.inf)
        if self.rescale not in ("teacache_flux", "identity"):
            raise SpecDiffError(f"rescale: {self.rescale!r}; allowed: teacache_flux, identity")
        _check_int("max_consecutive_skips", self.max_consecutive_skips, -1, 100000)

    def gate(self):
        return _core.StepGate(float(self.threshold), 0, self.max_consecutive_skips, -1, True, True, self.rescale)


_STEP_LEVEL = (FBCacheConfig, TeaCacheConfig)


def _forecast_warmup(config: ForecastConfig) -> int:
    """The warm-up a forecast runs with: the config's, or the C++ method's default for its interval."""
    if config.warmup_steps is not None:
        return int(config.warmup_steps)
    return int(_core.forecast_default_warmup(int(config.interval)))


def _learned_table(value, name="learned") -> Optional[_core.LearnedTable]:
    if value is None or isinstance(value, _core.LearnedTable):
        return value
    if isinstance(value, (str, os.PathLike)):
        table = _core.load_learned(os.fspath(value))
        if table is None:
            raise SpecDiffError(f"{name}: the file {os.fspath(value)!r} does not exist")
        return table
    raise SpecDiffError(f"{name}: expected a file path or a specdiff.LearnedTable, got {type(value).__name__}")


# --- the model adapter -------------------------------------------------------------------------------------------


def _supported(model) -> str:
    """'sd3' or 'flux': the transformer classes every method runs on."""
    from diffusers import SD3Transformer2DModel

    if isinstance(model, SD3Transformer2DModel):
        return "sd3"
    try:
        from diffusers import FluxTransformer2DModel

        if isinstance(model, FluxTransformer2DModel):
            return "flux"
    except ImportError:
        pass
    raise SpecDiffError(f"model: {type(model).__name__} is not supported; allowed: SD3Transformer2DModel "
                        "(SD3, SD3.5, MMDiT-X), FluxTransformer2DModel or a pipeline holding one as `transformer`")


def _grid_index(ts: np.ndarray, t: float, kind: str) -> Optional[int]:
    """The step of a transformer call's timestep on the scheduler's grid. SD3 pipelines pass the grid value itself;
    FluxPipeline passes it divided by 1000 in float32 (``timestep / 1000``), so FLUX compares against that."""
    grid = ts if kind == "sd3" else ts / np.float32(1000.0)
    hits = np.nonzero(grid == np.float32(t))[0]
    return int(hits[0]) if hits.size else None


class _Processor:
    """The joint attention of one block (or MMDiT-X's image-only attn2) over the active image tokens, reading and
    refreshing the per-layer image K/V cache; identical to diffusers' JointAttnProcessor2_0 when every token is
    computed. Falls back to the original processor outside a SpecDiff forward."""

    def __init__(self, runner: "_Runner", slot: int, original):
        self.runner = runner
        self.slot = slot
        self.original = original

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        r = self.runner
        if not r.active or attention_mask is not None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        residual = hidden_states
        batch_size = hidden_states.shape[0]
        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        n = query.shape[2]
        # The image keys/values: this step's rows into the cache; a partial step attends to every cached row.
        kc, vc = r.kv(self.slot, key, value)
        if r.ids is None:
            kc.copy_(key)
            vc.copy_(value)
            key_img, value_img = key, value
        else:
            index = r.kv_index(head_dim, attn.heads)
            kc.scatter_(2, index, key)
            vc.scatter_(2, index, value)
            key_img, value_img = kc, vc
        if encoder_hidden_states is not None:
            eq = attn.add_q_proj(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            ek = attn.add_k_proj(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            ev = attn.add_v_proj(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            if attn.norm_added_q is not None:
                eq = attn.norm_added_q(eq)
            if attn.norm_added_k is not None:
                ek = attn.norm_added_k(ek)
            query = torch.cat([query, eq], dim=2)
            key_all = torch.cat([key_img, ek], dim=2)
            value_all = torch.cat([value_img, ev], dim=2)
        else:
            key_all, value_all = key_img, value_img
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key_all, value_all)[:2]
        if r.probe is not None and self.slot < r.joint_slots:
            r.add_probe(query[:, :, :n], lse[:, :, :n], key_img, head_dim)
        hidden_states = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = hidden_states[:, : residual.shape[1]], hidden_states[:, residual.shape[1]:]
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


def _rope(x, cos, sin):
    """diffusers' apply_rotary_emb (use_real, pairs interleaved) on x [B, S, H, D] with tables [B or 1, S, D]."""
    x_real, x_imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return (x.float() * c + rotated.float() * s).to(x.dtype)


class _FluxProcessor:
    """FLUX's attention (a double-stream block's joint attention, or a single-stream block's over [text; image]) over
    the active image tokens, against the per-layer cache of the rotated image keys and the values; diffusers'
    FluxAttnProcessor when every token is computed. Falls back to the original processor outside a SpecDiff forward."""

    def __init__(self, runner: "_Runner", slot: int, original):
        self.runner = runner
        self.slot = slot
        self.original = original

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None, **kwargs):
        r = self.runner
        if not r.active or attention_mask is not None or kwargs:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, **kwargs)
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        query, key, value, eq, ek, ev = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        if encoder_hidden_states is not None:
            eq = attn.norm_added_q(eq.unflatten(-1, (-1, attn.head_dim)))
            ek = attn.norm_added_k(ek.unflatten(-1, (-1, attn.head_dim)))
            ev = ev.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([eq, query], dim=1)
            key = torch.cat([ek, key], dim=1)
            value = torch.cat([ev, value], dim=1)
        cos, sin = r.rope
        query = _rope(query, cos, sin).transpose(1, 2)
        key = _rope(key, cos, sin).transpose(1, 2)
        value = value.transpose(1, 2)
        L = r.txt_len
        k_img, v_img = key[:, :, L:], value[:, :, L:]
        kc, vc = r.kv(self.slot, k_img, v_img)
        if r.ids is None:
            kc.copy_(k_img)
            vc.copy_(v_img)
            key_img, value_img = k_img, v_img
        else:
            index = r.kv_index(attn.head_dim, key.shape[1])
            kc.scatter_(2, index, k_img)
            vc.scatter_(2, index, v_img)
            key_img, value_img = kc, vc
        key_all = torch.cat([key[:, :, :L], key_img], dim=2)
        value_all = torch.cat([value[:, :, :L], value_img], dim=2)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key_all, value_all)[:2]
        if r.probe is not None:
            r.add_probe(query[:, :, L:], lse[:, :, L:], key_img, attn.head_dim)
        hidden = out.transpose(1, 2).flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is not None:
            enc, hidden = hidden[:, :L], hidden[:, L:]
            hidden = attn.to_out[0](hidden.contiguous())
            hidden = attn.to_out[1](hidden)
            enc = attn.to_add_out(enc.contiguous())
            return hidden, enc
        return hidden


class _Runner:
    """Drives one composed accelerator over an SD3 transformer's calls (one call per denoising step)."""

    def __init__(self, model, config, scheduler=None, pipe=None):
        self.model = model
        self.config = config
        self.scheduler = scheduler
        self.pipe = pipe
        self.learned = _learned_table(getattr(config, "learned", None))
        self.active = False
        self.ids = None
        self.probe = None
        self.acc = None
        self.key = None
        self.caches = {}
        self.model_calls = 0
        self.partial_calls = 0
        self.library_seconds = 0.0
        self.kind = _supported(model)
        blocks = model.transformer_blocks
        self.joint_slots = len(blocks)
        self.processors = []
        if isinstance(config, _STEP_LEVEL):  # whole blocks skipped or run with their own processors
            self.gate = config.gate()
        elif self.kind == "flux":  # token-level SpecDiff: every double- and single-stream block's attention (the forecast
            if not isinstance(config, ForecastConfig):  # calls diffusers' own forward and touches no processor)
                for b in list(blocks) + list(model.single_transformer_blocks):
                    self.processors.append((b.attn, b.attn.processor))
        elif not isinstance(config, ForecastConfig):  # SD3: token-level SpecDiff only (the forecast runs diffusers' own forward)
            for i, b in enumerate(blocks):
                self.processors.append((b.attn, b.attn.processor))
            for i, b in enumerate(blocks):
                if getattr(b, "attn2", None) is not None:
                    self.processors.append((b.attn2, b.attn2.processor))

    # -- processors
    def install(self):
        cls = _FluxProcessor if self.kind == "flux" else _Processor
        for slot, (attn, original) in enumerate(self.processors):
            attn.set_processor(cls(self, slot, original))

    def uninstall(self):
        for attn, original in self.processors:
            attn.set_processor(original)

    # -- K/V cache, probe
    def kv(self, slot, key, value):
        b, h, _, d = key.shape
        shape = (b, h, self.tokens, d)
        c = self.caches.get(slot)
        if c is None or c[0].shape != shape or c[0].dtype != key.dtype:
            c = (torch.empty(shape, dtype=key.dtype), torch.empty(shape, dtype=value.dtype))
            self.caches[slot] = c
        return c

    def kv_index(self, head_dim, heads):
        if self._kv_index is None or self._kv_index.shape[1] != heads or self._kv_index.shape[3] != head_dim:
            self._kv_index = self.ids[:, None, :, None].expand(-1, heads, -1, head_dim)
        return self._kv_index

    def add_probe(self, q_img, lse_img, key_img, head_dim):
        # Column sums of the image queries' attention over the image keys, per head: log sum_i exp(s q_i.k_j - lse_i)
        # is the log-sum-exp of a transposed attention (keys as queries, the queries with -lse_i / s appended as keys).
        scale = 1.0 / math.sqrt(head_dim)
        ones = torch.ones(key_img.shape[:3] + (1,), dtype=key_img.dtype)
        qt = torch.cat([key_img, ones], dim=-1)
        kt = torch.cat([q_img, (-lse_img / scale).unsqueeze(-1)], dim=-1)
        lse_t = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qt, kt, kt, scale=scale)[1]
        self.probe += lse_t.exp().mean(dim=1)

    # -- the network
    def forward_rows(self, x, ctx, pooled, timestep, ids, probe):
        """Rows [B, n, p*p*C] of the active image tokens (ids [B, n], or None = all)."""
        m = self.model
        h = m.pos_embed(x).contiguous()
        temb = m.time_text_embed(timestep, pooled)
        enc = m.context_embedder(ctx)
        if ids is not None:
            h = torch.gather(h, 1, ids[:, :, None].expand(-1, -1, h.shape[-1]))
        self.ids, self._kv_index, self.probe = ids, None, probe
        self.active = True
        try:
            for block in m.transformer_blocks:
                enc, h = block(hidden_states=h, encoder_hidden_states=enc, temb=temb, joint_attention_kwargs=None)
            h = m.norm_out(h, temb)
            return m.proj_out(h)
        finally:
            self.active, self.ids, self.probe = False, None, None

    def forward_rows_flux(self, x, ctx, pooled, timestep, img_ids, txt_ids, guidance, ids, probe):
        """FLUX's output rows [B, n, features] of the active image tokens (ids [B, n], or None = all): FluxTransformer2DModel's
        forward with the active tokens' rows and rotary tables gathered; attention in _FluxProcessor."""
        m = self.model
        h = m.x_embedder(x)
        t = timestep.to(x.dtype) * 1000
        temb = m.time_text_embed(t, pooled) if guidance is None else m.time_text_embed(t, guidance.to(x.dtype) * 1000, pooled)
        enc = m.context_embedder(ctx)
        txt_ids = txt_ids[0] if txt_ids.ndim == 3 else txt_ids
        img_ids = img_ids[0] if img_ids.ndim == 3 else img_ids
        rotary = m.pos_embed(torch.cat((txt_ids, img_ids), dim=0))
        L = enc.shape[1]
        cos, sin = rotary[0][None], rotary[1][None]
        if ids is not None:
            h = torch.gather(h, 1, ids[:, :, None].expand(-1, -1, h.shape[-1]))
            b = ids.shape[0]
            cos = torch.cat([cos[:, :L].expand(b, -1, -1), cos[0, L:][ids]], dim=1)
            sin = torch.cat([sin[:, :L].expand(b, -1, -1), sin[0, L:][ids]], dim=1)
        self.ids, self._kv_index, self.probe, self.rope, self.txt_len = ids, None, probe, (cos, sin), L
        self.active = True
        try:
            for block in m.transformer_blocks:
                enc, h = block(hidden_states=h, encoder_hidden_states=enc, temb=temb, image_rotary_emb=rotary, joint_attention_kwargs=None)
            for block in m.single_transformer_blocks:
                enc, h = block(hidden_states=h, encoder_hidden_states=enc, temb=temb, image_rotary_emb=rotary, joint_attention_kwargs=None)
            h = m.norm_out(h, temb)
            return m.proj_out(h)
        finally:
            self.active, self.ids, self.probe, self.rope = False, None, None, None

    def patchify(self, sample):
        """[B, C, H, W] -> the accelerator's rows [B * tokens, p*p*C] (unpatchify's inverse), one contiguous copy."""
        p = self.model.config.patch_size
        b, c, h, w = sample.shape
        rows = sample.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
        return rows.reshape(b * (h // p) * (w // p), p * p * c).contiguous()

    def step_level(self, k, steps, h, enc, temb, blocks, block_kwargs):
        """FBCache / TeaCache (examples/methods/src/step_level.cpp's compositions) over the embedded image and context
        streams h, enc and the blocks in order (SD3's joint blocks; FLUX's double- then single-stream blocks): the gate
        decides from the proxy's relative change; a skipped step adds the cached residual instead of running the blocks.
        Returns the image stream before the final norm."""
        if k == 0:
            self.gate.reset()
            self.step_prev, self.step_residual, self.model_calls, self.partial_calls, self.library_seconds = None, None, 0, 0, 0.0
        elif k != getattr(self, "step_next", 0):
            raise SpecDiffError(f"timestep: step {k} came before step {getattr(self, 'step_next', 0)} of this run; specdiff expects the "
                                "scheduler's steps in order from the first")
        self.step_next = k + 1

        def run(blocks, h, enc):
            for block in blocks:
                enc, h = block(hidden_states=h, encoder_hidden_states=enc, temb=temb, **block_kwargs)
            return h

        def gate(proxy):
            t0 = time.perf_counter()
            change = _core.relative_l1(proxy, self.step_prev) if self.step_prev is not None else math.inf
            computing = self.gate.advance(k, steps, change)
            self.library_seconds += time.perf_counter() - t0
            return computing

        if isinstance(self.config, TeaCacheConfig):  # block 0's timestep-modulated input, LN(x)(1 + scale_msa) + shift_msa
            proxy = blocks[0].norm1(h, emb=temb)[0].contiguous()
            computing = gate(proxy)
            self.step_prev = proxy  # the previous step's proxy, computed or skipped
            if computing:
                h_in = h
                h = run(blocks, h, enc)
                self.step_residual = h - h_in
            else:
                h = h + self.step_residual
        else:  # FBCache: the first block always; its residual's change against the last computed step's
            h_in = h
            enc, h = blocks[0](hidden_states=h, encoder_hidden_states=enc, temb=temb, **block_kwargs)
            front = (h - h_in).contiguous()
            computing = gate(front)
            if computing:
                self.step_prev = front  # the reference is the last computed step's residual
                middle_in = h
                h = run(blocks[1:], h, enc)
                self.step_residual = h - middle_in
            else:
                h = h + self.step_residual
        self.model_calls += 1
        if not computing:
            self.partial_calls += 1
        return h

    def step_level_sd3(self, k, steps, x, ctx, pooled, timestep):
        m = self.model
        temb = m.time_text_embed(timestep, pooled)
        h = self.step_level(k, steps, m.pos_embed(x), m.context_embedder(ctx), temb, m.transformer_blocks, {"joint_attention_kwargs": None})
        return m.proj_out(m.norm_out(h, temb))

    def step_level_flux(self, k, steps, x, ctx, pooled, timestep, img_ids, txt_ids, guidance):
        """FLUX's output rows [B, tokens, features] (FluxTransformer2DModel's forward, its blocks under step_level)."""
        m = self.model
        t = timestep.to(x.dtype) * 1000
        temb = m.time_text_embed(t, pooled) if guidance is None else m.time_text_embed(t, guidance.to(x.dtype) * 1000, pooled)
        txt_ids = txt_ids[0] if txt_ids.ndim == 3 else txt_ids
        img_ids = img_ids[0] if img_ids.ndim == 3 else img_ids
        rotary = m.pos_embed(torch.cat((txt_ids, img_ids), dim=0))
        blocks = list(m.transformer_blocks) + list(m.single_transformer_blocks)
        h = self.step_level(k, steps, m.x_embedder(x), m.context_embedder(ctx), temb, blocks,
                            {"image_rotary_emb": rotary, "joint_attention_kwargs": None})
        return m.proj_out(m.norm_out(h, temb))

    def unpatchify(self, rows, height, width):
        p = self.model.config.patch_size
        c = self.model.out_channels
        h, w = height // p, width // p
        rows = rows.reshape(rows.shape[0], h, w, p, p, c)
        rows = torch.einsum("nhwpqc->nchpwq", rows)
        return rows.reshape(rows.shape[0], c, h * p, w * p)

    # -- the schedule of the run
    def grid(self, t: float):
        sched = self.scheduler if self.scheduler is not None else getattr(self.pipe, "scheduler", None)
        if sched is None or getattr(sched, "timesteps", None) is None:
            raise SpecDiffError("scheduler: enable() on a bare transformer needs scheduler= (the run's FlowMatchEulerDiscreteScheduler, "
                                "after set_timesteps) to know the run's timesteps")
        ts = sched.timesteps.detach().to("cpu", torch.float32).numpy()
        k = _grid_index(ts, t, self.kind)
        if k is None:
            raise SpecDiffError(f"timestep: {t} is not on the scheduler's grid ({ts.size} steps{', divided by 1000 as FluxPipeline passes it' if self.kind == 'flux' else ''}); "
                                "call set_timesteps before sampling")
        return ts, k

    def guidance(self, batch):
        g = self.config.guidance_scale if isinstance(self.config, SpecDiffConfig) else None
        if g is None and self.pipe is not None:
            g = getattr(self.pipe, "_guidance_scale", None)
        if g is None:
            g = 1.0
        return float(g), batch % 2 == 0 and g > 1.0

    def run_grid(self, ts):
        """The timesteps the accelerator is built on: the run's, or a learned table's own grid where every step is within
        4 float32 ulp of the run's. The C++ engine computes FLUX's shifted schedule (exp(mu) / (exp(mu) + 1/sigma - 1))
        in another order of operations than diffusers' scheduler, so a table fitted on the engine's grid sits up to 2 ulp
        off diffusers' grid on mnist-flux: the same sampler, steps and shift, which is what the table's exact check
        stands for. The step-indexed rules never read the values otherwise."""
        if self.learned is not None:
            table = np.asarray(self.learned.timesteps, dtype=np.float32)
            if table.shape == ts.shape and np.all(np.abs(table - ts) <= 4 * np.spacing(np.abs(ts))):
                return table
        return ts

    def make_accelerator(self, ts, batch, tokens, features, cfg):
        c = self.config
        steps = len(ts)
        ts = self.run_grid(ts)
        self.acc_ts = ts
        if isinstance(c, ForecastConfig):
            return _core.forecast_accelerator(tokens, batch, steps, features, c.interval, _forecast_warmup(c), c.c3, c.order,
                                              c.variable == "step", self.learned, list(ts))
        return _core.specdiff_accelerator(tokens, batch, steps, features, bool(c.share_cfg_plan and cfg), c.cache_rate, c.spec_steps,
                                          c.reuse_mass, c.warmup_steps, c.refresh_interval, list(c.dense_steps), c.starvation_scale,
                                          c.error_budget, c.max_partial_steps, list(c.cache_rate_buckets), c.bucket_error_step, c.c3,
                                          self.learned, list(ts))

    def begin_step(self, k, t, ts, batch, features, cfg, speculate, order_hint=""):
        """Step k of a run, for SD3 and FLUX alike: at k = 0 the accelerator for the run's shape (made anew, or reset),
        the counters zeroed and speculate() run when the config asks for a speculative pass; a later step must be the
        accelerator's next one of the same run."""
        key = (batch, self.tokens, features, tuple(ts.tolist()), cfg)
        if k == 0:
            if self.acc is None or self.key != key:
                self.acc = self.make_accelerator(ts, batch, self.tokens, features, cfg)
                self.key = key
            else:
                self.acc.reset()
            self.model_calls = 0
            self.partial_calls = 0
            self.library_seconds = 0.0
            if self.acc.speculates and getattr(self.config, "spec_steps", 0) > 0:
                speculate()
        elif self.acc is None or self.key != key or self.acc.next_step != k:
            raise SpecDiffError(f"timestep: step {k} (t = {t}) came before step {self.acc.next_step if self.acc else 0} of this run; "
                                "specdiff expects the scheduler's steps in order from the first" + order_hint)

    def speculate(self, ts, x, guidance, cfg, velocity):
        """SpecDiff's speculative pass, for SD3 and FLUX alike: Euler steps of the run's own sampler from the same noise at
        the aligned speculative timesteps, every token computed and each step's attention recorded. velocity(latents, t,
        probe) runs the model at timestep t (the scheduler's unit) on latents in the run's layout, fills probe and returns
        the velocity in that layout."""
        c = self.config
        spec_t = _core.aligned_speculative_timesteps(list(ts), c.spec_steps, c.warmup_steps, c.refresh_interval, list(c.dense_steps))
        self.acc.begin_speculation(spec_t)
        batch = x.shape[0]
        lat = x[batch // 2:].clone() if cfg else x.clone()
        for s, t in enumerate(spec_t):
            inp = torch.cat([lat, lat]) if cfg else lat
            probe = torch.zeros(batch, self.tokens)
            v = velocity(inp, t, probe)
            self.model_calls += 1
            t0 = time.perf_counter()
            self.acc.record_speculation(s, probe.reshape(-1))
            self.library_seconds += time.perf_counter() - t0
            if cfg:
                vu, vc = v.chunk(2)
                v = vu + guidance * (vc - vu)
            sigma = np.float32(t) / np.float32(1000.0)
            sigma_next = np.float32(spec_t[s + 1]) / np.float32(1000.0) if s + 1 < len(spec_t) else np.float32(0.0)
            lat = lat + float(np.float32(sigma_next - sigma)) * v

    def __call__(self, hidden_states, encoder_hidden_states=None, pooled_projections=None, timestep=None,
                 block_controlnet_hidden_states=None, joint_attention_kwargs=None, return_dict=True, skip_layers=None):
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        x = hidden_states
        if x.device.type != "cpu":
            raise SpecDiffError(f"hidden_states: on {x.device}; this build of specdiff runs on CPU tensors only (docs/python.md, the CUDA build)")
        if x.dtype != torch.float32:
            raise SpecDiffError(f"hidden_states: dtype {x.dtype}; specdiff's accelerator caches float32 rows (load the model in float32)")
        if block_controlnet_hidden_states is not None or skip_layers or (joint_attention_kwargs and len(joint_attention_kwargs)):
            raise SpecDiffError("transformer call: ControlNet residuals, skip_layers and joint_attention_kwargs are not supported with specdiff")
        batch, _, height, width = x.shape
        p = self.model.config.patch_size
        self.tokens = (height // p) * (width // p)
        features = p * p * self.model.out_channels
        t = float(timestep.reshape(-1)[0])
        ts, k = self.grid(t)
        if isinstance(self.config, _STEP_LEVEL):
            rows = self.step_level_sd3(k, len(ts), x, encoder_hidden_states, pooled_projections, timestep)
            sample = self.unpatchify(rows, height, width)
            return (sample,) if not return_dict else Transformer2DModelOutput(sample=sample)
        guidance, cfg = self.guidance(batch)

        def velocity(inp, t, probe):
            timestep = torch.full((inp.shape[0],), t, dtype=torch.float32)
            rows = self.forward_rows(inp, encoder_hidden_states, pooled_projections, timestep, None, probe)
            return self.unpatchify(rows, x.shape[-2], x.shape[-1])

        self.begin_step(k, t, ts, batch, features, cfg, lambda: self.speculate(ts, x, guidance, cfg, velocity))
        acc = self.acc
        t0 = time.perf_counter()
        count = acc.plan_step(k, t)
        self.library_seconds += time.perf_counter() - t0
        probe = torch.zeros(batch, self.tokens) if acc.reads_attention and count else None
        try:
            if count == 0:
                out = torch.empty(batch * self.tokens, features, dtype=torch.float32)
                t0 = time.perf_counter()
                acc.complete_step(torch.empty(0, features), out, None)
                self.library_seconds += time.perf_counter() - t0
            elif count == self.tokens and isinstance(self.config, ForecastConfig):
                # A full forecast step is diffusers' own forward, unchanged (no K/V cache to fill, no probe); its output
                # in the accelerator's row layout, handed over in place.
                sample = self.original_forward(hidden_states=x, encoder_hidden_states=encoder_hidden_states,
                                               pooled_projections=pooled_projections, timestep=timestep, return_dict=False)[0]
                out = self.patchify(sample.to(torch.float32))
                t0 = time.perf_counter()
                acc.complete_step_in_place(out, None)
                self.library_seconds += time.perf_counter() - t0
                self.model_calls += 1
            elif count == self.tokens:
                rows = self.forward_rows(x, encoder_hidden_states, pooled_projections, timestep, None, probe)
                out = rows.reshape(batch * self.tokens, features).contiguous()
                t0 = time.perf_counter()
                acc.complete_step_in_place(out, probe.reshape(-1) if probe is not None else None)
                self.library_seconds += time.perf_counter() - t0
                self.model_calls += 1
            else:
                t0 = time.perf_counter()
                ids = torch.from_numpy(acc.compute_tokens().astype(np.int64))
                self.library_seconds += time.perf_counter() - t0
                rows = self.forward_rows(x, encoder_hidden_states, pooled_projections, timestep, ids, probe)
                out = torch.empty(batch * self.tokens, features, dtype=torch.float32)
                t0 = time.perf_counter()
                acc.complete_step(rows.reshape(batch * count, features).contiguous(), out, probe.reshape(-1) if probe is not None else None)
                self.library_seconds += time.perf_counter() - t0
                self.model_calls += 1
                self.partial_calls += 1
        except BaseException:
            acc.abandon()
            self.acc = None
            raise
        sample = self.unpatchify(out.reshape(batch, self.tokens, features), height, width)
        if not return_dict:
            return (sample,)
        return Transformer2DModelOutput(sample=sample)


def _flux_call(runner: "_Runner", original, hidden_states, encoder_hidden_states=None, pooled_projections=None, timestep=None,
               img_ids=None, txt_ids=None, guidance=None, joint_attention_kwargs=None, controlnet_block_samples=None,
               controlnet_single_block_samples=None, return_dict=True, controlnet_blocks_repeat=False):
    """One FluxTransformer2DModel call (one step). hidden_states are FluxPipeline's packed latents [B, tokens, features].
    Forecast: a full step is diffusers' own forward (its output rows handed to the accelerator in place); on the other
    steps the transformer is not called and every row is the library's forecast. SpecDiff: the speculative pass at
    step 0, then each step's planned image tokens through forward_rows_flux (every token on a dense step, filling the
    K/V caches), the others' rows filled by the library."""
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    r = runner
    x = hidden_states
    if x.device.type != "cpu":
        raise SpecDiffError(f"hidden_states: on {x.device}; this build of specdiff runs on CPU tensors only (docs/python.md, the CUDA build)")
    if x.dtype != torch.float32:
        raise SpecDiffError(f"hidden_states: dtype {x.dtype}; specdiff's accelerator caches float32 rows (load the model in float32)")
    if x.dim() != 3:
        raise SpecDiffError(f"hidden_states: shape {tuple(x.shape)}; FluxTransformer2DModel takes packed latents [batch, tokens, features]")
    if controlnet_block_samples is not None or controlnet_single_block_samples is not None or (joint_attention_kwargs and len(joint_attention_kwargs)):
        raise SpecDiffError("transformer call: ControlNet residuals and joint_attention_kwargs are not supported with specdiff")
    batch, tokens, features = x.shape
    r.tokens = tokens
    ts, k = r.grid(float(timestep.reshape(-1)[0]))
    if isinstance(r.config, _STEP_LEVEL):
        sample = r.step_level_flux(k, len(ts), x, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids, guidance)
        return (sample,) if not return_dict else Transformer2DModelOutput(sample=sample)
    g, cfg = r.guidance(batch)

    def velocity(inp, t, probe):  # FluxPipeline calls the model with t / 1000, in the packed layout
        timestep = torch.full((inp.shape[0],), t, dtype=torch.float32) / 1000
        return r.forward_rows_flux(inp, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids, guidance, None, probe)

    r.begin_step(k, float(ts[k]), ts, batch, features, cfg, lambda: r.speculate(ts, x, g, cfg, velocity),
                 order_hint=", one transformer call per step (FluxPipeline's true_cfg_scale makes two)")
    acc = r.acc
    t0 = time.perf_counter()
    count = acc.plan_step(k, float(r.acc_ts[k]))
    r.library_seconds += time.perf_counter() - t0
    try:
        if count == 0:
            out = torch.empty(batch * tokens, features, dtype=torch.float32)
            t0 = time.perf_counter()
            acc.complete_step(torch.empty(0, features), out, None)
            r.library_seconds += time.perf_counter() - t0
        elif not isinstance(r.config, ForecastConfig):  # token-level SpecDiff: the K/V caches and the probe
            probe = torch.zeros(batch, tokens) if acc.reads_attention else None
            ids = None
            if count != tokens:
                t0 = time.perf_counter()
                ids = torch.from_numpy(acc.compute_tokens().astype(np.int64))
                r.library_seconds += time.perf_counter() - t0
            rows = r.forward_rows_flux(x, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids, guidance, ids, probe)
            t0 = time.perf_counter()
            if ids is None:
                out = rows.reshape(batch * tokens, features).contiguous()
                acc.complete_step_in_place(out, probe.reshape(-1) if probe is not None else None)
            else:
                out = torch.empty(batch * tokens, features, dtype=torch.float32)
                acc.complete_step(rows.reshape(batch * count, features).contiguous(), out, probe.reshape(-1) if probe is not None else None)
                r.partial_calls += 1
            r.library_seconds += time.perf_counter() - t0
            r.model_calls += 1
        elif count == tokens:
            sample = original(hidden_states=x, encoder_hidden_states=encoder_hidden_states, pooled_projections=pooled_projections,
                              timestep=timestep, img_ids=img_ids, txt_ids=txt_ids, guidance=guidance, return_dict=False)[0]
            out = sample.reshape(batch * tokens, features).to(torch.float32).contiguous()
            t0 = time.perf_counter()
            acc.complete_step_in_place(out, None)
            r.library_seconds += time.perf_counter() - t0
            r.model_calls += 1
        else:
            raise SpecDiffError(f"config: {type(r.config).__name__} planned {count} of {tokens} tokens; FLUX runs step-level methods only")
    except BaseException:
        acc.abandon()
        r.acc = None
        raise
    sample = out.reshape(batch, tokens, features)
    if not return_dict:
        return (sample,)
    return Transformer2DModelOutput(sample=sample)


def _hook_class():
    from diffusers.hooks import ModelHook

    class SpecDiffHook(ModelHook):
        _is_stateful = False

        def __init__(self, runner):
            super().__init__()
            self.runner = runner

        def new_forward(self, module, *args, **kwargs):
            if _parallel(module) and module._diffusers_hook._hook_order[-1] != _HOOK_NAME:
                raise SpecDiffError("transformer: enable_parallelism() came after specdiff's enable(), so its hooks split the inputs "
                                    "before specdiff sees them; disable() specdiff and enable it again after enable_parallelism()")
            with torch.no_grad():
                if self.runner.kind == "flux":
                    return _flux_call(self.runner, self.fn_ref.original_forward, *args, **kwargs)
                self.runner.original_forward = self.fn_ref.original_forward
                return self.runner(*args, **kwargs)

    return SpecDiffHook


# --- enable / disable --------------------------------------------------------------------------------------------


def _split(pipe_or_model):
    import torch.nn as nn

    if isinstance(pipe_or_model, nn.Module):
        return None, pipe_or_model
    model = getattr(pipe_or_model, "transformer", None)
    if model is None:
        raise SpecDiffError(f"pipe_or_transformer: a {type(pipe_or_model).__name__} has no `transformer`; pass a diffusers "
                            "pipeline or an SD3Transformer2DModel")
    return pipe_or_model, model


def _other_cache(model) -> Optional[str]:
    if getattr(model, "is_cache_enabled", False):
        return "a diffusers cache (enable_cache)"
    registry = getattr(model, "_diffusers_hook", None)
    if registry is not None:
        others = [n for n in registry.hooks if n != _HOOK_NAME and not n.startswith(_CP_HOOK_PREFIXES)]
        if others:
            return "hooks " + ", ".join(repr(n) for n in others)
    for name, sub in model.named_modules():
        r = getattr(sub, "_diffusers_hook", None)
        if r is not None and sub is not model and any(not n.startswith(_CP_HOOK_PREFIXES) for n in r.hooks):
            return f"hooks on {name}"
        if hasattr(sub, "_forward_original") or hasattr(sub, "_cache_context"):  # cache-dit style patching
            return f"a patched forward on {name or 'the transformer'}"
    if "cache_dit" in type(model.forward).__module__ if hasattr(type(model.forward), "__module__") else False:
        return "cache-dit"
    return None


def enable(pipe_or_transformer, config: Union[SpecDiffConfig, ForecastConfig, None] = None, *, scheduler=None):
    """Enables a SpecDiff method on a diffusers pipeline (its ``transformer``) or on an SD3Transformer2DModel.

    config: SpecDiffConfig (default), SpecDiffAdaptiveConfig or ForecastConfig. scheduler: with a bare transformer,
    the scheduler whose ``timesteps`` the run uses (a pipeline's own is used otherwise). Raises SpecDiffError naming
    the argument for an unsupported model, a model already using another cache, a config out of range, or a model
    not in float32 on the CPU; the pipeline is then unchanged.
    """
    from diffusers.hooks import HookRegistry

    config = SpecDiffConfig() if config is None else config
    if not isinstance(config, (SpecDiffConfig, ForecastConfig) + _STEP_LEVEL):
        raise SpecDiffError(f"config: expected SpecDiffConfig, SpecDiffAdaptiveConfig, ForecastConfig, FBCacheConfig or TeaCacheConfig, "
                            f"got {type(config).__name__}")
    config = dataclasses.replace(config)  # a private copy: later edits of the caller's object change nothing
    config.validate()
    pipe, model = _split(pipe_or_transformer)
    _supported(model)
    registry = getattr(model, "_diffusers_hook", None)
    if registry is not None and registry.get_hook(_HOOK_NAME) is not None:
        raise SpecDiffError("pipe_or_transformer: specdiff is already enabled on this model; disable() it first")
    other = _other_cache(model)
    if other is not None:
        raise SpecDiffError(f"pipe_or_transformer: the transformer already uses {other}; disable it first")
    if _parallel(model) and not isinstance(config, ForecastConfig):
        raise SpecDiffError(f"config: {type(config).__name__} under diffusers' enable_parallelism() is not supported (its forward runs "
                            "the blocks itself, unsharded; the token-level methods need the sharded accelerator over torch.distributed, "
                            "docs/scale-out.md); ForecastConfig composes with it")
    param = next(model.parameters())
    if param.device.type != "cpu":
        raise SpecDiffError(f"transformer: on {param.device}; this build of specdiff runs on CPU only (docs/python.md, the CUDA build)")
    if param.dtype != torch.float32:
        raise SpecDiffError(f"transformer: dtype {param.dtype}; specdiff needs float32 weights on the CPU")
    if scheduler is not None and not hasattr(scheduler, "timesteps"):
        raise SpecDiffError(f"scheduler: a {type(scheduler).__name__} has no timesteps")
    if pipe is None and isinstance(config, SpecDiffConfig) and config.guidance_scale is None:
        raise SpecDiffError("config.guidance_scale: needed when enabling on a bare transformer (SpecDiff's speculative pass samples "
                            "with the CFG scale of the run, and the CFG halves share a plan); give the scale you sample with, 1 for none")
    runner = _Runner(model, config, scheduler=scheduler, pipe=pipe)
    # What disable() puts back: whether the model had a hook registry and an instance-level forward before.
    runner.had_registry = getattr(model, "_diffusers_hook", None) is not None
    runner.instance_forward = model.__dict__.get("forward")
    runner.install()
    try:
        registry = HookRegistry.check_if_exists_or_initialize(model)
        registry.register_hook(_hook_class()(runner), _HOOK_NAME)
    except BaseException:
        runner.uninstall()
        raise
    model._specdiff_runner = runner
    return runner


def disable(pipe_or_transformer) -> None:
    """Removes specdiff from the pipeline or transformer: its forward and attention processors are the originals again
    (the weights were never touched)."""
    _, model = _split(pipe_or_transformer)
    runner = getattr(model, "_specdiff_runner", None)
    if runner is None:
        raise SpecDiffError("pipe_or_transformer: specdiff is not enabled on this model")
    registry = getattr(model, "_diffusers_hook", None)
    if registry is not None and registry.get_hook(_HOOK_NAME) is not None:
        registry.remove_hook(_HOOK_NAME, recurse=False)
    runner.uninstall()
    if not runner.had_registry and registry is not None and not registry.hooks:
        del model._diffusers_hook  # the registry enable() created, now empty
        if runner.instance_forward is None:
            model.__dict__.pop("forward", None)  # the class's forward again, as before enable()
        else:
            model.forward = runner.instance_forward
    del model._specdiff_runner


def stats(pipe_or_transformer) -> dict:
    """The last run: model calls (the speculative pass included), how many were partial, and the seconds spent in the
    C++ library's calls (planning, cache fills, records)."""
    _, model = _split(pipe_or_transformer)
    runner = getattr(model, "_specdiff_runner", None)
    if runner is None:
        raise SpecDiffError("pipe_or_transformer: specdiff is not enabled on this model")
    return {"model_calls": runner.model_calls, "partial_calls": runner.partial_calls, "library_seconds": runner.library_seconds}


def calibrate_forecast(pipe, runs: Sequence[dict], config: ForecastConfig = None, *, ridge: float = 1e-3, min_pairs: int = 16):
    """Fits the learned forecast's weights from full runs of the user's own pipeline: ``pipe(**kwargs)`` for each
    kwargs in ``runs`` (same num_inference_steps; use prompts/seeds other than the ones you evaluate on). Returns a
    LearnedTable for ForecastConfig(learned=...) (save it with specdiff.learned_json)."""
    from diffusers.hooks import HookRegistry, ModelHook

    config = ForecastConfig(c3="taylor") if config is None else dataclasses.replace(config)
    if not isinstance(config, ForecastConfig):
        raise SpecDiffError(f"config: expected a ForecastConfig, got {type(config).__name__}")
    if config.c3 == "learned" and config.learned is None:
        config.c3 = "taylor"
    config.validate()
    if not runs:
        raise SpecDiffError("runs: empty; give at least one dict of pipeline arguments")
    pipe_, model = _split(pipe)
    if pipe_ is None:
        raise SpecDiffError("pipe: calibrate_forecast needs a pipeline (it runs it)")
    kind = _supported(model)
    state = {"fit": None, "grid": None}

    class Observe(ModelHook):
        def new_forward(self, module, *args, **kwargs):
            out = self.fn_ref.original_forward(*args, **kwargs)
            sample = out[0] if isinstance(out, tuple) else out.sample
            ts = pipe_.scheduler.timesteps.detach().to("cpu", torch.float32).numpy()
            t = float(kwargs.get("timestep", args[3] if len(args) > 3 else None).reshape(-1)[0])
            k = _grid_index(ts, t, kind)
            if k is None:
                raise SpecDiffError(f"timestep: {t} is not on the scheduler's grid")
            if kind == "flux":  # packed rows [B, tokens, features] already
                rows = sample.reshape(-1, sample.shape[-1])
            else:
                p = model.config.patch_size
                b, c, h, w = sample.shape
                rows = sample.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b * (h // p) * (w // p), p * p * c)
            rows = rows.detach().to(torch.float32).contiguous()
            if state["fit"] is None:
                state["grid"] = list(ts)
                state["fit"] = _core.ForecastCalibration(state["grid"], rows.shape[0], rows.shape[1], config.interval, _forecast_warmup(config), 3)
            elif list(ts) != state["grid"]:
                raise SpecDiffError("runs: every run must use the same timesteps (num_inference_steps and scheduler)")
            if k == 0:
                state["fit"].begin_run()
            state["fit"].observe(k, rows)
            return out

    registry = HookRegistry.check_if_exists_or_initialize(model)
    registry.register_hook(Observe(), "specdiff_calibrate")
    try:
        for kwargs in runs:
            pipe_(**kwargs)
    finally:
        registry.remove_hook("specdiff_calibrate", recurse=False)
    return state["fit"].solve(ridge, min_pairs)
