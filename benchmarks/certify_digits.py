#!/usr/bin/env python
"""Certified robustness of the embedded digits models by denoised smoothing (``dpf.certify``), and the CPU
throughput of denoise-and-classify (images per second) that bounds its cost.

    python benchmarks/certify_digits.py            # the committed run (sigma 0.25 and 0.5; tens of minutes, 2 cores)
    python benchmarks/certify_digits.py --quick    # a smoke run (a minute), written under out/

Each sigma's records go to ``--work/sigma_<s>/`` (``certify``'s folders: rerunning the command resumes); the summary
(certified accuracy against radius for both sigmas, one plot) to ``--out`` (.md, .json, .png). Certificates do not
depend on the machine's load (counter-based noise); throughput does.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks._common import header, median_time
from diffpure_fast import certify
from diffpure_fast.eval import records as rec
from diffpure_fast.eval.certify import CertifyConfig, DenoisedSmoothing, plot_certified_accuracy
from diffpure_fast.models.digits import load_digits_classifier, load_digits_score_model


def throughput(batch_sizes: list[int], sigma: float) -> list[dict]:
    """Denoise-and-classify images per second (one-shot: one score-network call and one classifier call per noise
    draw), median of 3 batches of draws of one test image."""
    f = DenoisedSmoothing(load_digits_score_model(), load_digits_classifier("cpu").eval(), CertifyConfig(sigma=sigma))
    x = torch.rand(1, 16, 16, generator=torch.Generator().manual_seed(0))
    rows = []
    for bs in batch_sizes:
        draws = torch.arange(bs)
        sec = median_time(lambda draws=draws: f.predict(x, draws, seed=0), repeats=3)
        rows.append({"batch": bs, "images_per_s": bs / sec})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "certify_digits_cpu.md")
    p.add_argument("--work", type=Path, default=REPO / "out" / "certify_digits")
    p.add_argument("--sigmas", type=float, nargs="+", default=[0.25, 0.5])
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--n0", type=int, default=100)
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--alpha", type=float, default=0.001)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="4 images, n = 100; under out/")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.n0, args.n = 4, 20, 100
        args.out = REPO / "out" / "certify_digits_quick" / "certify_digits.md"
        args.work = REPO / "out" / "certify_digits_quick"
    torch.set_num_threads(args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python benchmarks/certify_digits.py", *sys.argv[1:]])
    runs, reports = [], {}
    model = load_digits_score_model()
    for sigma in args.sigmas:
        folder = args.work / f"sigma_{sigma:g}"
        rep = certify(model, "digits", "digits:test", folder, sigma=sigma, n0=args.n0, n=args.n, alpha=args.alpha,
                      n_images=args.images, batch_size=args.batch_size, progress=False, command=command)
        reports[f"{sigma:g}"] = rep
        runs.append((f"sigma = {sigma:g}", rec.merge_records(folder)))
        print(f"sigma {sigma:g}: " + ", ".join(f"r={r['radius']:g}: {100 * r['accuracy']:.1f}%"
                                               for r in rep["certified_accuracy"][::2]), flush=True)
    thr = throughput([100, 1000], args.sigmas[0])   # after the certificates: under load it is the slow part
    plot_certified_accuracy(args.out.with_suffix(".png"), runs, f"digits, one-shot, n = {args.n}, "
                            f"alpha = {args.alpha}, {args.images} images")
    args.out.with_suffix(".json").write_text(json.dumps({"throughput": thr, "reports": reports,
                                                         "settings": {k: str(v) for k, v in vars(args).items()}},
                                                        indent=1))
    lines = ["# Certified robustness of the digits models (denoised smoothing, CPU)", "", header(command),
             f"CERTIFY (Cohen et al. 2019) with the one-shot denoiser (Carlini et al. 2023: one score-network call "
             f"predicts x0 at the level whose noise matches sigma, then the digits classifier): the first "
             f"{args.images} digits of the test split, n0 = {args.n0}, n = {args.n}, alpha = {args.alpha}, seed 0. "
             "95% Wilson intervals over the images; abstentions count as failures. Per-sample p_lower and radii: "
             f"the .json beside this file (`reports.<sigma>.samples`), and each records folder's report.md.", ""]
    for sigma, rep in reports.items():
        lines += [f"## sigma = {sigma}", "",
                  f"Abstentions: {rep['abstentions']}/{rep['n_samples']}; largest radius n draws can certify: "
                  f"{rep['max_certifiable_radius']:.3f}; median radius of correct certificates: "
                  + ("-" if rep["median_radius_of_correct"] is None else f"{rep['median_radius_of_correct']:.3f}")
                  + f"; {rep['time_s_per_sample']:.1f} s per image (under load).", "",
                  "| L2 radius | certified accuracy [95% Wilson] |", "|---:|---|"]
        for row in rep["certified_accuracy"]:
            lo, hi = row["wilson95"]
            lines.append(f"| {row['radius']:.4g} | {100 * row['accuracy']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] |")
        lines.append("")
    lines += ["## Denoise-and-classify throughput", "",
              "**Provisional, measured under load** (the 2-core VM shared with other jobs), "
              f"{args.threads} torch thread(s): one-shot denoising (one score-network call) and classification of "
              "a batch of noise draws, median of 3.", "", "| draws per batch | images per second |", "|---:|---:|"]
    lines += [f"| {r['batch']} | {r['images_per_s']:.0f} |" for r in thr]
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out} (.json, .png)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
