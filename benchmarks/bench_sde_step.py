"""Bandwidth of the fused SDE step ``a*x + b*eps + c*z`` for every implementation available on the device.

Providers (each timed on the same float tensors of n elements, shaped (n / 4096, 4096)):

  torch_randn      a*x + b*eps + c*torch.randn_like(x)     plain torch, noise from torch's generator
  torch_z          x*a + eps*b + z*c                        plain torch, z given
  reference        ops.reference.sde_step_philox            pure-torch counter noise (the test oracle)
  cpp / cpp_z      diffpure_fast._C CPU kernel, philox / z given
  cuda / cuda_z    diffpure_fast._C CUDA kernel, philox / z given
  triton / triton_z  Triton kernels (GPU only: the CPU interpreter is not a performance path)

GB/s counts the bytes a fused kernel must move: 3 tensors (x, eps read; out written) for the noise-generating
providers, 4 (z read too) for the z-given ones. The unfused torch expressions move more than that (temporaries,
the materialised noise); their GB/s is the same effective figure, so every row compares time on the same work.
On CUDA the timing is triton.testing.do_bench (median, 20th/80th percentiles) or CUDA events after a synchronize,
and the table adds % of the GPU's peak DRAM bandwidth (H100 SXM 3.35 TB/s, H200 4.8 TB/s). Every GPU row times the
kernels alone: the CUDA op checks no sample ids on the host (no synchronisation inside a timed call), like Triton's.
The default GPU sizes put each tensor at 4x and 16x the L2 (64M and 256M float32 elements on an H200): smaller ones
would time the L2, not DRAM.

    python benchmarks/bench_sde_step.py                       # CPU, 1M/4M/16M float32 -> results/sde_step_cpu.md
    python benchmarks/bench_sde_step.py --device cuda         # beyond L2 -> results/sde_step_cuda.md
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import header
from diffpure_fast.ops import _dispatch, reference

A, B, C = 0.9731, -0.0123, 0.0456
SEED = 1234
PEAK_GBPS = {"H100": 3350.0, "H200": 4800.0}


def peak_gbps(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_GBPS.items() if k in name), None)


def l2_bytes(device: torch.device) -> int | None:
    """The GPU's L2 cache in bytes (None on CPU, or when torch does not report it)."""
    if device.type != "cuda":
        return None
    return getattr(torch.cuda.get_device_properties(device), "L2_cache_size", None) or None


def beyond_l2_sizes(device: torch.device, element_size: int, factors=(4, 16)) -> list[int]:
    """Element counts whose tensor is ``factors`` x the GPU's L2, rounded up to a power of two, so that a timed
    call streams from DRAM, not from L2 (an H200's 60 MB L2: 64M and 256M float32 elements; 64K and 1M elements,
    the suite's CPU default, would sit in it). Without a reported L2 size, 64M and 256M."""
    l2 = l2_bytes(device) or 60 * 10 ** 6
    return [1 << max(0, (f * l2 // element_size - 1).bit_length()) for f in factors]


def parse_sizes(text: str) -> list[int]:
    """Comma-separated element counts with optional K (2^10) / M (2^20) suffixes: "64K,1M,16M"."""
    scale = {"K": 1 << 10, "M": 1 << 20}
    return [int(s[:-1]) * scale[s[-1]] if s[-1] in scale else int(s) for s in text.split(",")]


def providers(x, eps, z, ids, with_reference: bool):
    """name -> (callable, tensors moved); only the implementations available for x's device."""
    out = {
        "torch_randn": (lambda: A * x + B * eps + C * torch.randn_like(x), 3),
        "torch_z": (lambda: x * A + eps * B + z * C, 4),
    }
    if with_reference:
        out["reference"] = (lambda: reference.sde_step_philox(x, eps, A, B, C, SEED, ids, 0, 1), 3)
    names = ["cpp"] if x.device.type == "cpu" else ["cuda", "triton"]
    for name in names:
        if not _dispatch.available(name):
            continue
        impl = _dispatch._module(name)
        out[name] = (lambda impl=impl: impl.sde_step_philox(x, eps, A, B, C, SEED, ids, 0, 1), 3)
        out[f"{name}_z"] = (lambda impl=impl: impl.sde_step_z(x, eps, z, A, B, C), 4)
    return out


def time_ms(fn, device: torch.device, repeats: int, budget_s: float) -> tuple[float, float, float]:
    """(median, 20th, 80th percentile) milliseconds per call."""
    if device.type == "cuda":
        try:
            import triton.testing

            return tuple(triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8]))
        except ImportError:
            pass
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    else:
        t0 = time.perf_counter()
        fn()  # warm-up; also sizes the repeat count to the time budget
        first = time.perf_counter() - t0
        # the time budget lowers the count to no fewer than 3 calls, never above --repeats (documented: at most)
        repeats = min(repeats, max(3, int(budget_s / max(first, 1e-9))))
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=10) if len(times) > 1 else times * 9
    return statistics.median(times), q[1], q[7]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--sizes", default="auto",
                        help="comma-separated element counts (K/M suffixes); auto: 1M,4M,16M on CPU, on a GPU 4x and "
                             "16x its L2 per tensor (DRAM bandwidth, not L2's)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per point on CPU (at most)")
    parser.add_argument("--budget", type=float, default=3.0, help="seconds of timed calls per point on CPU")
    parser.add_argument("--reference-max", default="4M",
                        help="largest size at which the (slow) pure-torch reference is timed")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", default=None, help="markdown file (default benchmarks/results/sde_step_<dev>.md)")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if args.sizes != "auto":
        sizes = parse_sizes(args.sizes)
    elif device.type == "cuda":
        sizes = beyond_l2_sizes(device, torch.empty((), dtype=dtype).element_size())
    else:
        sizes = parse_sizes("1M,4M,16M")
    (reference_max,) = parse_sizes(args.reference_max)
    out_path = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"sde_step_{device.type}.md"
    peak = peak_gbps(device)

    rows = []
    for n in sizes:
        per_sample = 4096 if n % 4096 == 0 else n
        g = torch.Generator().manual_seed(0)
        x, eps, z = (torch.randn(n // per_sample, per_sample, generator=g).to(device, dtype) for _ in range(3))
        ids = torch.arange(x.shape[0], device=device)
        for name, (fn, tensors) in providers(x, eps, z, ids, n <= reference_max).items():
            ms, lo, hi = time_ms(fn, device, args.repeats, args.budget)
            gbps = tensors * n * x.element_size() / (ms * 1e-3) / 1e9
            row = {"provider": name, "elements": n, "dtype": args.dtype, "ms_median": ms, "ms_p20": lo,
                   "ms_p80": hi, "GB/s": gbps}
            if peak:
                row["% peak"] = 100 * gbps / peak
            rows.append(row)
            print(f"{name:12s} n={n:>9d}  {ms:9.3f} ms  {gbps:8.2f} GB/s", flush=True)

    command = "python " + " ".join([os.path.relpath(__file__, ROOT), *(argv if argv is not None else sys.argv[1:])])
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    for row in rows:
        writer.writerow({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in row.items()})

    baseline = {r["elements"]: r["ms_median"] for r in rows if r["provider"] == "torch_randn"}
    head = ["provider", "elements", "ms (median)", "ms p20-p80", "GB/s", *(["% peak"] if peak else []),
            "vs torch_randn"]
    lines = [f"# sde_step bandwidth, {device.type}, {args.dtype}", "",
             header(command)]
    if device.type == "cuda":
        lines += [f"- GPU: {torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}"]
    lines += ["- GB/s: bytes a fused kernel moves (3 tensors; 4 for *_z and torch_z) / median time", "",
              "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["provider"], f"{r['elements']:,}", f"{r['ms_median']:.3f}", f"{r['ms_p20']:.3f}-{r['ms_p80']:.3f}",
                 f"{r['GB/s']:.2f}", *([f"{r['% peak']:.1f}"] if peak else []),
                 f"{baseline[r['elements']] / r['ms_median']:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "```csv", buf.getvalue().strip(), "```", ""]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text("\n".join(lines))
    out_path.with_suffix(".csv").write_text(buf.getvalue())
    print(f"wrote {out_path} and {out_path.with_suffix('.csv')}")


if __name__ == "__main__":
    main()
