"""autocast="bf16"|"fp16": the score network in reduced precision, the solver state in float32.

Tolerances are measured errors with a margin of about 3x (CPU autocast, torch 2.13, 2-core AMD EPYC VM; the
digits model, 8 test digits, t* = 0.1). Purification max |error| in [0, 1], bf16 / fp16: 2.9e-3 / 4.3e-4 (Euler, 20
steps), 2.5e-3 / 3.9e-4 (DDPM, 10 steps), 2.2e-3 / 3.4e-4 (Euler, dt = 1e-3: 100 steps, not run here: 30 s on 2
cores); one network call's eps error 3.5% / 0.37% of max |eps|; the exact gradient's relative error 4.7e-3 /
6.4e-4 (Euler, 10 steps; torch 2.13 here, 3.6e-3 / 6.3e-4 measured earlier), and in fp16 5.8e-4 with the upstream
gradient scaled by 1e-6 (1.28 before the VJP's loss scaling, models.base.network_vjp). Steps are few to keep the CPU
tests short: errors do not grow with the step count here.
"""

import pytest
import torch

import diffpure_fast as dpf
from diffpure_fast.data.digits import load_digits_dataset
from diffpure_fast.models.base import AutocastModel, network_vjp, with_autocast
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


GRAD_TOL = {"bf16": 1e-2, "fp16": 2e-3}  # relative, of the float32 exact gradient


def _exact_gradients(model, x, w, modes, **kw):
    grads = []
    for mode in modes:
        xg = x.clone().requires_grad_(True)
        out = dpf.purify(xg, model, seed=0, t_star=0.1, steps=10, grad_mode="full", autocast=mode, **kw)
        grads.append(torch.autograd.grad((out * w).sum(), xg)[0])
    return grads


@pytest.fixture(scope="module")
def float32_gradient(digits):
    """(w, the float32 exact gradient of <w, purify(x)>): the reference of the reduced-precision gradients."""
    model, x = digits
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    return w, _exact_gradients(model, x, w, (None,))[0]


@pytest.mark.parametrize("mode, upstream", [("bf16", 1.0), ("fp16", 1e-6)])
def test_exact_gradient_through_autocast(digits, float32_gradient, one_thread, mode, upstream):
    """fp16 with the upstream gradient scaled by 1e-6 (an attack's per-pixel loss gradient): without the VJP's loss
    scaling it flushed to zero in the network's float16 backward pass (relative error 1.28 here; 5.8e-4 with it).
    The gradient is linear in w: the reference is the float32 one times the same factor."""
    model, x = digits
    w, ref = float32_gradient
    (got,) = _exact_gradients(model, x, w * upstream, (mode,))
    assert got.dtype == torch.float32
    assert (got - ref * upstream).norm() <= GRAD_TOL[mode] * (ref * upstream).norm()


def test_network_vjp_scales_only_float16_and_exactly():
    model = tiny_score_model()
    x = torch.randn(2, 3, 6, 5, requires_grad=True)
    t = torch.full((2,), 0.3)
    v = torch.randn(2, 3, 6, 5) * 1e-7
    for net in (model, AutocastModel(model, "bf16")):  # no scaling: torch.autograd.grad itself, bit for bit
        eps = net.eps(x, t)
        assert torch.equal(network_vjp(net, eps, x, v, retain_graph=True)[0], torch.autograd.grad(eps, x, v)[0])
    fp16 = AutocastModel(model, "fp16")
    (ref,) = torch.autograd.grad(model.eps(x, t), x, v)
    (raw,) = torch.autograd.grad(fp16.eps(x, t), x, v)
    (got,) = network_vjp(fp16, fp16.eps(x, t), x, v)
    assert (raw - ref).norm() > 0.5 * ref.norm()  # the flush this guards against
    assert (got - ref).norm() <= GRAD_TOL["fp16"] * ref.norm()
    # Several vectors share one scale, the parameters' VJPs are unscaled too, and a zero vector stays zero.
    params = list(model.parameters())
    eps = fp16.eps(x, t)
    got_x, *got_p = network_vjp(fp16, (eps, eps), (x, *params), (v, torch.zeros_like(v)))
    want_x, *want_p = torch.autograd.grad(model.eps(x, t), (x, *params), v)
    assert (got_x - want_x).norm() <= GRAD_TOL["fp16"] * want_x.norm()
    for g, w in zip(got_p, want_p):
        assert (g - w).norm() <= 1e-2 * w.norm() + 1e-30
    assert not network_vjp(fp16, fp16.eps(x, t), x, torch.zeros_like(v))[0].any()


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


@pytest.mark.cuda
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_cuda_fp16_exact_gradient_of_a_small_upstream_gradient(digits, float32_gradient, cuda_graph):
    """fp16 on the GPU (cuDNN's float16 kernels) with the upstream gradient scaled by 1e-6, eager and captured,
    against the CPU float32 exact gradient."""
    _, x = digits
    w, ref = float32_gradient
    gpu = dpf.load_score_model("digits", device="cuda")
    (got,) = _exact_gradients(gpu, x.cuda(), w.cuda() * 1e-6, ("fp16",), cuda_graph=cuda_graph)
    assert (got.cpu() - ref * 1e-6).norm() <= GRAD_TOL["fp16"] * (ref * 1e-6).norm()
