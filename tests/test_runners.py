"""DiffPure's four other official runners (``diffusion_type`` ode, ldsde, ddpm, celebahq-ddpm): each chain against an
independent step-by-step transcription of the official update, the ODE against torchdiffeq itself (``odeint`` and
``odeint_adjoint``: outputs, time grids and both gradients), exact gradients against plain autograd through the same
chain (float64) and gradcheck, the LD-SDE's path through x_in, SDEdit's UNet loader, and option errors."""

import math
from argparse import Namespace

import numpy as np
import pytest
import torch

import diffpure_fast as dpf
from diffpure_fast.chain import forward_diffuse
from diffpure_fast.config import PurifyConfig
from diffpure_fast.methods.diffpure import DiffPureOptions, LangevinAnchor, ODEOptions
from diffpure_fast.models.ddpm_unet import CELEBAHQ_DDPM_CONFIG, DDPMUNet
from diffpure_fast.noise import STREAM_FORWARD, STREAM_REVERSE, sample_noise
from diffpure_fast.schedule import DIFFPURE_SCHEDULE as S
from diffpure_fast.solvers.euler import reverse_time_grid
from diffpure_fast.solvers.ode import torchdiffeq_grid
from diffpure_fast.testing.chain_reference import autograd_chain
from diffpure_fast.testing.nets import tiny_score_model

# the references need torchsde and torchdiffeq (dev dependencies): without them (the GPU machine carries no
# torchdiffeq) this module skips at collection instead of failing it
torchdiffeq = pytest.importorskip("torchdiffeq")
torchsde = pytest.importorskip("torchsde")
from diffpure_fast.testing.runner_reference import guided_p_sample_loop, sdedit_loop, torchsde_ldsde  # noqa: E402
from diffpure_fast.testing.torchdiffeq_reference import torchdiffeq_purify  # noqa: E402
from diffpure_fast.testing.torchsde_reference import forward_increments, torchsde_ts  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# Small chains (a few steps each) for the gradient tests.
SMALL = {
    "ode": dict(t_star=0.008, step_size=1e-3),
    "ldsde": dict(t_star=0.05, dt=1e-2),
    "ddpm": dict(t_star=0.006),
    "celebahq-ddpm": dict(t_star=0.006),
    "celebahq-ddpm_large": dict(t_star=0.006, var_type="fixedlarge"),
}


def _kind(key):
    return key.split("_")[0]


def _model(key, dtype=torch.float64, hidden=8):
    return tiny_score_model(hidden=hidden, seed=1, dtype=dtype, learned_sigma=_kind(key) == "ddpm")


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def _x(dtype, b=2, c=3, size=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (0.2 + 0.6 * torch.rand(b, c, size, size, generator=g)).to(dtype)


# ---------------------------------------------------------------------------------------------------------------
# The ODE against torchdiffeq.


@pytest.mark.parametrize("t_star, step_size", [(0.1, 1e-3), (0.02, 1e-3), (0.015, 1e-3), (0.123, 1e-3), (0.5, 7e-3),
                                               (0.1, 1e-2), (0.2, 0.00159992)])
def test_ode_time_grids_are_torchdiffeqs(t_star, step_size):
    """The network-call times of the forward solve and of odeint_adjoint's backward solve, recorded from torchdiffeq
    itself (float32 times, as in DiffPure), against ours: a prefix (torchdiffeq keeps stepping past the output time
    when an earlier grid point rounds past it, then interpolates the output inside the interval that reached it)."""
    calls = []

    class F(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(0.5))

        def forward(self, t, states):
            calls.append(float(t.detach()))
            return (-states[0] * self.w,)

    y0 = torch.ones(1, 2, requires_grad=True)
    ts = torch.linspace(t_star, 1e-5, 2)
    out = torchdiffeq.odeint_adjoint(F(), (y0,), ts, method="euler", options=dict(step_size=step_size))
    forward_calls = list(calls)
    calls.clear()
    out[0][-1].sum().backward()
    plan = PurifyConfig.build(diffusion_type="ode", t_star=t_star, step_size=step_size).plan()
    ours = [s.t for s in plan.steps]
    assert ours == forward_calls[:len(ours)]
    back = torchdiffeq_grid(np.float32(1e-5), np.float32(t_star), step_size)
    assert [float(v) for v in back[:-1]] == calls[:len(back) - 1]
    assert back[-1] == np.float32(t_star)


def test_ode_grid_stops_where_torchdiffeq_returns():
    """t* = 0.2, step 0.00159992: in float32 the grid point 125 of 127 already reaches -1e-5, so torchdiffeq
    returns the solution interpolated inside interval 124-125 (and keeps stepping, unused); the plan stops there
    with one Euler step to the end (125 steps), and the outputs agree."""
    t_star, step = 0.2, 0.00159992
    assert len(torchdiffeq_grid(np.float32(-t_star), np.float32(-1e-5), step)) == 126
    model = _model("ode", torch.float32)
    x = _x(torch.float32)
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    y = dpf.purify(x, model, diffusion_type="ode", t_star=t_star, step_size=step, forward_noise=z)
    ref = (torchdiffeq_purify(forward_diffuse(x * 2 - 1, z, t_star, S), model, t_star, step_size=step) + 1) / 2
    assert (y - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ode_output_and_both_gradients_against_torchdiffeq(dtype):
    """purify(diffusion_type="ode") = torchdiffeq.odeint; grad_mode="full" = autograd through odeint (the exact
    gradient of the Euler steps); grad_mode="adjoint" = odeint_adjoint's gradient (the official one)."""
    tol = {torch.float64: 1e-10, torch.float32: 1e-5}[dtype]
    model = _model("ode", dtype)
    x, t_star = _x(dtype), 0.02
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    opts = dict(diffusion_type="ode", t_star=t_star, forward_noise=z, value_range=(-1, 1))
    xin = (x * 2 - 1).requires_grad_(True)
    grads = {}
    for mode in ("full", "adjoint"):
        y = dpf.purify(xin, model, grad_mode=mode, **opts)
        (grads[mode],) = torch.autograd.grad((y * w).sum(), xin)
    refs = {}
    for mode, adjoint in (("full", False), ("adjoint", True)):
        x_t = forward_diffuse(xin, z, t_star, S)
        ref = torchdiffeq_purify(x_t, model, t_star, adjoint=adjoint, adjoint_params=())
        (refs[mode],) = torch.autograd.grad((ref * w).sum(), xin)
    assert rel_err(y.detach(), ref.detach()) <= tol
    assert rel_err(grads["full"], refs["full"]) <= tol
    assert rel_err(grads["adjoint"], refs["adjoint"]) <= tol
    # Not the same gradient: the adjoint integrates the adjoint ODE on its own grid.
    assert rel_err(grads["adjoint"], grads["full"]) > 100 * tol


# ---------------------------------------------------------------------------------------------------------------
# Independent transcriptions of the official updates (counter noise in place of torch's RNG).


def _forward(x_in, level, seed):
    abar = S.discrete_alpha_bar()[level - 1].item()
    z = sample_noise(seed, torch.arange(x_in.shape[0]), 0, STREAM_FORWARD, x_in)
    return math.sqrt(abar) * x_in + math.sqrt(1 - abar) * z


def _counter(seed, b):
    """The engine's counter draw of step k (standard normals), as the official samplers' noise."""
    return lambda k, like: sample_noise(seed, torch.arange(b), k, STREAM_REVERSE, like)


def _increments(seed, x, t_star, dt):
    """Brownian increments on torchsde's grid from the counter generator (as the engine draws them)."""
    grid = reverse_time_grid(t_star, dt, np.float64 if x.dtype == torch.float64 else np.float32)
    return torch.stack([_counter(seed, x.shape[0])(k, x) * math.sqrt(float(grid[k + 1] - grid[k]))
                        for k in range(len(grid) - 1)])


def test_guided_ddpm_is_guided_diffusions_p_sample():
    model = _model("ddpm", torch.float32)
    x = _x(torch.float32)
    y = dpf.purify(x, model, diffusion_type="ddpm", t_star=0.012, seed=5)
    ref = guided_p_sample_loop(_forward(x * 2 - 1, 12, 5), model, 12, _counter(5, 2))
    assert (y - (ref + 1) / 2).abs().max().item() <= 1e-5


@pytest.mark.parametrize("var_type", ["fixedsmall", "fixedlarge"])
def test_celebahq_ddpm_is_sdedits_step(var_type):
    model = tiny_score_model(seed=1)
    model.time_input = "discrete"
    x = _x(torch.float32)
    y = dpf.purify(x, model, diffusion_type="celebahq-ddpm", t_star=0.01, var_type=var_type, seed=4)
    ref = sdedit_loop(_forward(x * 2 - 1, 10, 4), model, 10, _counter(4, 2), var_type)
    assert (y - (ref + 1) / 2).abs().max().item() <= 1e-5


def test_ldsde_is_the_official_langevin_sde():
    """purify(diffusion_type="ldsde") against torchsde.sdeint_adjoint on the official LDSDE, the same increments
    (the engine's own counter draws, and caller-given ones)."""
    model = tiny_score_model(seed=1)
    x = _x(torch.float32) * 2 - 1
    kw = dict(t_star=0.1, dt=1e-2, sigma2=1e-3, lambda_ld=1e-2, eta=5.0)
    y = dpf.purify(x, model, diffusion_type="ldsde", seed=7, value_range=(-1, 1), **kw)
    ref = torchsde_ldsde(x, model, dw=_increments(7, x, 0.1, 1e-2), **kw)
    assert (y - ref).abs().max().item() <= 1e-5
    dw = torch.randn(10, *x.shape, generator=torch.Generator().manual_seed(0)) * 0.1
    y = dpf.purify(x, model, diffusion_type="ldsde", increments=dw, value_range=(-1, 1), **kw)
    assert (y - torchsde_ldsde(x, model, dw=dw, **kw)).abs().max().item() <= 1e-5


# ---------------------------------------------------------------------------------------------------------------
# Exact gradients.


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("key", list(SMALL))
def test_full_gradient_is_autograd_through_the_chain(key, dtype):
    """grad_mode="full" (stored states, recomputed steps) equals plain autograd through the same chain: the ODE's
    Euler steps, the Langevin chain with its x_in path, the clipped DDPM chain with its learned variance."""
    model = _model(key, dtype)
    cfg = PurifyConfig.build("diffpure", diffusion_type=_kind(key), **SMALL[key])
    x = _x(dtype).requires_grad_(True)
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(4)).to(dtype)
    y = dpf.purify(x, model, diffusion_type=_kind(key), seed=3, grad_mode="full", **SMALL[key])
    (g,) = torch.autograd.grad((y * w).sum(), x)
    ref = autograd_chain(x, model, cfg, seed=3)
    (g_ref,) = torch.autograd.grad((ref * w).sum(), x)
    assert (y - ref).abs().max().item() <= {torch.float64: 1e-12, torch.float32: 1e-6}[dtype]
    assert rel_err(g, g_ref) <= {torch.float64: 1e-6, torch.float32: 1e-4}[dtype]


@pytest.mark.parametrize("key", ["ode", "ldsde", "ddpm", "celebahq-ddpm"])
def test_gradcheck(key):
    model = _model(key, torch.float64, hidden=4)
    x = _x(torch.float64, b=1, c=3, size=3).requires_grad_(True)

    def f(inp):
        return dpf.purify(inp, model, diffusion_type=_kind(key), seed=11, grad_mode="full", **SMALL[key])

    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_ldsde_gradient_carries_the_input_path(monkeypatch):
    """The input enters every Langevin step (the pull w_k x_in): the exact gradient equals autograd through
    torchsde.sdeint on the official LDSDE (x_in in the graph), and the same gradient without that path is far
    from it; so is the official one (sdeint_adjoint: x_in is not one of its adjoint parameters)."""
    model = tiny_score_model(seed=1, dtype=torch.float64)
    kw = dict(t_star=0.05, dt=1e-2, sigma2=1e-3, lambda_ld=1e-2, eta=5.0)
    x = (_x(torch.float64) * 2 - 1).requires_grad_(True)
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ts = torchsde_ts(0.05, dtype=torch.float64)
    bm = torchsde.BrownianInterval(t0=ts[0], t1=ts[-1], size=(2, x[0].numel()), dtype=torch.float64, entropy=3)
    dw = forward_increments(bm, reverse_time_grid(0.05, 1e-2, np.float64), x.detach())

    def grad(fn):
        return torch.autograd.grad((fn(x) * w).sum(), x)[0]

    def ours(v):
        return dpf.purify(v, model, diffusion_type="ldsde", increments=dw, grad_mode="full", value_range=(-1, 1),
                          **kw)

    g_ref = grad(lambda v: torchsde_ldsde(v, model, bm=bm, adjoint=False, **kw))
    assert rel_err(grad(ours), g_ref) <= 1e-6
    assert rel_err(grad(lambda v: torchsde_ldsde(v, model, bm=bm, **kw)), g_ref) > 0.1
    original = LangevinAnchor.term
    monkeypatch.setattr(LangevinAnchor, "term", lambda self, k, step, xk, eps, ref, noise, **kws:
                        original(self, k, step, xk, eps, ref.detach(), noise, **kws))
    assert rel_err(grad(ours), g_ref) > 0.1


def test_guided_ddpm_gradient_is_zero_through_active_clips():
    """Where the clip of x0 is active the output does not move with x0: at level 0 (t* = 0.001, one step; coef1 = 1,
    coef2 = 0) the output is the clipped x0 itself, so the exact gradient of the clipped outputs is zero (to
    rounding) with respect to every input pixel, and that of the others is not."""
    model = _model("ddpm", torch.float64)
    sign = torch.where(torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(3)) < 0.5, -1.0, 1.0)
    x = (0.999 * sign).to(torch.float64).requires_grad_(True)
    y = dpf.purify(x, model, diffusion_type="ddpm", t_star=0.001, seed=2, grad_mode="full", value_range=(-1, 1))
    clipped = (y.detach().abs() - 1.0).abs() <= 1e-12   # a x + b eps + coef1 (clip(x0) - x0): 1 to rounding
    assert 0 < int(clipped.sum()) < y.numel()
    (g_clipped,) = torch.autograd.grad((y * clipped).sum(), x, retain_graph=True)
    (g_free,) = torch.autograd.grad((y * ~clipped).sum(), x)
    assert g_clipped.abs().max().item() <= 1e-12 and g_free.abs().max().item() > 0.5


def test_surrogate_and_bpda_serve_every_runner():
    model = _model("ddpm", torch.float32)
    for kind, kw in (("ode", SMALL["ode"]), ("ldsde", SMALL["ldsde"]), ("ddpm", SMALL["ddpm"])):
        for mode in ("bpda", "surrogate"):
            x = _x(torch.float32).requires_grad_(True)
            y = dpf.purify(x, model, diffusion_type=kind, seed=1, grad_mode=mode, surrogate_steps=3, **kw)
            (g,) = torch.autograd.grad(y.sum(), x)
            assert torch.isfinite(g).all() and g.abs().sum() > 0
            if mode == "bpda":
                assert torch.equal(g, torch.ones_like(g))


# ---------------------------------------------------------------------------------------------------------------
# Options and errors.


@pytest.mark.parametrize("kwargs, match", [
    (dict(diffusion_type="ode", sigma2=1e-3), r"sigma2: not an option of method='diffpure' with diffusion_type='ode'"),
    (dict(diffusion_type="ode", dt=1e-3), r"dt: not an option of method='diffpure' with diffusion_type='ode'"),
    # eta is an option of the sde runner's DDIM solver, not of its default Euler solver
    (dict(diffusion_type="sde", eta=5.0), r"eta: not an option of solver='euler' \(it is an option of solver='ddim'"),
    (dict(diffusion_type="ddpm", steps=10), r"steps: not an option .* diffusion_type='ddpm'"),
    (dict(diffusion_type="celebahq-ddpm", step_size=1e-3), r"step_size: not an option"),
    (dict(diffusion_type="SDE"), r"diffusion_type: expected one of \('sde', 'ode', 'ldsde', 'ddpm', "),
    (dict(method="gdmp", diffusion_type="ode"), r"diffusion_type: not an option of method='gdmp'"),
    (dict(diffusion_type="ode", step_size=0.0), r"step_size: expected a value > 0"),
    (dict(diffusion_type="ode", t_star=0.0105), r"t_star: diffusion_type='ode' diffuses to the integer level"),
    (dict(diffusion_type="ddpm", t_star=0.0004), r"t_star: diffusion_type='ddpm' diffuses to the integer level"),
    (dict(diffusion_type="ldsde", t_star=1e-6), r"t_star: diffusion_type='ldsde' runs from t\* down to"),
    (dict(diffusion_type="ldsde", sigma2=0.0), r"sigma2: expected a value > 0"),
    (dict(diffusion_type="ldsde", lambda_ld=-1.0), r"lambda_ld: expected a value > 0"),
    (dict(diffusion_type="ldsde", eta=float("nan")), r"eta: expected a finite float"),
    (dict(diffusion_type="celebahq-ddpm", var_type="learned"), r"var_type: expected one of"),
    (dict(diffusion_type="ldsde", grad_mode="adjoint"), r"grad_mode: 'adjoint' with diffusion_type='ldsde'.*x_in"),
    (dict(diffusion_type="ddpm", grad_mode="adjoint"), r"grad_mode: 'adjoint' with diffusion_type='ddpm'"),
    (dict(diffusion_type="ldsde", guidance_grad="detached"), r"guidance_grad: method='diffpure' takes one of"),
])
def test_bad_options_name_themselves(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dpf.Purifier(_model("ddpm", torch.float32), **kwargs)


def test_options_classes_hold_their_runner():
    with pytest.raises(ValueError, match="diffusion_type: ODEOptions holds the options of diffusion_type='ode'"):
        ODEOptions(diffusion_type="sde")
    assert PurifyConfig(options=ODEOptions(t_star=0.02)).chain().rounds[0].plan.solver == "ode_euler"
    assert PurifyConfig().options == DiffPureOptions()
    assert "diffusion_type='ode'" in dpf.Purifier(_model("ode"), diffusion_type="ode").extra_repr()


def test_caller_noise_and_model_errors_name_the_argument():
    x = _x(torch.float32)
    plain, learned = _model("ode", torch.float32), _model("ddpm", torch.float32)
    with pytest.raises(ValueError, match="forward_noise: .*diffusion_type='ldsde'.* has no forward diffusion"):
        dpf.purify(x, plain, diffusion_type="ldsde", forward_noise=torch.zeros_like(x))
    with pytest.raises(ValueError, match="increments: .*diffusion_type='ode'.* takes no increments"):
        dpf.purify(x, plain, diffusion_type="ode", t_star=0.01, increments=torch.zeros(10, *x.shape))
    with pytest.raises(ValueError, match=r"increments: expected shape \(6, 2, 3, 6, 6\) \(one per solver step"):
        dpf.purify(x, learned, diffusion_type="ddpm", t_star=0.006, increments=torch.zeros(5, *x.shape))
    with pytest.raises(ValueError, match="model: diffusion_type='ddpm' .* learned variance"):
        dpf.purify(x, plain, diffusion_type="ddpm", t_star=0.006)
    plain.var_type = "fixedlarge"
    with pytest.raises(ValueError, match="var_type: the model's config says var_type='fixedlarge'"):
        dpf.purify(x, plain, diffusion_type="celebahq-ddpm", t_star=0.006)
    assert dpf.purify(x, plain, diffusion_type="celebahq-ddpm", t_star=0.006, var_type="fixedlarge").shape == x.shape


# ---------------------------------------------------------------------------------------------------------------
# SDEdit's DDPM UNet.


def _small_celebahq_config(**model):
    cfg = {k: dict(v) for k, v in CELEBAHQ_DDPM_CONFIG.items()}
    cfg["data"]["image_size"] = 16
    cfg["model"].update(ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[8], **model)
    return cfg


def test_celebahq_loader_reads_a_plain_state_dict_and_namespace_configs(tmp_path):
    cfg = _small_celebahq_config()
    net = DDPMUNet.from_config(cfg)
    path = tmp_path / "celeba_hq.ckpt"
    torch.save(net.state_dict(), path)
    ns = Namespace(**{k: Namespace(**v) for k, v in cfg.items()})   # DiffPure's dict2namespace
    model = dpf.load_score_model("celebahq_ddpm", path, ns)
    x, t = torch.rand(2, 3, 16, 16) * 2 - 1, torch.tensor([3, 700])
    with torch.no_grad():
        assert torch.equal(model.eps(x, t.float() / 1000, t), net.eval()(x, t))
    assert model.var_type == "fixedsmall" and model.image_size == 16 and model.in_channels == 3
    assert "nin_shortcut" in "".join(net.state_dict()) and "attn" in "".join(net.state_dict())


@pytest.mark.parametrize("change, match", [
    (lambda c: c["diffusion"].update(beta_schedule="quad"), r"config\['diffusion'\]\['beta_schedule'\]"),
    (lambda c: c["diffusion"].update(num_diffusion_timesteps=500),
     r"config\['diffusion'\]\['num_diffusion_timesteps'\]"),
    (lambda c: c["model"].update(var_type="learned"), r"config\['model'\]\['var_type'\]"),
    (lambda c: c["model"].pop("ch"), r"config\['model'\]\['ch'\]: missing"),
    (lambda c: c["model"].update(ch=64), r"shape mismatch"),
])
def test_celebahq_loader_errors_name_the_field(change, match):
    cfg = _small_celebahq_config()
    state = DDPMUNet.from_config(cfg).state_dict()
    change(cfg)
    with pytest.raises(ValueError, match=match):
        dpf.load_score_model("celebahq_ddpm", state, cfg)


def test_celebahq_loader_refuses_other_families():
    adm_keys = {"input_blocks.0.0.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="guided-diffusion .* use family='guided_diffusion'"):
        dpf.load_score_model("celebahq_ddpm", adm_keys)
    with pytest.raises(ValueError, match="score_sde .* use family='score_sde'"):
        dpf.load_score_model("celebahq_ddpm", {"model": {}, "ema": {}})


# ---------------------------------------------------------------------------------------------------------------
# The command line and the evaluation harness.


def test_cli_purify_with_each_runner_matches_the_python_api(tmp_path, capsys):
    from diffpure_fast.cli import main

    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    torch.save(x, tmp_path / "in.pt")
    model = dpf.load_score_model("digits")
    for kind, flags, kw in (("ode", ["--t-star", "0.02", "--dt", "0.005"], dict(t_star=0.02, step_size=0.005)),
                            ("ldsde", ["--t-star", "0.03", "--eta", "2"], dict(t_star=0.03, eta=2.0)),
                            ("celebahq-ddpm", ["--t-star", "0.005"], dict(t_star=0.005))):
        out = tmp_path / f"{kind}.pt"
        rc = main(["purify", "--model", "digits", "--input", str(tmp_path / "in.pt"), "--output", str(out),
                   "--seed", "2", "--no-progress", "--diffusion-type", kind, *flags])
        assert rc == 0, capsys.readouterr().err
        ref = dpf.purify(x, model, diffusion_type=kind, seed=2, noise_ids=[0, 1], **kw)
        assert torch.allclose(torch.load(out), ref, atol=1e-6)


@pytest.mark.parametrize("argv, match", [
    (["--diffusion-type", "ode", "--steps", "3"], "--steps: not an option of --diffusion-type ode (its flags: "
                                                  "--t-star, --dt)"),
    (["--diffusion-type", "ode", "--dt", "-1"], "--dt: expected a value > 0"),
    (["--diffusion-type", "ldsde", "--solver", "ddpm"], "--solver: not an option of --diffusion-type ldsde"),
    (["--sigma2", "0.1"], "--sigma2: not an option of --diffusion-type sde"),
    (["--diffusion-type", "ldsde", "--lambda-ld", "0"], "--lambda-ld: expected a value > 0"),
    (["--diffusion-type", "ode", "--t-star", "0.0105"], "--t-star: --diffusion-type ode diffuses to the integer"),
    (["--diffusion-type", "ddpm"], "--model: --diffusion-type ddpm (guided-diffusion's p_sample)"),
    (["--method", "gdmp", "--diffusion-type", "ode"], "--diffusion-type: an option of DiffPure"),
])
def test_cli_runner_errors_name_the_flag(tmp_path, capsys, argv, match):
    from diffpure_fast.cli import main

    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((1, 1, 16, 16), dtype=np.float32))
    rc = main(["purify", "--model", "digits", "--input", str(tmp_path / "x.npy"), "--output",
               str(tmp_path / "y.npy"), "--no-progress", *argv])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and match in err, err


def test_cli_eval_runs_a_runner_and_its_records_name_it(tmp_path):
    import json

    from diffpure_fast.cli import main

    out = tmp_path / "ode"
    assert main(["eval", "--diffusion-type", "ode", "--t-star", "0.02", "--dt", "0.005", "--grad-mode", "adjoint",
                 "--n-images", "2", "--batch-size", "2", "--attack-steps", "1", "--eot", "1", "--n-eval", "2",
                 "--eps", "0.1", "--threads", "1", "--quiet", "--output", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["defense"]["options"] == {"t_star": 0.02, "step_size": 0.005, "diffusion_type": "ode"}
    assert config["defense"]["grad_mode"] == "adjoint"
    assert (out / "report.md").read_text().startswith("# Evaluation: diffpure (ode) on digits:test")
    assert json.loads((out / "report.json").read_text())["n_samples"] == 2
