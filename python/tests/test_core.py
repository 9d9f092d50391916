"""The low-level binding: the C++ accelerator over CPU tensors and NumPy arrays without a copy, its errors."""
import numpy as np
import pytest
import torch

import specdiff


def test_noise_is_the_engines():
    a = specdiff.sample_latents(3, 16, seed=7)
    b = specdiff.sample_latents(1, 16, seed=7, first_sample=2)
    assert a.dtype == np.float32 and a.shape == (3, 16)
    np.testing.assert_array_equal(a[2], b[0])  # sample k is stream k, whatever the batching
    assert not np.array_equal(a[0], a[1])
    assert abs(float(a.mean())) < 1.0


def test_forecast_accelerator_writes_into_the_callers_tensor():
    tokens, batch, features, steps = 8, 2, 3, 6
    t = [1000.0 - 150.0 * k for k in range(steps)]
    acc = specdiff.forecast_accelerator(tokens, batch, steps, features, 2, 1, "latest", 1, True, None, t)
    out = torch.zeros(batch * tokens, features)
    for k in range(steps):
        count = acc.plan_step(k, t[k])
        ids = acc.compute_tokens()
        assert ids.shape == (batch, count)
        if count == tokens:
            rows = torch.full((batch * tokens, features), float(k))
            acc.complete_step(rows, out, None)
            assert torch.equal(out, rows)  # written into out's own memory
        else:
            assert count == 0
            acc.complete_step(torch.empty(0, features), out, None)
            assert torch.all(out == float(k - 1))  # 'latest': the last full step's rows


def test_specdiff_accelerator_plans_c1_tokens_and_refuses_bad_rows():
    tokens, batch, features, steps = 16, 2, 4, 6
    t = [1000.0 - 150.0 * k for k in range(steps)]
    acc = specdiff.specdiff_accelerator(tokens, batch, steps, features, True, 0.75, 0, 0.1, 1, 0, [], 1.0, float("inf"), 0, [], 0.1,
                                        "specdiff", None, t)
    out = np.zeros((batch * tokens, features), np.float32)
    attention = np.linspace(0.0, 1.0, batch * tokens).astype(np.float32)
    assert acc.plan_step(0, t[0]) == tokens
    acc.complete_step(np.ones((batch * tokens, features), np.float32), out, attention)
    count = acc.plan_step(1, t[1])
    assert count == 4
    ids = acc.compute_tokens()
    assert ids.shape == (batch, 4) and np.all(np.diff(ids, axis=1) > 0)
    np.testing.assert_array_equal(ids[0], ids[1])  # the CFG halves share a plan
    with pytest.raises(ValueError, match="computed"):
        acc.complete_step(np.ones((batch * count, features + 1), np.float32), out, attention)
    with pytest.raises(RuntimeError, match="plan_step"):
        acc.plan_step(2, t[2])  # the planned step is still pending after the refused rows
    acc.complete_step(np.full((batch * count, features), 2.0, np.float32), out, attention)
    assert acc.next_step == 2


def test_bad_configurations_are_refused_naming_the_field():
    t = [1000.0, 500.0]
    with pytest.raises(ValueError, match="cache_rate"):
        specdiff.specdiff_accelerator(8, 2, 2, 1, False, 1.5, 0, 0.1, 1, 0, [], 1.0, float("inf"), 0, [], 0.1, "specdiff", None, t)
    with pytest.raises(ValueError, match="interval"):
        specdiff.forecast_accelerator(8, 2, 2, 1, 0, 1, "latest", 1, True, None, t)
    with pytest.raises(ValueError, match="c3"):
        specdiff.forecast_accelerator(8, 2, 2, 1, 2, 1, "learned", 1, True, None, t)
    acc = specdiff.specdiff_accelerator(8, 2, 2, 1, False, 0.5, 0, 0.1, 1, 0, [], 1.0, float("inf"), 0, [], 0.1, "specdiff", None, t)
    acc.plan_step(0, t[0])
    with pytest.raises(TypeError):  # float64 rows: no silent conversion (the binding reads the caller's memory)
        acc.complete_step(np.zeros((16, 1), np.float64), np.zeros((16, 1), np.float32), np.zeros(16, np.float32))
    with pytest.raises(TypeError):  # a non-contiguous output cannot be written in place
        acc.complete_step(np.zeros((16, 1), np.float32), np.zeros((16, 2), np.float32)[:, :1], np.zeros(16, np.float32))


def test_learned_file_round_trip(tmp_path):
    from conftest import MODELS

    table = specdiff.load_learned(str(MODELS / "mnist-sd3" / "learned_forecast_N3.json"))
    assert table.steps == 28 and table.depth == 3
    path = tmp_path / "copy.json"
    path.write_text(specdiff.learned_json(table, '{"source": "test"}'))
    again = specdiff.load_learned(str(path))
    assert again.timesteps == table.timesteps
    for k in (5, 20):
        np.testing.assert_array_equal(again.weights(k, 3), table.weights(k, 3))
    assert specdiff.load_learned(str(tmp_path / "missing.json")) is None
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(Exception, match="bad.json"):
        specdiff.load_learned(str(bad))


def test_image_quality_is_the_cpp_tools_metric():
    """specdiff._core.image_quality (quality::mean_psnr / mean_ssim, what bench/python/compare.py reports): a constant
    offset d on images of range 2 gives PSNR 10 log10(4 / d^2) per image; equal images SSIM 1; shapes must agree."""
    from specdiff import _core

    g = np.random.default_rng(0)
    a = g.uniform(-1, 1, (3, 1, 16, 16)).astype(np.float32)
    b = (a + np.float32(0.125)).astype(np.float32)
    psnr, ssim = _core.image_quality(a, b, 2.0)
    assert abs(psnr - 10 * np.log10(4 / 0.125 ** 2)) < 1e-3
    assert 0 < ssim < 1
    assert _core.image_quality(a, a.copy(), 2.0)[1] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="shape"):
        _core.image_quality(a, a[:2].copy(), 2.0)
