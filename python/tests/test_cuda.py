"""The CUDA path of specdiff._core (a package built with SPECDIFF_PY_CUDA=ON): specdiff::gpu::accelerator over torch CUDA
tensors on torch's current stream, held against the host accelerator of the same composition on the same inputs.
Skipped, with the reason, where the package was built without CUDA or no GPU is visible. Never run yet: no GPU has been
lent to this project's Python checks (docs/python.md)."""
import numpy as np
import pytest
import torch

from specdiff import _core

def require_gpu():
    """Skips, saying why, unless the package has the device accelerator and a GPU is visible."""
    if not _core.cuda:
        pytest.skip("specdiff._core built without CUDA (SPECDIFF_PY_CUDA=ON builds the device accelerator)")
    if not torch.cuda.is_available() or _core.cuda_device_count() == 0:
        pytest.skip("no CUDA device visible to torch and the CUDA runtime")


def _stream():
    return torch.cuda.current_stream().cuda_stream


def test_the_build_says_whether_it_has_cuda():
    assert isinstance(_core.cuda, bool)
    assert hasattr(_core, "DeviceAccelerator") == _core.cuda


def test_forecast_on_the_device_equals_the_host():
    require_gpu()
    tokens, batch, steps, dim = 64, 2, 10, 16
    ts = list(np.linspace(1000, 100, steps).astype(np.float32))
    host = _core.forecast_accelerator(tokens, batch, steps, dim, 3, 2, "taylor", 1, True, None, ts)
    dev = _core.device_forecast_accelerator(tokens, batch, steps, dim, 3, 2, "taylor", 1, True, _stream())
    g = torch.Generator().manual_seed(0)
    for k in range(steps):
        n_host = host.plan_step(k, float(ts[k]))
        n_dev = dev.plan_step(k, float(ts[k]))
        assert n_host == n_dev
        if n_host:
            rows = torch.randn(batch * tokens, dim, generator=g)
            out_h = rows.clone()
            host.complete_step_in_place(out_h, None)
            out_d = rows.cuda()
            dev.complete_step_in_place(out_d, None)
        else:
            out_h = torch.empty(batch * tokens, dim)
            host.complete_step(torch.empty(0, dim), out_h, None)
            out_d = torch.empty(batch * tokens, dim, device="cuda")
            dev.complete_step(torch.empty(0, dim, device="cuda"), out_d, None)
        torch.testing.assert_close(out_d.cpu(), out_h, rtol=1e-6, atol=1e-6)
    dev.check_status()


def test_specdiff_on_the_device_plans_as_the_host():
    require_gpu()
    tokens, batch, steps, dim = 256, 2, 8, 16
    ts = list(np.linspace(1000, 100, steps).astype(np.float32))
    args = dict(tokens=tokens, batch=batch, steps=steps, feature_dim=dim, share_cfg_plan=True, cache_rate=0.75, spec_steps=2, reuse_mass=0.1,
                warmup_steps=2, refresh_interval=0, dense_steps=[5], starvation_scale=1.0, c3="specdiff")
    host = _core.specdiff_accelerator(**args, error_budget=float("inf"), max_partial_steps=0, cache_rate_buckets=[], bucket_error_step=0.1,
                                      learned=None, timesteps=ts)
    dev = _core.device_specdiff_accelerator(**args, stream=_stream())
    spec_t = _core.aligned_speculative_timesteps(ts, 2, 2, 0, [5])
    host.begin_speculation(spec_t)
    dev.begin_speculation(spec_t)
    g = torch.Generator().manual_seed(1)
    # dyadic attention values: sums and orders exact in float on both sides
    for s in range(len(spec_t)):
        att = torch.randint(1, 64, (batch * tokens,), generator=g).float() / 64
        host.record_speculation(s, att)
        dev.record_speculation(s, att.cuda())
    for k in range(steps):
        count = host.plan_step(k, float(ts[k]))
        assert dev.plan_step(k, float(ts[k])) == count
        att = torch.randint(1, 64, (batch * tokens,), generator=g).float() / 64
        computed = torch.randn(batch * count, dim, generator=g)
        if count == tokens:
            out_h = computed.clone()
            host.complete_step_in_place(out_h, att)
            out_d = computed.cuda()
            dev.complete_step_in_place(out_d, att.cuda())
        else:
            ids_h = np.sort(host.compute_tokens().reshape(batch, count), axis=1)
            ids_d = np.sort(dev.compute_tokens(count).cpu().numpy(), axis=1)
            np.testing.assert_array_equal(ids_d, ids_h)
            out_h = torch.empty(batch * tokens, dim)
            host.complete_step(computed, out_h, att)
            out_d = torch.empty(batch * tokens, dim, device="cuda")
            dev.complete_step(computed.cuda(), out_d, att.cuda())
        torch.testing.assert_close(out_d.cpu(), out_h, rtol=1e-5, atol=1e-6)
    dev.check_status()


def test_device_accelerator_refuses_cpu_and_wrong_dtype_tensors_by_name():
    require_gpu()
    tokens, batch, steps, dim = 16, 2, 4, 8
    dev = _core.device_forecast_accelerator(tokens, batch, steps, dim, 2, 1, "latest", 1, True, _stream())
    dev.plan_step(0, 1000.0)
    with pytest.raises(ValueError, match="^output: not a CUDA tensor"):
        dev.complete_step_in_place(torch.zeros(batch * tokens, dim), None)
    with pytest.raises(ValueError, match="^output: dtype is not float32"):
        dev.complete_step_in_place(torch.zeros(batch * tokens, dim, device="cuda", dtype=torch.float16), None)
    with pytest.raises(ValueError, match="^output: not C-contiguous"):
        dev.complete_step_in_place(torch.zeros(dim, batch * tokens, device="cuda").t(), None)
    dev.complete_step_in_place(torch.zeros(batch * tokens, dim, device="cuda"), None)  # the accelerator is usable after the refusals
    dev.check_status()
