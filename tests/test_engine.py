"""purify against torchsde on identical noise, replay, batch invariance, solver convergence, bad input."""

import math

import numpy as np
import pytest
import torch

import diffpure_fast as dpf
from diffpure_fast.engine import Noise, forward_diffuse, reverse_solve
from diffpure_fast.schedule import DIFFPURE_SCHEDULE
from diffpure_fast.solvers import reverse_time_grid
from diffpure_fast.testing.nets import GaussianEps, TinyEpsNet, tiny_score_model

TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def _increments(t_star, shape, dtype, seed=0):
    grid = torch.from_numpy(reverse_time_grid(t_star, 1e-3, np.float64 if dtype == torch.float64 else np.float32))
    h = (grid[1:] - grid[:-1]).to(torch.float64)
    g = torch.Generator().manual_seed(seed)
    dw = torch.randn((len(h), *shape), generator=g, dtype=torch.float64) * h.sqrt().reshape(-1, 1, 1, 1, 1)
    return grid, dw.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("t_star", [0.1, 0.0375])
def test_purify_matches_torchsde_euler(torchsde_ref, dtype, t_star):
    model = tiny_score_model(dtype=dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.rand((3, 3, 6, 5), generator=g, dtype=dtype) * 2 - 1
    z = torch.randn(x.shape, generator=g, dtype=dtype)
    grid, dw = _increments(t_star, x.shape, dtype)
    ours = dpf.purify(x, model, t_star=t_star, forward_noise=z, increments=dw, value_range=(-1, 1))
    x_t = forward_diffuse(x, z, t_star, DIFFPURE_SCHEDULE)
    with torch.no_grad():
        ref = torchsde_ref.torchsde_purify(x_t, model, t_star, increments=dw, grid=grid)
    err = (ours - ref).abs().max().item()
    assert err <= TOL[dtype] * max(1.0, ref.abs().max().item()), err


def test_value_range_maps_like_diffpure():
    model = tiny_score_model()
    x = torch.rand(2, 3, 4, 4)
    kw = dict(seed=3, t_star=0.05)
    a = dpf.purify(x, model, **kw)
    b = (dpf.purify(x * 2 - 1, model, value_range=(-1, 1), **kw) + 1) / 2
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_same_seed_replays_bitwise_and_seeds_differ():
    model = tiny_score_model()
    x = torch.rand(2, 3, 5, 5)
    a = dpf.purify(x, model, seed=7, t_star=0.05)
    b = dpf.purify(x, model, seed=7, t_star=0.05)
    c = dpf.purify(x, model, seed=8, t_star=0.05)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3


def test_noise_does_not_depend_on_batch_composition():
    model = tiny_score_model()
    x = torch.rand(4, 3, 5, 5)
    full = dpf.purify(x, model, seed=11, t_star=0.05)
    ids = torch.tensor([2, 0])
    part = dpf.purify(x[ids], model, seed=11, t_star=0.05, noise_ids=ids)
    torch.testing.assert_close(part, full[ids], rtol=0, atol=1e-6)


def test_no_side_effects():
    model = tiny_score_model()
    x = torch.rand(2, 3, 4, 4, requires_grad=True)
    state = torch.get_rng_state()
    y = dpf.purify(x, model, t_star=0.02)
    assert torch.equal(state, torch.get_rng_state())
    assert not y.requires_grad  # grad_mode="none" builds no graph
    assert all(p.grad is None for p in model.parameters())


def test_purifier_module_equals_function():
    model = tiny_score_model()
    pur = dpf.Purifier(model, t_star=0.03, seed=5)
    x = torch.rand(2, 3, 4, 4)
    assert torch.equal(pur(x), dpf.purify(x, model, t_star=0.03, seed=5))
    pur.train()
    assert not pur.model.training
    assert "t_star=0.03" in repr(pur)


def test_ddpm_solver_runs_and_full_step_count():
    model = tiny_score_model()
    x = torch.rand(2, 3, 4, 4)
    cfg = dpf.PurifyConfig.build(t_star=0.1, solver="ddpm")
    assert len(cfg.plan()) == 100
    assert len(dpf.PurifyConfig.build(t_star=0.1, solver="ddpm", steps=10).plan()) == 10
    y = dpf.purify(x, model, t_star=0.1, solver="ddpm", steps=10, seed=0)
    assert y.shape == x.shape and torch.isfinite(y).all()


def test_ddpm_given_normals_match_hand_loop():
    model = tiny_score_model(dtype=torch.float64)
    x = torch.rand(2, 3, 4, 4, dtype=torch.float64) * 2 - 1
    z0 = torch.randn_like(x)
    plan = dpf.PurifyConfig.build(t_star=0.05, solver="ddpm", steps=7).plan()
    zs = torch.randn(len(plan), *x.shape, dtype=torch.float64)
    ours = dpf.purify(x, model, t_star=0.05, solver="ddpm", steps=7, forward_noise=z0, increments=zs,
                      value_range=(-1, 1))
    # Hand-written ancestral DDPM from the discrete schedule.
    ab = DIFFPURE_SCHEDULE.discrete_alpha_bar()
    levels = [int(v) for v in np.round(np.linspace(49, 0, 7))]
    y = math.sqrt(ab[49]) * x + math.sqrt(1 - ab[49]) * z0
    with torch.no_grad():
        for k, lk in enumerate(levels):
            ab_next = ab[levels[k + 1]] if k + 1 < len(levels) else torch.tensor(1.0, dtype=torch.float64)
            alpha = ab[lk] / ab_next
            t = torch.full((2,), float(np.float32((lk + 1) / 1000)), dtype=torch.float64)
            eps = model.eps(y, t)
            mean = (y - (1 - alpha) / torch.sqrt(1 - ab[lk]) * eps) / torch.sqrt(alpha)
            var = (1 - alpha) * (1 - ab_next) / (1 - ab[lk])
            y = mean + torch.sqrt(var) * zs[k]
    torch.testing.assert_close(ours, y, rtol=0, atol=1e-12)


def _linear_sde_endpoints(steps_coarse, refine, t_star, n_paths, seed):
    """EM on the Gaussian-data reverse SDE at two resolutions on the same Brownian path (float64)."""
    model = dpf.EpsModel(GaussianEps(DIFFPURE_SCHEDULE), time_input="unit")
    g = torch.Generator().manual_seed(seed)
    fine = dpf.PurifyConfig.build(t_star=t_star, dt=None, steps=steps_coarse * refine).plan(torch.float64)
    coarse = dpf.PurifyConfig.build(t_star=t_star, dt=None, steps=steps_coarse).plan(torch.float64)
    h = torch.tensor([(s.c_unit / s.c_increment) ** 2 for s in fine.steps], dtype=torch.float64)
    shape = (n_paths, 1, 1, 1)
    dw_fine = torch.randn((len(h), *shape), generator=g, dtype=torch.float64) * h.sqrt().reshape(-1, 1, 1, 1, 1)
    dw_coarse = dw_fine.reshape(steps_coarse, refine, *shape).sum(1)
    x_t = torch.randn(shape, generator=g, dtype=torch.float64) * math.sqrt(model.net.variance(t_star))
    with torch.no_grad():
        out_coarse = reverse_solve(x_t, model, coarse, Noise(increments=dw_coarse))
        out_fine = reverse_solve(x_t, model, fine, Noise(increments=dw_fine))
    return out_coarse, out_fine


def test_strong_convergence_on_linear_sde():
    # Additive noise: Euler–Maruyama has strong order 1; demand a fitted slope > 0.8.
    errs = []
    ns = [8, 16, 32, 64]
    for n in ns:
        coarse, ref = _linear_sde_endpoints(n, 256 // n * 4, 0.3, 2000, seed=0)
        errs.append((coarse - ref).pow(2).mean().sqrt().item())
    slope = -np.polyfit(np.log(ns), np.log(errs), 1)[0]
    assert slope > 0.8, (errs, slope)


def test_weak_convergence_of_the_variance_on_linear_sde():
    # The exact reverse solution keeps the marginal: Var x(1e-5) = v(1e-5). For this linear SDE the EM variance
    # follows exactly Var_{k+1} = (a + b sigma/v)^2 Var_k + c_unit^2, so the weak error is computed without
    # Monte Carlo noise; Euler–Maruyama has weak order 1: the error must halve (within 25%) as the step halves.
    gauss = GaussianEps(DIFFPURE_SCHEDULE)
    errs = []
    for n in [20, 40, 80, 160]:
        var = gauss.variance(0.3)
        for s in dpf.PurifyConfig.build(t_star=0.3, dt=None, steps=n).plan(torch.float64).steps:
            lin = s.a + s.b * DIFFPURE_SCHEDULE.sigma(s.t) / gauss.variance(s.t)
            var = lin * lin * var + s.c_unit ** 2
        errs.append(abs(var - gauss.variance(1e-5)))
    ratios = [errs[i] / errs[i + 1] for i in range(3)]
    assert all(1.5 < r < 2.5 for r in ratios[1:]), (errs, ratios)


@pytest.mark.parametrize("kwargs, match", [
    (dict(x=torch.rand(3, 4, 4)), "x: expected shape"),
    (dict(x=torch.randint(0, 2, (1, 3, 4, 4))), "x: expected a floating-point"),
    (dict(x=torch.rand(1, 3, 4, 4) + 1.5), "value_range"),
    (dict(x=torch.full((1, 3, 4, 4), float("nan"))), "NaN"),
    (dict(t_star=0.0), "t_star"),
    (dict(t_star=1.5), "t_star"),
    (dict(dt=-1e-3), "dt"),
    (dict(dt=0.0), "dt"),
    (dict(increments=torch.zeros(3, 1, 3, 4, 4)), "increments: expected shape"),
    (dict(forward_noise=torch.zeros(1, 3, 4, 5)), "forward_noise: expected shape"),
    (dict(forward_noise=torch.zeros(1, 3, 4, 4, dtype=torch.float64)), "forward_noise: expected dtype"),
    (dict(solver="heun"), "solver"),
    (dict(grad_mode="magic"), "grad_mode"),
    (dict(value_range=(1, 0)), "value_range"),
    (dict(seed=-1), "seed"),
    (dict(noise_ids=torch.tensor([0, 1])), "noise_ids"),
    (dict(model=torch.nn.Conv2d(3, 3, 1)), "model: expected a diffpure_fast ScoreModel"),
    (dict(surrogate_steps=0), "surrogate_steps"),
])
def test_bad_input_names_the_argument(kwargs, match):
    args = dict(x=torch.rand(1, 3, 4, 4), model=tiny_score_model(), t_star=0.01)
    args.update(kwargs)
    x, model = args.pop("x"), args.pop("model")
    with pytest.raises((ValueError, TypeError), match=match):
        dpf.purify(x, model, **args)


def test_model_channel_mismatch_is_named():
    model = tiny_score_model(channels=1)
    model.in_channels = 1
    with pytest.raises(ValueError, match="channels"):
        dpf.purify(torch.rand(1, 3, 4, 4), model, t_star=0.01)


# ---------------------------------------------------------------------------------------------------------------
# Issue 17: a network in training mode is refused (never switched), numeric options are honoured exactly or
# refused, the schedule follows the model.


class _DropoutEps(torch.nn.Module):
    """An epsilon network with dropout: random in training mode, a fixed function in eval mode."""

    def __init__(self):
        super().__init__()
        self.inner = TinyEpsNet(3, 8, seed=1)
        self.drop = torch.nn.Dropout(0.5)

    def forward(self, x, labels):
        return self.drop(self.inner(x, labels))


def test_score_network_in_training_mode_is_refused_and_eval_mode_is_deterministic():
    net = _DropoutEps()                                    # a fresh module: training mode, dropout active
    model = dpf.EpsModel(net, time_input="continuous")
    x = torch.rand(2, 3, 5, 5, requires_grad=True)
    kw = dict(t_star=0.05, steps=4, seed=3, grad_mode="full")
    with pytest.raises(ValueError, match=r"model: has a submodule in training mode \('net'\).*dropout.*"
                                         r"call model\.eval\(\) first"):
        dpf.purify(x, model, **kw)
    assert net.training                                    # refused, not switched
    net.eval()
    a, b = dpf.purify(x, model, **kw), dpf.purify(x, model, **kw)
    (ga,) = torch.autograd.grad(a.sum(), x)
    (gb,) = torch.autograd.grad(b.sum(), x)
    assert torch.equal(a, b) and torch.equal(ga, gb)
    # Purifier owns its network: eval mode at construction and after .train(); switched back, it is refused
    net.train()
    pur = dpf.Purifier(model, **kw)
    assert not net.training
    pur.train()
    assert torch.equal(pur(x), a)
    pur.model.train()
    with pytest.raises(ValueError, match="model: is in training mode"):
        pur(x)
    pur.model.eval()
    pur.model.net.drop.train()                             # one submodule in training mode is enough
    with pytest.raises(ValueError, match=r"model: has a submodule in training mode \('net\.drop'\)"):
        pur(x)


def test_classifier_in_training_mode_is_refused(tmp_path):
    from diffpure_fast.attacks import DefendedClassifier

    model = tiny_score_model()
    clf = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Dropout(0.5), torch.nn.Linear(48, 3))
    pur = dpf.Purifier(model, t_star=0.05, steps=2, grad_mode="full")
    with pytest.raises(ValueError, match=r"classifier: is in training mode.*call classifier\.eval\(\)"):
        DefendedClassifier(pur, clf)
    x, y = torch.rand(2, 3, 4, 4), torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"classifier: .*training mode"):
        dpf.evaluate(pur, clf, (x, y), tmp_path / "out", attack_steps=1, eot=1, n_eval=1, progress=False)
    assert not (tmp_path / "out").exists()              # refused before any work
    defended = DefendedClassifier(pur, clf.eval())
    clf[1].train()
    with pytest.raises(ValueError, match=r"classifier: has a submodule in training mode \('1'\)"):
        defended.logits(x, seed=0, noise_ids=torch.arange(2))
    model.net.train()
    with pytest.raises(ValueError, match=r"defense: .*training mode.*defense\.eval\(\)"):
        DefendedClassifier(pur, clf.eval())


def test_surrogate_steps_beyond_the_surrogate_level_is_an_error_not_a_cap():
    model = tiny_score_model()
    x = torch.rand(1, 3, 4, 4)
    # t* = 0.01: level 10; 20 surrogate steps were silently 10 (and recorded as 20)
    with pytest.raises(ValueError, match=r"surrogate_steps: expected at most 10.*level 10.*t_star=0\.01.*got 20"):
        dpf.purify(x, model, t_star=0.01, grad_mode="surrogate", surrogate_steps=20)
    with pytest.raises(ValueError, match=r"surrogate_steps: expected at most 5.*purify_step=5"):
        dpf.Purifier(model, method="gdmp", purify_step=5, max_iter=1, grad_mode="surrogate", surrogate_steps=20)
    cfg = dpf.Purifier(model, t_star=0.01, steps=4, grad_mode="surrogate", surrogate_steps=10).config
    assert len(cfg.surrogate_chain(torch.float32)) == 10
    assert cfg.resolved() == {"level": 10, "rounds": 1, "steps": 4, "surrogate_level": 10, "surrogate_steps": 10}


def test_rounded_and_derived_values_are_recorded_as_used():
    # DiffPure's level is round(N t*): rounded once, and the value used is in the description and the records
    cfg = dpf.PurifyConfig.build(t_star=0.1234)
    assert cfg.resolved() == {"level": 123, "rounds": 1, "steps": 124}
    assert "used: level 123, rounds 1, steps 124" in cfg.describe()
    from diffpure_fast.eval.defenses import describe_defense

    desc = describe_defense(dpf.Purifier(tiny_score_model(), method="gdmp", purify_step=6, max_iter=2))
    assert desc["resolved"] == {"level": 6, "rounds": 2, "steps": 12}
    # an option that would not be used is an error, never ignored
    with pytest.raises(ValueError, match="dt: give a step size dt or a step count steps, not both"):
        dpf.PurifyConfig.build(t_star=0.1, steps=20, dt=1e-3)
    with pytest.raises(ValueError, match="dt: solver='ddpm' walks discrete levels"):
        dpf.PurifyConfig.build(t_star=0.1, solver="ddpm", dt=5e-3)
    assert dpf.PurifyConfig.build(t_star=0.1, steps=20).options.dt is None     # the record says what ran
    assert dpf.PurifyConfig.build(t_star=0.1).options.dt == 1e-3
    with pytest.raises(ValueError, match="purify_step: expected at most 99 .*100 levels"):
        dpf.purify(torch.rand(1, 3, 4, 4), dpf.EpsModel(TinyEpsNet().eval(), schedule=dpf.VPSchedule(num_levels=100)),
                   method="gdmp", purify_step=120)


def test_schedule_follows_the_model_and_a_contradicting_one_is_refused():
    sched = dpf.VPSchedule(0.1, 10.0)
    own = dpf.EpsModel(TinyEpsNet().eval(), schedule=sched)
    x = torch.rand(2, 3, 4, 4)
    a = dpf.purify(x, own, t_star=0.1, steps=3, seed=0)
    assert torch.equal(a, dpf.purify(x, own, t_star=0.1, steps=3, seed=0, schedule=dpf.VPSchedule(0.1, 10)))
    assert dpf.Purifier(own, t_star=0.1).config.schedule == sched
    with pytest.raises(ValueError, match=r"schedule: .*beta_max=20.0.*contradicts the score model's own.*"
                                         r"beta_max=10.0"):
        dpf.purify(x, own, t_star=0.1, steps=3, schedule=dpf.DIFFPURE_SCHEDULE)
    with pytest.raises(ValueError, match="schedule"):
        dpf.Purifier(tiny_score_model(), schedule=sched)


def test_resize_belongs_to_the_defense():
    """resize="bilinear": DiffPure's ImageNet pipeline (224 -> 256, purify, 256 -> 224) inside purify, its gradient
    through both resizes, so an attack's budget stays in the input's space."""
    import torch.nn.functional as F

    from diffpure_fast._validate import OptionError

    def up_down(x, size, fn):
        return F.interpolate(fn(F.interpolate(x, size=(8, 8), mode="bilinear", align_corners=False)), size=size,
                             mode="bilinear", align_corners=False)

    model = tiny_score_model(dtype=torch.float64)
    model.image_size = 8
    opts = dict(t_star=0.05, steps=3, seed=3)
    x = torch.rand(2, 3, 6, 6, dtype=torch.float64)
    got = dpf.purify(x, model, resize="bilinear", **opts)
    assert got.shape == x.shape
    assert torch.equal(got, up_down(x, (6, 6), lambda u: dpf.purify(u, model, **opts)))
    x8 = torch.rand(2, 3, 8, 8, dtype=torch.float64)   # already the model's size: nothing resized
    assert torch.equal(dpf.purify(x8, model, resize="bilinear", **opts), dpf.purify(x8, model, **opts))
    with pytest.raises(OptionError, match=r"^x: the model was built for 8x8 images, got 6x6 \(pass resize='bilinear'"):
        dpf.purify(x, model, **opts)
    with pytest.raises(OptionError, match=r"^resize: expected one of \(None, 'bilinear'\)"):
        dpf.purify(x, model, resize="nearest", **opts)
    # exact gradient through the resizes: equals autograd through the composition written by hand
    for grad_mode in ("full", "bpda"):
        pur = dpf.Purifier(model, grad_mode=grad_mode, resize="bilinear", **opts)
        inner = dpf.Purifier(model, grad_mode=grad_mode, **opts)
        a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        (pur(a) ** 2).sum().backward()
        (up_down(b, (6, 6), inner) ** 2).sum().backward()
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)
    assert "inputs resized (bilinear) to the model's size and back" in pur.config.describe()
    assert "resize='bilinear'" in repr(pur)
