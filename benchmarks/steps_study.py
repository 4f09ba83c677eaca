#!/usr/bin/env python
"""Steps versus robustness on the embedded digits models: DiffPure (t* = 0.1) with the Euler–Maruyama SDE solver,
DDIM (eta = 0) and DPM-Solver++(2M) at a range of network calls per purification, each evaluated through
``dpf.evaluate``: clean accuracy and robust accuracy under an adaptive PGD-EOT attack with exact gradients
(``grad_mode="full"``) through every solver step, each sample judged ``--n-eval`` times with fresh noise
(single-shot, worst-of-N, majority vote, 95% Wilson intervals), and time per image.

    python benchmarks/steps_study.py                   # the committed study (about an hour on the 2-core VM)
    python benchmarks/steps_study.py --quick           # a smoke run (minutes), written under out/

Every configuration's records go to ``--work/<solver>_<calls>/`` (``evaluate``'s folders: rerunning the command
resumes), the summary to ``--out`` (markdown, JSON and a PNG plot). Accuracies do not depend on the machine's load
(all randomness derives from the seed and the sample index); times do.
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

from benchmarks._common import header, median_time
from diffpure_fast import build_defense, evaluate
from diffpure_fast.data import load_digits_dataset
from diffpure_fast.models.digits import load_digits_score_model

SOLVERS = {"euler": {}, "ddim": {"eta": 0.0}, "dpm-solver++": {}}
LABELS = {"euler": "Euler–Maruyama (SDE)", "ddim": "DDIM, eta 0", "dpm-solver++": "DPM-Solver++(2M)"}


def _purify_seconds(defense, x: torch.Tensor) -> float:
    """Median time of one no-grad purification of x, per image."""
    with torch.no_grad():
        return median_time(lambda: defense(x), repeats=3) / x.shape[0]


def run(args) -> dict:
    model = load_digits_score_model()
    x_all, _ = load_digits_dataset("test")
    rows = []
    # cheapest first across solvers, so a run stopped early still compares every solver at the smaller counts
    for calls in sorted(args.calls):
        for solver in args.solvers:
            extra = SOLVERS[solver]
            defense = build_defense(model, grad_mode="full", t_star=args.t_star, solver=solver, steps=calls, **extra)
            folder = args.work / f"{solver}_{calls}"
            t0 = time.perf_counter()
            rep = evaluate(defense, "digits", "digits:test", folder, attack="pgd-eot", eps=args.eps,
                           attack_steps=args.attack_steps, eot=args.eot, n_eval=args.n_eval, n_images=args.images,
                           batch_size=args.batch_size, seed=args.seed, progress=False)
            wall = time.perf_counter() - t0
            records = [json.loads(line) for line in (folder / "records.jsonl").read_text().splitlines()]
            row = {"solver": solver, "calls": calls, "clean": rep["clean"], "robust": rep["robust"],
                   "eval_s_per_image": sum(r["time_s"] for r in records) / len(records),
                   "purify_s_per_image": _purify_seconds(defense, x_all[:args.batch_size]),
                   "wall_s_this_run": wall}
            rows.append(row)
            robust = row["robust"]
            print(f"{solver:>13} {calls:4d} calls: clean {row['clean']['single_shot']['accuracy']:.3f}  robust "
                  f"{robust['single_shot']['accuracy']:.3f} / worst {robust['worst_of_n']['accuracy']:.3f}  "
                  f"{row['purify_s_per_image'] * 1e3:.1f} ms/image", flush=True)
    rows.sort(key=lambda r: (list(SOLVERS).index(r["solver"]), r["calls"]))
    return {"rows": rows, "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}


def _pct(acc: dict) -> str:
    lo, hi = acc["wilson95"]
    return f"{100 * acc['accuracy']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"


def write_markdown(result: dict, path: Path, command: str) -> None:
    s = result["settings"]
    lines = [
        "# Steps versus robustness: DiffPure on the digits models", "", header(command),
        f"Settings: the first {s['images']} digits of the test split, t* = {s['t_star']}, L-inf eps = {s['eps']}; "
        f"adaptive PGD-EOT {s['attack_steps']} steps x {s['eot']} EOT (step 2.5 eps / steps, random start, CE), "
        f"exact gradients (`grad_mode=\"full\"`) through every solver step; each image judged {s['n_eval']} times "
        f"with fresh noise (the clean image with the same draws); seed {s['seed']}. Solvers: "
        + ", ".join(f"{LABELS[k]} (`solver=\"{k}\"`)" for k in SOLVERS if k in s["solvers"])
        + "; uniform time grid from t* to 1e-5; network calls = steps. 95% Wilson intervals.",
        "",
        "Times are **provisional, measured under load** (the 2-core VM shared with other jobs): `purify` = one "
        f"no-grad purification of a batch of {s['batch_size']}, median of 3, per image; `eval` = the harness's "
        "per-image time (clean judgements, the attack, the adversarial judgements).",
        "",
        "| solver | calls | clean single-shot | clean worst-of-N | robust single-shot | robust worst-of-N | "
        "robust majority | purify (ms/image) | eval (s/image) |",
        "|---|---:|---|---|---|---|---|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(f"| {LABELS[r['solver']]} | {r['calls']} | {_pct(r['clean']['single_shot'])} | "
                     f"{_pct(r['clean']['worst_of_n'])} | {_pct(r['robust']['single_shot'])} | "
                     f"{_pct(r['robust']['worst_of_n'])} | {_pct(r['robust']['majority_vote'])} | "
                     f"{1e3 * r['purify_s_per_image']:.1f} | {r['eval_s_per_image']:.2f} |")
    path.write_text("\n".join(lines) + "\n")


def plot(result: dict, path: Path) -> bool:
    try:
        import matplotlib
    except ImportError:
        print("plot not written: matplotlib is not installed", file=sys.stderr)
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    panels = (("clean", "single_shot", "clean accuracy (single-shot)"),
              ("robust", "single_shot", "robust accuracy, single-shot"),
              ("robust", "worst_of_n", f"robust accuracy, worst-of-{result['settings']['n_eval']}"))
    for ax, (part, metric, title) in zip(axes, panels):
        for solver in SOLVERS:
            rows = [r for r in result["rows"] if r["solver"] == solver]
            if not rows:
                continue
            calls = [r["calls"] for r in rows]
            acc = [100 * r[part][metric]["accuracy"] for r in rows]
            lo = [a - 100 * r[part][metric]["wilson95"][0] for a, r in zip(acc, rows)]
            hi = [100 * r[part][metric]["wilson95"][1] - a for a, r in zip(acc, rows)]
            ax.errorbar(calls, acc, yerr=[lo, hi], marker="o", capsize=3, label=LABELS[solver])
        ax.set_xscale("log")
        ax.set_xlabel("network calls per purification")
        ax.set_ylabel("%")
        ax.set_title(title)
        ax.set_ylim(0, 102)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower right")
    s = result["settings"]
    fig.suptitle(f"DiffPure on digits, t* = {s['t_star']}, eps = {s['eps']}, PGD-EOT {s['attack_steps']}x{s['eot']} "
                 f"exact gradients, n = {s['images']} (95% Wilson)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "steps_study_cpu.md",
                   help="markdown summary (.json and .png beside it)")
    p.add_argument("--work", type=Path, default=REPO / "out" / "steps_study", help="evaluate's record folders")
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--calls", type=int, nargs="+", default=[5, 10, 20, 50, 100])
    p.add_argument("--solvers", nargs="+", default=list(SOLVERS), choices=list(SOLVERS))
    p.add_argument("--t-star", type=float, default=0.1)
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--attack-steps", type=int, default=4)
    p.add_argument("--eot", type=int, default=2)
    p.add_argument("--n-eval", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="4 images, 5 and 10 calls, 2 attack steps; under out/")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.calls, args.attack_steps, args.n_eval = 4, [5, 10], 2, 2
        args.out = REPO / "out" / "steps_study_quick" / "steps_study.md"
        args.work = REPO / "out" / "steps_study_quick"
    torch.set_num_threads(args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python benchmarks/steps_study.py", *sys.argv[1:]])
    result = run(args)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    write_markdown(result, args.out, command)
    plot(result, args.out.with_suffix(".png"))
    print(f"wrote {args.out} (.json, .png)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
