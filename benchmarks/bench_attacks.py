"""One step of every attack of the harness: network calls and wall time per sample, on the embedded digits model.

For each attack and defense, the attack runs ``--repeats`` times with S_hi steps on the same batch; one step's wall
time is the median interval between the attack's progress calls (one after each step), which leaves out the set-up
and the last evaluation; the network calls per step are the difference of the counts of a run of S_hi and one of S_lo
steps, divided by S_hi - S_lo, taken by hooks on the networks: score-network forwards and backwards (VJPs),
classifier forwards and LPIPS-network forwards, in image evaluations per sample. pgd-eot, apgd-eot and fixed-noise
apgd cost the same per step (one EOT gradient of N draws); DiffHammer's row against them is its claim: N
purifications without a graph and one with the gradient, against N with the gradient.

    python benchmarks/bench_attacks.py                 # batch 8, N = 8 draws, the study's DiffPure and GDMP
    python benchmarks/bench_attacks.py --quick         # a smoke run: batch 2, N = 2, 1 solver step, DiffPure only
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import diffpure_fast as dpf
from benchmarks._common import header, write_results
from diffpure_fast.attacks import DefendedClassifier
from diffpure_fast.attacks.apgd import apgd_eot
from diffpure_fast.attacks.diffattack import diffattack_oracle
from diffpure_fast.attacks.diffhammer import diffhammer_oracle
from diffpure_fast.attacks.perceptual import load_lpips
from diffpure_fast.attacks.pgd import pgd_eot
from diffpure_fast.attacks.unrestricted import lf_attack, ppgd_attack, stadv_attack
from diffpure_fast.data import load_digits_dataset

ATTACKS = ("pgd-eot", "apgd-eot", "diffattack", "diffhammer", "lf", "ppgd", "stadv")


class Counter:
    """Image evaluations through a module: forwards (every call) and, with ``backward``, backwards (gradients flowing
    out of it; the module must return a tensor)."""

    def __init__(self, module: torch.nn.Module, backward: bool = True):
        self.forward = self.backward = 0
        module.register_forward_pre_hook(self._fwd)
        if backward:
            module.register_full_backward_hook(self._bwd)

    def _fwd(self, module, args):
        self.forward += args[0].shape[0]

    def _bwd(self, module, grad_in, grad_out):
        self.backward += grad_out[0].shape[0]

    def snapshot(self) -> tuple[int, int]:
        return self.forward, self.backward


def runner(attack: str, d, x, y, ids, *, eot: int, eps: float, lpips):
    """fn(steps, progress) running ``attack`` for that many steps on the batch."""
    common = dict(eot=eot, seed=1)
    if attack == "pgd-eot":
        return lambda s, p: pgd_eot(d, x, y, ids, eps=eps, steps=s, progress=p, **common)
    if attack in ("apgd-eot", "diffattack", "diffhammer"):
        def run(s, p):
            oracle = None
            if attack == "diffattack":
                oracle = diffattack_oracle(d, y, ids, seed=1, eot=eot)
            elif attack == "diffhammer":
                oracle = diffhammer_oracle(d, y, ids, seed=1, paths=eot, eps=eps)
            return apgd_eot(d, x, y, ids, eps=eps, steps=s, oracle=oracle, progress=p, **common)
        return run
    if attack == "lf":
        return lambda s, p: lf_attack(d, x, y, ids, lpips=lpips, bound=1.0, steps=s, step_size=0.05, progress=p,
                                      **common)
    if attack == "ppgd":
        return lambda s, p: ppgd_attack(d, x, y, ids, lpips=lpips, bound=1.0, steps=s, progress=p, **common)
    return lambda s, p: stadv_attack(d, x, y, ids, bound=0.05, steps=s, progress=p, **common)


def measure(fn, counters: dict, lo: int, hi: int, repeats: int):
    """(seconds per step, {name: (forwards, backwards) per step}): the median interval between progress calls over
    ``repeats`` runs of hi steps, and the difference of the counts of a run of hi and one of lo steps."""
    counts, intervals = {}, []
    for s in (lo, hi):
        before = {k: c.snapshot() for k, c in counters.items()}
        fn(s, None)
        after = {k: c.snapshot() for k, c in counters.items()}
        counts[s] = {k: (after[k][0] - before[k][0], after[k][1] - before[k][1]) for k in counters}
    for _ in range(repeats):
        stamps: list[float] = []
        fn(hi, lambda n, log=stamps: log.append(time.perf_counter()))
        # the steps between progress calls, the last one (an evaluation without a gradient) left out
        intervals += [b - a for a, b in zip(stamps[:-2], stamps[1:-1])]
    per = {k: tuple((counts[hi][k][i] - counts[lo][k][i]) / (hi - lo) for i in range(2)) for k in counters}
    return statistics.median(intervals), per


def defenses(args, model):
    from benchmarks.attack_study import STUDY_DEFENSES

    out = {}
    for name in args.defenses.split(","):
        opts = dict(STUDY_DEFENSES[name])
        if args.quick:
            opts = dict(t_star=0.1, steps=1, dt=None) if name == "diffpure" else dict(opts, purify_step=2)
        out[name] = dpf.build_defense(model, grad_mode="full", **opts)
    return out


def main(argv=None) -> list[str]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: batch 2, N = 2, 1 solver step, 1 repeat")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--eot", type=int, default=8, help="N: EOT draws / DiffHammer paths per step")
    ap.add_argument("--defenses", default="diffpure,gdmp")
    ap.add_argument("--attacks", default=",".join(ATTACKS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: on the loaded 2-core VM two "
                    "threads ran 10x slower than one)")
    ap.add_argument("--output", default=None, help="results file name under benchmarks/results (default "
                    "attacks_cpu.md; none with --quick)")
    args = ap.parse_args(argv)
    if args.quick:
        args.batch, args.eot, args.repeats, args.defenses = 2, 2, 1, "diffpure"
    torch.set_num_threads(args.threads)
    lo, hi = (1, 3) if args.quick else (2, 5)
    model, clf = dpf.load_score_model("digits"), dpf.load_classifier("digits")
    lpips = load_lpips("digits")
    x, y = load_digits_dataset("test")
    x, y, ids = x[:args.batch], y[:args.batch], torch.arange(args.batch)
    counters = {"score": Counter(model.net), "classifier": Counter(clf), "lpips": Counter(lpips.net, backward=False)}
    rows = ["| defense | attack | wall per sample per step (ms) | vs pgd-eot | score-net forwards | score-net "
            "backwards | classifier forwards | LPIPS-net forwards |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for dname, pur in defenses(args, model).items():
        d = DefendedClassifier(pur, clf)
        base = None
        for attack in args.attacks.split(","):
            sec, per = measure(runner(attack, d, x, y, ids, eot=args.eot, eps=0.1, lpips=lpips), counters, lo, hi,
                               args.repeats)
            ms = 1000 * sec / args.batch
            base = ms if attack == "pgd-eot" else base
            ratio = f"{ms / base:.2f}x" if base else "-"
            f = {k: (v[0] / args.batch, v[1] / args.batch) for k, v in per.items()}
            rows.append(f"| {dname} | {attack} | {ms:.1f} | {ratio} | {f['score'][0]:.1f} | {f['score'][1]:.1f} | "
                        f"{f['classifier'][0]:.1f} | {f['lpips'][0]:.1f} |")
            print(rows[-1], flush=True)
    command = "python benchmarks/bench_attacks.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = ["# One attack step per attack (cpu)", "", header(command.strip()),
             f"Embedded digits NCSN++ and CNN, batch {args.batch} of 1x16x16, N = {args.eot} EOT draws (DiffHammer: "
             f"paths) per step, eps 0.1, LPIPS bound 1.0 over the digits classifier's features, StAdv bound 0.05; "
             f"defenses {args.defenses} (grad_mode='full'). Wall time: the median step of {args.repeats} runs of {hi} "
             f"steps; counts: the difference of runs of {lo} and {hi} steps. "
             "Network calls: image evaluations per sample per step (a backward is one VJP through the network).",
             "", "Provisional: measured under load on a shared machine; times vary by 2-3x between runs.", "", *rows,
             ""]
    if not args.quick:
        write_results(args.output or "attacks_cpu.md", lines)
    else:
        print("\n".join(lines))
    return lines


if __name__ == "__main__":
    main()
