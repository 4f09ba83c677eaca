"""The few-step solvers (ddim, dpm-solver, dpm-solver++, heun): each update against an independent transcription of
its paper's formula, the agreements the papers state, exact gradients against autograd, and their options' errors.

The transcriptions below are written from the papers, not from the package: their own time grids (the logSNR grid
inverted by root finding, not by the closed form of ``solvers.grids``), their own alpha/sigma, and the update as the
paper writes it (x0 prediction, D_i, midpoints). The networks are float64 and the noise is given, so agreement is
to rounding (1e-10 relative).
"""

import math
import re

import numpy as np
import pytest
import torch
from scipy.optimize import brentq

import diffpure_fast as dpf
from diffpure_fast.cli import main as cli_main
from diffpure_fast.schedule import DIFFPURE_SCHEDULE as S
from diffpure_fast.solvers.ddpm import respaced_levels
from diffpure_fast.testing.chain_reference import autograd_chain
from diffpure_fast.testing.memory import PeakMemoryCounter
from diffpure_fast.testing.nets import tiny_score_model

T_END = 1e-5
F64 = torch.float64


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# ---- the papers' quantities, written here ------------------------------------------------------------------------


def abar(t):
    return math.exp(-0.5 * t * t * (S.beta_max - S.beta_min) - t * S.beta_min)


def lam(t):  # half log-SNR log(alpha / sigma)
    return 0.5 * math.log(abar(t) / (1.0 - abar(t)))


def t_of_lam(v):  # inverted numerically: independent of the closed form in solvers.grids
    return brentq(lambda t: lam(t) - v, 1e-9, 1.0, xtol=1e-15, rtol=1e-15)


def grid(t0, n, kind):
    if kind == "uniform":
        return list(np.linspace(t0, T_END, n + 1))
    if kind == "quadratic":
        return [float(v) ** 2 for v in np.linspace(t0 ** 0.5, T_END ** 0.5, n + 1)]
    lams = np.linspace(lam(t0), lam(T_END), n + 1)
    return [t0] + [t_of_lam(v) for v in lams[1:-1]] + [T_END]


def eps_fn(model, x, t):
    return model.eps(x, torch.full((x.shape[0],), t, dtype=x.dtype))


def start(x, z, t_star):
    """DiffPure's forward diffusion (discrete alpha_bar at level round(N t*) - 1), x in [0, 1]."""
    ab = S.discrete_alpha_bar()[S.level_of(t_star) - 1].item()
    return (x * 2 - 1) * ab ** 0.5 + z * (1 - ab) ** 0.5


def ddim_ref(model, x, t_star, n, kind, eta, zs):
    """Song et al. 2021, eq. 12 with sigma of eq. 16 (times eta), on the continuous schedule."""
    ts = grid(t_star, n, kind)
    for k, (t, s) in enumerate(zip(ts[:-1], ts[1:])):
        e = eps_fn(model, x, t)
        a_t, a_s = abar(t), abar(s)
        x0 = (x - (1 - a_t) ** 0.5 * e) / a_t ** 0.5
        sig = eta * ((1 - a_s) / (1 - a_t)) ** 0.5 * (1 - a_t / a_s) ** 0.5
        x = a_s ** 0.5 * x0 + (1 - a_s - sig ** 2) ** 0.5 * e + sig * zs[k]
    return x


def dpm_solver_ref(model, x, t_star, n, kind, order):
    """Lu et al. 2022, Algorithm 1 (DPM-Solver-2, r1 = 1/2) and eq. 3.7 (DPM-Solver-1)."""
    ts = grid(t_star, n, kind)
    for t, s in zip(ts[:-1], ts[1:]):
        h = lam(s) - lam(t)
        if order == 1:
            x = (abar(s) / abar(t)) ** 0.5 * x - (1 - abar(s)) ** 0.5 * math.expm1(h) * eps_fn(model, x, t)
            continue
        m = t_of_lam(lam(t) + h / 2)
        u = (abar(m) / abar(t)) ** 0.5 * x - (1 - abar(m)) ** 0.5 * math.expm1(h / 2) * eps_fn(model, x, t)
        x = (abar(s) / abar(t)) ** 0.5 * x - (1 - abar(s)) ** 0.5 * math.expm1(h) * eps_fn(model, u, m)
    return x


def dpm_solver_pp_ref(model, x, t_star, n, kind):
    """Lu et al. 2022b, Algorithm 2 (DPM-Solver++(2M)), the last step first order below 10 steps (the official
    sampler's lower_order_final)."""
    ts = grid(t_star, n, kind)
    x0_prev = None
    for i in range(n):
        t, s = ts[i], ts[i + 1]
        x0 = (x - (1 - abar(t)) ** 0.5 * eps_fn(model, x, t)) / abar(t) ** 0.5
        h = lam(s) - lam(t)
        if x0_prev is None or (n < 10 and i == n - 1):
            d = x0
        else:
            r = (lam(t) - lam(ts[i - 1])) / h
            d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev
        x = ((1 - abar(s)) / (1 - abar(t))) ** 0.5 * x - abar(s) ** 0.5 * math.expm1(-h) * d
        x0_prev = x0
    return x


def _setup(seed=0, shape=(2, 3, 5, 4)):
    g = torch.Generator().manual_seed(seed)
    model = tiny_score_model(dtype=F64)
    x = torch.rand(shape, generator=g, dtype=F64)
    z = torch.randn(shape, generator=g, dtype=F64)
    return model, x, z


# ---- updates against the papers ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["uniform", "logSNR", "quadratic"])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_matches_the_paper(kind, eta):
    model, x, z = _setup()
    n, t_star = 4, 0.1
    zs = torch.randn((n, *x.shape), dtype=F64, generator=torch.Generator().manual_seed(1))
    kw = dict(increments=zs) if eta > 0 else {}
    ours = dpf.purify(x, model, t_star=t_star, solver="ddim", steps=n, eta=eta, time_grid=kind, forward_noise=z,
                      value_range=(0, 1), **kw)
    ref = (ddim_ref(model, start(x, z, t_star), t_star, n, kind, eta, zs) + 1) / 2
    assert rel(ours, ref) < 1e-10


@pytest.mark.parametrize("kind", ["uniform", "logSNR", "quadratic"])
@pytest.mark.parametrize("order", [1, 2])
def test_dpm_solver_matches_algorithm_1(kind, order):
    model, x, z = _setup()
    n, t_star = 3, 0.1
    ours = dpf.purify(x, model, t_star=t_star, solver="dpm-solver", order=order, steps=n * order, time_grid=kind,
                      forward_noise=z)
    ref = (dpm_solver_ref(model, start(x, z, t_star), t_star, n, kind, order) + 1) / 2
    assert rel(ours, ref) < 1e-10


@pytest.mark.parametrize("kind", ["uniform", "logSNR", "quadratic"])
@pytest.mark.parametrize("n", [1, 4, 12])
def test_dpm_solver_pp_matches_algorithm_2(kind, n):
    model, x, z = _setup()
    t_star = 0.1
    ours = dpf.purify(x, model, t_star=t_star, solver="dpm-solver++", steps=n, time_grid=kind, forward_noise=z)
    ref = (dpm_solver_pp_ref(model, start(x, z, t_star), t_star, n, kind) + 1) / 2
    assert rel(ours, ref) < 1e-10


def test_heun_matches_torchsde_heun(torchsde_ref):
    """torchsde's method="heun" on DiffPure's reverse SDE (additive noise: Stratonovich = Ito), same increments."""
    import torchsde

    model, x, z = _setup()
    t_star, n = 0.05, 5
    s_grid = torch.tensor([1 - t for t in np.linspace(t_star, T_END, n + 1)], dtype=F64)
    h = s_grid[1:] - s_grid[:-1]
    dw = torch.randn((n, *x.shape), dtype=F64, generator=torch.Generator().manual_seed(2))
    dw = dw * h.sqrt().reshape(-1, 1, 1, 1, 1)
    # ours: one increment per network call, the corrector's entries (odd k) multiplied by zero
    inc = torch.zeros((2 * n, *x.shape), dtype=F64)
    inc[0::2] = dw
    ours = dpf.purify(x, model, t_star=t_star, solver="heun", steps=2 * n, forward_noise=z, increments=inc)

    class StratonovichRevVPSDE(torchsde_ref.RevVPSDE):
        sde_type = "stratonovich"

    sde = StratonovichRevVPSDE(model, x.shape[1:])
    bm = torchsde_ref.ReplayBrownian(s_grid, dw)
    x_t = start(x, z, t_star)
    ys = torchsde.sdeint(sde, x_t.flatten(1), s_grid[[0, -1]], method="heun", dt=float(h[0]), bm=bm)
    ref = (ys[-1].view_as(x) + 1) / 2
    assert rel(ours, ref) < 1e-10
    # and the corrector's increments are not read: other values there change nothing
    inc[1::2] = 7.0
    again = dpf.purify(x, model, t_star=t_star, solver="heun", steps=2 * n, forward_noise=z, increments=inc)
    assert torch.equal(ours, again)


def test_ddim_eta_1_on_the_levels_grid_is_the_ddpm_solver():
    """Song et al. 2021 (after eq. 16): eta = 1 gives the DDPM posterior, so DDIM on the ddpm solver's respaced
    levels equals it step for step, given the same normals."""
    model, x, z = _setup()
    for steps in (7, 20):
        inc = torch.randn((steps, *x.shape), dtype=F64, generator=torch.Generator().manual_seed(steps))
        kw = dict(t_star=0.05, steps=steps, forward_noise=z, increments=inc)
        ddim = dpf.purify(x, model, solver="ddim", eta=1.0, time_grid="levels", **kw)
        ddpm = dpf.purify(x, model, solver="ddpm", **kw)
        assert rel(ddim, ddpm) < 1e-12
        assert respaced_levels(50, steps)[-1] == 0
    # and with counter noise (same seed, same draws)
    a = dpf.purify(x, model, t_star=0.05, steps=9, solver="ddim", eta=1.0, time_grid="levels", seed=3)
    b = dpf.purify(x, model, t_star=0.05, steps=9, solver="ddpm", seed=3)
    assert rel(a, b) < 1e-12


def test_ddim_eta_0_is_dpm_solver_1():
    """Lu et al. 2022 (section 4.1): DPM-Solver-1 is DDIM; also true on every grid."""
    model, x, z = _setup()
    for kind in ("uniform", "logSNR"):
        a = dpf.purify(x, model, solver="ddim", steps=6, time_grid=kind, forward_noise=z)
        b = dpf.purify(x, model, solver="dpm-solver", order=1, steps=6, time_grid=kind, forward_noise=z)
        assert rel(a, b) < 1e-12


def test_orders_converge_on_a_known_ode():
    """For data x0 ~ N(0, s0^2), eps is known in closed form and the probability-flow ODE is linear: DDIM's error
    falls about 2x per doubling of steps (first order), DPM-Solver-2's and ++'s about 4x (second order)."""
    from diffpure_fast.models.base import EpsModel
    from diffpure_fast.testing.nets import GaussianEps

    model = EpsModel(GaussianEps(S, s0=0.5), time_input="unit")
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(1, 1, 8, 8, generator=g, dtype=F64)
    t0, t1 = 0.5, T_END
    # exact flow of the linear ODE: x(t) = x(t0) sqrt(v(t) / v(t0)), v = abar s0^2 + 1 - abar
    def var(t):
        return abar(t) * 0.25 + 1 - abar(t)

    exact = x_t * math.sqrt(var(t1) / var(t0))
    # start the chains at x_t itself: no forward noise (forward_noise = x_t / sqrt(1 - abar), x = 1/2 gives 0)
    ab = S.discrete_alpha_bar()[S.level_of(t0) - 1].item()
    fw = x_t / (1 - ab) ** 0.5
    x = torch.full_like(x_t, 0.5)

    def err(solver, steps, **kw):
        out = dpf.purify(x, model, t_star=t0, solver=solver, steps=steps, time_grid="logSNR", forward_noise=fw,
                         value_range=(0, 1), **kw)
        return ((out * 2 - 1) - exact).abs().max().item()

    r1 = err("ddim", 8) / err("ddim", 16)
    r2 = err("dpm-solver", 16, order=2) / err("dpm-solver", 32, order=2)
    r3 = err("dpm-solver++", 16) / err("dpm-solver++", 32)   # >= 10 steps: no first-order last step
    assert 1.6 < r1 < 2.6, r1
    assert r2 > 3.2, r2
    assert r3 > 3.0, r3


# ---- exact gradients ----------------------------------------------------------------------------------------------

GRAD_CASES = {
    "ddim": dict(solver="ddim", steps=4, eta=0.5),
    "ddim-levels": dict(solver="ddim", steps=4, eta=1.0, time_grid="levels"),
    "dpm-solver-1": dict(solver="dpm-solver", steps=3, order=1, time_grid="logSNR"),
    "dpm-solver-2": dict(solver="dpm-solver", steps=6, order=2),
    "dpm-solver++": dict(solver="dpm-solver++", steps=5, time_grid="quadratic"),
    "dpm-solver++-12": dict(solver="dpm-solver++", steps=12),
    "heun": dict(solver="heun", steps=6),
}


@pytest.mark.parametrize("case", sorted(GRAD_CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_full_gradient_matches_autograd(case, dtype):
    kw = dict(t_star=0.05, **GRAD_CASES[case])
    g = torch.Generator().manual_seed(1)
    model = tiny_score_model(dtype=dtype)
    x = torch.rand(2, 3, 5, 4, generator=g, dtype=dtype)
    w = torch.randn(x.shape, generator=g, dtype=dtype)
    xg = x.clone().requires_grad_(True)
    out = dpf.purify(xg, model, seed=3, grad_mode="full", **kw)
    (g_full,) = torch.autograd.grad((out * w).sum(), xg)
    xa = x.clone().requires_grad_(True)
    ref = autograd_chain(xa, model, dpf.PurifyConfig.build(**kw), seed=3)
    (g_auto,) = torch.autograd.grad((ref * w).sum(), xa)
    assert torch.allclose(out.detach(), ref.detach(), rtol=0, atol=1e-12 if dtype == F64 else 1e-5)
    assert rel(g_full, g_auto) <= (1e-6 if dtype == F64 else 1e-4)
    # the same gradient with every step's graph kept from the forward pass
    xc = x.clone().requires_grad_(True)
    (g_cached,) = torch.autograd.grad((dpf.purify(xc, model, seed=3, grad_mode="full", grad_cache_steps=100, **kw)
                                       * w).sum(), xc)
    assert rel(g_cached, g_full) <= (1e-12 if dtype == F64 else 1e-6)


@pytest.mark.parametrize("case", ["dpm-solver-2", "dpm-solver++", "heun", "ddim"])
def test_gradcheck_small_network(case):
    model = tiny_score_model(channels=1, hidden=4, dtype=F64)
    x = (torch.rand(2, 1, 3, 3, dtype=F64) * 0.8 + 0.1).requires_grad_(True)
    kw = dict(GRAD_CASES[case], t_star=0.02)

    def f(inp):
        return dpf.purify(inp, model, seed=1, grad_mode="full", **kw)

    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_bpda_and_surrogate_with_a_new_solver():
    model, x, _ = _setup()
    w = torch.randn(x.shape, dtype=F64)
    kw = dict(t_star=0.05, solver="dpm-solver++", steps=5, seed=2)
    value = dpf.purify(x, model, **kw)
    xb = x.clone().requires_grad_(True)
    out = dpf.purify(xb, model, grad_mode="bpda", **kw)
    (gb,) = torch.autograd.grad((out * w).sum(), xb)
    assert torch.allclose(out.detach(), value, rtol=0, atol=1e-14) and torch.allclose(gb, w)
    xs = x.clone().requires_grad_(True)
    out = dpf.purify(xs, model, grad_mode="surrogate", surrogate_steps=4, **kw)
    (gs,) = torch.autograd.grad((out * w).sum(), xs)
    xd = x.clone().requires_grad_(True)
    ddpm = dpf.purify(xd, model, grad_mode="full", t_star=0.05, solver="ddpm", steps=4, seed=2)
    (gd,) = torch.autograd.grad((ddpm * w).sum(), xd)
    assert torch.equal(out.detach(), value) and rel(gs, gd) < 1e-12


def test_full_memory_stays_flat_with_history_terms():
    """The history term costs no stored activations: from 10 to 40 steps the peak grows by the stored states
    only (as for Euler, tests/test_grad.py)."""
    model = tiny_score_model(hidden=32)
    x = torch.rand(4, 3, 16, 16)
    state = x.numel() * x.element_size()

    def peak(steps):
        xg = x.clone().requires_grad_(True)
        with PeakMemoryCounter() as counter:
            dpf.purify(xg, model, t_star=0.2, solver="dpm-solver++", steps=steps, seed=0, grad_mode="full").sum(
            ).backward()
        return counter.peak

    p10, p40 = peak(10), peak(40)
    assert p40 - p10 <= 1.1 * 30 * state, (p10, p40, state)


# ---- options and their errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw, option, text", [
    (dict(solver="ddim"), "steps", "needs a step count"),
    (dict(solver="ddim", steps=4, dt=1e-2), "dt", "not a step size"),
    (dict(solver="ddim", steps=4, eta=1.5), "eta", "<= 1.0"),
    (dict(solver="ddim", steps=4, eta=True), "eta", "finite float"),
    (dict(solver="euler", eta=0.5), "eta", "not an option of solver='euler'"),
    (dict(solver="ddpm", time_grid="uniform"), "time_grid", "not an option of solver='ddpm'"),
    (dict(solver="dpm-solver++", steps=4, order=2), "order", "not an option of solver='dpm-solver++'"),
    (dict(solver="dpm-solver", steps=4, order=3), "order", "(1, 2)"),
    (dict(solver="dpm-solver", steps=4, order=2.0), "order", "never rounded"),
    (dict(solver="dpm-solver", steps=5), "steps", "multiple of 2"),
    (dict(solver="heun", steps=7), "steps", "multiple of 2"),
    (dict(solver="dpm-solver++", steps=4, time_grid="levels"), "time_grid", "takes one of"),
    (dict(solver="ddim", steps=4, time_grid="linear"), "time_grid", "takes one of"),
    (dict(solver="ddim", steps=4, time_grid=3), "time_grid", "expected a str"),
    (dict(solver="ddim", steps=200, time_grid="levels"), "steps", "at most 100"),
    (dict(solver="heun", steps=4, grad_mode="adjoint"), "grad_mode", "solver='euler'"),
])
def test_option_errors_name_the_option(kw, option, text):
    with pytest.raises(ValueError, match=re.escape(text)) as info:
        dpf.PurifyConfig.build(**kw)
    assert info.value.option == option


def test_options_are_recorded_as_used():
    cfg = dpf.PurifyConfig.build(solver="dpm-solver", steps=4)
    assert (cfg.options.order, cfg.options.time_grid, cfg.options.eta) == (2, "uniform", None)
    assert "order=2, time_grid='uniform'" in cfg.describe() and "eta" not in cfg.describe()
    assert cfg.resolved()["steps"] == 4
    assert "eta" not in dpf.PurifyConfig.build().describe()


def test_cli_purify_with_new_solvers_and_flag_errors(tmp_path, capsys):
    x = np.random.default_rng(0).random((2, 1, 16, 16)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    base = ["purify", "--model", "digits", "--input", str(tmp_path / "x.npy"), "--t-star", "0.05"]
    assert cli_main([*base, "--output", str(tmp_path / "a.npy"), "--solver", "dpm-solver++", "--steps", "3",
                     "--time-grid", "logSNR"]) == 0
    assert cli_main([*base, "--output", str(tmp_path / "b.npy"), "--solver", "ddim", "--steps", "3", "--eta",
                     "0.5"]) == 0
    ref = dpf.purify(torch.from_numpy(x), dpf.load_score_model("digits"), t_star=0.05, solver="dpm-solver++",
                     steps=3, time_grid="logSNR", seed=0)
    assert np.allclose(np.load(tmp_path / "a.npy"), ref.numpy(), atol=1e-6)
    capsys.readouterr()
    for extra, msg in ((["--solver", "ddim"], "--steps: --solver ddim needs a step count (network calls), e.g. "
                        "--steps 10"),
                       (["--solver", "ddim", "--steps", "3", "--order", "2"],
                        "--order: not an option of --solver ddim"),
                       (["--solver", "heun", "--steps", "3"], "--steps: --solver heun makes 2 network calls"),
                       (["--solver", "euler", "--eta", "0.3"], "--eta: not an option of --solver euler"),
                       (["--solver", "ddim", "--steps", "2", "--eta", "3"], "--eta: expected a value <= 1.0")):
        assert cli_main([*base, "--output", str(tmp_path / "c.npy"), *extra]) == 2
        assert msg in capsys.readouterr().err
