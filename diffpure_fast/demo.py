"""The demo: attack and purify real handwritten digits on CPU with the embedded models, and report honestly.

On a fixed subset of the digits test split it measures, each with a 95% Wilson interval:

1. clean accuracy of the classifier, undefended and defended (classifier after DiffPure purification);
2. robust accuracy of the undefended classifier under L-inf PGD;
3. defended accuracy on those same adversarial examples (the attack does not see the purifier: a transfer
   attack, the weakest evaluation, shown because it is what purification papers used to report);
4. robust accuracy of the defended classifier under an adaptive PGD-EOT that differentiates through the whole
   purification with exact gradients (``grad_mode="full"``), averaging ``eot`` noise draws per step, run on the
   evaluation harness (``diffpure_fast.eval``); each adversarial image is judged ``n_eval`` times with fresh noise
   the attack never saw (single-shot, worst-of-N and majority-vote accuracies);

5. the paper's noise-injection ablation: DiffPure's probability-flow ODE (``diffusion_type="ode"``, the same
   forward diffusion, then no noise) against the SDE on the first ``ode_images`` images, under the same adaptive
   attack (the SDE's numbers are those of item 4's attack on those images; every sample's attack randomness
   derives from its index, so they are what the attack gives on that subset alone);

6. the same for the guided methods (GDMP, MimicDiffusion, AGDM) on the first ``guided_images`` images, with the
   settings of ``GUIDED_SETTINGS`` (fewer steps than released, to fit the demo's time): clean defended accuracy,
   transfer, and adaptive PGD-EOT under each gradient the method admits (exact through the guidance; detached, as
   the released evaluations; for MimicDiffusion, whose exact gradient is zero, the declared straight-through
   surrogate and the released attack's unguided 5-step DDPM surrogate; for AGDM, a reconstruction, exact and
   detached guidance gradients).

It writes ``report.md``, ``report.json`` (settings, seeds, timings, versions) and ``grid.png`` (rows: clean,
PGD-adversarial, purified adversarial by each method; each with its predicted label) into the output folder.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import __version__
from ._optional import available
from ._validate import OptionError, check_float, check_int
from .attacks import DefendedClassifier, pgd_linf
from .engine import PurifyConfig, purify
from .eval import Accuracy, protocol_metrics
from .eval.defenses import build_defense, jsonable_option
from .eval.harness import EvalConfig, evaluate_batch
from .info import info
from .methods import DiffPureOptions
from .models.auxiliary import load_auxiliary

__all__ = ["DemoConfig", "REPORT_FILES", "guided_kwargs", "run_demo"]

REPORT_FILES = ("report.md", "report.json", "grid.png")


@dataclass(frozen=True)
class DemoConfig:
    n_images: int = 200            # test images for items 1-3
    adaptive_images: int | None = None  # of those, how many the adaptive attack (item 4) runs on (None: all)
    t_star: float = 0.1            # DiffPure's CIFAR-10 setting
    steps: int | None = 20         # Euler steps over [1e-5, t*]; None: DiffPure's dt = 1e-3 (100 steps at t* 0.1)
    eps: float = 0.1               # L-inf radius in [0, 1] pixel units
    pgd_steps: int = 40            # PGD steps against the undefended classifier
    adaptive_steps: int = 10       # PGD-EOT steps through the purifier
    eot: int = 4                   # noise draws averaged per adaptive step
    seed: int = 0
    batch_size: int = 100
    device: str = "cpu"
    guided_images: int = 32        # images for the guided methods' rows (0: no guided rows); at 32 the guided
                                   # rows take 270 of make demo's 605 s on the 2-core VM
    guided_eot: int = 2            # noise draws per adaptive step for the guided methods
    n_eval: int = 5                # fresh-noise judgements of each adaptive adversarial image (worst-of-N, vote)
    dt: float | None = None        # Euler step size instead of steps (None with steps=None: DiffPure's 1e-3)
    ode_images: int = 32           # images for the ODE-vs-SDE rows (0: none); the ODE's adaptive attack is the
                                   # SDE's (adaptive_steps x eot), so it costs ode_images / adaptive_images of it

    def __post_init__(self):
        # every option honoured exactly or refused here, before any work (errors name the field)
        if self.adaptive_images is None:
            object.__setattr__(self, "adaptive_images", self.n_images)
        for name, low in (("n_images", 1), ("adaptive_images", 1), ("pgd_steps", 0), ("adaptive_steps", 0),
                          ("eot", 1), ("seed", 0), ("batch_size", 1), ("guided_images", 0), ("guided_eot", 1),
                          ("n_eval", 1), ("ode_images", 0)):
            object.__setattr__(self, name, check_int(name, getattr(self, name), low=low))
        for name in ("adaptive_images", "guided_images"):
            if getattr(self, name) > self.n_images:
                raise OptionError(name, lambda s, name=name: f"expected at most {s.setting('n_images', self.n_images)}"
                                                             f", got {getattr(self, name)}")
        object.__setattr__(self, "eps", check_float("eps", self.eps, low=0.0, high=1.0))
        # the purification options, checked as purify checks them
        opts = DiffPureOptions(**self.purify_kwargs)
        object.__setattr__(self, "t_star", opts.t_star)
        object.__setattr__(self, "steps", opts.steps)
        object.__setattr__(self, "dt", None if self.steps is not None else opts.dt)
        if self.ode_images > self.adaptive_images:
            raise OptionError("ode_images", lambda s: f"expected at most "
                                                      f"{s.setting('adaptive_images', self.adaptive_images)}, got "
                                                      f"{self.ode_images}")
        if self.ode_images:
            PurifyConfig.build(**self.ode_kwargs)   # the ODE rows' options (t* a multiple of 1/1000), before any work

    @property
    def ode_kwargs(self) -> dict:
        """The probability-flow ODE with as many Euler steps as the SDE (torchdiffeq's grid: step t* / steps), or
        the SDE's dt as its step size."""
        return {"diffusion_type": "ode", "t_star": self.t_star,
                "step_size": self.t_star / self.steps if self.steps is not None else self.dt}

    @property
    def purify_kwargs(self) -> dict:
        """The purification every part of the demo uses (attacked and evaluated alike)."""
        return {"t_star": self.t_star, "steps": self.steps, "dt": self.dt}


# The guided methods on 1x16x16 digits (our settings, not the authors'): guidance strength per pixel matched to the
# released CIFAR-10 runs (3x32x32: GDMP's batch mean over 100 images is one over 1200 digits; MimicDiffusion's over
# 16 images one over 64 digits), with fewer steps than released (GDMP one round of 36 levels, not 4; MimicDiffusion
# 20 steps at stride 50 with guidance on steps 4..17, not 100 with 21..89). Clean defended accuracy with these
# settings: 99% on the first 100 test digits for both (ptb, GDMP's budget in /255 units, follows the demo's eps).
# AGDM: its t* = 0.07 with 10 respaced DDPM steps (not one per level), the shipped auxiliary network, the default
# scale (ours; no value is published).
GUIDED_SETTINGS = {
    "gdmp": dict(purify_step=36, max_iter=1, norm_batch=1200),
    "mimic": dict(steps=20, guidance_window=(4, 18), norm_batch=64),
    "agdm": dict(steps=10),
}
# Adaptive attacks per guided method: (row key, purify keyword arguments of the gradient).
GUIDED_ATTACKS = {
    "gdmp": (("exact", dict(grad_mode="full", guidance_grad="exact")),
             ("detached", dict(grad_mode="full", guidance_grad="detached"))),
    "mimic": (("exact", dict(grad_mode="full", guidance_grad="exact")),
              ("straight_through", dict(grad_mode="full", guidance_grad="straight_through")),
              ("released_surrogate", dict(grad_mode="surrogate", surrogate_steps=5))),
    "agdm": (("exact", dict(grad_mode="full", guidance_grad="exact")),
             ("detached_agdm", dict(grad_mode="full", guidance_grad="detached"))),
}
GUIDED_LABELS = {
    "exact": "exact gradients through the guidance",
    "detached": "guidance detached (the released evaluation's gradient)",
    "straight_through": "straight-through sign surrogate (declared)",
    "released_surrogate": "the released attack's unguided 5-step DDPM from t = 0.2",
    "detached_agdm": "guidance detached (an attacker ignoring the guidance)",
}


def guided_kwargs(method: str, cfg: DemoConfig = DemoConfig()) -> dict:
    """The demo's ``purify`` keyword arguments for a guided method (GUIDED_SETTINGS plus what depends on the run:
    GDMP's attack budget, AGDM's shipped auxiliary network on ``cfg.device``)."""
    kw = dict(GUIDED_SETTINGS[method])
    if method == "gdmp":
        kw["ptb"] = cfg.eps * 255.0   # GDMP's scale formula takes the attack budget in /255 units
    if method == "agdm":
        kw["auxiliary"] = load_auxiliary("digits", cfg.device)
    return kw



def _predict(classifier, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([classifier(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])


def _purify_all(x, model, cfg: DemoConfig, seed: int, desc: str, progress: bool, kwargs=None) -> torch.Tensor:
    out = []
    kwargs = cfg.purify_kwargs if kwargs is None else kwargs
    for i in tqdm(range(0, len(x), cfg.batch_size), desc=desc, disable=not progress, leave=False):
        ids = torch.arange(i, min(i + cfg.batch_size, len(x)), device=x.device)
        out.append(purify(x[i:i + cfg.batch_size], model, seed=seed, noise_ids=ids, **kwargs))
    return torch.cat(out)


def _adaptive_attack(x, y, model, clf, cfg: DemoConfig, seed: int, kwargs: dict, grad_kwargs: dict, eot: int,
                     desc: str, progress: bool, per_image: list | None = None) -> dict:
    """PGD-EOT through the purifier on the evaluation harness (``diffpure_fast.eval``), then ``cfg.n_eval``
    fresh-noise judgements of each adversarial image. Returns the four protocol accuracies (single-shot, mean,
    worst-of-N, majority vote) and the largest L-inf perturbation; ``per_image`` (a list) receives each image's
    record."""
    defended = DefendedClassifier(build_defense(model, **kwargs, **grad_kwargs), clf)
    ecfg = EvalConfig(attack="pgd-eot", eps=cfg.eps, attack_steps=cfg.adaptive_steps, eot=eot, n_eval=cfg.n_eval,
                      seed=seed, batch_size=cfg.batch_size, grid_images=0)
    bar = tqdm(total=-(-len(x) // cfg.batch_size) * cfg.adaptive_steps, desc=desc, disable=not progress,
               leave=False)
    records = []
    for i in range(0, len(x), cfg.batch_size):
        xb, yb = x[i:i + cfg.batch_size], y[i:i + cfg.batch_size]
        records += evaluate_batch(defended, xb, yb, torch.arange(i, i + len(xb)), ecfg, progress=bar.update)
    bar.close()
    if per_image is not None:
        per_image.extend(records)
    return _protocol(y, records)


def _protocol(y: torch.Tensor, records: list) -> dict:
    """The protocol accuracies of the harness records of the images y (in order) and their largest L-inf
    perturbation."""
    metrics = protocol_metrics(y.cpu().tolist(), [r["adv_pred"] for r in records])
    return {**{k: a.as_dict() for k, a in metrics.items()}, "linf": max(r["linf"] for r in records)}


def _grid_png(path: Path, rows: list[tuple[str, torch.Tensor, torch.Tensor]], labels: torch.Tensor) -> None:
    """A grid: one row per (title, images (n, 1, H, W) in [0, 1], predictions (n,)); red labels are wrong."""
    from PIL import Image, ImageDraw  # optional: run_demo checks it is installed before the work starts

    scale, pad, text_h, title_w = 4, 4, 12, 92
    n, _, h, w = rows[0][1].shape
    cell_w, cell_h = w * scale + pad, h * scale + text_h + pad
    img = Image.new("RGB", (title_w + n * cell_w, len(rows) * cell_h), "white")
    draw = ImageDraw.Draw(img)
    for r, (title, images, preds) in enumerate(rows):
        y0 = r * cell_h
        draw.text((4, y0 + h * scale // 2), title, fill="black")
        for i in range(n):
            a = (images[i, 0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
            tile = Image.fromarray(a).resize((w * scale, h * scale), Image.NEAREST)
            x0 = title_w + i * cell_w
            img.paste(tile.convert("RGB"), (x0, y0))
            ok = int(preds[i]) == int(labels[i])
            draw.text((x0 + 2, y0 + h * scale), f"pred {int(preds[i])}", fill=(0, 110, 0) if ok else (200, 0, 0))
    img.save(path)


_TABLE = ["| what | accuracy (single-shot) | 95% Wilson interval | correct / total | worst-of-N | majority vote |",
          "|---|---:|---:|---:|---:|---:|"]


def _row(name: str, a: dict) -> str:
    """One table row; an adaptive result (a dict of protocol accuracies) also fills worst-of-N and majority."""
    single = a.get("single_shot", a)
    lo, hi = single["wilson95"]
    extra = [f"{100 * a[k]['accuracy']:.1f}%" if k in a else "-" for k in ("worst_of_n", "majority_vote")]
    return (f"| {name} | {100 * single['accuracy']:.1f}% | [{100 * lo:.1f}, {100 * hi:.1f}] | "
            f"{single['correct']} / {single['total']} | {' | '.join(extra)} |")


def _markdown(report: dict) -> str:
    r, s = report["results"], report["settings"]
    rows = [
        ("Clean, undefended classifier", "clean_undefended"),
        ("Clean, defended (DiffPure + classifier)", "clean_defended"),
        (f"PGD-{s['pgd_steps']} (L-inf eps={s['eps']}) on the undefended classifier", "pgd_undefended"),
        ("Defended, on those PGD examples (transfer: attack blind to the purifier)", "pgd_transfer_defended"),
        (f"Defended, adaptive PGD-EOT ({s['adaptive_steps']} steps x {s['eot']} EOT, exact gradients "
         "through the purifier)", "adaptive_defended"),
    ]
    lines = ["# diffpure-fast demo: DiffPure and guided purification on handwritten digits", "",
             f"Command: `{report['command']}`", "", *_TABLE]
    lines += [_row(name, r[key]) for name, key in rows]
    ode = r.get("ode_vs_sde")
    if ode:
        lines += ["", f"## Noise injection: the probability-flow ODE against the SDE (first {ode['images']} images, "
                  f"the same adaptive attack; ODE settings {ode['settings']})", "", *_TABLE]
        for what, key in (("Clean, defended", "clean_defended"), ("Defended, on the PGD examples (transfer)",
                                                                  "pgd_transfer_defended"),
                          (f"Defended, adaptive PGD-EOT ({s['adaptive_steps']} steps x {s['eot']} EOT, exact "
                           "gradients)", "adaptive")):
            lines += [_row(f"{what}: SDE (diffusion_type sde)", ode["sde"][key]),
                      _row(f"{what}: ODE (diffusion_type ode)", ode["ode"][key])]
        lines += ["", "The ODE shares the SDE's forward diffusion but adds no noise on the way back: the attack "
                  "faces only the forward noise's randomness (DiffPure's ablation: noise injection matters)."]
    for method, g in r.get("guided", {}).items():
        n = g["clean_defended"]["total"]
        lines += ["", f"## {method} (first {n} images; settings {g['settings']})", "", *_TABLE,
                  _row("Clean, defended", g["clean_defended"]),
                  _row("Defended, on the PGD examples (transfer)", g["pgd_transfer_defended"])]
        lines += [_row(f"Defended, adaptive PGD-EOT ({s['adaptive_steps']} steps x {s['guided_eot']} EOT), "
                       f"{GUIDED_LABELS[k]}", g[f"adaptive_{k}"]) for k, _ in GUIDED_ATTACKS[method]]
    lines += ["", f"Adaptive rows: each adversarial image judged {s['n_eval']} times with fresh purification noise; "
              "single-shot is the first judgement, worst-of-N counts an image robust only if all are correct, "
              "majority vote if most are."]
    if r.get("guided", {}).get("mimic"):
        lines += ["", "MimicDiffusion's exact input gradient is zero (its input enters only through a sign), and so "
                  "is the detached one: the exact-gradient attack sees no signal. That is gradient masking, not "
                  "robustness; the straight-through and surrogate rows are the informative ones."]
    if r.get("guided", {}).get("agdm"):
        lines += ["", "AGDM is a reconstruction (no code was published; diffpure_fast.methods.agdm says which parts "
                  "are the paper's and which are our reading), guided by the shipped adversarially trained auxiliary "
                  "network. The exact rows differentiate through the guidance (second order through the auxiliary "
                  "network, and through its view of the attacked input); the detached rows treat the guidance as a "
                  "constant."]
    steps = s["steps"] if s["steps"] is not None else f"dt={s['dt']:g}"
    lines += ["", "Settings: " + ", ".join(f"{k}={v}" for k, v in s.items()), "",
              f"Purification: forward diffusion to t*={s['t_star']}, reverse VP-SDE by Euler–Maruyama ({steps} "
              "steps), embedded NCSN++ digits score model; classifier: embedded CNN. eps is in [0, 1] pixel units: "
              f"{s['eps']} is {16 * s['eps']:.1f} of the 16 grey-level steps of the original 8x8 digits, a change "
              "a person still reads through.",
              "", "Timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in report["timings_s"].items()),
              "", f"Machine: {report['machine']['platform']}, torch {report['machine']['torch']}, diffpure_fast "
              f"{report['machine']['diffpure_fast']}, fused step {report['machine']['fused_step']}", ""]
    if report.get("grid", "grid.png") != "grid.png":
        lines += [report["grid"], ""]
    return "\n".join(lines)


def run_demo(output: str | Path, cfg: DemoConfig = DemoConfig(), *, overwrite: bool = False, progress: bool = True,
             command: str = "diffpure-fast demo") -> dict:
    """Run the demo and write its report into ``output`` (a folder); returns the report dict."""
    from .data import load_digits_dataset
    from .models.digits import load_digits_classifier, load_digits_score_model

    out = Path(output)
    existing = [f for f in REPORT_FILES if (out / f).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{out}: already holds {', '.join(existing)}; pass --overwrite to replace them")
    dev = torch.device(cfg.device)
    timings: dict[str, float] = {}
    t_all = time.perf_counter()

    x_all, y_all = load_digits_dataset("test")
    if cfg.n_images > len(x_all):
        raise OptionError("n_images", f"the digits test split has {len(x_all)} images, got {cfg.n_images}")
    # The grid needs Pillow (optional): without it the demo runs all the same and its report says so.
    grid_note = None if available("PIL") else "grid.png not written: Pillow is not installed; pip install pillow"
    x, y = x_all[:cfg.n_images].to(dev), y_all[:cfg.n_images].to(dev)
    model = load_digits_score_model(dev)
    clf = load_digits_classifier(dev)
    # The adaptive attacks' randomness (starts, EOT and evaluation noise) derives from seeds["adaptive"] and each
    # image's index, as in diffpure_fast.eval.
    seeds = {"purify_clean": cfg.seed + 1, "purify_transfer": cfg.seed + 2, "adaptive": cfg.seed + 1000,
             "pgd_random_start": cfg.seed}

    t0 = time.perf_counter()
    pred_clean = _predict(clf, x, cfg.batch_size)
    x_pur = _purify_all(x, model, cfg, seeds["purify_clean"], "purify clean", progress)
    pred_clean_def = _predict(clf, x_pur, cfg.batch_size)
    timings["clean"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    x_adv = torch.cat([pgd_linf(lambda z, d: clf(z), x[i:i + cfg.batch_size], y[i:i + cfg.batch_size],
                                eps=cfg.eps, steps=cfg.pgd_steps, seed=seeds["pgd_random_start"] + i)
                       for i in range(0, len(x), cfg.batch_size)])
    pred_adv = _predict(clf, x_adv, cfg.batch_size)
    x_adv_pur = _purify_all(x_adv, model, cfg, seeds["purify_transfer"], "purify PGD", progress)
    pred_adv_def = _predict(clf, x_adv_pur, cfg.batch_size)
    timings["pgd_and_transfer"] = time.perf_counter() - t0

    # Adaptive PGD-EOT with exact gradients through the whole purification.
    t0 = time.perf_counter()
    n_ad, sde_records = cfg.adaptive_images, []
    adaptive = _adaptive_attack(x[:n_ad], y[:n_ad], model, clf, cfg, seeds["adaptive"], dict(cfg.purify_kwargs),
                                dict(grad_mode="full"), cfg.eot, "adaptive PGD-EOT", progress, sde_records)
    timings["adaptive"] = time.perf_counter() - t0

    def acc(pred, labels):
        return Accuracy(int((pred == labels).sum()), len(labels))

    # The ODE against the SDE on the first ode_images images: the same attack and seeds.
    ode_vs_sde, grid_rows, no = None, [], cfg.ode_images
    if no:
        t0 = time.perf_counter()
        kw = cfg.ode_kwargs
        x_tr = _purify_all(x_adv[:no], model, cfg, seeds["purify_transfer"], "ODE PGD", progress, kw)
        pred_tr = _predict(clf, x_tr, cfg.batch_size)
        ode_vs_sde = {
            "images": no, "settings": kw,
            "sde": {"clean_defended": acc(pred_clean_def[:no], y[:no]).as_dict(),
                    "pgd_transfer_defended": acc(pred_adv_def[:no], y[:no]).as_dict(),
                    "adaptive": _protocol(y[:no], sde_records[:no])},
            "ode": {"clean_defended": acc(_predict(clf, _purify_all(x[:no], model, cfg, seeds["purify_clean"],
                                                                    "ODE clean", progress, kw), cfg.batch_size),
                                          y[:no]).as_dict(),
                    "pgd_transfer_defended": acc(pred_tr, y[:no]).as_dict(),
                    "adaptive": _adaptive_attack(x[:no], y[:no], model, clf, cfg, seeds["adaptive"], kw,
                                                 dict(grad_mode="full"), cfg.eot, "ODE adaptive PGD-EOT", progress)},
        }
        grid_rows.append(("ode", x_tr, pred_tr))
        timings["ode_vs_sde"] = time.perf_counter() - t0

    # The guided methods: the same protocol on the first guided_images images.
    guided, ng = {}, cfg.guided_images
    for method in GUIDED_SETTINGS if ng else ():
        t0 = time.perf_counter()
        kw = dict(guided_kwargs(method, cfg), method=method)
        res = {"settings": {k: jsonable_option(v) for k, v in kw.items()},
               "clean_defended": acc(_predict(clf, _purify_all(x[:ng], model, cfg, seeds["purify_clean"],
                                                               f"{method} clean", progress, kw), cfg.batch_size),
                                     y[:ng]).as_dict()}
        x_tr = _purify_all(x_adv[:ng], model, cfg, seeds["purify_transfer"], f"{method} PGD", progress, kw)
        pred_tr = _predict(clf, x_tr, cfg.batch_size)
        res["pgd_transfer_defended"] = acc(pred_tr, y[:ng]).as_dict()
        grid_rows.append((f"{method}", x_tr, pred_tr))
        for key, grad_kw in GUIDED_ATTACKS[method]:
            res[f"adaptive_{key}"] = _adaptive_attack(x[:ng], y[:ng], model, clf, cfg, seeds["adaptive"], kw,
                                                      grad_kw, cfg.guided_eot, f"{method} adaptive ({key})",
                                                      progress)
        guided[method] = res
        timings[method] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_all

    results = {
        "clean_undefended": acc(pred_clean, y).as_dict(),
        "clean_defended": acc(pred_clean_def, y).as_dict(),
        "pgd_undefended": acc(pred_adv, y).as_dict(),
        "pgd_transfer_defended": acc(pred_adv_def, y).as_dict(),
        "adaptive_defended": adaptive,
        "linf_check": {"pgd": float((x_adv - x).abs().max()), "adaptive": adaptive["linf"]},
        "ode_vs_sde": ode_vs_sde,
        "guided": guided,
    }
    env = info()
    report = {
        "command": command,
        "settings": asdict(cfg),
        "seeds": seeds,
        "data": {"dataset": "sklearn.datasets.load_digits, test split", "indices": f"first {cfg.n_images}",
                 "shape": list(x.shape[1:])},
        "results": results,
        "timings_s": timings,
        "grid": grid_note or "grid.png",
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "diffpure_fast": __version__, "fused_step": env["active_implementation"].get(dev.type),
                    "threads": torch.get_num_threads()},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(_markdown(report))
    if grid_note is not None:
        (out / "grid.png").unlink(missing_ok=True)  # an earlier run's grid would not show this run's images
        return report
    k = min(10, cfg.n_images)
    _grid_png(out / "grid.png", [("clean", x[:k].cpu(), pred_clean[:k].cpu()),
                                 ("adversarial", x_adv[:k].cpu(), pred_adv[:k].cpu()),
                                 ("diffpure", x_adv_pur[:k].cpu(), pred_adv_def[:k].cpu())]
              + [(title, im[:k].cpu(), p[:k].cpu()) for title, im, p in grid_rows if len(im) >= k], y[:k].cpu())
    return report
