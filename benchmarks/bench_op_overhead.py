"""What the fused-step op costs beyond its kernel on CPU: the first call of a fresh process, and every later call.

(1) First call. Each of ``--processes`` fresh interpreters times ``import torch``, ``import diffpure_fast`` and then
    its first and second ``ops.sde_step`` (philox noise, 4x3x32x32 float32, the step ``purify`` runs), and reports
    whether ``torch._dynamo`` got imported (the torch.library.custom_op wrapper imported it on first use: 0.99 s).
    Medians over the processes; once with the default implementation and once with DIFFPURE_FAST_IMPL=reference
    (the Python kernel path). Target: first call under 50 ms.

(2) Per-call overhead at small sizes, where it is largest relative to the work, for each op (philox, z given):

    public      diffpure_fast.ops.sde_step(...)                  the entry chain.py calls
    op          torch.ops.diffpure_fast.<op>.default(...)        dispatcher + the autograd kernel (Python)
    kernel      the same op under _AutoDispatchBelowAutograd     dispatcher -> C++ CPU kernel, nothing else
    torch_z     x * a + eps * b + z * c                          5 eager torch ops, for scale

    Time per call: the median over ``--rounds`` interleaved rounds of ``--calls`` calls each, on ``--threads``
    threads (1 by default); overhead = public - kernel.

    python benchmarks/bench_op_overhead.py                 # -> benchmarks/results/op_overhead_cpu.md
    python benchmarks/bench_op_overhead.py --processes 3 --rounds 5 --out /tmp/op_overhead.md   # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import RESULTS, header

A, B, C = 0.9731, -0.0123, 0.0456
SEED = 1234
FIRST_CALL_SHAPE = (4, 3, 32, 32)
TARGET_FIRST_CALL_MS = 50.0

# Runs in a fresh interpreter: nothing imported before the clock starts.
_FIRST_CALL = """
import json, sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
import diffpure_fast
from diffpure_fast import ops
t2 = time.perf_counter()
g = torch.Generator().manual_seed(0)
x, eps = (torch.randn({shape}, generator=g) for _ in range(2))
ids = torch.arange(x.shape[0])
t3 = time.perf_counter()
ops.sde_step(x, eps, {a}, {b}, {c}, seed={seed}, sample_ids=ids, step=0)
t4 = time.perf_counter()
ops.sde_step(x, eps, {a}, {b}, {c}, seed={seed}, sample_ids=ids, step=1)
t5 = time.perf_counter()
print(json.dumps({{"import_torch": t1 - t0, "import_package": t2 - t1, "first_call": t4 - t3,
                  "second_call": t5 - t4, "dynamo_imported": "torch._dynamo" in sys.modules,
                  "impl": ops.default_impl_name(x.device)}}))
"""


def first_call(processes: int, impl: str | None) -> dict:
    """Medians (seconds) over ``processes`` fresh interpreters; ``impl`` forced through DIFFPURE_FAST_IMPL."""
    env = {k: v for k, v in os.environ.items() if k != "DIFFPURE_FAST_IMPL"}
    if impl is not None:
        env["DIFFPURE_FAST_IMPL"] = impl
    script = _FIRST_CALL.format(shape=FIRST_CALL_SHAPE, a=A, b=B, c=C, seed=SEED)
    runs = []
    for _ in range(processes):
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT,
                             check=False)
        if out.returncode != 0:
            raise RuntimeError(f"first-call process failed:\n{out.stderr[-3000:]}")
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    keys = ("import_torch", "import_package", "first_call", "second_call")
    result = {k: statistics.median(r[k] for r in runs) for k in keys}
    result["first_call_max"] = max(r["first_call"] for r in runs)
    result["dynamo_imported"] = any(r["dynamo_imported"] for r in runs)
    result["impl"] = runs[0]["impl"]
    return result


def providers(shape: tuple[int, ...]):
    """(op, provider) -> callable on fixed float32 inputs of ``shape``."""
    from diffpure_fast import ops

    g = torch.Generator().manual_seed(0)
    x, eps, z = (torch.randn(shape, generator=g) for _ in range(3))
    ids = torch.arange(shape[0])
    philox_op = torch.ops.diffpure_fast.sde_step_philox.default
    z_op = torch.ops.diffpure_fast.sde_step_z.default

    def below_autograd(fn):
        def run():
            with torch._C._AutoDispatchBelowAutograd():
                return fn()

        return run

    philox_args = (x, eps, A, B, C, SEED, ids, 0, 1, None)
    z_args = (x, eps, z, A, B, C, None)
    return {
        ("philox", "public"): lambda: ops.sde_step(x, eps, A, B, C, seed=SEED, sample_ids=ids, step=0, stream=1),
        ("philox", "op"): lambda: philox_op(*philox_args),
        ("philox", "kernel"): below_autograd(lambda: philox_op(*philox_args)),
        ("z", "public"): lambda: ops.sde_step(x, eps, A, B, C, z=z),
        ("z", "op"): lambda: z_op(*z_args),
        ("z", "kernel"): below_autograd(lambda: z_op(*z_args)),
        ("z", "torch_z"): lambda: x * A + eps * B + z * C,
    }


def per_call_us(fns: dict, calls: int, rounds: int) -> dict:
    """Median microseconds per call over interleaved rounds (every provider once per round, in turn)."""
    for fn in fns.values():
        for _ in range(max(10, calls // 10)):  # warm-up: allocator, OpenMP pool, first-call caches
            fn()
    times = {key: [] for key in fns}
    for _ in range(rounds):
        for key, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            times[key].append((time.perf_counter() - t0) / calls * 1e6)
    return {key: statistics.median(v) for key, v in times.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--processes", type=int, default=9, help="fresh interpreters for the first-call median")
    parser.add_argument("--shapes", default="1x3x32x32,4x3x32x32", help="comma-separated BxCxHxW for (2)")
    parser.add_argument("--calls", type=int, default=200, help="calls per round in (2)")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds in (2) (median)")
    # One thread by default: the overhead does not depend on it, and on a small shared machine an OpenMP team of 2
    # turns another process's load into 3x swings of a 4x3x32x32 philox step (10.6 ms against 3.4 ms, measured).
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads for (2)")
    parser.add_argument("--note", default=None, help="a line added under the header (e.g. the machine's state)")
    parser.add_argument("--out", default=None, help="markdown file (default benchmarks/results/op_overhead_cpu.md)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    command = "python " + shlex.join([os.path.relpath(__file__, ROOT), *(argv if argv is not None else sys.argv[1:])])
    lines = ["# Fused-step op overhead, cpu", "", header(command)]
    if args.note:
        lines += [f"**{args.note}**", ""]

    lines += [f"## (1) First call of a fresh process (sde_step philox, {'x'.join(map(str, FIRST_CALL_SHAPE))} "
              f"float32; median of {args.processes} processes, torch's default threads)", "",
              "| implementation | import torch (ms) | import diffpure_fast (ms) | first call (ms) | first call, worst "
              "(ms) | second call (ms) | first - second (ms) | torch._dynamo imported | target < 50 ms |",
              "|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for impl in (None, "reference"):
        r = first_call(args.processes, impl)
        name = r["impl"] + (" (default)" if impl is None else f" ({'DIFFPURE_FAST_IMPL=' + impl})")
        # The target is the default path's; the reference's first call is mostly its own (slow) computation.
        met = "-" if impl is not None else "met" if r["first_call"] * 1e3 < TARGET_FIRST_CALL_MS else "NOT met"
        lines.append(f"| {name} | {r['import_torch'] * 1e3:.0f} | {r['import_package'] * 1e3:.0f} | "
                     f"{r['first_call'] * 1e3:.2f} | {r['first_call_max'] * 1e3:.2f} | {r['second_call'] * 1e3:.3f} | "
                     f"{(r['first_call'] - r['second_call']) * 1e3:.2f} | {'yes' if r['dynamo_imported'] else 'no'} | "
                     f"{met} |")
        print(lines[-1], flush=True)

    lines += ["", f"## (2) Time per call (us; median of {args.rounds} interleaved rounds of {args.calls} calls; "
              f"torch threads {torch.get_num_threads()})", "",
              "public = `ops.sde_step`; op = `torch.ops.diffpure_fast.<op>.default` (dispatcher + Python autograd "
              "kernel); kernel = the same op below autograd (dispatcher -> C++ CPU kernel); torch_z = "
              "`x * a + eps * b + z * c` in eager torch.", "",
              "| shape | op | public | op | kernel | overhead public - kernel | torch_z |",
              "|---|---|---:|---:|---:|---:|---:|"]
    from diffpure_fast import ops

    if ops.default_impl_name(torch.device("cpu")) != "cpp":
        raise SystemExit("bench_op_overhead: (2) needs the C++ CPU kernel (build the extension; no override)")
    for spec in args.shapes.split(","):
        shape = tuple(int(d) for d in spec.lower().split("x"))
        t = per_call_us(providers(shape), args.calls, args.rounds)
        for op in ("philox", "z"):
            torch_z = f"{t[op, 'torch_z']:.1f}" if (op, "torch_z") in t else "-"
            lines.append(f"| {spec} | {op} | {t[op, 'public']:.1f} | {t[op, 'op']:.1f} | {t[op, 'kernel']:.1f} | "
                         f"{t[op, 'public'] - t[op, 'kernel']:.1f} | {torch_z} |")
            print(lines[-1], flush=True)
    lines.append("")

    out = Path(args.out) if args.out else RESULTS / "op_overhead_cpu.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
