"""``report.md``, ``report.json``, ``curve.png`` and ``grid.png`` of an evaluation folder, from its records alone
(``diffpure-fast report FOLDER`` rebuilds them).

A study folder holds several evaluations, one sub-folder each (e.g. ``study/diffpure-apgd-eot``,
``study/gdmp-stadv``): ``write_study_report`` (``diffpure-fast report STUDY``) rebuilds every sub-folder's report and
writes the study's ``report.md``/``report.json`` (one row per evaluation: defense, attack, gradient, noise mode,
bound, accuracies with Wilson intervals, time) and ``curve.png``, every evaluation's attack-success curve on one plot.
"""

from __future__ import annotations

import base64
import json
from collections import Counter
from pathlib import Path

import numpy as np

from .._optional import available
from . import records as rec
from .attacks import ATTACK_SPECS, describe_attack, describe_threat
from .metrics import PROTOCOL_METRICS, protocol_metrics, robust_curve

__all__ = ["REPORT_FILES", "compute_report", "study_folders", "write_report", "write_study_report"]

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


def _noise_mode(config: dict) -> str:
    """The purification noise the attack saw, in words."""
    if config["defense"].get("method", "").startswith("none"):
        return "none (undefended classifier)"
    ev = config["eval"]
    if ev["attack"] == "autoattack" and ev["aa_mode"] == "as-released":
        return "fresh noise at every call of the package's model (seeds counted per call within a block)"
    if ev.get("fixed_noise"):
        return (f"FIXED: every step of the attack used one set of {ev['eot']} draws per sample (purifier seed "
                f"derive_seed(seed, 'fixed-noise'), noise id index * {ev['eot']} + j); the selection and the judge "
                f"used fresh noise")
    text = ("fresh noise for every EOT draw of every iteration (seed from (seed, run, iteration), noise id from the "
            "sample index and the draw)")
    if ev["attack"] == "autoattack" and ev["aa_version"] == "standard":
        text += "; FAB-T and Square: fresh noise at every call of the package's model"
    return text


def _defense_name(defense: dict) -> str:
    """The method, with DiffPure's runner when it is not the default sde one (e.g. ``diffpure (ode)``), and the
    defense's resize stage when it has one."""
    name = defense.get("method", defense.get("class", "defense"))
    options = defense.get("options")
    kind = options.get("diffusion_type") if isinstance(options, dict) else None
    name = f"{name} ({kind})" if kind not in (None, "sde") else name
    if defense.get("resize"):   # the resize stage is part of the defense (the attack's budget is the input's)
        to = defense.get("resize_to")
        name += f", inputs resized ({defense['resize']}) to {f'{to}x{to}' if to else 'the model size'} and back"
    return name


_NAMES = {"single_shot": "single-shot (evaluation 1)", "mean": "mean over the N evaluations",
          "worst_of_n": "worst-of-N (correct on all N)", "majority_vote": "majority vote over N"}


def compute_report(folder: str | Path) -> dict:
    """Metrics of the records in ``folder`` (merged across ranks), with its configuration and environment."""
    folder = Path(folder)
    cfg_path = folder / rec.CONFIG_FILE
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{folder}: no {rec.CONFIG_FILE} (not an evaluation output folder)")
    config = json.loads(cfg_path.read_text())
    ev = config["eval"]
    if "steps" in ev and "attack_steps" not in ev:   # a folder written before attack_steps had that name
        ev["attack_steps"] = ev.pop("steps")
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
    # A sample judged at distance 0 was not attacked (AutoAttack as released returns the clean input where one noisy
    # evaluation said the attack failed): its "robust" entries are clean-image results, so they are counted apart.
    unattacked = [r["index"] for r in records if r["linf"] == 0.0]
    attacked = [r for r in records if r["linf"] != 0.0]
    chosen = Counter(r["candidate"] for r in records if "candidate" in r)
    rep = {
        "configuration": config,
        "n_samples": len(records),
        "complete": expected is None or len(records) == expected,
        "n_eval": ev["n_eval"],
        "attack": describe_attack(ev),
        "bound": describe_threat(ev),
        "gradient": _gradient(config),
        "noise": _noise_mode(config),
        "clean": {k: v.as_dict() for k, v in clean.items()},
        "robust": {k: v.as_dict() for k, v in robust.items()},
        "not_attacked": {"count": len(unattacked), "indices": unattacked},
        "robust_attacked_only": ({k: v.as_dict() for k, v in protocol_metrics(
            [r["label"] for r in attacked], [r["adv_pred"] for r in attacked]).items()}
            if unattacked and attacked else None),
        "chosen_candidates": dict(sorted(chosen.items())),
        "attack_curve": curve,
        "perturbation": _perturbation(ev, records),
        "time_s": {"sum_over_samples": sum(r.get("time_s", 0.0) for r in records)},
        "environment": env,
        "indices": [r["index"] for r in records],
    }
    rep["warnings"] = _warnings(rep)
    return rep


def _perturbation(ev: dict, records: list[dict]) -> dict:
    """The largest perturbation judged: its L-inf and L2 sizes and, for an unrestricted attack, the largest value of
    its own bound's quantity (LPIPS distance or flow size) against the bound."""
    out = {"max_linf": max(r["linf"] for r in records), "max_l2": max(r["l2"] for r in records)}
    threat = ATTACK_SPECS[ev["attack"]].threat
    if threat != "lp":
        key = "lpips" if threat == "lpips" else "flow_linf"
        out[f"max_{key}"] = max(r[key] for r in records)
        out["bound"] = ev["bound"]
    return out


def _warnings(rep: dict) -> list[str]:
    """What a reader must know before quoting the numbers."""
    out = []
    ev = rep["configuration"]["eval"]
    if ev["attack"] == "autoattack" and ev.get("aa_mode") == "as-released":
        out.append("AutoAttack ran AS RELEASED on a randomized defense: its output falls back to the clean input "
                   "wherever one noisy evaluation said an attack failed (AutoAttack pull requests #104/#105), so "
                   "this robust accuracy is not a robustness number; use aa_mode='native'.")
    na = rep["not_attacked"]
    if na["count"]:
        shown = ", ".join(map(str, na["indices"][:20])) + (", ..." if na["count"] > 20 else "")
        out.append(f"{na['count']} of {rep['n_samples']} samples were judged at distance 0 from the clean input, i.e. "
                   f"not attacked (indices {shown}); their robust entries are clean-image results."
                   + (" The robust accuracy over the attacked samples alone is reported separately."
                      if rep["robust_attacked_only"] else ""))
    p = rep["perturbation"]
    over = [k for k in ("max_lpips", "max_flow_linf") if k in p and p[k] > p["bound"]]
    if over:
        out.append(f"The judged samples exceed the attack's bound ({over[0]} = {p[over[0]]:.6g} > {p['bound']:.6g}): "
                   f"these are not results under that bound.")
    if rep["robust"]["single_shot"]["accuracy"] > rep["clean"]["single_shot"]["accuracy"]:
        out.append("The robust single-shot accuracy is above the clean one: the attack did not find what one "
                   "evaluation's noise already gives; check its strength before quoting it.")
    return out


def _fmt(a: dict) -> str:
    lo, hi = a["wilson95"]
    return f"{100 * a['accuracy']:.1f}% | [{100 * lo:.1f}, {100 * hi:.1f}] | {a['correct']} / {a['total']}"


def _markdown(rep: dict) -> str:
    c, ev = rep["configuration"], rep["configuration"]["eval"]
    skipped = rep.get("plots", {}).get("skipped")
    plots = skipped is None
    lines = [f"# Evaluation: {_defense_name(c['defense'])} on {c['data']}", ""]
    lines += [f"**Warning: {w}**\n" for w in rep.get("warnings", [])]
    lines += [f"Command: `{rep['environment'].get('command', '?')}`", "",
              f"Attack: {rep['attack']}.", "",
              f"Bound: {rep['bound']}.", "",
              f"Gradient used by the attack: {rep['gradient']}.", "",
              f"Purification noise during the attack: {rep['noise']}.", "",
              f"Samples: {rep['n_samples']}" + ("" if rep["complete"] else " (INCOMPLETE: the run has not finished)")
              + f", each judged N = {rep['n_eval']} times with purification noise the attack never saw (the same "
              "draws for the clean and the adversarial image).", "",
              "| protocol | clean accuracy | 95% Wilson | correct / total | robust accuracy | 95% Wilson "
              "| correct / total |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for k in PROTOCOL_METRICS:
        lines.append(f"| {_NAMES[k]} | {_fmt(rep['clean'][k])} | {_fmt(rep['robust'][k])} |")
    if rep.get("robust_attacked_only"):
        lines += ["", f"Robust accuracy over the {rep['n_samples'] - rep['not_attacked']['count']} attacked samples "
                  "only (distance > 0):", "", "| protocol | robust accuracy | 95% Wilson | correct / total |",
                  "|---|---:|---:|---:|"]
        lines += [f"| {_NAMES[k]} | {_fmt(rep['robust_attacked_only'][k])} |" for k in PROTOCOL_METRICS]
    if rep.get("chosen_candidates") and len(rep["chosen_candidates"]) > 1:
        lines += ["", "Candidate judged per sample (the run whose output the selection kept): "
                  + ", ".join(f"{k} {v}" for k, v in rep["chosen_candidates"].items()) + "."]
    lines += ["", "The mean's interval counts the N draws of an image as independent trials; they are not, so it is "
              "too narrow.", ""]
    if rep["attack_curve"]:
        cv = rep["attack_curve"]
        pts = ", ".join(f"{s}: {100 * a['accuracy']:.1f}%" for s, a in enumerate(cv))
        runs = " (APGD runs only)" if ev["attack"] == "autoattack" else ""
        lines += [f"Attack-success curve{runs} (robust accuracy of the attack's own EOT prediction after each step; a "
                  f"sample counts as robust at step s when every run still classifies it correctly): {pts}",
                  "", *(["![robust accuracy against attack step](curve.png)", ""] if plots else [])]
    p = rep["perturbation"]
    size = c.get("input_size")
    at = f" (on the {'x'.join(map(str, size))} inputs, where the budget is)" if size else ""
    extra = "".join(f", {k[4:]} {p[k]:.5g} (bound {p['bound']:.5g})" for k in ("max_lpips", "max_flow_linf")
                    if k in p)
    lines += [f"Largest perturbation{at}: L-inf {p['max_linf']:.5g}, L2 {p['max_l2']:.5g}{extra}.", "",
              *(["![clean / adversarial / purified](grid.png)", ""] if plots else [skipped, ""]),
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


def _plot_title(rep: dict) -> str:
    """One line naming what a plot shows: defense, attack, bound and data."""
    c, ev = rep["configuration"], rep["configuration"]["eval"]
    eps = ev.get("eps")
    if eps is None:  # an unrestricted attack: its own bound (perceptual or spatial), never an L-p radius
        bound = rep["bound"].split(";")[0]
    else:
        bound = f"{ev['norm']} eps " + (f"{eps:.4g} = {eps * 255:.3g}/255" if ev["norm"] == "linf" else f"{eps:.4g}")
    return f"{_defense_name(c['defense'])}, {ev['attack']} ({bound}), {c['data']}"


def _plots(folder: Path, rep: dict, records: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    if rep["attack_curve"]:
        cv = rep["attack_curve"]
        steps = range(len(cv))
        acc = [100 * a["accuracy"] for a in cv]
        lo = [100 * a["wilson95"][0] for a in cv]
        hi = [100 * a["wilson95"][1] for a in cv]
        fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
        ax.plot(steps, acc, marker="o", ms=3, label="robust accuracy (attack's EOT prediction)")
        ax.fill_between(steps, lo, hi, alpha=0.25, label="95% Wilson")
        ax.set_xlabel("attack step (0: before the first step)")
        ax.set_ylabel("robust accuracy (%)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
        # a little room below 0 and above 100 so that a curve at 0% or 100% is not hidden by the frame
        ax.set_ylim(-3, 103)
        ax.axhline(0, color="0.6", lw=0.8, zorder=0)
        ax.grid(alpha=0.3)
        ax.set_title(_plot_title(rep), fontsize=8)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(folder / "curve.png")
        plt.close(fig)
    shown = [r for r in records if "images" in r]
    if shown:
        undefended = rep["configuration"]["defense"].get("method", "").startswith("none")
        rows = [("clean", "clean", "clean_pred"), ("adversarial", "adversarial", None),
                ("purified adv.", "purified", "adv_pred")]
        if undefended:  # nothing is purified: the adversarial row carries the classifier's prediction
            rows = [("clean", "clean", "clean_pred"), ("adversarial", "adversarial", "adv_pred")]
        fig, axes = plt.subplots(len(rows), len(shown), figsize=(1.2 * len(shown) + 0.8, 1.25 * len(rows) + 0.7),
                                 dpi=120, squeeze=False)
        for j, r in enumerate(shown):
            for i, (title, key, pred_key) in enumerate(rows):
                ax = axes[i, j]
                a = _decode(r["images"][key])
                ax.imshow(a, cmap="gray" if a.ndim == 2 else None, vmin=0, vmax=255)
                ax.set_xticks([])
                ax.set_yticks([])
                if i == 0:
                    ax.set_title(f"#{r['index']} true {r['label']}", fontsize=7)
                if pred_key:
                    p = r[pred_key][0]  # the first judgement's prediction
                    ax.set_xlabel(f"pred {p}", fontsize=7, color="green" if p == r["label"] else "red")
                if j == 0:
                    ax.set_ylabel(title, fontsize=7)
        fig.suptitle(_plot_title(rep) + "\n(pred: the first of the N judgements; green correct, red wrong)",
                     fontsize=7)
        fig.tight_layout()
        fig.savefig(folder / "grid.png")
        plt.close(fig)


def write_report(folder: str | Path) -> dict:
    """Compute the report of ``folder`` and write report.json, report.md, curve.png and grid.png there.

    The plots need matplotlib (optional): without it the report is written all the same, without them, and
    report.md and report.json (``plots.skipped``) say so; stale plots of an earlier run are removed."""
    folder = Path(folder)
    rep = compute_report(folder)
    has_mpl = available("matplotlib")
    rep["plots"] = {"skipped": None if has_mpl else "Plots not written: matplotlib is not installed; pip install "
                                                    "matplotlib (then diffpure-fast report FOLDER writes them)."}
    (folder / "report.json").write_text(json.dumps(rep, indent=2))
    (folder / "report.md").write_text(_markdown(rep))
    if has_mpl:
        _plots(folder, rep, rec.merge_records(folder))
    else:
        for name in ("curve.png", "grid.png"):
            (folder / name).unlink(missing_ok=True)
    return rep


# ---------------------------------------------------------------------------------------------------------------
# A study: several evaluations, one sub-folder each.


def study_folders(folder: str | Path) -> list[Path]:
    """The evaluation sub-folders of a study folder (those holding a config.json), sorted by name."""
    return sorted(p.parent for p in Path(folder).glob(f"*/{rec.CONFIG_FILE}"))


def _pct(a: dict) -> str:
    lo, hi = a["wilson95"]
    return f"{100 * a['accuracy']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"


def write_study_report(folder: str | Path) -> dict:
    """Rebuild the report of every evaluation sub-folder of ``folder`` and write the study's report.md, report.json
    and curve.png (see the module docstring). FileNotFoundError when it holds no evaluation."""
    folder = Path(folder)
    subs = study_folders(folder)
    if not subs:
        raise FileNotFoundError(f"{folder}: no {rec.CONFIG_FILE} and no evaluation sub-folders (folders holding one)")
    # an evaluation still running its first block has nothing to report yet: listed, not a failure
    pending = [sub.name for sub in subs if not rec.read_records(sub)]
    reps = {sub.name: write_report(sub) for sub in subs if sub.name not in pending}
    rows = []
    for name, rep in reps.items():
        ev, defense = rep["configuration"]["eval"], rep["configuration"]["defense"]
        rows.append({"folder": name, "defense": defense.get("method"), "attack": ev["attack"],
                     "fixed_noise": bool(ev.get("fixed_noise")), "bound": rep["bound"], "gradient": rep["gradient"],
                     "n": rep["n_samples"], "n_eval": rep["n_eval"], "clean": rep["clean"], "robust": rep["robust"],
                     "attack_curve": rep["attack_curve"], "time_s": rep["time_s"]["sum_over_samples"],
                     "complete": rep["complete"], "warnings": rep["warnings"]})
    study = {"evaluations": rows, "pending": pending}
    (folder / "report.json").write_text(json.dumps(study, indent=2))
    lines = [f"# Study: {len(rows)} evaluations in {folder}", "",
             "Robust accuracy with 95% Wilson intervals; each sample judged N times with noise the attack never saw "
             "(see each sub-folder's report.md for its command, options, gradient and machine).", "",
             "| evaluation | defense | attack | noise | bound | n | clean worst-of-N | robust single-shot | "
             "robust worst-of-N | robust majority | time (s) |", "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['folder']}{'' if r['complete'] else ' (INCOMPLETE)'} | {r['defense']} | {r['attack']} | "
                     f"{'fixed' if r['fixed_noise'] else 'fresh'} | {r['bound']} | {r['n']} | "
                     f"{_pct(r['clean']['worst_of_n'])} | {_pct(r['robust']['single_shot'])} | "
                     f"{_pct(r['robust']['worst_of_n'])} | {_pct(r['robust']['majority_vote'])} | {r['time_s']:.0f} |")
    warned = [(r["folder"], w) for r in rows for w in r["warnings"]]
    lines += [""] + [f"**Warning ({f}): {w}**\n" for f, w in warned]
    if pending:
        lines += [f"No finished samples yet in: {', '.join(pending)}.", ""]
    has_mpl = available("matplotlib")
    if any(r["attack_curve"] for r in rows):
        lines += ["", "![robust accuracy against attack step, every evaluation](curve.png)" if has_mpl else
                  "Plot not written: matplotlib is not installed; pip install matplotlib (then diffpure-fast report "
                  "FOLDER writes it).", ""]
    (folder / "report.md").write_text("\n".join(lines) + "\n")
    if has_mpl:
        _study_curve(folder, rows)
    else:
        (folder / "curve.png").unlink(missing_ok=True)
    return study


def _study_curve(folder: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [r for r in rows if r["attack_curve"]]
    if not curves:
        return
    fig, ax = plt.subplots(figsize=(6.4, 4), dpi=120)
    colors = plt.get_cmap("tab20").colors  # 20 distinct colours; the line style changes after them
    for i, r in enumerate(curves):
        acc = [100 * a["accuracy"] for a in r["attack_curve"]]
        ax.plot(range(len(acc)), acc, marker="o", ms=2, label=r["folder"], color=colors[i % 20],
                linestyle=("-", "--", ":")[i // 20 % 3])
    ax.set_xlabel("attack step")
    ax.set_ylabel("robust accuracy (%), attack's EOT prediction")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(folder / "curve.png")
    plt.close(fig)
