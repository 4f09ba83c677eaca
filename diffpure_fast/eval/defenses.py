"""Building the defense an evaluation attacks: the one place that turns (method, grad_mode, options) into a module."""

from __future__ import annotations

from ..engine import Purifier

__all__ = ["DEFENSES", "build_defense", "describe_defense"]

# The purification methods ``--defense`` accepts (one list for the CLI and the API).
DEFENSES = ("diffpure",)


def build_defense(model, *, method: str = "diffpure", grad_mode: str = "full", **options) -> Purifier:
    """A ``Purifier`` for ``method`` whose gradient is ``grad_mode`` ("full": exact discrete adjoint, "adjoint":
    continuous adjoint, "bpda": identity backward, "surrogate": a shorter DDPM chain); ``options`` go to
    ``Purifier`` unchanged (t_star, steps, dt, solver, ...)."""
    if method not in DEFENSES:
        raise ValueError(f"method: expected one of {DEFENSES}, got {method!r}")
    return Purifier(model, grad_mode=grad_mode, **options)


def describe_defense(defense) -> dict:
    """JSON-able description of a defense (every option that decides its output)."""
    if defense is None:
        return {"method": "none (undefended classifier)"}
    out = {"class": type(defense).__name__, "score_model": type(getattr(defense, "model", None)).__name__}
    config = getattr(defense, "config", None)
    if config is not None:
        for k, v in vars(config).items():
            out[k] = v if isinstance(v, (int, float, str, bool, type(None))) else (
                list(v) if isinstance(v, tuple) else repr(v))
    for k in ("method", "guidance_grad"):
        if hasattr(defense, k):
            out[k] = getattr(defense, k)
    # today's Purifier is DiffPure; methods added later name themselves through the attributes above
    out.setdefault("method", "diffpure")
    return out
