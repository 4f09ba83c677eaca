"""The outputs of ``diffpure-fast bench``: a markdown table (stdout and ``bench.md``), ``bench.json`` (header and
rows), ``bench.csv`` (rows) and ``bench.png`` (throughput against batch size, latency against steps)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

__all__ = ["COLUMNS", "OUTPUTS", "markdown", "plot", "write_outputs"]

# The CSV's columns, in order (a JSON row has the same keys; blank where a row has no value).
COLUMNS = ["engine", "device", "dtype", "batch", "steps", "dt", "grad_mode", "status", "median_s", "min_s", "max_s",
           "repeats", "images_per_s", "peak_mib", "peak_extra_mib", "network_calls", "call_ms", "cost_calls",
           "cost_nograd", "max_abs_diff"]
OUTPUTS = ("bench.md", "bench.json", "bench.csv", "bench.png")


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def markdown(header: dict, rows: list[dict], *, warmup: int) -> str:
    """The header as lines, then one table row per measured configuration."""
    lines = ["# diffpure-fast bench", "",
             f"Command: `{header['command']}`", "",
             f"Machine: {header['cpu']}, {header['logical_cpus']} logical CPUs, torch CPU threads that ran "
             f"{header['torch_threads']}; GPU: {header['gpu']}",
             f"Versions: diffpure_fast {header['diffpure_fast']}, torch {header['torch']}, Python {header['python']}",
             f"Load average (1, 5, 15 min) at the start: {', '.join(map(str, header['load_average_1_5_15']))}",
             f"Model: {header['model']}; t* = {header['t_star']}, dt = t* / steps (Euler–Maruyama on torchsde's "
             f"grid); {warmup} warm-up call(s) per row excluded, then the repeats timed (median, min-max).",
             "Peak memory: " + ("the CUDA allocator's maximum during the first timed call (reset per row)"
                                if any(r["device"].startswith("cuda") for r in rows) else
                                "the process's RSS high-water mark during the first timed call (reset per row; "
                                "model and interpreter included), and that above the RSS before the call") + ".",
             "Network calls: counted per purification (forward and backward); cost: median time over one no-grad "
             "network call on the same batch (calls), and over the no-grad purification (x none).", "",
             "| engine | device | dtype | batch | steps | grad_mode | median (s) | min-max (s) | images/s | "
             "peak (MiB) | extra (MiB) | network calls | cost (calls) | cost (x none) |",
             "|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['engine']} | {r['device']} | {r['dtype']} | {r['batch']} | {_fmt(r.get('steps'))} | "
                         f"{r['grad_mode']} | {r['status']} ||||||||")
            continue
        lines.append(f"| {r['engine']} | {r['device']} | {r['dtype']} | {r['batch']} | {r['steps']} | "
                     f"{r['grad_mode']} | {_fmt(r['median_s'])} | {_fmt(r['min_s'])}-{_fmt(r['max_s'])} | "
                     f"{_fmt(r['images_per_s'])} | {_fmt(r['peak_mib'], 4)} | {_fmt(r['peak_extra_mib'], 2)} | "
                     f"{r['network_calls']} | {_fmt(r['cost_calls'])} | {_fmt(r['cost_nograd'])} |")
    diffs = [r["max_abs_diff"] for r in rows if r.get("max_abs_diff") is not None]
    if diffs:
        lines += ["", f"Official pipeline against dpf.purify on the same forward noise and Brownian increments: "
                      f"largest output difference {max(diffs):.2e} (in [-1, 1])."]
    return "\n".join(lines) + "\n"


def plot(header: dict, rows: list[dict], path: Path) -> Path:
    """Two panels: images/s against batch size (at the largest step count) and median seconds per purification
    against steps (at the largest batch), one line per engine, grad_mode, device and dtype; linear axes from 0."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server or in CI
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    ok = [r for r in rows if r["status"] == "ok"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    if ok:
        top_steps = max(r["steps"] for r in ok)
        top_batch = max(r["batch"] for r in ok)
        lines: dict[tuple, list[dict]] = {}
        for r in ok:
            lines.setdefault((r["engine"], r["grad_mode"], r["device"], r["dtype"]), []).append(r)
        for (engine, mode, device, dtype), rs in lines.items():
            label = f"{'official' if engine.startswith('official') else mode}, {device} {dtype}"
            by_batch = sorted((r for r in rs if r["steps"] == top_steps), key=lambda r: r["batch"])
            if by_batch:
                ax1.plot([r["batch"] for r in by_batch], [r["images_per_s"] for r in by_batch], "o-", label=label)
            by_steps = sorted((r for r in rs if r["batch"] == top_batch), key=lambda r: r["steps"])
            if by_steps:
                med = [r["median_s"] for r in by_steps]
                err = [[m - r["min_s"] for m, r in zip(med, by_steps)], [r["max_s"] - m for m, r in zip(med, by_steps)]]
                ax2.errorbar([r["steps"] for r in by_steps], med, yerr=err, fmt="o-", capsize=3, label=label)
        ax1.set(title=f"throughput at {top_steps} steps", xlabel="batch size (images)", ylabel="images / s")
        ax2.set(title=f"latency at batch {top_batch} (median, min-max bars)", xlabel="solver steps",
                ylabel="seconds per purification")
    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # batch sizes and steps are counts
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(f"diffpure-fast bench: {header['model']}\n{header['cpu']}, torch CPU threads: "
                 f"{header['torch_threads']}, GPU: {header['gpu']}; torch {header['torch']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(folder: Path, header: dict, rows: list[dict], *, warmup: int) -> str:
    """Write ``OUTPUTS`` into ``folder`` (created); returns the markdown table."""
    folder.mkdir(parents=True, exist_ok=True)
    table = markdown(header, rows, warmup=warmup)
    (folder / "bench.md").write_text(table)
    (folder / "bench.json").write_text(json.dumps({"header": header, "rows": rows}, indent=1))
    with (folder / "bench.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    plot(header, rows, folder / "bench.png")
    return table
