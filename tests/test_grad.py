"""Gradients through purification: exact discrete adjoint against autograd and torchsde, the continuous adjoint
against torchsde's sdeint_adjoint, BPDA, surrogate, memory, determinism and misuse."""

import numpy as np
import pytest
import torch

import diffpure_fast as dpf
from diffpure_fast.engine import Noise, PurifyConfig, forward_diffuse, reverse_solve
from diffpure_fast.grad import differentiable_reverse_solve
from diffpure_fast.schedule import DIFFPURE_SCHEDULE
from diffpure_fast.solvers import reverse_time_grid
from diffpure_fast.testing.memory import PeakMemoryCounter
from diffpure_fast.testing.nets import tiny_score_model

# Relative-error bounds of the issue: float64 1e-6, float32 1e-4.
REL = {torch.float64: 1e-6, torch.float32: 1e-4}


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def _autograd_purify(x, model, *, t_star, seed, solver="euler"):
    """The same purification as ``dpf.purify(x, model, seed=seed)`` run as a plain autograd graph (the reference)."""
    ids = torch.arange(x.shape[0])
    z = dpf.noise.sample_noise(seed, ids, 0, dpf.noise.STREAM_FORWARD, x)
    x_t = forward_diffuse(x * 2 - 1, z, t_star, DIFFPURE_SCHEDULE)
    plan = PurifyConfig.build(t_star=t_star, solver=solver).plan(x.dtype)
    return (reverse_solve(x_t, model, plan, Noise(seed=seed, sample_ids=ids)) + 1) / 2


def _setup(dtype, t_star=0.03, shape=(2, 3, 5, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    model = tiny_score_model(dtype=dtype)
    x = torch.rand(shape, generator=g, dtype=dtype)
    w = torch.randn(shape, generator=g, dtype=dtype)  # loss weights: L = <w, purify(x)>
    return model, x, w


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("solver", ["euler", "ddpm"])
def test_full_matches_plain_autograd(dtype, solver):
    model, x, w = _setup(dtype)
    kw = dict(t_star=0.03, seed=3, solver=solver)
    xg = x.clone().requires_grad_(True)
    (g_full,) = torch.autograd.grad((dpf.purify(xg, model, grad_mode="full", **kw) * w).sum(), xg)
    # Plain autograd through the same solver: the loop run with a graph.
    xa = x.clone().requires_grad_(True)
    out = _autograd_purify(xa, model, t_star=0.03, seed=3, solver=solver)
    (g_auto,) = torch.autograd.grad((out * w).sum(), xa)
    assert rel_err(g_full, g_auto) <= REL[dtype]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_full_matches_torchsde_sdeint_autograd(torchsde_ref, dtype):
    model, x, w = _setup(dtype, t_star=0.02)
    t_star = 0.02
    grid = torch.from_numpy(reverse_time_grid(t_star, 1e-3, np.float64 if dtype == torch.float64 else np.float32))
    h = (grid[1:] - grid[:-1]).to(dtype)
    dw = torch.randn((len(h), *x.shape), dtype=dtype, generator=torch.Generator().manual_seed(9))
    dw = dw * h.sqrt().reshape(-1, 1, 1, 1, 1)
    x_t = (x * 2 - 1).requires_grad_(True)
    ours = dpf.purify(x_t, model, t_star=t_star, forward_noise=torch.zeros_like(x), increments=dw,
                      value_range=(-1, 1), grad_mode="full")
    ab = DIFFPURE_SCHEDULE.discrete_alpha_bar()[DIFFPURE_SCHEDULE.level_of(t_star) - 1].item()
    (g_ours,) = torch.autograd.grad((ours * w).sum(), x_t)
    x_t2 = (x * 2 - 1).requires_grad_(True)
    ref = torchsde_ref.torchsde_purify(x_t2 * ab ** 0.5, model, t_star, increments=dw, grid=grid.to(dtype))
    (g_ref,) = torch.autograd.grad((ref * w).sum(), x_t2)
    assert rel_err(ours.detach(), ref.detach()) <= REL[dtype]
    assert rel_err(g_ours, g_ref) <= REL[dtype]


def test_adjoint_matches_torchsde_sdeint_adjoint(torchsde_ref, capsys):
    import torchsde

    dtype = torch.float64
    model, x, w = _setup(dtype)
    t_star, b = 0.03, x.shape[0]
    ts = torchsde_ref.torchsde_ts(t_star, dtype=dtype)
    bm = torchsde.BrownianInterval(t0=ts[0], t1=ts[-1], size=(b, x[0].numel()), dtype=dtype, entropy=5)
    grid = reverse_time_grid(t_star, 1e-3, np.float64)
    dw = torchsde_ref.forward_increments(bm, grid, x)
    x_t = x * 2 - 1
    # torchsde's adjoint, parameters frozen (adjoint_params=()).
    y0 = x_t.clone().requires_grad_(True)
    ref = torchsde_ref.torchsde_purify(y0, model, t_star, bm=bm, adjoint=True, adjoint_params=())
    (g_ref,) = torch.autograd.grad((ref * w).sum(), y0)
    # Ours, on the same Brownian path.
    cfg = PurifyConfig.build(t_star=t_star, grad_mode="adjoint")
    y1 = x_t.clone().requires_grad_(True)
    walker = torchsde_ref.TorchsdeBrownianWalker
    out = differentiable_reverse_solve(y1, model, cfg.plan(dtype), Noise(seed=0, sample_ids=torch.arange(b),
                                       increments=dw), cfg, x_in=y1,
                                       brownian_factory=lambda grid, noise, like: walker(bm, like))
    (g_adj,) = torch.autograd.grad((out * w).sum(), y1)
    # The exact gradient of the same discrete computation, for contrast.
    y2 = x_t.clone().requires_grad_(True)
    cfg_full = PurifyConfig.build(t_star=t_star, grad_mode="full")
    out_full = differentiable_reverse_solve(y2, model, cfg_full.plan(dtype), Noise(increments=dw), cfg_full, x_in=y2)
    (g_full,) = torch.autograd.grad((out_full * w).sum(), y2)
    err = rel_err(g_adj, g_ref)
    cos = torch.nn.functional.cosine_similarity(g_adj.flatten(), g_ref.flatten(), dim=0).item()
    err_full = rel_err(g_adj, g_full)
    cos_full = torch.nn.functional.cosine_similarity(g_adj.flatten(), g_full.flatten(), dim=0).item()
    with capsys.disabled():
        print(f"\n[adjoint vs torchsde sdeint_adjoint] rel err {err:.3e}, cosine {cos:.9f}"
              f"\n[adjoint vs exact discrete gradient]  rel err {err_full:.3e}, cosine {cos_full:.6f}")
    # Same algorithm (Euler on the augmented state, same shifted backward grid), same Brownian path, float64:
    # only summation order differs, so agreement to ~1e-12 is expected; 1e-8 leaves room for BLAS differences.
    assert err < 1e-8 and cos > 1 - 1e-12
    assert torch.allclose(out.detach(), ref.detach(), atol=1e-12)
    # The continuous adjoint is an O(dt) approximation of the exact gradient: close, but not equal.
    assert cos_full > 0.99 and err_full > 1e-9


def test_gradcheck_full_float64():
    model = tiny_score_model(channels=1, hidden=4, dtype=torch.float64)
    # Inside [0.1, 0.9] so that the finite-difference probes stay within value_range (0, 1).
    x = (torch.rand(2, 1, 3, 3, dtype=torch.float64) * 0.8 + 0.1).requires_grad_(True)

    def f(inp):
        return dpf.purify(inp, model, t_star=0.004, seed=1, grad_mode="full")

    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_gradients_deterministic_and_no_param_grads():
    model, x, w = _setup(torch.float32)
    grads = []
    for _ in range(2):
        xg = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad((dpf.purify(xg, model, t_star=0.02, seed=4, grad_mode="full") * w).sum(), xg)
        grads.append(g)
    assert torch.equal(grads[0], grads[1])
    xg = x.clone().requires_grad_(True)
    (dpf.purify(xg, model, t_star=0.02, seed=4, grad_mode="full") * w).sum().backward()
    assert xg.grad is not None
    assert all(p.grad is None for p in model.parameters())


def test_grad_cache_steps_give_identical_gradients():
    model, x, w = _setup(torch.float64)
    out = []
    for cache in (0, 5, 1000):
        xg = x.clone().requires_grad_(True)
        y = dpf.purify(xg, model, t_star=0.02, seed=4, grad_mode="full", grad_cache_steps=cache)
        out.append(torch.autograd.grad((y * w).sum(), xg)[0])
    assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[2])


def test_bpda_is_identity_backward_with_purified_value():
    model, x, w = _setup(torch.float32)
    xg = x.clone().requires_grad_(True)
    y = dpf.purify(xg, model, t_star=0.02, seed=2, grad_mode="bpda")
    assert torch.allclose(y, dpf.purify(x, model, t_star=0.02, seed=2), atol=1e-6)
    (g,) = torch.autograd.grad((y * w).sum(), xg)
    torch.testing.assert_close(g, w, rtol=0, atol=1e-6)


def test_surrogate_value_is_defended_output_and_gradient_is_ddpm_chain():
    model, x, w = _setup(torch.float64)
    xg = x.clone().requires_grad_(True)
    y = dpf.purify(xg, model, t_star=0.03, seed=6, grad_mode="surrogate", surrogate_steps=5)
    torch.testing.assert_close(y.detach(), dpf.purify(x, model, t_star=0.03, seed=6), rtol=0, atol=1e-12)
    (g_sur,) = torch.autograd.grad((y * w).sum(), xg)
    xr = x.clone().requires_grad_(True)
    y_ddpm = dpf.purify(xr, model, t_star=0.03, seed=6, solver="ddpm", steps=5, grad_mode="full")
    (g_ddpm,) = torch.autograd.grad((y_ddpm * w).sum(), xr)
    torch.testing.assert_close(g_sur, g_ddpm, rtol=1e-10, atol=1e-12)


def _peak_bytes(steps, grad_mode, x, model):
    xg = x.clone().requires_grad_(True)
    with PeakMemoryCounter() as counter:
        y = dpf.purify(xg, model, t_star=steps / 1000 + 1e-5, seed=0, grad_mode=grad_mode)
        if grad_mode != "none":
            y.sum().backward()
    return counter.peak


def test_full_memory_does_not_grow_with_steps_beyond_stored_states():
    model = tiny_score_model(hidden=32)
    x = torch.rand(4, 3, 16, 16)
    state = x.numel() * x.element_size()
    full_10, full_40 = _peak_bytes(10, "full", x, model), _peak_bytes(40, "full", x, model)
    none_10 = _peak_bytes(10, "none", x, model)
    # Growth from 10 to 40 steps: at most the 30 extra stored states (plus 10% slack for allocator noise).
    assert full_40 - full_10 <= 1.1 * 30 * state, (full_10, full_40, state)
    # Plain autograd keeps every step's activations: it must grow far more (the 10x claim is benchmarked).
    xg = x.clone().requires_grad_(True)
    with PeakMemoryCounter() as counter:
        _autograd_purify(xg, model, t_star=0.04001, seed=0).sum().backward()
    assert counter.peak > 3 * full_40, (counter.peak, full_40)
    assert none_10 < full_10


@pytest.mark.parametrize("method, opts", [
    ("diffpure", dict(t_star=0.1, steps=4, dt=None)),
    ("diffpure", dict(t_star=0.02, solver="ddpm", steps=5, dt=None)),
    ("gdmp", dict(purify_step=3, max_iter=2)),          # two rounds, guidance differentiated in the recompute
])
def test_exposed_states_gradient_equals_autograd_float64(method, opts):
    # Purifier.trajectory returns chosen intermediate states from the exact adjoint; a loss on the output and on the
    # states has the gradient of plain autograd through the same chain (DiffAttack's loss reads the states).
    from diffpure_fast.testing.chain_reference import autograd_chain

    model = tiny_score_model(dtype=torch.float64)
    x = torch.rand(2, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    pur = dpf.Purifier(model, method=method, seed=3, grad_mode="full", **opts)
    xg = x.clone().requires_grad_(True)
    tr = pur.trajectory(xg, every=1)
    chain = pur.config.chain(torch.float64)
    assert tr.steps == tuple(r.first_step + j for r in chain.rounds for j in range(1, len(r.plan)))
    w = torch.randn_like(x)
    ws = [torch.randn_like(s) for s in tr.states]
    (g_full,) = torch.autograd.grad((tr.output * w).sum() + sum((s * v).sum() for s, v in zip(tr.states, ws)), xg)
    xa = x.clone().requires_grad_(True)
    out, states = autograd_chain(xa, model, pur.config, seed=3, keep_states=True)
    (g_auto,) = torch.autograd.grad((out * w).sum() + sum((states[k] * v).sum() for k, v in zip(tr.steps, ws)), xa)
    assert all(torch.equal(states[k].detach(), s.detach()) for k, s in zip(tr.steps, tr.states))
    assert ((g_full - g_auto).norm() / g_auto.norm()).item() <= 1e-10
    # every other state, and the states' marginals: the continuous alpha_bar(t) of an Euler step, the discrete one
    # of a DDPM level
    tr2 = pur.trajectory(x, every=2)
    assert tr2.steps == tuple(r.first_step + j for r in chain.rounds for j in range(2, len(r.plan), 2))
    steps = [st for r in chain.rounds for st in r.plan.steps]
    for k, ab in zip(tr.steps, tr.alpha_bar):
        want = (DIFFPURE_SCHEDULE.alpha_bar(steps[k].t) if steps[k].level is None
                else DIFFPURE_SCHEDULE.discrete_alpha_bar()[steps[k].level].item())
        assert ab == pytest.approx(want, rel=1e-12)


def test_exposed_states_refused_without_exact_gradient():
    model, x, _ = _setup(torch.float32)
    for mode in ("bpda", "adjoint"):
        pur = dpf.Purifier(model, t_star=0.02, seed=1, grad_mode=mode)
        with pytest.raises(ValueError, match="grad_mode"):
            pur.trajectory(x.clone().requires_grad_(True))
    with pytest.raises(ValueError, match="every"):
        dpf.Purifier(model, t_star=0.02, seed=1).trajectory(x, every=0)


def test_backward_after_in_place_change_is_an_error():
    model, x, w = _setup(torch.float32)
    xg = x.clone().requires_grad_(True)
    leaf = xg * 1.0  # a non-leaf input the caller then modifies in place
    y = dpf.purify(leaf, model, t_star=0.02, seed=1, grad_mode="full")
    with torch.no_grad():
        leaf.mul_(0.5)
    with pytest.raises(RuntimeError, match="the input x was modified in place"):
        y.sum().backward()
    y = dpf.purify(x.clone().requires_grad_(True), model, t_star=0.02, seed=1, grad_mode="full")
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    with pytest.raises(RuntimeError, match="score-network parameter"):
        y.sum().backward()


def test_bad_grad_arguments():
    model, x, _ = _setup(torch.float32)
    with pytest.raises(ValueError, match="surrogate_steps"):
        dpf.purify(x, model, t_star=0.02, grad_mode="surrogate", surrogate_steps=0)
    with pytest.raises(ValueError, match="grad_mode"):
        dpf.purify(x.requires_grad_(True), model, t_star=0.02, grad_mode="adjoint", solver="ddpm")
    with pytest.raises(ValueError, match="grad_cache_steps"):
        dpf.purify(x, model, t_star=0.02, grad_mode="full", grad_cache_steps=-1)


def test_bridged_brownian_hits_the_forward_path_and_has_bridge_variance():
    from diffpure_fast.grad import BridgedBrownian
    from diffpure_fast.grad.continuous_adjoint import backward_time_grid

    t_star, n = 0.02, 20000
    grid = reverse_time_grid(t_star, 1e-3, np.float64)
    like = torch.zeros(n, 1, 1, 1, dtype=torch.float64)
    noise = Noise(seed=3, sample_ids=torch.arange(n))
    # At forward grid points, W (relative to W(s_n) = 0) is minus the sum of the later forward increments.
    walker = BridgedBrownian(grid, noise, like)
    h = np.diff(grid)
    incs = [dpf.noise.sample_noise(3, noise.sample_ids, k, dpf.noise.STREAM_REVERSE, like) * float(np.sqrt(h[k]))
            for k in range(len(h))]
    for k in range(len(grid) - 1, -1, -1):
        expected = -sum(incs[k:], torch.zeros_like(like))
        torch.testing.assert_close(walker.value(grid[k]), expected, rtol=0, atol=1e-12)
    # On the shifted backward grid: the increments telescope to the whole path, and a point inside a forward
    # interval has the Brownian-bridge variance (s - a)(b - s)/(b - a) around the linear interpolation.
    walker = BridgedBrownian(grid, noise, like)
    bgrid = backward_time_grid(t_star, 1e-3, np.float64)
    values = [walker.value(s) for s in bgrid]
    torch.testing.assert_close(values[-1] - values[0], -sum(incs, torch.zeros_like(like)), rtol=0, atol=1e-12)
    s = bgrid[1]
    k = int(np.searchsorted(grid, s)) - 1
    a, b = grid[k], grid[k + 1]
    w_a, w_b = -sum(incs[k:], torch.zeros_like(like)), -sum(incs[k + 1:], torch.zeros_like(like))
    resid = values[1] - (w_a + (s - a) / (b - a) * (w_b - w_a))
    var = (s - a) * (b - s) / (b - a)
    assert abs(resid.var().item() / var - 1) < 0.05  # 20000 samples: the sample variance is within ~2%


def test_param_grads_on_request_match_plain_autograd():
    model, x, w = _setup(torch.float64)
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    xg = x.clone().requires_grad_(True)
    y = dpf.purify(xg, model, t_star=0.02, seed=2, grad_mode="full", param_grads=True, grad_cache_steps=3)
    g_x, *g_p = torch.autograd.grad((y * w).sum(), (xg, *params))
    xa = x.clone().requires_grad_(True)
    out = _autograd_purify(xa, model, t_star=0.02, seed=2)
    r_x, *r_p = torch.autograd.grad((out * w).sum(), (xa, *params))
    assert rel_err(g_x, r_x) <= 1e-6
    for a, b in zip(g_p, r_p):
        assert rel_err(a, b) <= 1e-6
    with pytest.raises(ValueError, match="param_grads"):
        dpf.purify(x, model, t_star=0.02, grad_mode="adjoint", param_grads=True)
