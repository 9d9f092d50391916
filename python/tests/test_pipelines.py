"""Text-to-image: StableDiffusion3Pipeline assembled from small random components built from configs (no download),
each method enabled in one line, `pipe(prompt)` run; disable() gives the plain pipeline's image back bit for bit."""
import numpy as np
import pytest
import torch

import specdiff
import specdiff.diffusers as sd

STEPS = 8


def byte_symbols():
    """The byte-level BPE alphabet: printable Latin-1 bytes stand for themselves, the others for code points from 256 on."""
    keep = [b for b in range(256) if 0x21 <= b <= 0x7E or 0xA1 <= b <= 0xAC or 0xAE <= b <= 0xFF]
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return list(out.values())


def byte_tokenizer():
    """A CLIP BPE tokenizer over single bytes (every byte a token, no merges): enough to drive the text encoders."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for s in byte_symbols():
        vocab.setdefault(s, len(vocab))
        vocab.setdefault(s + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


@pytest.fixture(scope="module")
def sd3_pipe(tmp_path_factory):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(0)
    tok = byte_tokenizer()
    text_config = CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                 num_hidden_layers=2, vocab_size=len(tok), projection_dim=16, max_position_embeddings=77)
    components = dict(
        transformer=SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
                                          caption_projection_dim=16, joint_attention_dim=32, pooled_projection_dim=32, out_channels=4),
        vae=AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1, latent_channels=4,
                          norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder=CLIPTextModelWithProjection(text_config),
        tokenizer=tok,
        text_encoder_2=CLIPTextModelWithProjection(text_config),
        tokenizer_2=tok,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe = StableDiffusion3Pipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, seed=0, prompt="a digit seven"):
    out = pipe(prompt, num_inference_steps=STEPS, guidance_scale=4.0, height=32, width=32, output_type="np",
               generator=torch.Generator().manual_seed(seed), max_sequence_length=16)
    return out.images


def test_each_method_in_one_line(sd3_pipe):
    plain = generate(sd3_pipe)
    assert plain.shape == (1, 32, 32, 3) and np.isfinite(plain).all()
    for config in (sd.SpecDiffConfig(cache_rate=0.75), sd.SpecDiffAdaptiveConfig(cache_rate=0.75),
                   sd.ForecastConfig(interval=2, c3="taylor")):
        sd.enable(sd3_pipe, config)
        try:
            image = generate(sd3_pipe)
            calls = sd.stats(sd3_pipe)
        finally:
            sd.disable(sd3_pipe)
        assert image.shape == plain.shape and np.isfinite(image).all()
        assert not np.array_equal(image, plain), type(config).__name__  # it cached something
        assert np.abs(image - plain).mean() < 0.2, type(config).__name__
        assert calls["model_calls"] <= STEPS + getattr(config, "spec_steps", 0)
    np.testing.assert_array_equal(generate(sd3_pipe), plain)  # disabled: the plain pipeline again


def test_cache_rate_zero_is_the_plain_pipeline(sd3_pipe):
    plain = generate(sd3_pipe, seed=3)
    sd.enable(sd3_pipe, sd.SpecDiffConfig(cache_rate=0.0))
    try:
        np.testing.assert_array_equal(generate(sd3_pipe, seed=3), plain)
    finally:
        sd.disable(sd3_pipe)


def test_forecast_calibrated_on_the_users_pipeline(sd3_pipe, tmp_path):
    def args(prompt, seed):
        return dict(prompt=prompt, num_inference_steps=STEPS, guidance_scale=4.0, height=32, width=32, output_type="np",
                    generator=torch.Generator().manual_seed(seed), max_sequence_length=16)

    plain = generate(sd3_pipe)
    errors = {}
    # Fitted on other prompts and seeds, and on the evaluated run itself (the weights' best case).
    for name, runs in (("other", [args("a digit one", 101), args("a digit two", 102), args("a digit three", 103)]),
                       ("same", [args("a digit seven", 0)])):
        table = sd.calibrate_forecast(sd3_pipe, runs, sd.ForecastConfig(interval=2, c3="taylor"))
        assert table.steps == STEPS and table.depth == 3
        path = tmp_path / f"learned_forecast_{name}.json"
        path.write_text(specdiff.learned_json(table, '{"runs": %d}' % len(runs)))
        sd.enable(sd3_pipe, sd.ForecastConfig(interval=2, learned=path))
        try:
            errors[name] = float(np.abs(generate(sd3_pipe) - plain).mean())
        finally:
            sd.disable(sd3_pipe)
    for name, config in (("taylor", sd.ForecastConfig(interval=2, c3="taylor")), ("latest", sd.ForecastConfig(interval=2, c3="latest"))):
        sd.enable(sd3_pipe, config)
        try:
            errors[name] = float(np.abs(generate(sd3_pipe) - plain).mean())
        finally:
            sd.disable(sd3_pipe)
    # On this random 2-block model the fitted weights beat 'latest' but not Taylor (measured: other 1.4e-3, same 1.3e-3,
    # taylor 0.87e-3, latest 2.1e-3; the shipped models' learned files beat both: docs/results.md); the fit is
    # teacher-forced on the full trajectory, which the forecast then leaves.
    assert errors["same"] < errors["latest"] and errors["other"] < errors["latest"], errors
    assert errors["same"] < 3 * errors["taylor"] and errors["other"] < 3 * errors["taylor"], errors


@pytest.fixture(scope="module")
def flux_pipe():
    """FluxPipeline from random components: CLIP (pooled) with the byte tokenizer, a one-layer T5 over the same tokenizer,
    a one-level VAE (latents 32 x 32, packed 2x2 into 256 tokens), FLUX's dynamic-shift scheduler."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(0)
    tok = byte_tokenizer()
    clip = CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                          num_hidden_layers=2, vocab_size=len(tok), max_position_embeddings=77)
    t5 = T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=2, pad_token_id=1, eos_token_id=1,
                  decoder_start_token_id=0, dropout_rate=0.0)
    components = dict(
        transformer=FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=8,
                                           num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(2, 2, 4)),
        vae=AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1, latent_channels=4,
                          norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611),
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                  max_image_seq_len=4096),
        text_encoder=CLIPTextModel(clip),
        tokenizer=tok,
        text_encoder_2=T5EncoderModel(t5),
        tokenizer_2=tok,
    )
    for c in components.values():
        if isinstance(c, torch.nn.Module):
            c.eval()  # built from configs: training mode (T5's dropout) until told otherwise
    pipe = FluxPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate_flux(pipe, seed=0, prompt="a digit seven"):
    out = pipe(prompt, num_inference_steps=STEPS, height=32, width=32, output_type="np", generator=torch.Generator().manual_seed(seed),
               max_sequence_length=16)
    return out.images


def test_flux_pipeline_each_method_in_one_line(flux_pipe):
    """FluxPipeline without true CFG: one transformer call per step (batch 1), so SpecDiff's guidance_scale is 1."""
    plain = generate_flux(flux_pipe)
    assert plain.shape == (1, 32, 32, 3) and np.isfinite(plain).all()
    for config in (sd.SpecDiffConfig(cache_rate=0.75, guidance_scale=1.0), sd.SpecDiffAdaptiveConfig(cache_rate=0.75, guidance_scale=1.0),
                   sd.ForecastConfig(interval=2, c3="taylor")):
        sd.enable(flux_pipe, config)
        try:
            image = generate_flux(flux_pipe)
            calls = sd.stats(flux_pipe)
        finally:
            sd.disable(flux_pipe)
        assert image.shape == plain.shape and np.isfinite(image).all()
        assert not np.array_equal(image, plain), type(config).__name__
        assert np.abs(image - plain).mean() < 0.2, type(config).__name__
        assert calls["model_calls"] <= STEPS + getattr(config, "spec_steps", 0)
    sd.enable(flux_pipe, sd.SpecDiffConfig(cache_rate=0.0, guidance_scale=1.0))
    try:
        np.testing.assert_array_equal(generate_flux(flux_pipe), plain)  # cache rate 0: the plain pipeline
    finally:
        sd.disable(flux_pipe)
    np.testing.assert_array_equal(generate_flux(flux_pipe), plain)  # disabled: the plain pipeline again


def test_flux_pipeline_true_cfg_is_refused(flux_pipe):
    """true_cfg_scale > 1 calls the transformer twice per step: refused naming the timestep, and the pipeline still works."""
    plain = generate_flux(flux_pipe)
    sd.enable(flux_pipe, sd.ForecastConfig(interval=2, c3="taylor"))
    try:
        with pytest.raises(sd.SpecDiffError, match="timestep: step 1 .*true_cfg_scale"):
            flux_pipe("a digit seven", negative_prompt="noise", true_cfg_scale=2.0, num_inference_steps=STEPS, height=32, width=32,
                      output_type="np", max_sequence_length=16)
    finally:
        sd.disable(flux_pipe)
    np.testing.assert_array_equal(generate_flux(flux_pipe), plain)
