"""Check this implementation against recorded runs of the official DiffPure code (conformance vectors).

    python -m diffpure_fast.conformance /work/shared/conformance/*.pt

A vector (see ``shared/conformance/README.md``) holds a checkpoint in the official format, its official config, one
direct network evaluation and one full purification with all of its randomness. For every file this loads the
checkpoint with :func:`diffpure_fast.models.load_score_model` and reports the max-abs error of

* ``score_sde_ncsnpp``: the score ``-eps / std(t)`` (``score_call.expected_score``);
* ``guided_diffusion_adm``: the raw 6-channel network output at ``(1000 t).long()``
  (``score_call.expected_model_output``) and DiffPure's reverse-SDE drift ``f(x, t) - g(t)^2 score``
  (``score_call.expected_reverse_drift``);
* both: ``diffpure_fast.purify`` replaying the recorded forward noise and Brownian increments (``purify.expected``).

Exit status: 0 when every error is within its tolerance, 1 when one is over, 2 for an unreadable or malformed file.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .models.loading import load_score_model
from .schedule import DIFFPURE_SCHEDULE

__all__ = ["KINDS", "Check", "main", "run_vector"]

KINDS = {"score_sde_ncsnpp": ("score_sde", "checkpoint"), "guided_diffusion_adm": ("guided_diffusion", "state_dict")}

# (CPU float32, other devices) tolerances; README: ~1e-5 on CPU float32, ~1e-3 on GPU.
SCORE_TOL = {"cpu": 1e-5, "other": 1e-3}
PURIFY_TOL = {"cpu": 1e-4, "other": 1e-3}


@dataclass
class Check:
    name: str
    error: float
    tol: float

    @property
    def ok(self) -> bool:
        return self.error <= self.tol  # NaN compares False: a NaN error fails


class VectorError(ValueError):
    """The file is not a readable conformance vector."""


def load_vector(path: str) -> dict[str, Any]:
    try:
        vec = torch.load(path, map_location="cpu", weights_only=False)  # vectors hold configs/ints besides tensors
    except FileNotFoundError:
        raise VectorError(f"{path}: file not found") from None
    except Exception as exc:  # noqa: BLE001
        raise VectorError(f"{path}: cannot read as a torch file ({type(exc).__name__}: {exc})") from None
    if not isinstance(vec, Mapping) or vec.get("kind") not in KINDS:
        kind = vec.get("kind") if isinstance(vec, Mapping) else type(vec).__name__
        raise VectorError(f"{path}: not a conformance vector (kind {kind!r}, expected one of {sorted(KINDS)})")
    _family, ckpt_key = KINDS[vec["kind"]]
    for key in (ckpt_key, "config", "score_call"):
        if key not in vec:
            raise VectorError(f"{path}: missing key {key!r}")
    return dict(vec)


def _maxabs(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    return (a.detach().float().cpu() - b.float()).abs().max().item()


def run_vector(vec: Mapping[str, Any], *, device: str = "cpu", purify_check: bool = True) -> list[Check]:
    """All checks of one vector; returns the list of (name, max-abs error, tolerance)."""
    family, ckpt_key = KINDS[vec["kind"]]
    where = "cpu" if torch.device(device).type == "cpu" else "other"
    s_tol, p_tol = SCORE_TOL[where], PURIFY_TOL[where]
    model = load_score_model(family, vec[ckpt_key], vec["config"], device=device, dtype=torch.float32)
    sched = DIFFPURE_SCHEDULE
    sc = vec["score_call"]
    x, t = sc["x"].to(device), sc["t"].to(device)
    checks: list[Check] = []
    with torch.no_grad():
        if family == "score_sde":
            checks.append(Check("score_call.expected_score", _maxabs(model.score(x, t), sc["expected_score"]), s_tol))
        else:
            out = model.net(x, model.labels(t, None))
            checks.append(Check("score_call.expected_model_output",
                                _maxabs(out, sc["expected_model_output"]), s_tol))
            # as DiffPure's RevVPSDE: drift - diffusion**2 * score with diffusion = sqrt(beta(t))
            beta = sched.beta(t).reshape(-1, 1, 1, 1)
            drift = -0.5 * beta * x - torch.sqrt(beta) ** 2 * model.score(x, t)
            checks.append(Check("score_call.expected_reverse_drift",
                                _maxabs(drift, sc["expected_reverse_drift"]), s_tol))
    if purify_check and "purify" in vec:
        from . import purify  # the engine; imported late so the network checks run without it

        p = vec["purify"]
        with torch.no_grad():
            y = purify(p["x"].to(device), model, t_star=float(p["t_star"]),
                       forward_noise=p["forward_noise"].to(device), increments=p["dW"].to(device),
                       value_range=(-1, 1))
        checks.append(Check("purify.expected", _maxabs(y, p["expected"]), p_tol))
    return checks


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m diffpure_fast.conformance",
        description="Compare diffpure_fast with recorded runs of the official DiffPure code. For each vector file: "
                    "load its official checkpoint with load_score_model, evaluate the network (score, or raw output "
                    "and reverse drift for guided-diffusion) and replay the recorded purification; print each "
                    "max-abs error with its tolerance. Exit 0 if all pass, 1 if any error is over tolerance, 2 if a "
                    "file cannot be read.")
    ap.add_argument("files", nargs="+", metavar="FILE.pt", help="conformance vector files (torch.save'd dicts)")
    ap.add_argument("--device", default="cpu",
                    help="device to run on (default cpu; tolerances: score 1e-5 / purify 1e-4 on CPU, 1e-3 else)")
    ap.add_argument("--no-purify", action="store_true", help="only the network checks, skip the purification")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads for the run (1 is fastest for the small vectors on a busy machine)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    status = 0
    for path in args.files:
        try:
            vec = load_vector(path)
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
            print(f"{path} [{vec['kind']}] {c.name}: max_abs_err={c.error:.3e} tol={c.tol:.0e} {verdict}")
            if not c.ok:
                status = max(status, 1)
    return status


if __name__ == "__main__":
    sys.exit(main())
