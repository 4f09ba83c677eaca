"""The one-screen summary of scripts/gpu_check.sh: stages, test counts, the benchmark rows that matter.

Reads what the stages wrote under --out (machine.md, tests.xml, gpu.csv, gpu_step.csv) and the stages' table
(--stages: name, status, seconds, note; tab-separated); writes --out/summary.md and prints it. Exit status 0 when
every stage passed or skipped for a reason other than time (no GPU, no carried wheels), else 1.

    python scripts/gpu_check_summary.py --mode full --stages stages.tsv --out out/gpu_check --seconds 391 --budget 460
"""

from __future__ import annotations

import argparse
import csv
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path


def _rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _float(row: dict, key: str) -> float | None:
    v = row.get(key)
    return None if v in (None, "", "None") else float(v)


def stage_lines(stages: list[list[str]]) -> list[str]:
    lines = ["| stage | status | s | note |", "|---|---|---:|---|"]
    lines += [f"| {name} | {status} | {sec} | {note} |" for name, status, sec, note, *_ in (s + [""] for s in stages)]
    return lines


def test_lines(path: Path) -> list[str]:
    """Counts from pytest's JUnit XML, the failed tests (up to 8) and the skip reasons with their counts."""
    if not path.exists():
        return ["Tests: no tests.xml (the tests stage did not finish)"]
    cases = list(ET.parse(path).getroot().iter("testcase"))
    kinds, failed, skips = Counter(), [], Counter()
    for case in cases:
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        if case.find("failure") is not None or case.find("error") is not None:
            kinds["failed"] += 1
            failed.append(name)
        elif (skip := case.find("skipped")) is not None:
            kinds["skipped"] += 1
            skips[(skip.get("message") or "").split("\n")[0][:90]] += 1
        else:
            kinds["passed"] += 1
    lines = [f"Tests (-m 'cuda or triton'): {kinds['passed']} passed, {kinds['failed']} failed, "
             f"{kinds['skipped']} skipped, of {len(cases)}"]
    lines += [f"  FAILED {name}" for name in failed[:8]]
    if len(failed) > 8:
        lines.append(f"  ... and {len(failed) - 8} more failures (logs.tar.gz: tests.log)")
    lines += [f"  skipped x{n}: {reason}" for reason, n in skips.most_common(4)]
    return lines


def purify_lines(path: Path) -> list[str]:
    """Per (network, batch): every variant's ms per step, with the speed-up over the official pipeline (no-grad
    rows) or the cost in eager no-grad purifications (gradient rows)."""
    rows = _rows(path)
    if not rows:
        return []
    lines = ["Purification, ms per step (x official: speed-up over DiffPure's torchsde pipeline; gradients: cost in "
             "eager no-grad purifications); images/s at the full step count:"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["net"], int(r["batch"])), []).append(r)
    for (net, batch), rs in groups.items():
        per_step = {r["variant"]: _float(r, "ms_per_step") for r in rs}
        parts = []
        for r in rs:
            ms = per_step[r["variant"]]
            if ms is None:
                parts.append(f"{r['variant']} {r['status']}")
                continue
            ref, label = (per_step.get("eager"), "x eager") if r["variant"].startswith("full") else (
                per_step.get("official"), "x off.")
            ratio = "" if ref is None or r["variant"] == "official" else (
                f" {ms / ref:.1f}{label}" if label == "x eager" else f" {ref / ms:.1f}{label}")
            parts.append(f"{r['variant']} {ms:.2f}{ratio}")
        best = max((r for r in rs if _float(r, "images_per_s") and not r["variant"].startswith("full")),
                   key=lambda r: float(r["images_per_s"]), default=None)
        tail = f"; best {float(best['images_per_s']):.1f} img/s ({best['variant']})" if best else ""
        lines.append(f"  {net} B={batch} ({rs[0]['steps']}/{rs[0]['full_steps']} steps): " + ", ".join(parts) + tail)
    return lines


def step_lines(path: Path) -> list[str]:
    rows = _rows(path)
    if not rows:
        return []
    lines = ["Fused step (float32), GB/s (% of datasheet peak, % of the copy):"]
    by_size: dict[str, list[dict]] = {}
    for r in rows:
        by_size.setdefault(r["elements"], []).append(r)
    for n, rs in by_size.items():
        where = "beyond L2" if rs[0]["beyond_l2"] == "True" else "in L2" if rs[0]["beyond_l2"] == "False" else "L2 ?"
        parts = []
        for r in rs:
            peak = "" if _float(r, "% peak") is None else f"{float(r['% peak']):.0f}%, "
            parts.append(f"{r['provider']} {float(r['GB/s']):.0f} ({peak}{float(r['% copy']):.0f}%)")
        lines.append(f"  {int(n) / 2 ** 20:.0f}M elements ({where}): " + ", ".join(parts))
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", required=True, choices=["full", "quick"])
    p.add_argument("--stages", required=True, help="the stages' table (tab-separated: name, status, s, note)")
    p.add_argument("--out", required=True, help="the folder the stages wrote to")
    p.add_argument("--seconds", type=int, required=True, help="the run's wall time")
    p.add_argument("--budget", type=int, required=True, help="the run's time budget")
    args = p.parse_args(argv)
    out = Path(args.out)
    stages = [line.rstrip("\n").split("\t") for line in Path(args.stages).read_text().splitlines() if line.strip()]
    bad = [s[0] for s in stages if not (s[1] == "ok" or (s[1] == "skipped" and "no time" not in s[3]))]
    machine = out / "machine.md"
    facts = [line[2:] for line in machine.read_text().splitlines()
             if line.startswith(("- GPU", "- Host", "- Triton", "- torchsde", "- Commit"))] if machine.exists() else []
    lines = [f"# gpu_check.sh {args.mode}: {'PASS' if not bad else 'FAIL (' + ', '.join(bad) + ')'}, "
             f"{args.seconds} s of a {args.budget} s budget", "", *[f"- {f}" for f in facts], "",
             *stage_lines(stages), "", *test_lines(out / "tests.xml")]
    for block in (purify_lines(out / "gpu.csv"), step_lines(out / "gpu_step.csv")):
        if block:
            lines += ["", *block]
    present = sorted(f.name for f in out.iterdir() if f.is_file())
    lines += ["", f"Files in {out}: {', '.join(sorted({*present, 'summary.md', 'logs.tar.gz'}))}"]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    print(text, end="")
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
