"""autocast="bf16"|"fp16": the score network in reduced precision, the solver state in float32.

Tolerances are measured errors with a margin of about 3x (CPU autocast, torch 2.13, 2-core AMD EPYC VM; the
digits model, 8 test digits, t* = 0.1). Purification max |error| in [0, 1], bf16 / fp16: 2.9e-3 / 4.3e-4 (Euler, 20
steps), 2.5e-3 / 3.9e-4 (DDPM, 10 steps), 2.2e-3 / 3.4e-4 (Euler, dt = 1e-3: 100 steps, not run here: 30 s on 2
cores); one network call's eps error 3.5% / 0.37% of max |eps|; the exact gradient's relative error 3.6e-3 /
6.3e-4 (Euler, 10 steps). Steps are few to keep the CPU tests short: errors do not grow with the step count here.
"""

import pytest
import torch

import diffpure_fast as dpf
from diffpure_fast.data.digits import load_digits_dataset
from diffpure_fast.models.base import AutocastModel, with_autocast
from diffpure_fast.testing.nets import tiny_score_model

PURIFY_TOL = {"bf16": 1e-2, "fp16": 2e-3}
EPS_TOL = {"bf16": 0.1, "fp16": 0.015}  # of max |eps|


@pytest.fixture(scope="module")
def digits():
    x, _ = load_digits_dataset("test")
    return dpf.load_score_model("digits"), x[:8]


@pytest.mark.parametrize("mode", ["bf16", "fp16"])
def test_eps_in_reduced_precision_returned_in_the_state_dtype(digits, one_thread, mode):
    model, x = digits
    t = torch.full((x.shape[0],), 0.05)
    wrapped = AutocastModel(model, mode)
    assert wrapped.in_channels == model.in_channels and wrapped.image_size == model.image_size
    assert list(wrapped.parameters()) == list(model.parameters())
    with torch.no_grad():
        ref = model.eps(x * 2 - 1, t)
        got = wrapped.eps(x * 2 - 1, t)
    assert got.dtype == torch.float32
    assert 0 < (got - ref).abs().max() <= EPS_TOL[mode] * ref.abs().max()


@pytest.mark.parametrize("mode", ["bf16", "fp16"])
@pytest.mark.parametrize("opts", [dict(t_star=0.1, steps=20), dict(t_star=0.1, solver="ddpm", steps=10)],
                         ids=["euler", "ddpm"])
def test_purify_with_autocast_close_to_float32(digits, one_thread, mode, opts):
    model, x = digits
    ref = dpf.purify(x, model, seed=0, **opts)
    got = dpf.purify(x, model, seed=0, autocast=mode, **opts)
    assert got.dtype == torch.float32
    assert (got - ref).abs().max() <= PURIFY_TOL[mode]


def test_exact_gradient_through_autocast(digits, one_thread):
    model, x = digits
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    grads = []
    for mode in (None, "bf16"):
        xg = x.clone().requires_grad_(True)
        out = dpf.purify(xg, model, seed=0, t_star=0.1, steps=10, grad_mode="full", autocast=mode)
        grads.append(torch.autograd.grad((out * w).sum(), xg)[0])
    assert grads[1].dtype == torch.float32
    assert (grads[1] - grads[0]).norm() <= 1e-2 * grads[0].norm()


def test_autocast_none_is_the_model_itself():
    model = tiny_score_model()
    assert with_autocast(model, None) is model
    x = torch.rand(2, 3, 6, 5)
    assert torch.equal(dpf.purify(x, model, seed=1, t_star=0.01), dpf.purify(x, model, seed=1, t_star=0.01,
                                                                                  autocast=None))


@pytest.mark.parametrize("bad", ["f16", "bfloat16", torch.bfloat16, True])
def test_autocast_bad_value(bad):
    with pytest.raises(ValueError, match="autocast: expected one of"):
        dpf.PurifyConfig.build(autocast=bad)
    with pytest.raises(ValueError, match="autocast: expected one of"):
        AutocastModel(tiny_score_model(), bad)


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["bf16", "fp16"])
def test_cuda_autocast_close_to_cpu_float32(digits, mode):
    """The GPU autocast path against the CPU float32 reference, to the CPU autocast tolerance."""
    model, x = digits
    ref = dpf.purify(x, model, seed=0, t_star=0.1)
    gpu = dpf.load_score_model("digits", device="cuda")
    got = dpf.purify(x.cuda(), gpu, seed=0, t_star=0.1, autocast=mode)
    graphed = [dpf.purify(x.cuda(), gpu, seed=0, t_star=0.1, autocast=mode, cuda_graph=True) for _ in range(2)]
    assert got.dtype == torch.float32
    assert (got.cpu() - ref).abs().max() <= PURIFY_TOL[mode]
    assert torch.equal(graphed[0], got) and torch.equal(graphed[1], got)
