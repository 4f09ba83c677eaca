#!/usr/bin/env python
"""AGDM ablation on the embedded digits models: guidance scale (0 / default / large) and distance D, each with
clean defended accuracy, transfer accuracy, and adaptive PGD-EOT under exact and detached guidance gradients
(95% Wilson intervals). The demo's protocol (``diffpure_fast.demo``): same images, PGD examples, seeds and
fresh-noise judgements; AGDM at t* = 0.07 with 10 respaced DDPM steps and the shipped auxiliary network.

    python benchmarks/agdm_ablation.py --out benchmarks/results/agdm_ablation_cpu.md

Accuracies do not depend on the machine's load or thread count beyond float rounding; the seconds do.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks._common import header
from diffpure_fast.attacks import pgd_linf
from diffpure_fast.data import load_digits_dataset
from diffpure_fast.demo import DemoConfig, _adaptive_attack, _predict, _purify_all
from diffpure_fast.eval import Accuracy
from diffpure_fast.methods.agdm import AGDMOptions
from diffpure_fast.models.auxiliary import load_auxiliary
from diffpure_fast.models.digits import load_digits_classifier, load_digits_score_model

DEFAULT_SCALE = AGDMOptions.__dataclass_fields__["scale"].default
# (row name, AGDM options beyond the shared ones, run the adaptive attacks)
ROWS = [
    ("scale 0 (unguided DDPM)", dict(scale=0.0), True),
    (f"scale {DEFAULT_SCALE:g} (default), feature_mse", dict(), True),
    (f"scale {10 * DEFAULT_SCALE:g}, feature_mse", dict(scale=10 * DEFAULT_SCALE), True),
    (f"scale {DEFAULT_SCALE:g}, logit_mse", dict(distance="logit_mse"), True),
    (f"scale {DEFAULT_SCALE:g}, kl", dict(distance="kl"), True),
    (f"scale {DEFAULT_SCALE:g}, feature_mse, no class term", dict(label="none"), False),
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="markdown report (a .json beside it)")
    p.add_argument("--images", type=int, default=64, help="test images for the clean and transfer columns")
    p.add_argument("--adaptive-images", type=int, default=32)
    p.add_argument("--steps", type=int, default=10, help="AGDM's DDPM steps")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = DemoConfig()
    x, y = load_digits_dataset("test")
    x, y = x[:args.images], y[:args.images]
    model, clf, aux = load_digits_score_model(), load_digits_classifier(), load_auxiliary("digits")
    x_adv = torch.cat([pgd_linf(lambda z, d: clf(z), x[i:i + cfg.batch_size], y[i:i + cfg.batch_size], eps=cfg.eps,
                                steps=cfg.pgd_steps, seed=cfg.seed + i) for i in range(0, len(x), cfg.batch_size)])
    na = args.adaptive_images
    results = []
    for name, extra, adaptive in ROWS:
        t0 = time.perf_counter()
        kw = dict(method="agdm", auxiliary=aux, steps=args.steps, **extra)
        row = {"name": name, "options": {k: v for k, v in extra.items()}}
        for key, xs, seed in (("clean", x, cfg.seed + 1), ("transfer", x_adv, cfg.seed + 2)):
            pred = _predict(clf, _purify_all(xs, model, cfg, seed, key, False, kw), cfg.batch_size)
            row[key] = Accuracy(int((pred == y).sum()), len(y)).as_dict()
        for grad in ("exact", "detached") if adaptive else ():
            if grad == "detached" and extra.get("scale") == 0.0:
                continue   # no guidance: detached is the exact gradient
            row[f"adaptive_{grad}"] = _adaptive_attack(
                x[:na], y[:na], model, clf, cfg, cfg.seed + 1000, kw, dict(grad_mode="full", guidance_grad=grad),
                cfg.guided_eot, grad, False)
        row["seconds"] = round(time.perf_counter() - t0, 1)
        results.append(row)
        print(json.dumps(row), flush=True)

    def cell(a):
        if a is None:
            return "-"
        s = a.get("single_shot", a)
        lo, hi = s["wilson95"]
        worst = f"; worst-of-{cfg.n_eval} {100 * a['worst_of_n']['accuracy']:.1f}%" if "worst_of_n" in a else ""
        return f"{100 * s['accuracy']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]{worst}"

    lines = ["# AGDM ablation on the digits models (CPU)", "",
             header(f"python benchmarks/agdm_ablation.py {' '.join(sys.argv[1:] if argv is None else argv)}"),
             f"AGDM (our reconstruction) at t* = 0.07, {args.steps} respaced DDPM steps, the shipped auxiliary "
             f"network; the demo's classifier and PGD examples (L-inf eps = {cfg.eps}, {cfg.pgd_steps} steps). "
             f"Clean and transfer: first {args.images} test digits. Adaptive: PGD-EOT {cfg.adaptive_steps} steps x "
             f"{cfg.guided_eot} EOT on the first {na}, each adversarial image judged {cfg.n_eval} times with fresh "
             "noise (single-shot with its 95% Wilson interval; worst-of-N).", "",
             "| setting | clean defended | transfer | adaptive, exact gradients | adaptive, guidance detached |",
             "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['name']} | {cell(r['clean'])} | {cell(r['transfer'])} | "
                     f"{cell(r.get('adaptive_exact'))} | {cell(r.get('adaptive_detached'))} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
