"""Render the benchmark plots from the machine-readable results the scripts write.

Reads, in --results (default benchmarks/results/), whichever of these exist, and writes PNGs beside them:

  scaling_<dev>.csv  (bench_scaling.py)  -> purify_vs_batch_<dev>.png   time per purification (and per image) vs batch
                                         -> purify_vs_steps_<dev>.png   time per purification vs steps, per grad_mode
                                         -> memory_vs_steps_<dev>.png   peak extra memory vs steps, per grad_mode
  sde_step_<dev>.csv (bench_sde_step.py) -> sde_step_<dev>.png          fused-step GB/s per provider and size
  gpu.csv            (bench_gpu.py)      -> gpu_throughput.png          images/s (at the full step count) vs batch
                                                                        per variant, per network

Each plot's title names the machine (and, for the scaling runs, the load average during them) from the CSV.

    python benchmarks/plot_results.py
    python benchmarks/plot_results.py --results out/bench_quick
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on a server or in CI
import matplotlib.pyplot as plt

ROOT = Path(__file__).resolve().parents[1]
# One colour and marker per grad_mode, the same in every plot.
STYLE = {"none": ("C0", "o"), "bpda": ("C1", "v"), "full": ("C2", "s"), "full_cache": ("C3", "D"),
         "adjoint": ("C4", "^"), "surrogate": ("C5", "P")}


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _subtitle(rows: list[dict]) -> str:
    machine = rows[0].get("machine", "")
    loads = [float(r["load_1min"]) for r in rows if r.get("load_1min")]
    load = f"; load avg {min(loads):.1f}-{max(loads):.1f}" if loads else ""
    threads = sorted({r["threads"] for r in rows if r.get("threads")})
    ran = f", {'/'.join(threads)} torch thread(s)" if threads else ""
    return f"{rows[0].get('net', '')} on {rows[0].get('device', '')}: {machine}{ran}{load}"


def _linear_from_zero(ax) -> None:
    """Linear axes that start at 0 (a log axis hid how times and memory grow; a y axis not from 0 overstated small
    differences), integer ticks (batch sizes and steps are counts), a light grid."""
    from matplotlib.ticker import MaxNLocator

    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")
    return path


def _rows_and_device(csv_path: Path, prefix: str):
    """The CSV's rows and the device its name ends with (``<prefix><device>.csv``)."""
    return read_csv(csv_path), csv_path.stem.removeprefix(prefix)


def plot_scaling(csv_path: Path) -> list[Path]:
    rows, dev = _rows_and_device(csv_path, "scaling_")
    if not rows:
        return []
    out = []
    batch = sorted((r for r in rows if r["sweep"] == "batch"), key=lambda r: int(r["batch"]))
    if batch:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6))
        b = [int(r["batch"]) for r in batch]
        ax1.plot(b, [float(r["seconds"]) for r in batch], "o-")
        ax1.set(xlabel="batch size (images)", ylabel="seconds per purification",
                title=f"{batch[0]['steps']} steps, grad_mode none")
        ax2.plot(b, [1e3 * float(r["seconds_per_image"]) for r in batch], "o-")
        ax2.set(xlabel="batch size (images)", ylabel="ms per image", title="per image")
        for ax in (ax1, ax2):
            _linear_from_zero(ax)
            ax.set_xticks(b, [str(v) for v in b])
        fig.suptitle(_subtitle(batch), fontsize=9)
        out.append(_save(fig, csv_path.parent / f"purify_vs_batch_{dev}.png"))
    steps = [r for r in rows if r["sweep"] == "steps"]
    if steps:
        by_mode = defaultdict(list)
        for r in steps:
            by_mode[r["grad_mode"]].append(r)
        step_ticks = sorted({int(r["steps"]) for r in steps})
        for name, column, ylabel in (("purify_vs_steps", "seconds", "seconds per purification"),
                                     ("memory_vs_steps", "peak_mib", "peak extra memory (MiB)")):
            # Memory: full_cache grows to GBs while the others stay flat near 0 on the same linear axis, so a
            # second panel shows the others alone (linear from 0 too: a log axis was unreadable).
            panels = [list(by_mode)]
            if column == "peak_mib" and "full_cache" in by_mode and len(by_mode) > 1:
                panels.append([m for m in by_mode if m != "full_cache"])
            fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
            for ax, modes in zip(axes[0], panels):
                for mode in modes:
                    rs = sorted(by_mode[mode], key=lambda r: int(r["steps"]))
                    colour, marker = STYLE.get(mode, (None, "o"))
                    ax.plot([int(r["steps"]) for r in rs], [float(r[column]) for r in rs], marker=marker,
                            color=colour, label=mode)
                title = f"batch {steps[0]['batch']}, per grad_mode" + ("" if modes is panels[0] else
                                                                        ", without full_cache")
                ax.set(xlabel="solver steps", ylabel=ylabel, title=title)
                _linear_from_zero(ax)
                ax.set_xticks(step_ticks, [str(v) for v in step_ticks])
                ax.legend(fontsize=8)
            fig.suptitle(_subtitle(steps), fontsize=9)
            out.append(_save(fig, csv_path.parent / f"{name}_{dev}.png"))
    return out


def plot_sde_step(csv_path: Path) -> list[Path]:
    rows, dev = _rows_and_device(csv_path, "sde_step_")
    if not rows:
        return []
    sizes = sorted({int(r["elements"]) for r in rows})
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    fig, ax = plt.subplots(figsize=(7, 3.8))
    width = 0.8 / len(sizes)
    for i, n in enumerate(sizes):
        gbps = {r["provider"]: float(r["GB/s"]) for r in rows if int(r["elements"]) == n}
        ax.bar([p + i * width for p in range(len(providers))], [gbps.get(p, 0.0) for p in providers], width,
               label=f"{n / 2**20:g}M elements")
    ax.set_xticks([p + width * (len(sizes) - 1) / 2 for p in range(len(providers))], providers, rotation=30)
    ax.set(ylabel="GB/s (bytes a fused kernel moves)", yscale="log",
           title=f"fused SDE step, {rows[0].get('dtype', '')}, {dev}")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return [_save(fig, csv_path.parent / f"sde_step_{dev}.png")]


def plot_gpu(csv_path: Path) -> list[Path]:
    rows = [r for r in read_csv(csv_path) if r.get("images_per_s")]
    if not rows:
        return []
    nets = list(dict.fromkeys(r["net"] for r in rows))
    fig, axes = plt.subplots(1, len(nets), figsize=(5 * len(nets), 3.8), squeeze=False)
    for ax, net in zip(axes[0], nets):
        by_variant = defaultdict(list)
        for r in rows:
            if r["net"] == net:
                by_variant[r["variant"]].append(r)
        for variant, rs in by_variant.items():
            rs.sort(key=lambda r: int(r["batch"]))
            ax.plot([int(r["batch"]) for r in rs], [float(r["images_per_s"]) for r in rs], "o-", label=variant)
        full = next(r.get("full_steps") or r["steps"] for r in rows if r["net"] == net)
        ax.set(xlabel="batch size", ylabel="images / s", xscale="log", yscale="log",
               title=f"{net}, at {full} steps")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return [_save(fig, csv_path.parent / "gpu_throughput.png")]


def main(argv=None) -> list[Path]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"), help="folder of the CSV results")
    args = p.parse_args(argv)
    folder = Path(args.results)
    written = []
    for path in sorted(folder.glob("scaling_*.csv")):
        written += plot_scaling(path)
    for path in sorted(folder.glob("sde_step_*.csv")):
        written += plot_sde_step(path)
    if (folder / "gpu.csv").exists():
        written += plot_gpu(folder / "gpu.csv")
    if not written:
        raise SystemExit(f"plot_results: no scaling_*.csv, sde_step_*.csv or gpu.csv in {folder}")
    return written


if __name__ == "__main__":
    main()
