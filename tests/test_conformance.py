"""Parity with the official DiffPure code on the shared conformance vectors (see shared/conformance/README.md).

The vectors live in ``../shared/conformance/`` (the sde runner's) and its ``runners/`` folder (the ode, ldsde,
guided-diffusion ddpm and celebahq-ddpm runners') relative to the repository root, or in the directory named by
``DIFFPURE_FAST_CONFORMANCE_DIR`` (and its ``runners/``); without them these tests are skipped. Nothing here depends
on the vectors' sizes.
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
FILES = sorted(VEC_DIR.glob("*.pt")) + sorted(VEC_DIR.glob("runners/*.pt")) if VEC_DIR.is_dir() else []

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.skipif(
    not FILES, reason=f"no conformance vectors found in {VEC_DIR} (set DIFFPURE_FAST_CONFORMANCE_DIR to their folder)")]




VECTORS = {f: conformance.load_vector(str(f)) for f in FILES}
SCORE_FILES = [f for f in FILES if "score_call" in VECTORS[f]]      # every sde vector, celebahq_ddpm_small.pt
SDE_FILES = [f for f in FILES if "purify" in VECTORS[f]]
RUNNER_FILES = [f for f in FILES if VECTORS[f].get("runner")]


def _vec_fixture(files):
    @pytest.fixture(scope="module", params=files, ids=[f.name for f in files])
    def fixture(request):
        return VECTORS[request.param]
    return fixture


vec = _vec_fixture(FILES)
score_vec = _vec_fixture(SCORE_FILES)
sde_vec = _vec_fixture(SDE_FILES)


def _model(vec):
    family, key = conformance.KINDS[vec["kind"]]
    return family, load_score_model(family, vec[key], vec["config"])


def _scaled(expected: torch.Tensor, tol: float) -> float:
    """The conformance command's bound: tol relative to max(1, max|expected|) (float32 rounding grows with size)."""
    return tol * max(1.0, expected.abs().max().item())


def test_score_call(score_vec):
    vec = score_vec
    family, model = _model(vec)
    sc = vec["score_call"]
    with torch.no_grad():
        if family == "celebahq_ddpm":   # integer steps
            out = model.net(sc["x"], sc["t"])
            bound = _scaled(sc["expected_model_output"], 1e-5)
            err = (out - sc["expected_model_output"]).abs().max().item()
            assert err <= bound, f"model output max abs error {err:.3e} > {bound:.3e}"
        elif family == "score_sde":
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


def test_purify(sde_vec):
    vec = sde_vec
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


@pytest.mark.parametrize("path", RUNNER_FILES, ids=[f.name for f in RUNNER_FILES])
def test_runner_vector(path):
    """Every check of a runner vector passes: its purification (ode, ldsde, guided ddpm, celebahq-ddpm) with every
    recorded draw replayed and, for the ODE, its forward diffusion and both gradients."""
    vec = VECTORS[path]
    checks = conformance.run_vector(vec)
    names = {c.name for c in checks}
    runner = vec["runner"]
    expected = {f"{runner}.{k}" for k in vec[runner] if k.startswith("expected") or k == "x_t"}
    assert expected <= names, f"unchecked: {sorted(expected - names)}"
    bad = [f"{c.name}: {c.error:.3e} > {c.bound:.3e}" for c in checks if not c.ok]
    assert not bad, bad


@pytest.mark.parametrize("path", RUNNER_FILES, ids=[f.name for f in RUNNER_FILES])
def test_cli_fails_on_a_runner_vector_moved_by_1e_2(path, tmp_path, capsys):
    """The conformance command fails on a runner vector whose expected output (and, for the ODE, each gradient) is
    moved by 1e-2 at one element: every moved tensor's own check fails."""
    vec = dict(VECTORS[path])
    runner = vec["runner"]
    run = dict(vec[runner])
    keys = [k for k in run if k.startswith("expected")]
    for k in keys:
        moved = run[k].clone()
        moved.view(-1)[moved.numel() // 2] += 1e-2
        run[k] = moved
    vec[runner] = run
    bad = tmp_path / path.name
    torch.save(vec, bad)
    assert conformance.main([str(bad), "--threads", "1"]) == 1
    out = capsys.readouterr().out
    for k in keys:
        line = next(ln for ln in out.splitlines() if f" {runner}.{k}:" in ln)
        assert line.endswith("FAIL"), line
