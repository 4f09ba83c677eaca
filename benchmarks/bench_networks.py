"""Forward time and peak memory of the two DiffPure score networks at their real sizes (random weights).

    python benchmarks/bench_networks.py            # CPU part (batch 1, float32) -> benchmarks/results/networks_cpu.md
    python benchmarks/bench_networks.py --gpu      # CUDA part (batch 1/8/64; fp32, bf16 autocast, channels_last)
                                                   # -> benchmarks/results/networks_gpu.md (needs CUDA)

Networks: NCSN++ "deep continuous" CIFAR-10 (DiffPure's configs/cifar10.yml: nf 128, 8 blocks per level, 32x32) and
the ADM 256x256 unconditional UNet (DiffPure's configs/imagenet.yml), both float32, eval mode, under no_grad.

Time: median wall time of ``--repeats`` forwards after one warm-up (CPU: time.perf_counter; CUDA: CUDA events).
Memory: CPU: each network runs in its own fresh subprocess; reported is the growth of the process's peak resident
set size (``resource.getrusage().ru_maxrss``, a high-water mark) from after building the model to after the
forwards, i.e. the peak extra memory the forward needs beyond the weights, plus the weights' size. CUDA:
``torch.cuda.max_memory_allocated`` during the forwards minus the memory allocated before them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks._common import header
from diffpure_fast.models import NCSNpp, create_adm_model

RESULTS = ROOT / "benchmarks" / "results"
NETS = {
    "ncsnpp_cifar10_deep": {"shape": (3, 32, 32), "time": "continuous"},
    "adm_imagenet256_uncond": {"shape": (3, 256, 256), "time": "discrete"},
}


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    net = NCSNpp() if name == "ncsnpp_cifar10_deep" else create_adm_model()  # defaults: DiffPure's configs
    with torch.no_grad():  # random (non-zero) weights so that no layer is trivially zero
        for p in net.parameters():
            p.normal_(0.0, 0.02)
    return net.eval()


def labels(name: str, batch: int, device) -> torch.Tensor:
    t = torch.full((batch,), 0.1, device=device)
    return t * 999 if NETS[name]["time"] == "continuous" else (t * 1000).long()


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def cpu_worker(name: str, repeats: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    net = build(name)
    weights_mib = sum(p.numel() * p.element_size() for p in net.parameters()) / 2 ** 20
    x = torch.randn(1, *NETS[name]["shape"])
    lab = labels(name, 1, "cpu")
    rss0 = _maxrss_mib()
    times = []
    with torch.no_grad():
        net(x, lab)  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            net(x, lab)
            times.append(time.perf_counter() - t0)
    return {"name": name, "params_m": sum(p.numel() for p in net.parameters()) / 1e6, "weights_mib": weights_mib,
                "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "repeats": repeats,
                "peak_extra_mib": _maxrss_mib() - rss0, "threads": threads}


def run_cpu(args) -> None:
    rows = []
    for name in NETS:
        cmd = [sys.executable, __file__, "--worker", name, "--repeats", str(args.repeats), "--threads",
               str(args.threads)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode:
            raise SystemExit(f"worker {name} failed:\n{res.stderr}")
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    torch.set_num_threads(args.threads)
    lines = [
        "# Score networks on CPU: forward time and peak memory",
        "",
        header(f"python benchmarks/bench_networks.py --repeats {args.repeats} --threads {args.threads}"),
        ("Random weights, float32, batch 1, eval, `torch.no_grad()`. Time: median of the repeats after one warm-up "
        "(min-max in brackets). Memory: growth of the peak RSS (`ru_maxrss`) of a fresh process from after "
        "building the model to after the forwards (the activation peak beyond the weights); weights listed apart."),
        "",
        "| network | input | params (M) | weights (MiB) | forward median (s) [min-max] | repeats "
        "| peak extra RSS (MiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        shape = "x".join(str(s) for s in NETS[r["name"]]["shape"])
        lines.append(f"| {r['name']} | 1x{shape} | {r['params_m']:.1f} | {r['weights_mib']:.0f} | "
                     f"{r['median_s']:.3f} [{r['min_s']:.3f}-{r['max_s']:.3f}] | {r['repeats']} | "
                     f"{r['peak_extra_mib']:.0f} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "networks_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def run_gpu(args) -> None:
    if not torch.cuda.is_available():
        raise SystemExit("--gpu: CUDA is not available on this machine")
    dev = torch.device("cuda")
    rows = []
    for name in NETS:
        net = build(name).to(dev)
        for mode in ("fp32", "bf16", "bf16_channels_last"):
            if mode.endswith("channels_last"):
                net = net.to(memory_format=torch.channels_last)
            for batch in (1, 8, 64):
                x = torch.randn(batch, *NETS[name]["shape"], device=dev)
                if mode.endswith("channels_last"):
                    x = x.to(memory_format=torch.channels_last)
                lab = labels(name, batch, dev)
                ctx = (torch.autocast("cuda", dtype=torch.bfloat16) if mode.startswith("bf16")
                       else torch.autocast("cuda", enabled=False))
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                times = []
                try:
                    with torch.no_grad(), ctx:
                        net(x, lab)
                        for _ in range(args.repeats):
                            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                            s.record()
                            net(x, lab)
                            e.record()
                            torch.cuda.synchronize()
                            times.append(s.elapsed_time(e) / 1e3)
                except torch.cuda.OutOfMemoryError:
                    rows.append((name, mode, batch, None, None))
                    torch.cuda.empty_cache()
                    continue
                peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
                rows.append((name, mode, batch, statistics.median(times), peak))
                print(rows[-1], flush=True)
        del net
        torch.cuda.empty_cache()
    lines = [
        "# Score networks on CUDA: forward time and peak memory",
        "",
        f"Command: `python benchmarks/bench_networks.py --gpu --repeats {args.repeats}`",
        "",
        f"Device: {torch.cuda.get_device_name(0)}; torch {torch.__version__}, CUDA {torch.version.cuda}.",
        "",
        ("Random weights, eval, no_grad. Time: median of CUDA-event timings after one warm-up. Memory: "
        "max_memory_allocated during the forwards minus what was allocated before (weights excluded)."),
        "",
        "| network | mode | batch | forward median (ms) | images/s | peak extra (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for name, mode, batch, med, peak in rows:
        if med is None:
            lines.append(f"| {name} | {mode} | {batch} | OOM | - | - |")
        else:
            lines.append(f"| {name} | {mode} | {batch} | {med * 1e3:.2f} | {batch / med:.1f} | {peak:.0f} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "networks_gpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpu", action="store_true", help="run the CUDA part instead of the CPU part")
    ap.add_argument("--repeats", type=int, default=3, help="timed forwards per case (after one warm-up)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch CPU threads (CPU part)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(cpu_worker(args.worker, args.repeats, args.threads)))
    elif args.gpu:
        run_gpu(args)
    else:
        run_cpu(args)


if __name__ == "__main__":
    main()
