"""The evaluation harness's speed: batched against looped EOT, and the harness's overhead beyond the purifier.

(1) One PGD-EOT attack step (EOT gradient, grad_mode='full') on B images with EOT 1/4/16/64: batched (the eot
    copies go through the purifier as one batch of eot * B) against looped (eot purifier calls of B). Reported in
    score-network image evaluations per second: eot * B images x solver steps of the forward solve per attack step
    (the backward pass recomputes them again; both forms do the same work).
(2) Harness overhead: ``evaluate`` (records, seeds, progress bar, JSON lines, fsync, per-step traces, clean and
    adversarial evaluations) against a bare loop making the same purifier and classifier calls with the same
    shapes and nothing else; overhead = t_harness / t_bare - 1 (target: under 5%). The report's plots are written
    after the measured part (``report=False``).

Model: the embedded digits NCSN++ (16x16, 1 channel) and CNN classifier, t* = 0.1.

    python benchmarks/bench_eval.py [--batch 4] [--solver-steps 5] [--repeats 5]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import diffpure_fast as dpf
from benchmarks._common import RESULTS, header
from diffpure_fast.attacks import DefendedClassifier, derive_seed, eot_gradient, eot_noise_ids
from diffpure_fast.data import load_digits_dataset


def min_time(fn, repeats: int) -> float:
    """The fastest of ``repeats`` timed calls after one warm-up: on a shared machine the minimum is the run least
    disturbed by other jobs (a median still carries their load)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_eot(model, clf, batch: int, solver_steps: int, repeats: int) -> list[str]:
    pur = dpf.build_defense(model, grad_mode="full", t_star=0.1, steps=solver_steps, dt=None)
    d = DefendedClassifier(pur, clf)
    x, y = load_digits_dataset("test")
    x, y, ids = x[:batch], y[:batch], torch.arange(batch)
    rows = ["| EOT | copies per step | batched (s) | looped (s) | batched net-evals/s | looped net-evals/s | "
            "speed-up |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for eot in (1, 4, 16, 64):
        tb = min_time(lambda e=eot: eot_gradient(d, x, y, ids, seed=1, eot=e), repeats)
        tl = min_time(lambda e=eot: eot_gradient(d, x, y, ids, seed=1, eot=e, batched=False), repeats)
        evals = eot * batch * solver_steps
        rows.append(f"| {eot} | {eot * batch} | {tb:.3f} | {tl:.3f} | {evals / tb:.0f} | {evals / tl:.0f} | "
                    f"{tl / tb:.2f}x |")
        print(rows[-1], flush=True)
    return rows


def bare_loop(d, x, y, cfg) -> None:
    """The purifier and classifier calls ``evaluate`` makes for one block, and nothing else."""
    ids = torch.arange(x.shape[0])
    with torch.no_grad():
        for e in range(cfg["n_eval"]):
            d.logits(x, seed=derive_seed(0, "c", e), noise_ids=ids).argmax(1)
    eot, eps = cfg["eot"], cfg["eps"]
    x_adv = (x + (torch.rand_like(x) * 2 - 1) * eps).clamp(0, 1)
    rep_ids = eot_noise_ids(ids, eot)
    for s in range(cfg["attack_steps"] + 1):
        xr = x_adv.repeat(eot, 1, 1, 1).requires_grad_(s < cfg["attack_steps"])
        with torch.set_grad_enabled(s < cfg["attack_steps"]):
            logits = d.logits(xr, seed=derive_seed(0, "a", s), noise_ids=rep_ids)
            if s < cfg["attack_steps"]:
                loss = torch.nn.functional.cross_entropy(logits, y.repeat(eot), reduction="sum")
                g = torch.autograd.grad(loss, xr)[0].reshape(eot, *x.shape).sum(0)
                x_adv = torch.minimum(torch.maximum(x_adv + 2.5 * eps / cfg["attack_steps"] * g.sign(), x - eps),
                                      x + eps).clamp(0, 1)
    with torch.no_grad():
        for e in range(cfg["n_eval"]):
            d.logits(x_adv, seed=derive_seed(0, "e", e), noise_ids=ids).argmax(1)


def bench_overhead(model, clf, solver_steps: int, repeats: int) -> list[str]:
    cfg = dict(n_images=16, batch_size=8, attack_steps=3, eot=4, n_eval=2, eps=0.1)
    pur = dpf.build_defense(model, grad_mode="full", t_star=0.1, steps=solver_steps, dt=None)
    d = DefendedClassifier(pur, clf)
    x_all, y_all = load_digits_dataset("test")

    def bare():
        for i in range(0, cfg["n_images"], cfg["batch_size"]):
            bare_loop(d, x_all[i:i + cfg["batch_size"]], y_all[i:i + cfg["batch_size"]], cfg)

    def harness():
        out = Path(tempfile.mkdtemp(prefix="bench_eval_"))
        try:
            dpf.evaluate(pur, clf, "digits:test", out, progress=False, report=False, **cfg)
        finally:
            shutil.rmtree(out)

    bare()
    harness()  # warm-up of every shape both use
    wall = {"bare": [], "harness": []}
    cpu = {"bare": [], "harness": []}
    for _ in range(repeats):  # interleaved, so slow drifts of a shared machine hit both alike
        for name, fn in (("bare", bare), ("harness", harness)):
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    rows = [f"Settings: {cfg}, solver steps {solver_steps}, grad_mode='full', {repeats} interleaved repeats; the "
            f"fastest run of each (wall) and its process CPU time (all threads), which other jobs disturb less.", "",
            "| what | wall, min (s) | wall, median (s) | CPU, min (s) |", "|---|---:|---:|---:|"]
    for name, what in (("bare", "bare loop: the same purifier + classifier calls"),
                       ("harness", "dpf.evaluate (records fsync'ed per batch, traces, seeds)")):
        rows.append(f"| {what} | {min(wall[name]):.3f} | {statistics.median(wall[name]):.3f} | "
                    f"{min(cpu[name]):.3f} |")
    rows += [f"| overhead | {100 * (min(wall['harness']) / min(wall['bare']) - 1):+.1f}% | "
             f"{100 * (statistics.median(wall['harness']) / statistics.median(wall['bare']) - 1):+.1f}% | "
             f"{100 * (min(cpu['harness']) / min(cpu['bare']) - 1):+.1f}% |", "",
             "All runs, wall (bare, harness): " + ", ".join(f"({a:.3f}, {b:.3f})" for a, b in
                                                            zip(wall["bare"], wall["harness"]))]
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--solver-steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = dpf.load_score_model("digits")
    clf = dpf.load_classifier("digits")
    command = "python benchmarks/bench_eval.py " + " ".join(sys.argv[1:])
    lines = ["# Evaluation harness: batched EOT and overhead (cpu)", "", header(command),
             f"Embedded digits NCSN++ and CNN, batch {args.batch} of 1x16x16, t*=0.1, {args.solver_steps} Euler "
             f"steps, grad_mode='full'. One attack step = one EOT gradient (forward solve, exact backward).", "",
             "## (1) One PGD-EOT step: batched against looped EOT", ""]
    lines += bench_eot(model, clf, args.batch, args.solver_steps, args.repeats)
    lines += ["", "## (2) Harness overhead beyond the purifier's own calls", ""]
    lines += bench_overhead(model, clf, args.solver_steps, args.repeats)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "eval_cpu.md"
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
