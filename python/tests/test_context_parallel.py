"""The forecast under diffusers' context parallelism (FluxTransformer2DModel.enable_parallelism with Ulysses over two
CPU processes, gloo): its full steps are diffusers' own sharded forward, the forecast steps run on every rank from the
gathered output, so two ranks give one process's images; the token- and step-level methods, which run the blocks
themselves, are refused by name; enable_parallelism after enable() is refused at the call."""
import json
import os
import socket
import subprocess
import sys
import pathlib

import pytest
import torch

HERE = pathlib.Path(__file__).resolve().parent
TOL = 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks_result(tmp_path_factory):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this torch build")
    out = tmp_path_factory.mktemp("cp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(HERE / "context_parallel_worker.py"), str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, f"torch.distributed.run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_diffusers_context_parallel_matches_one_process(ranks_result):
    """The harness itself: diffusers' Ulysses forward on two ranks gives one process's plain loop."""
    for r in ranks_result:
        assert r["ranks"] == 2
        assert r["plain_cp_vs_one"] < TOL


def test_forecast_under_context_parallelism_matches_one_process(ranks_result):
    for r in ranks_result:
        print(f"forecast: two ranks vs one process relative L2 {r['forecast_cp_vs_one']:.3g} "
              f"(forecast vs plain {r['forecast_vs_plain']:.3g}); model calls {r['calls_cp']} (one process {r['calls_one']})")
        assert r["finite"]
        assert r["forecast_cp_vs_one"] < TOL
        assert r["forecast_vs_plain"] > 100 * TOL  # it did forecast
        assert r["calls_cp"] == r["calls_one"] < 28
        assert r["ranks_equal"]
        assert r["disable_restores"]


def test_other_methods_and_late_parallelism_are_refused(ranks_result):
    for r in ranks_result:
        assert "config: SpecDiffConfig under diffusers' enable_parallelism() is not supported" in r["token_level"]
        assert "enable_parallelism() came after specdiff's enable()" in r["late_enable_parallelism"]
