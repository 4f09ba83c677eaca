"""``report.md``, ``report.json``, ``curve.png`` and ``grid.png`` of an evaluation folder, from its records alone
(``diffpure-fast report FOLDER`` rebuilds them)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np

from . import records as rec
from .metrics import PROTOCOL_METRICS, protocol_metrics, robust_curve

__all__ = ["REPORT_FILES", "compute_report", "write_report"]

REPORT_FILES = ("report.md", "report.json", "curve.png", "grid.png")
_GRAD_MODES = {"full": "exact gradient of the discrete solve (discrete adjoint, grad_mode='full')",
               "adjoint": "continuous adjoint, torchsde-style (grad_mode='adjoint')",
               "bpda": "BPDA: identity backward through the purifier (grad_mode='bpda')",
               "surrogate": "exact gradient of a shorter DDPM surrogate chain (grad_mode='surrogate')",
               "classifier only": "the undefended classifier's own gradient (no purifier)"}
_GUIDANCE_GRADS = {"exact": "exact through the guidance (second order where the guidance is a gradient)",
                   "detached": "guidance detached, treated as a constant (the gradient of GDMP's and MimicDiffusion's "
                               "released evaluations)",
                   "straight_through": "guidance's sign given a smooth-L1 derivative in the backward pass only "
                                       "(a declared surrogate)"}


def _gradient(config: dict) -> str:
    """The gradient an attack used, in words: grad_mode, and for a guided method how the guidance was treated."""
    text = _GRAD_MODES.get(config["grad_mode"], config["grad_mode"])
    defense = config.get("defense", {})
    guided = defense.get("method") not in (None, "diffpure", "none (undefended classifier)")
    if config["grad_mode"] == "full" and guided:
        text += "; " + _GUIDANCE_GRADS.get(defense.get("guidance_grad"), str(defense.get("guidance_grad")))
    return text
def _defense_name(defense: dict) -> str:
    """The method, with DiffPure's runner when it is not the default sde one (e.g. ``diffpure (ode)``)."""
    name = defense.get("method", defense.get("class", "defense"))
    options = defense.get("options")
    kind = options.get("diffusion_type") if isinstance(options, dict) else None
    return f"{name} ({kind})" if kind not in (None, "sde") else name


_NAMES = {"single_shot": "single-shot (evaluation 1)", "mean": "mean over the N evaluations",
          "worst_of_n": "worst-of-N (correct on all N)", "majority_vote": "majority vote over N"}


def compute_report(folder: str | Path) -> dict:
    """Metrics of the records in ``folder`` (merged across ranks), with its configuration and environment."""
    folder = Path(folder)
    cfg_path = folder / rec.CONFIG_FILE
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{folder}: no {rec.CONFIG_FILE} (not an evaluation output folder)")
    config = json.loads(cfg_path.read_text())
    env_path = folder / "environment.json"
    env = json.loads(env_path.read_text()) if env_path.is_file() else {}
    records = rec.merge_records(folder)
    if not records:
        raise ValueError(f"{folder}: no finished samples in the records")
    labels = [r["label"] for r in records]
    clean = protocol_metrics(labels, [r["clean_pred"] for r in records])
    robust = protocol_metrics(labels, [r["adv_pred"] for r in records])
    curve = None
    if all("attack_pred_trace" in r for r in records):
        curve = [a.as_dict() for a in robust_curve(labels, [r["attack_pred_trace"] for r in records])]
    ev = config["eval"]
    expected = config.get("n_samples")
    return {
        "configuration": config,
        "n_samples": len(records),
        "complete": expected is None or len(records) == expected,
        "n_eval": ev["n_eval"],
        "gradient": _gradient(config),
        "clean": {k: v.as_dict() for k, v in clean.items()},
        "robust": {k: v.as_dict() for k, v in robust.items()},
        "attack_curve": curve,
        "perturbation": {"max_linf": max(r["linf"] for r in records), "max_l2": max(r["l2"] for r in records)},
        "time_s": {"sum_over_samples": sum(r.get("time_s", 0.0) for r in records)},
        "environment": env,
        "indices": [r["index"] for r in records],
    }


def _fmt(a: dict) -> str:
    lo, hi = a["wilson95"]
    return f"{100 * a['accuracy']:.1f}% | [{100 * lo:.1f}, {100 * hi:.1f}] | {a['correct']} / {a['total']}"


def _markdown(rep: dict) -> str:
    c, ev = rep["configuration"], rep["configuration"]["eval"]
    atk = ev["attack"]
    if atk == "autoattack":
        what = f"AutoAttack version={ev['aa_version']} ({ev['aa_package']} package)"
    else:
        what = (f"{atk}: {ev['steps']} steps of {ev['step_size']:.5g}, {ev['eot']} EOT ({ev['eot_reduce']} "
                f"averaged), loss {ev['loss']}, {ev['restarts']} restart(s), random start {ev['random_start']}")
    lines = [f"# Evaluation: {_defense_name(c['defense'])} on {c['data']}", "",
             f"Command: `{rep['environment'].get('command', '?')}`", "",
             f"Attack: {what}; {ev['norm']} eps = {ev['eps']:.5g}.", "",
             f"Gradient used by the attack: {rep['gradient']}.", "",
             f"Samples: {rep['n_samples']}" + ("" if rep["complete"] else " (INCOMPLETE: the run has not finished)")
             + f", each judged N = {rep['n_eval']} times with fresh purification noise.", "",
             "| protocol | clean accuracy | 95% Wilson | correct / total | robust accuracy | 95% Wilson "
             "| correct / total |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for k in PROTOCOL_METRICS:
        lines.append(f"| {_NAMES[k]} | {_fmt(rep['clean'][k])} | {_fmt(rep['robust'][k])} |")
    lines += ["", "The mean's interval counts the N draws of an image as independent trials; they are not, so it is "
              "too narrow.", ""]
    if rep["attack_curve"]:
        cv = rep["attack_curve"]
        pts = ", ".join(f"{s}: {100 * a['accuracy']:.1f}%" for s, a in enumerate(cv))
        lines += [f"Attack-success curve (robust accuracy of the attack's own EOT prediction after each step): {pts}",
                  "", "![robust accuracy against attack step](curve.png)", ""]
    p = rep["perturbation"]
    lines += [f"Largest perturbation: L-inf {p['max_linf']:.5g}, L2 {p['max_l2']:.5g}.", "",
              "![clean / adversarial / purified](grid.png)", "",
              "Defense: " + ", ".join(f"{k}={v}" for k, v in c["defense"].items()), "",
              f"Classifier: {c['classifier']}", "",
              "Options: " + ", ".join(f"{k}={v}" for k, v in ev.items()), ""]
    env = rep["environment"]
    if env:
        lines += [f"Machine: {env.get('platform')}, {env.get('cpu_count')} CPUs, torch threads "
                  f"{env.get('torch_threads')}, GPU {env.get('gpu')}, {env.get('world_size')} process(es); "
                  f"versions: diffpure_fast {env.get('diffpure_fast')}, torch {env.get('torch')}, numpy "
                  f"{env.get('numpy')}, Python {env.get('python')}, "
                  + ", ".join(f"{k} {v}" for k, v in env.get("packages", {}).items() if v), ""]
    lines += [f"Time: {rep['time_s']['sum_over_samples']:.1f} s summed over samples.", ""]
    return "\n".join(lines)


def _decode(img: dict) -> np.ndarray:
    a = np.frombuffer(base64.b64decode(img["uint8_b64"]), dtype=np.uint8).reshape(img["shape"])
    return a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0)


def _plots(folder: Path, rep: dict, records: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    if rep["attack_curve"]:
        cv = rep["attack_curve"]
        acc = [100 * a["accuracy"] for a in cv]
        lo = [100 * a["wilson95"][0] for a in cv]
        hi = [100 * a["wilson95"][1] for a in cv]
        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
        ax.plot(range(len(cv)), acc, marker="o", ms=3, label="robust accuracy (attack's EOT prediction)")
        ax.fill_between(range(len(cv)), lo, hi, alpha=0.25, label="95% Wilson")
        ax.set_xlabel("attack step")
        ax.set_ylabel("robust accuracy (%)")
        ax.set_ylim(0, 100)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(folder / "curve.png")
        plt.close(fig)
    shown = [r for r in records if "images" in r]
    if shown:
        rows = (("clean", "clean", "clean_pred"), ("adversarial", "adversarial", None),
                ("purified adv.", "purified", "adv_pred"))
        fig, axes = plt.subplots(3, len(shown), figsize=(1.1 * len(shown) + 0.6, 3.6), dpi=120, squeeze=False)
        for j, r in enumerate(shown):
            for i, (title, key, pred_key) in enumerate(rows):
                ax = axes[i, j]
                a = _decode(r["images"][key])
                ax.imshow(a, cmap="gray" if a.ndim == 2 else None, vmin=0, vmax=255)
                ax.set_xticks([])
                ax.set_yticks([])
                if pred_key:
                    p = r[pred_key][0]
                    ax.set_title(f"pred {p}", fontsize=7, color="green" if p == r["label"] else "red")
                if j == 0:
                    ax.set_ylabel(title, fontsize=7)
        fig.tight_layout()
        fig.savefig(folder / "grid.png")
        plt.close(fig)


def write_report(folder: str | Path) -> dict:
    """Compute the report of ``folder`` and write report.json, report.md, curve.png and grid.png there."""
    folder = Path(folder)
    rep = compute_report(folder)
    (folder / "report.json").write_text(json.dumps(rep, indent=2))
    (folder / "report.md").write_text(_markdown(rep))
    _plots(folder, rep, rec.merge_records(folder))
    return rep
