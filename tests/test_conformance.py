"""Parity with the official DiffPure code on the shared conformance vectors (see shared/conformance/README.md).

The vectors live in ``../shared/conformance/`` relative to the repository root, or in the directory named by
``DIFFPURE_FAST_CONFORMANCE_DIR``; without them these tests are skipped.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from diffpure_fast import conformance
from diffpure_fast.models import load_score_model

REPO = Path(__file__).resolve().parents[1]
VEC_DIR = Path(os.environ.get("DIFFPURE_FAST_CONFORMANCE_DIR", REPO.parent / "shared" / "conformance"))
FILES = sorted(VEC_DIR.glob("*.pt")) if VEC_DIR.is_dir() else []

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.skipif(
    not FILES, reason=f"no conformance vectors found in {VEC_DIR} (set DIFFPURE_FAST_CONFORMANCE_DIR to their folder)")]




@pytest.fixture(scope="module", params=FILES, ids=[f.name for f in FILES])
def vec(request):
    return conformance.load_vector(str(request.param))


def _model(vec):
    family, key = conformance.KINDS[vec["kind"]]
    return family, load_score_model(family, vec[key], vec["config"])


def _scaled(expected: torch.Tensor, tol: float) -> float:
    """The conformance command's bound: tol relative to max(1, max|expected|) (float32 rounding grows with size)."""
    return tol * max(1.0, expected.abs().max().item())


def test_score_call(vec):
    family, model = _model(vec)
    sc = vec["score_call"]
    with torch.no_grad():
        if family == "score_sde":
            err = (model.score(sc["x"], sc["t"]) - sc["expected_score"]).abs().max().item()
            assert err <= 1e-5, f"score max abs error {err:.3e} > 1e-5"
        else:
            out = model.net(sc["x"], (sc["t"] * 1000).long())
            err = (out - sc["expected_model_output"]).abs().max().item()
            assert err <= 1e-5, f"model output max abs error {err:.3e} > 1e-5"
            beta = (0.1 + sc["t"] * 19.9).reshape(-1, 1, 1, 1)
            drift = -0.5 * beta * sc["x"] - torch.sqrt(beta) ** 2 * model.score(sc["x"], sc["t"])
            err = (drift - sc["expected_reverse_drift"]).abs().max().item()
            bound = _scaled(sc["expected_reverse_drift"], 1e-5)  # the drift reaches 7.2 in magnitude
            assert err <= bound, f"reverse drift max abs error {err:.3e} > {bound:.3e}"


def test_checkpoint_parameter_order(vec):
    """The network's parameter names/order are the official ones (state dict order, EMA list length)."""
    family, key = conformance.KINDS[vec["kind"]]
    model = load_score_model(family, vec[key], vec["config"])
    if family == "score_sde":
        state = vec[key]["model"]
        names = [k.removeprefix("module.") for k in state if not k.endswith("sigmas")]
        assert [n for n, _ in model.net.named_parameters()] == names
        assert len(vec[key]["ema"]["shadow_params"]) == len(model.net.ema_parameters())
    else:
        assert [n for n, _ in model.net.named_parameters()] == list(vec[key])


def test_purify(vec):
    try:
        from diffpure_fast import purify
    except ImportError as exc:  # the engine is developed alongside; the network checks do not need it
        pytest.skip(f"diffpure_fast.purify not importable: {exc}")
    _, model = _model(vec)
    p = vec["purify"]
    with torch.no_grad():
        y = purify(p["x"], model, t_star=p["t_star"], forward_noise=p["forward_noise"], increments=p["dW"],
                   value_range=(-1, 1))
    err = (y - p["expected"]).abs().max().item()
    assert err <= 1e-4, f"purify max abs error {err:.3e} > 1e-4"


def test_cli_passes_and_reports(capsys):
    assert conformance.main([str(f) for f in FILES] + ["--no-purify"]) == 0
    out = capsys.readouterr().out
    assert "max_abs_err=" in out and "tol=" in out and "bound=" in out and "FAIL" not in out


def test_cli_unreadable_file(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_text("hello")
    assert conformance.main([str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "bad.pt" in err and "\n" not in err
    assert conformance.main([str(tmp_path / "missing.pt")]) == 2


def test_cli_fails_over_tolerance(tmp_path, capsys):
    vec = conformance.load_vector(str(FILES[0]))
    vec = dict(vec)
    sc = dict(vec["score_call"])
    for k in [k for k in sc if k.startswith("expected")]:
        sc[k] = sc[k] + 1e-3
    vec["score_call"] = sc
    path = tmp_path / "perturbed.pt"
    torch.save(vec, path)
    assert conformance.main([str(path), "--no-purify"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_tolerance_scales_with_the_expected_tensor():
    Check = conformance.Check
    assert Check("drift", 5e-5, 1e-5, scale=7.2).ok and not Check("drift", 8e-5, 1e-5, scale=7.2).ok
    assert not Check("small", 2e-5, 1e-5, scale=0.5).ok  # below magnitude 1 the bound stays tol (absolute)
    assert not Check("nan", float("nan"), 1e-5, scale=7.2).ok
