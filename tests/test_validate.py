"""One rule per kind of argument (diffpure_fast._validate) and optional packages (diffpure_fast._optional): the same
value is accepted or refused alike by every interface, and errors carry the keyword so each interface names it."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

import diffpure_fast as dpf
from diffpure_fast._optional import MissingDependency, missing_module, require
from diffpure_fast._validate import API, OptionError, OptionTypeError, Spelling, check_bool, check_float, check_int
from diffpure_fast.testing.nets import TinyAuxNet, tiny_score_model


def test_the_integer_rule():
    for v in (3, np.int64(3), np.int32(3), np.uint8(3)):
        assert check_int("n", v) == 3 and type(check_int("n", v)) is int
    for v in (True, np.bool_(True), 3.0, np.float64(3.0), "3", None, torch.tensor(3)):
        with pytest.raises(TypeError, match=r"n: expected an int >= 1, got"):
            check_int("n", v)
    with pytest.raises(ValueError, match=r"n: expected an int in \[1, 5\], got 6"):
        check_int("n", 6, high=5)
    with pytest.raises(TypeError, match="never rounded"):
        check_int("n", 20.0)
    assert check_float("f", np.float32(0.5)) == 0.5 and check_float("f", np.int64(2)) == 2.0
    for v in (True, float("nan"), float("inf"), "0.5"):
        with pytest.raises(ValueError, match="f: expected a finite float"):
            check_float("f", v)
    assert check_bool("b", np.bool_(True)) is True
    with pytest.raises(TypeError, match="b: expected a bool"):
        check_bool("b", 1)


def test_option_errors_render_in_each_interfaces_words_and_pickle():
    class Flags(Spelling):
        def name(self, key):
            return "--" + key.replace("_", "-")

    e = OptionError("t_star", lambda s: f"expected > 0; see {s.name('value_range')}", where="'a.pt'")
    assert str(e) == "t_star 'a.pt': expected > 0; see value_range" == e.render(API)
    assert e.render(Flags()) == "--t-star 'a.pt': expected > 0; see --value-range"
    for err in (e, OptionTypeError("seed", "expected an int")):
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is type(err) and str(back) == str(err) and back.option == err.option
    assert isinstance(OptionTypeError("x", "y"), TypeError) and isinstance(OptionTypeError("x", "y"), ValueError)


INT_OPTIONS = [   # (method, option, value): every integer option of purify / Purifier
    ("diffpure", "steps", 3), ("diffpure", "seed", 5), ("diffpure", "surrogate_steps", 4),
    ("diffpure", "grad_cache_steps", 2), ("gdmp", "purify_step", 4), ("gdmp", "max_iter", 2),
    ("gdmp", "norm_batch", 8), ("mimic", "steps", 10), ("mimic", "upsample", 2), ("mimic", "norm_batch", 4),
    ("agdm", "steps", 3),
]
BASE = {"diffpure": dict(t_star=0.05, steps=3), "gdmp": dict(purify_step=3, max_iter=1),
        "mimic": dict(steps=10, guidance_window=(2, 8)), "agdm": dict(t_star=0.02, steps=2)}


AUX = TinyAuxNet(channels=3, pixels=16).eval()


def _kwargs(method, option, value):
    kw = dict(BASE[method], seed=1)
    if method == "agdm":
        kw["auxiliary"] = AUX
    if option == "surrogate_steps":
        kw["grad_mode"] = "surrogate"
    if option == "grad_cache_steps":
        kw["grad_mode"] = "full"
    kw[option] = value
    return kw


@pytest.mark.parametrize("method, option, value", INT_OPTIONS)
def test_numpy_integers_work_for_every_integer_option(method, option, value):
    model = tiny_score_model()
    x = torch.rand(2, 3, 4, 4)
    ref = dpf.purify(x, model, method=method, **_kwargs(method, option, value))
    got = dpf.purify(x, model, method=method, **_kwargs(method, option, np.int64(value)))
    assert torch.equal(ref, got)
    pur = dpf.Purifier(model, method=method, **_kwargs(method, option, np.int32(value)))
    assert torch.equal(pur(x), ref)
    assert pur.config == dpf.Purifier(model, method=method, **_kwargs(method, option, value)).config
    for bad in (True, float(value)):
        with pytest.raises((TypeError, ValueError), match=option):
            dpf.purify(x, model, method=method, **_kwargs(method, option, bad))


def test_numpy_integers_elsewhere():
    model = tiny_score_model()
    x = torch.rand(2, 3, 4, 4)
    ref = dpf.purify(x, model, method="mimic", **BASE["mimic"], seed=0)
    win = (np.int64(2), np.int64(8))
    assert torch.equal(dpf.purify(x, model, method="mimic", steps=10, guidance_window=win, seed=0), ref)
    ids = [np.int64(4), np.int32(9)]
    assert torch.equal(dpf.purify(x, model, t_star=0.05, steps=2, seed=0, noise_ids=ids),
                       dpf.purify(x, model, t_star=0.05, steps=2, seed=0, noise_ids=[4, 9]))
    assert dpf.VPSchedule(0.1, 20, np.int64(1000)) == dpf.DIFFPURE_SCHEDULE
    with pytest.raises(TypeError, match="num_levels"):
        dpf.VPSchedule(0.1, 20, 1000.0)
    from diffpure_fast.attacks import DefendedClassifier, derive_seed, pgd_eot

    assert derive_seed(np.int64(3), "a") == derive_seed(3, "a")
    clf = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 3)).eval()
    defended = DefendedClassifier(dpf.Purifier(model, t_star=0.05, steps=2, grad_mode="full"), clf)
    y, sid = torch.tensor([0, 1]), torch.tensor([0, 1])
    a = pgd_eot(defended, x, y, sid, eps=0.1, steps=np.int64(2), eot=np.int64(2), restarts=np.int64(1))
    b = pgd_eot(defended, x, y, sid, eps=0.1, steps=2, eot=2, restarts=1)
    assert torch.equal(a.x_adv, b.x_adv)
    with pytest.raises(TypeError, match="steps"):
        pgd_eot(defended, x, y, sid, eps=0.1, steps=2.0)
    from diffpure_fast.data import load_digits_dataset

    with pytest.raises(TypeError, match="resolution"):          # was int(16.5) = 16, silently
        load_digits_dataset("test", resolution=16.5)


def test_auxiliary_submodule_in_training_mode_is_refused():
    aux = TinyAuxNet(channels=3, pixels=16).eval()
    aux.conv.train()                          # the top-level flag says eval; a submodule does not
    with pytest.raises(ValueError, match=r"auxiliary: has a submodule in training mode \('conv'\)"):
        dpf.purify(torch.rand(1, 3, 4, 4), tiny_score_model(), method="agdm", auxiliary=aux, steps=2)
    aux.eval()
    pur = dpf.Purifier(tiny_score_model(), method="agdm", auxiliary=aux, t_star=0.02, steps=2)
    aux.train()                               # switched after the options were built: refused at the call
    with pytest.raises(ValueError, match="auxiliary: is in training mode"):
        pur(torch.rand(1, 3, 4, 4))


def test_missing_optional_packages(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    with pytest.raises(MissingDependency, match=r"matplotlib is not installed \(needed for the plots\); pip install "
                                                "matplotlib"):
        require("matplotlib", "the plots")
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        assert missing_module(exc) == "matplotlib is not installed; pip install matplotlib"
    assert missing_module(ImportError("x", name="diffpure_fast._C")) is None    # our own: a bug, not a user error
    assert missing_module(ValueError("x")) is None
