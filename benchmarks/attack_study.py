"""The attack comparison on the digits model: PGD-EOT, APGD-EOT, fixed-noise APGD-EOT, DiffAttack, DiffHammer, LF and
StAdv against DiffPure and GDMP, each an evaluation of the harness in its own sub-folder of one study folder, then the
study's combined report (``eval.report.write_study_report``: worst-of-N and majority vote with Wilson intervals, every
attack-success curve on one plot).

Sized to fit about an hour of the 2-core development VM (``STUDY_ATTACKS``: far fewer iterations than the papers'
100 x 20; the sizes are written into the results file): one process per defense, one torch thread each (on a loaded
2-core machine two threads per process ran 10x slower than one, OpenMP threads waiting on each other), then
``--report-only`` writes the combined report. Rerunning resumes: finished evaluations are skipped by the harness.
Accuracies do not depend on the machine's load; the times do.

    python benchmarks/attack_study.py --defenses diffpure & python benchmarks/attack_study.py --defenses gdmp; wait
    python benchmarks/attack_study.py --report-only
    python benchmarks/attack_study.py --quick      # 4 images, 1 step each: a smoke run (results not written)
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import diffpure_fast as dpf
from benchmarks._common import RESULTS, header, write_results
from diffpure_fast.eval.report import write_study_report

# Our digits settings: DiffPure at t* = 0.1 with 5 Euler steps (the demo's); GDMP one round of 12 levels (t* = 0.012;
# its CIFAR-10 setting is 4 rounds of 36: one round of 36 costs 3x more per attack step, 2.1 s per sample at N = 4,
# which would not fit the hour) with the released per-pixel guidance strength (norm_batch 1200) and ptb = 25.5 (eps
# 0.1 in /255 units).
STUDY_DEFENSES = {
    "diffpure": dict(method="diffpure", t_star=0.1, steps=5, dt=None),
    "gdmp": dict(method="gdmp", purify_step=12, max_iter=1, norm_batch=1200, ptb=25.5),
}
# Every attack: 8 steps, N = 4 EOT draws (DiffHammer: 4 paths) per step, one run; the L-p attacks at L-inf eps = 0.1
# (the project's digits radius), LF at LPIPS 1.0 over the digits classifier's features (about the LPIPS of the L-inf
# 0.1 PGD examples on the undefended classifier: mean 0.99), StAdv at DiffPure's flow bound 0.05.
_SIZE = dict(attack_steps=8, eot=4)
STUDY_ATTACKS = {
    "pgd-eot": dict(attack="pgd-eot", eps=0.1, **_SIZE),
    "apgd-eot": dict(attack="apgd-eot", eps=0.1, **_SIZE),
    "apgd-eot-fixed": dict(attack="apgd-eot", eps=0.1, fixed_noise=True, **_SIZE),
    "diffattack": dict(attack="diffattack", eps=0.1, **_SIZE),
    "diffhammer": dict(attack="diffhammer", eps=0.1, restarts=1, **_SIZE),
    "lf": dict(attack="lf", lpips="digits", bound=1.0, lf_factor=2, step_size=0.05, **_SIZE),
    "stadv": dict(attack="stadv", bound=0.05, **_SIZE),
}
PROTOCOL = dict(n_eval=10, batch_size=32, seed=0)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", default="out/attack_study")
    ap.add_argument("--n-images", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1, see above)")
    ap.add_argument("--report-only", action="store_true", help="write the combined report and the results file from "
                    "the finished evaluations")
    ap.add_argument("--defenses", default=",".join(STUDY_DEFENSES))
    ap.add_argument("--attacks", default=",".join(STUDY_ATTACKS))
    ap.add_argument("--quick", action="store_true", help="4 images, 1 attack step, 2 evaluations; no results file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.output)
    model = dpf.load_score_model("digits")
    for dname in ([] if args.report_only else args.defenses.split(",")):
        defense = dpf.build_defense(model, grad_mode="full", **STUDY_DEFENSES[dname])
        for aname in args.attacks.split(","):
            opts = dict(STUDY_ATTACKS[aname], **PROTOCOL)
            if args.quick:
                opts.update(attack_steps=1, n_eval=2, batch_size=4)
            t0 = time.perf_counter()
            dpf.evaluate(defense, "digits", "digits:test", out / f"{dname}-{aname}", n_images=4 if args.quick else
                         args.n_images, progress=False, command=f"benchmarks/attack_study.py ({dname}, {aname})",
                         **opts)
            print(f"{dname}-{aname}: {time.perf_counter() - t0:.0f} s", flush=True)
    study = write_study_report(out)
    print((out / "report.md").read_text())
    if not args.report_only:
        return
    minutes = sum(r["time_s"] for r in study["evaluations"]) / 60
    command = ("python benchmarks/attack_study.py --defenses diffpure & python benchmarks/attack_study.py --defenses "
               "gdmp; wait; python benchmarks/attack_study.py --report-only")
    sizes = [f"- `{k}`: " + ", ".join(f"{a}={v}" for a, v in s.items()) for k, s in STUDY_ATTACKS.items()]
    defs = [f"- `{k}`: " + ", ".join(f"{a}={v}" for a, v in s.items()) for k, s in STUDY_DEFENSES.items()]
    # the study report's table and plot, the plot renamed as it is copied next to the results file
    table = (out / "report.md").read_text().split("\n", 2)[2].replace("](curve.png)", "](attack_study_curve.png)")
    lines = ["# Attack comparison on the digits model (cpu)", "", header(command.strip()),
             f"First {args.n_images} test digits; every sample attacked; each adversarial image judged "
             f"{PROTOCOL['n_eval']} times with noise the attack never saw (seed {PROTOCOL['seed']}); 95% Wilson "
             "intervals. grad_mode='full' (exact gradients through the chain and GDMP's guidance).", "",
             "Defenses:", *defs, "", "Attacks (far fewer iterations than the papers' 100 x 20; one run each):", *sizes,
             "", f"Time: {minutes:.0f} min summed over the evaluations (the records' per-sample times; DiffPure and "
             "GDMP ran as two one-thread processes side by side). Provisional: measured under load on a shared "
             "machine.",
             "", table]
    write_results("attack_study_cpu.md", lines)
    shutil.copyfile(out / "curve.png", RESULTS / "attack_study_curve.png")
    print(f"{len(study['evaluations'])} evaluations, {minutes:.0f} min")


if __name__ == "__main__":
    main()
