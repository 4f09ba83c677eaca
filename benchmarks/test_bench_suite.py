"""The micro-benchmarks as a pytest-benchmark suite: the fused step per implementation and size, one network call,
one purification per grad_mode. Host-side wall time (pytest-benchmark's timer); on CUDA every timed callable
synchronises, so a round covers the GPU work too.

    pytest benchmarks --benchmark-only --benchmark-json=benchmarks/results/micro_cpu.json   # (make bench-suite)
    DPF_BENCH_SIZES=1M,16M pytest benchmarks --benchmark-only -k sde_step                   # larger steps only

Defaults are small (fused step on 64K and 1M float32 elements on CPU; purifications on the digits model) so that the
whole suite takes one to two minutes on the 2-core VM; bench_sde_step.py / bench_purify.py / bench_grad.py remain
the committed, interleaved measurements. On a GPU the fused step runs on tensors 4x and 16x its L2 (64M and 256M
elements on an H200: 64K and 1M would sit in its 60 MB L2 and time the cache, not DRAM). Plain ``pytest`` does not
collect this folder.
"""

from __future__ import annotations

import os

import pytest
import torch

import diffpure_fast as dpf
from benchmarks.bench_purify import bench_model
from benchmarks.bench_sde_step import beyond_l2_sizes, parse_sizes, providers

PROVIDERS = ("torch_randn", "torch_z", "reference", "cpp", "cpp_z", "cuda", "cuda_z", "triton", "triton_z")
# The device as conftest's fixture picks it (parametrisation happens before fixtures exist).
_DEVICE = torch.device(os.environ.get("DPF_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
SIZES = (parse_sizes(os.environ["DPF_BENCH_SIZES"]) if os.environ.get("DPF_BENCH_SIZES")
         else beyond_l2_sizes(_DEVICE, 4) if _DEVICE.type == "cuda" else parse_sizes("64K,1M"))
GRAD_MODES = ("none", "bpda", "full", "adjoint", "surrogate")


def _synced(fn, device: torch.device):
    if device.type != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return run


@pytest.mark.parametrize("size", SIZES, ids=lambda n: f"{n // 1024}K")
@pytest.mark.parametrize("provider", PROVIDERS)
def test_sde_step(benchmark, device, provider, size):
    g = torch.Generator().manual_seed(0)
    per_sample = 4096 if size % 4096 == 0 else size
    x, eps, z = (torch.randn(size // per_sample, per_sample, generator=g).to(device) for _ in range(3))
    ids = torch.arange(x.shape[0], device=device)
    available = providers(x, eps, z, ids, with_reference=True)
    if provider not in available:
        pytest.skip(f"{provider} is not available on {device.type}")
    fn, tensors = available[provider]
    benchmark.group = f"sde_step {size // 1024}K float32 {device.type}"
    benchmark.extra_info.update(bytes_moved=tensors * size * 4, elements=size)
    benchmark(_synced(fn, device))


@pytest.mark.parametrize("net", ["ncsnpp_2.5M", "digits"])
def test_network_call(benchmark, device, net):
    model = bench_model(device) if net == "ncsnpp_2.5M" else dpf.load_score_model("digits", device=device)
    shape = (3, 32, 32) if net == "ncsnpp_2.5M" else (1, 16, 16)
    x = torch.rand(4, *shape, generator=torch.Generator().manual_seed(0)).to(device) * 2 - 1
    t = torch.full((4,), 0.05, device=device)
    benchmark.group = f"network call, batch 4, {device.type}"

    def call():
        with torch.no_grad():
            return model.eps(x, t)

    benchmark.pedantic(_synced(call, device), rounds=10, warmup_rounds=1)


@pytest.mark.parametrize("grad_mode", GRAD_MODES)
def test_purify(benchmark, device, grad_mode):
    """One purification (digits model, batch 4, t* = 0.1: 100 Euler steps) and, with a gradient mode, its backward
    pass for <w, purify(x)>."""
    model = dpf.load_score_model("digits", device=device)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 16, 16, generator=g).to(device)
    w = torch.randn(x.shape, generator=g).to(device)
    benchmark.group = f"purify digits batch 4, 100 steps, {device.type}"
    benchmark.extra_info["steps"] = 100

    def run():
        if grad_mode == "none":
            with torch.no_grad():
                return dpf.purify(x, model, seed=0, t_star=0.1)
        xg = x.clone().requires_grad_(True)
        out = dpf.purify(xg, model, seed=0, t_star=0.1, grad_mode=grad_mode)
        return torch.autograd.grad((out * w).sum(), xg)[0]

    result = benchmark.pedantic(_synced(run, device), rounds=3, warmup_rounds=1)
    assert torch.isfinite(result).all()
