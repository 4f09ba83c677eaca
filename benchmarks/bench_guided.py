"""The guided methods (GDMP, MimicDiffusion) next to DiffPure: time and peak memory of a purification and of its
gradients, in units of one network call, and how far the detached (released-evaluation) gradient is from the exact
one on the embedded digits models.

Part 1 (cost): the 2.47M-parameter NCSN++ of bench_purify.py (random weights), batch 4 of 3x32x32, float32, each
method at its released CIFAR-10 defaults (DiffPure 100 Euler steps; GDMP 4 rounds x 36 steps, MSE; MimicDiffusion 100
steps, guidance on 21..89). Loss <w, purify(x)>. Every mode runs in a fresh process; peak memory is the RSS
high-water mark above the RSS before the call.

Part 2 (gradients): the embedded digits score model and classifier, the demo's digits settings of each method
(``diffpure_fast.demo.GUIDED_SETTINGS``), the cross-entropy of the defended classifier on the first 16 test digits;
the detached and straight-through gradients against the exact one (relative error, cosine, norms).

    python benchmarks/bench_guided.py [--repeats 1] [--batch 4]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import diffpure_fast as dpf
from benchmarks._common import header, measure, network_call_seconds, run_workers, worker_parser, write_results
from benchmarks.bench_purify import bench_model

# (method, grad_mode, guidance_grad) per measured mode.
MODES = {
    "diffpure/none": ("diffpure", "none", "exact"),
    "diffpure/full": ("diffpure", "full", "exact"),
    "gdmp/none": ("gdmp", "none", "exact"),
    "gdmp/full": ("gdmp", "full", "exact"),
    "gdmp/detached": ("gdmp", "full", "detached"),
    "mimic/none": ("mimic", "none", "exact"),
    "mimic/full": ("mimic", "full", "exact"),
    "mimic/detached": ("mimic", "full", "detached"),
    "mimic/straight_through": ("mimic", "full", "straight_through"),
}


def run_mode(mode: str, batch: int, repeats: int) -> dict:
    method, grad_mode, guidance_grad = MODES[mode]
    model = bench_model(torch.device("cpu"))
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, 32, 32, generator=g)
    w = torch.randn(x.shape, generator=g)

    def fn():
        xg = x.clone().requires_grad_(grad_mode != "none")
        out = dpf.purify(xg, model, method=method, seed=0, grad_mode=grad_mode, guidance_grad=guidance_grad)
        if grad_mode != "none":
            torch.autograd.grad((out * w).sum(), xg)

    res, _ = measure(fn, repeats)
    res["call_seconds"] = network_call_seconds(model, x)
    return {**res, "steps": len(dpf.PurifyConfig.build(method).chain())}


def digits_gradients(n: int = 16) -> list[str]:
    from diffpure_fast.data import load_digits_dataset
    from diffpure_fast.demo import GUIDED_SETTINGS, guided_kwargs

    model, clf = dpf.load_score_model("digits"), dpf.load_classifier("digits")
    x, y = load_digits_dataset("test")
    x, y = x[:n], y[:n]

    def grad(method, **kw):
        xg = x.clone().requires_grad_(True)
        out = dpf.purify(xg, model, method=method, seed=0, grad_mode="full", **kw)
        return torch.autograd.grad(torch.nn.functional.cross_entropy(clf(out), y, reduction="sum"), xg)[0]

    lines = [f"Digits ({n} test images, the demo's settings), gradient of the defended classifier's cross-entropy:",
             "", "| method | gradient | vs exact: rel. error | cosine | norm | exact norm |",
             "|---|---|---:|---:|---:|---:|"]
    # GDMP also at norm_batch=1: the released code run one image at a time, its strongest guidance.
    cases = [(m, m, guided_kwargs(m)) for m in GUIDED_SETTINGS]
    cases.insert(1, ("gdmp", "gdmp (norm_batch=1)", dict(guided_kwargs("gdmp"), norm_batch=1)))
    for method, name, kw in cases:
        exact = grad(method, guidance_grad="exact", **kw)
        others = ["detached"] + (["straight_through"] if method == "mimic" else [])
        for mode in others:
            g = grad(method, guidance_grad=mode, **kw)
            if exact.norm() > 0:
                err = f"{((g - exact).norm() / exact.norm()).item():.3f}"
                cos = f"{torch.nn.functional.cosine_similarity(g.flatten(), exact.flatten(), dim=0).item():.4f}"
            else:
                err = cos = "undefined (exact = 0)"
            lines.append(f"| {name} | {mode} | {err} | {cos} | {g.norm().item():.3e} | {exact.norm().item():.3e} |")
    return lines


def main() -> None:
    p = worker_parser(__doc__, MODES)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(run_mode(args.worker, args.batch, args.repeats)))
        return

    results = run_workers(Path(__file__), args.modes.split(","), ["--batch", str(args.batch), "--repeats",
                                                                   str(args.repeats)], str)
    calls = [r["call_seconds"] for r in results.values()]
    lines = ["# Guided methods: cost of purification and of its gradients (cpu)", "",
             header("python benchmarks/bench_guided.py " + " ".join(sys.argv[1:])),
             f"NCSN++ 2.47M parameters (random weights), batch {args.batch}x3x32x32 float32, released CIFAR-10 "
             f"defaults per method, loss <w, purify(x)>. Network calls: the mode's time over one no-grad network call "
             "timed in the same process right after it (median of 10; "
             f"{min(calls) * 1e3:.1f}-{max(calls) * 1e3:.1f} ms across the modes' processes).", "",
             "| method / gradient | steps | time (s) | network calls | per step | peak extra memory (MiB) |",
             "|---|---:|---:|---:|---:|---:|"]
    for mode, r in results.items():
        n = r["seconds"] / r["call_seconds"]
        lines.append(f"| {mode} | {r['steps']} | {r['seconds']:.2f} | {n:.0f} | {n / r['steps']:.2f} | "
                     f"{r['peak_bytes'] / 2**20:.0f} |")
    lines += ["", *digits_gradients(), ""]
    write_results("guided_cpu.md", lines)


if __name__ == "__main__":
    main()
