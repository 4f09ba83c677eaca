"""Check this implementation against recorded runs of the official DiffPure code (conformance vectors).

    python -m diffpure_fast.conformance /work/shared/conformance/*.pt /work/shared/conformance/runners/*.pt

A vector (see ``shared/conformance/README.md``) holds a checkpoint in the official format, its official config, one
direct network evaluation and one full purification with all of its randomness. For every file this loads the
checkpoint with :func:`diffpure_fast.models.load_score_model` and reports the max-abs error of

* ``score_sde_ncsnpp``: the score ``-eps / std(t)`` (``score_call.expected_score``);
* ``guided_diffusion_adm``: the raw 6-channel network output at ``(1000 t).long()``
  (``score_call.expected_model_output``) and DiffPure's reverse-SDE drift ``f(x, t) - g(t)^2 score``
  (``score_call.expected_reverse_drift``);
* ``ddpm_celebahq``: SDEdit's DDPM UNet's output at the integer steps ``t`` (``score_call.expected_model_output``);
* the ``sde`` vectors (a ``purify`` dict): ``diffpure_fast.purify`` replaying the recorded forward noise and
  Brownian increments (``purify.expected``);
* the other runners' vectors (``runner`` names a dict: ``ode``, ``ldsde``, ``guided``, ``celebahq``): ``purify``
  with the matching ``diffusion_type`` replaying every recorded draw (``<runner>.expected``), the ODE's forward
  diffusion (``ode.x_t``) and both of its gradients, ``d sum(grad_weight * output) / dx`` with ``grad_mode="full"``
  against autograd through ``torchdiffeq.odeint`` (``ode.expected_grad_exact``) and with ``grad_mode="adjoint"``
  against ``odeint_adjoint`` (``ode.expected_grad_adjoint``).

Every size (batch, channels, image size, levels, step counts) is read from the vector, its config and checkpoint.

Tolerances scale with the expected tensor: a check passes when ``max|got - expected| <= tol * max(1,
max|expected|)``, i.e. about ``tol`` absolute for tensors of magnitude up to 1 and ``tol`` relative beyond (the ADM
reverse drift reaches 7.2 in magnitude, where float32 rounding alone gives errors above 1e-5). ``tol`` is 1e-5 for
the network checks and 1e-4 for whole purifications and their gradients (up to hundreds of solver steps) on CPU
float32, 1e-3 on other devices.

Vectors are read with torch's restricted (``weights_only``) unpickler, the same rule as checkpoints (they hold only
tensors, dicts, lists, numbers and strings); ``--trust-checkpoint`` opts in to the full unpickler.

Exit status: 0 when every error is within its tolerance, 1 when one is over, 2 for an unreadable or malformed file.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ._validate import FlagSpelling, OptionError
from .models.loading import load_score_model, safe_torch_load
from .schedule import DIFFPURE_SCHEDULE

__all__ = ["KINDS", "RUNNERS", "Check", "main", "run_vector"]

KINDS = {"score_sde_ncsnpp": ("score_sde", "checkpoint"), "guided_diffusion_adm": ("guided_diffusion", "state_dict"),
         "ddpm_celebahq": ("celebahq_ddpm", "state_dict")}
# A runner vector's ``runner`` (the dict holding its run) and the diffusion_type that reproduces it.
RUNNERS = {"ode": "ode", "ldsde": "ldsde", "guided": "ddpm", "celebahq": "celebahq-ddpm"}

# (CPU float32, other devices) tolerances, relative to max(1, max|expected|); README: ~1e-5 on CPU float32, ~1e-3
# on GPU. A purification runs up to hundreds of steps, each rounding in float32, hence its looser CPU tolerance
# (also that of its gradients).
SCORE_TOL = {"cpu": 1e-5, "other": 1e-3}
PURIFY_TOL = {"cpu": 1e-4, "other": 1e-3}


@dataclass
class Check:
    """One comparison: ``error`` = max|got - expected|, passing when ``error <= tol * max(1, scale)`` with
    ``scale`` = max|expected| (float32 rounding grows with the magnitude of what is computed)."""

    name: str
    error: float
    tol: float
    scale: float = 1.0

    @property
    def bound(self) -> float:
        return self.tol * max(1.0, self.scale)

    @property
    def ok(self) -> bool:
        return self.error <= self.bound  # NaN compares False: a NaN error fails


class VectorError(ValueError):
    """The file is not a readable conformance vector."""


def load_vector(path: str, *, trust_checkpoint: bool = False) -> dict[str, Any]:
    import os

    if not os.path.isfile(path):
        raise VectorError(f"{path}: file not found")
    try:
        # configs, ints and strings besides tensors: all within what the restricted unpickler reads
        vec = safe_torch_load(path, what="vector", trust_checkpoint=trust_checkpoint)
    except OptionError as exc:   # in this command line's words (--trust-checkpoint)
        raise VectorError(f"{path}: {exc.render(FlagSpelling({'vector': 'vector'}))}") from None
    except ValueError as exc:
        raise VectorError(f"{path}: {exc}") from None
    if not isinstance(vec, Mapping) or vec.get("kind") not in KINDS:
        kind = vec.get("kind") if isinstance(vec, Mapping) else type(vec).__name__
        raise VectorError(f"{path}: not a conformance vector (kind {kind!r}, expected one of {sorted(KINDS)})")
    _family, ckpt_key = KINDS[vec["kind"]]
    # A runner vector may come without a score call (only celebahq_ddpm_small.pt has one).
    for key in (ckpt_key, "config") + (() if "runner" in vec else ("score_call",)):
        if key not in vec:
            raise VectorError(f"{path}: missing key {key!r}")
    runner = vec.get("runner")
    if runner is not None and (runner not in RUNNERS or not isinstance(vec.get(runner), Mapping)):
        raise VectorError(f"{path}: runner {runner!r}: expected one of {sorted(RUNNERS)} with a dict of that name")
    return dict(vec)


def _check(name: str, got: torch.Tensor, expected: torch.Tensor, tol: float) -> Check:
    expected = expected.float()
    scale = expected.abs().max().item() if expected.numel() else 0.0
    if got.shape != expected.shape:
        return Check(name, float("inf"), tol, scale)
    return Check(name, (got.detach().float().cpu() - expected).abs().max().item(), tol, scale)


def run_vector(vec: Mapping[str, Any], *, device: str = "cpu", purify_check: bool = True) -> list[Check]:
    """All checks of one vector; returns the list of (name, max-abs error, tolerance, max|expected|)."""
    family, ckpt_key = KINDS[vec["kind"]]
    where = "cpu" if torch.device(device).type == "cpu" else "other"
    s_tol, p_tol = SCORE_TOL[where], PURIFY_TOL[where]
    model = load_score_model(family, vec[ckpt_key], vec["config"], device=device, dtype=torch.float32)
    checks = _score_checks(vec["score_call"], model, family, device, s_tol) if "score_call" in vec else []
    if purify_check and "purify" in vec:
        from . import purify  # the engine; imported late so the network checks run without it

        p = vec["purify"]
        with torch.no_grad():
            y = purify(p["x"].to(device), model, t_star=float(p["t_star"]),
                       forward_noise=p["forward_noise"].to(device), increments=p["dW"].to(device),
                       value_range=(-1, 1))
        checks.append(_check("purify.expected", y, p["expected"], p_tol))
    if purify_check and vec.get("runner") is not None:
        checks += _runner_checks(vec, model, device, p_tol)
    return checks


def _score_checks(sc: Mapping[str, Any], model, family: str, device: str, tol: float) -> list[Check]:
    """The checks of one direct network evaluation (``score_call``)."""
    x, t = sc["x"].to(device), sc["t"].to(device)
    with torch.no_grad():
        if family == "score_sde":
            return [_check("score_call.expected_score", model.score(x, t), sc["expected_score"], tol)]
        if family == "celebahq_ddpm":   # t: the integer steps themselves
            return [_check("score_call.expected_model_output", model.net(x, t), sc["expected_model_output"], tol)]
        out = model.net(x, model.labels(t, None))
        # as DiffPure's RevVPSDE: drift - diffusion**2 * score with diffusion = sqrt(beta(t))
        beta = DIFFPURE_SCHEDULE.beta(t).reshape(-1, 1, 1, 1)
        drift = -0.5 * beta * x - torch.sqrt(beta) ** 2 * model.score(x, t)
        return [_check("score_call.expected_model_output", out, sc["expected_model_output"], tol),
                _check("score_call.expected_reverse_drift", drift, sc["expected_reverse_drift"], tol)]


def _runner_checks(vec: Mapping[str, Any], model, device: str, tol: float) -> list[Check]:
    """The checks of a runner vector: its purification replayed with every recorded draw, and for the ODE its
    forward diffusion and both gradients."""
    from . import purify
    from .chain import forward_diffuse

    name = vec["runner"]
    p = vec[name]
    kind = RUNNERS[name]
    x = p["x"].to(device)
    # The official runners take the level --t and use t* = t / N.
    opts: dict[str, Any] = {"diffusion_type": kind, "t_star": int(p["levels"]) / DIFFPURE_SCHEDULE.num_levels}
    noise: dict[str, torch.Tensor] = {}
    # The official step sizes (ode: --step_size 1e-3, ldsde: dt 1e-2) are the runners' defaults; a vector that
    # records another one is replayed with it.
    step_key = {"ode": "step_size", "ldsde": "dt"}.get(kind)
    if step_key in p:
        opts[step_key] = float(p[step_key])
    if kind == "ldsde":
        opts.update(sigma2=float(p["sigma2"]), lambda_ld=float(p["lambda_ld"]), eta=float(p["eta"]))
        noise["increments"] = p["dW"].to(device)
    else:
        noise["forward_noise"] = p["forward_noise"].to(device)
        if "step_noise" in p:
            noise["increments"] = p["step_noise"].to(device)
    if kind == "celebahq-ddpm":
        opts["var_type"] = getattr(model, "var_type", "fixedsmall")
    checks = []
    if "x_t" in p:
        x_t = forward_diffuse(x, noise["forward_noise"], opts["t_star"], DIFFPURE_SCHEDULE)
        checks.append(_check(f"{name}.x_t", x_t, p["x_t"], tol))
    with torch.no_grad():
        y = purify(x, model, value_range=(-1, 1), **opts, **noise)
    checks.append(_check(f"{name}.expected", y, p["expected"], tol))
    for key, grad_mode in (("expected_grad_exact", "full"), ("expected_grad_adjoint", "adjoint")):
        if key in p:
            xg = x.clone().requires_grad_(True)
            out = purify(xg, model, value_range=(-1, 1), grad_mode=grad_mode, **opts, **noise)
            (g,) = torch.autograd.grad((out * p["grad_weight"].to(device)).sum(), xg)
            checks.append(_check(f"{name}.{key}", g, p[key], tol))
    return checks


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="diffpure-fast conformance",
        description="Compare diffpure_fast with recorded runs of the official DiffPure code. For each vector file: "
                    "load its official checkpoint with load_score_model, evaluate the network (score, or raw output "
                    "and reverse drift for guided-diffusion) and replay the recorded purification (any of the five "
                    "runners; the ODE's gradients too); print each "
                    "max-abs error with its bound. Tolerances scale with the expected tensor: a check passes when "
                    "max|err| <= tol * max(1, max|expected|), i.e. about tol relative for large tensors (tol: 1e-5 "
                    "for network outputs and 1e-4 for the purification on CPU float32, 1e-3 on other devices). "
                    "Exit 0 if all pass, 1 if any error is over its bound, 2 if a file cannot be read.")
    ap.add_argument("files", nargs="+", metavar="FILE.pt", help="conformance vector files (torch.save'd dicts)")
    ap.add_argument("--device", default="cpu",
                    help="device to run on (default cpu; tol, relative to max(1, max|expected|): network 1e-5 / "
                    "purify 1e-4 on CPU, 1e-3 else)")
    ap.add_argument("--trust-checkpoint", action="store_true",
                    help="read vectors with the full unpickler (default: torch's restricted weights_only one, which "
                    "reads the official vectors; a pickle can run arbitrary code, so only for trusted files)")
    ap.add_argument("--no-purify", action="store_true",
                    help="only the network checks, skip the purifications (and the ODE's gradients)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: the vectors are small, and with torch's default threads a "
                    "busy 2-core machine took over 200 s for what one thread does in 3 s)")
    args = ap.parse_args(argv)
    if args.threads < 1:
        ap.error(f"--threads: expected an int >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)

    status = 0
    for path in args.files:
        try:
            vec = load_vector(path, trust_checkpoint=args.trust_checkpoint)
        except VectorError as exc:
            print(f"error: {exc}", file=sys.stderr)
            status = max(status, 2)
            continue
        try:
            checks = run_vector(vec, device=args.device, purify_check=not args.no_purify)
        except (ValueError, FileNotFoundError, ImportError) as exc:
            print(f"error: {path}: {exc}", file=sys.stderr)
            status = max(status, 2)
            continue
        for c in checks:
            verdict = "ok" if c.ok else "FAIL"
            kind = vec["kind"] + (f"/{vec['runner']}" if vec.get("runner") else "")
            print(f"{path} [{kind}] {c.name}: max_abs_err={c.error:.3e} bound={c.bound:.3e} "
                  f"(tol={c.tol:.0e} x max(1, max|expected|={c.scale:.3g})) {verdict}")
            if not c.ok:
                status = max(status, 1)
    return status


if __name__ == "__main__":
    sys.exit(main())
