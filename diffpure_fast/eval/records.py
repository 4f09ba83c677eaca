"""Per-sample JSON-lines records: written as each batch finishes, read back for resume, merged across ranks.

Layout of an output folder: ``config.json`` (every option that decides a number), ``records-RRR.jsonl`` (one per
process (rank RRR) that wrote, one JSON object per sample, appended and fsync'ed per batch; a single-process run
has just ``records-000.jsonl``), ``adversarial/`` (with ``save_adversarial``: every judged adversarial image, one
``.npz`` per batch, read back by ``read_adversarial``), then the report files. ``merge_records`` reads them all,
sorted by index: there is no second, merged copy on disk.

Nothing lost, nothing counted twice: a sample is done when its line is complete in any records file; a run killed
mid-write leaves at most one partial last line, which the reader ignores and the writer of that file truncates
before appending; a sample found twice must carry the same results (a mismatch is an error, never averaged).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .._validate import OptionError

__all__ = ["TIMING_FIELDS", "RecordWriter", "check_config", "comparable", "config_from", "merge_records",
           "read_adversarial", "read_records", "write_adversarial"]

CONFIG_FILE = "config.json"
# what releases before 0.2 wrote next to the per-process files: an identical merged copy (removed when found)
MERGED_FILE = "records.jsonl"
ADVERSARIAL_DIR = "adversarial"
# fields that describe how a sample was run, not what it measured: left out when comparing runs
TIMING_FIELDS = ("time_s", "rank")


def comparable(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in TIMING_FIELDS}


def _record_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("records-*.jsonl"))


def _read_lines(path: Path) -> list[dict]:
    text = path.read_text()
    lines = text.split("\n")
    out = []
    for k, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if k == len(lines) - 1:  # the partial last line of a killed run: not a finished sample
                continue
            raise ValueError(f"{path}: line {k + 1} is not valid JSON (a corrupt records file)") from None
    return out


def read_records(folder: str | Path) -> dict[int, dict]:
    """All finished samples in ``folder``'s records files, by global index."""
    records: dict[int, dict] = {}
    for path in _record_files(Path(folder)):
        for r in _read_lines(path):
            i = int(r["index"])
            if i in records and comparable(records[i]) != comparable(r):
                raise ValueError(f"{folder}: sample {i} is recorded twice with different results (records from two "
                                 f"different configurations?)")
            records.setdefault(i, r)
    return records


def merge_records(folder: str | Path) -> list[dict]:
    """Every finished sample of every process's records file, sorted by index."""
    folder = Path(folder)
    (folder / MERGED_FILE).unlink(missing_ok=True)  # an earlier release's duplicate of the per-process files
    return [r for _, r in sorted(read_records(folder).items())]


def write_adversarial(folder: str | Path, index, label, x_adv) -> Path:
    """Save a batch's judged adversarial images as ``adversarial/IIIIIIII-JJJJJJJJ.npz`` (first and last index):
    ``x_adv`` float32 (B, C, H, W) in [0, 1] exactly as judged, ``index`` and ``label`` int64 (B,). Written to a
    temporary file and renamed, so a killed run leaves no partial file."""
    import numpy as np

    d = Path(folder) / ADVERSARIAL_DIR
    d.mkdir(exist_ok=True)
    index = np.asarray(index, dtype=np.int64)
    path = d / f"{int(index.min()):08d}-{int(index.max()):08d}.npz"
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, x_adv=np.asarray(x_adv, dtype=np.float32), index=index, label=np.asarray(label, dtype=np.int64))
    os.replace(tmp, path)
    return path


def read_adversarial(folder: str | Path):
    """Every saved adversarial image of ``folder`` (``save_adversarial``), sorted by index: a dict of NumPy arrays
    ``x_adv`` (N, C, H, W) float32, ``index`` (N,), ``label`` (N,). FileNotFoundError when none were saved."""
    import numpy as np

    files = sorted((Path(folder) / ADVERSARIAL_DIR).glob("*-*.npz"))
    files = [f for f in files if not f.name.endswith(".tmp.npz")]
    if not files:
        raise FileNotFoundError(f"{folder}: no {ADVERSARIAL_DIR}/*.npz (run the evaluation with save_adversarial, "
                                f"--save-adversarial on the command line)")
    parts = [dict(np.load(f)) for f in files]
    out = {k: np.concatenate([p[k] for p in parts]) for k in ("x_adv", "index", "label")}
    # a run killed after saving a batch and before recording it saves that batch again on resume (the same
    # images: the attack is a function of the seed and the indices): each index once
    _, first = np.unique(out["index"], return_index=True)
    return {k: v[first] for k, v in out.items()}


class RecordWriter:
    """Appends records to ``records-RRR.jsonl`` (rank RRR), one fsync per batch."""

    def __init__(self, folder: str | Path, rank: int):
        self.path = Path(folder) / f"records-{rank:03d}.jsonl"
        if self.path.exists():
            data = self.path.read_bytes()
            cut = data.rfind(b"\n") + 1
            if cut != len(data):  # a partial line from a killed run: drop it before appending
                with open(self.path, "r+b") as f:
                    f.truncate(cut)
        self._f = open(self.path, "a")

    def write(self, records: list[dict]) -> None:
        self._f.write("".join(json.dumps(r) + "\n" for r in records))
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


def config_from(config_class, config, options: dict):
    """The run's configuration: ``config`` (an instance of ``config_class``) or ``config_class(**options)``; both
    given, or a config of another class, is a TypeError naming the argument. (``evaluate`` and ``certify``.)"""
    if config is None:
        return config_class(**options)
    if options:
        raise TypeError(f"options: give either config or keyword options, not both ({sorted(options)})")
    if not isinstance(config, config_class):
        raise TypeError(f"config: expected an {config_class.__name__}, got {type(config).__name__}")
    return config


def _first_difference(old, new, keys=()) -> tuple[list[str], object, object]:
    """The path of the first differing leaf of two JSON objects, and its two values (None where absent)."""
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if a != b:
            if isinstance(a, dict) and isinstance(b, dict):
                return _first_difference(a, b, (*keys, k))
            return [*keys, k], a, b
    return list(keys) or ["configuration"], old, new


def check_config(folder: str | Path, config: dict, *, overwrite: bool = False) -> bool:
    """Write ``config.json`` or check it against the existing one; returns True when resuming.

    A folder holding records of another configuration is refused (naming the first differing option) unless
    ``overwrite``, which deletes its records and report first. A folder whose run failed before it finished any
    sample (a ``config.json``, no record) holds no result, so a corrected command simply starts there.
    """
    folder = Path(folder)
    path = folder / CONFIG_FILE
    if path.exists() and (overwrite or (json.loads(path.read_text()) != config and not read_records(folder))):
        for p in [*_record_files(folder), folder / MERGED_FILE, path, *(folder / ADVERSARIAL_DIR).glob("*.npz")]:
            p.unlink(missing_ok=True)
    if path.exists():
        old = json.loads(path.read_text())
        ev = old.get("eval", {})
        if "steps" in ev and "attack_steps" not in ev:   # written before attack_steps had that name: the same option
            ev["attack_steps"] = ev.pop("steps")
            if old == config:
                path.write_text(json.dumps(config, indent=2, sort_keys=True))
        if old != config:
            keys, was, now = _first_difference(old, config)
            raise OptionError("output", lambda s: (
                f"{folder} holds records of another configuration ({CONFIG_FILE}'s {'.'.join(keys)} was {was!r}, "
                f"now {now!r}); use another output folder or {s.setting('overwrite', True)}"))
        return True
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True))
    os.replace(tmp, path)
    return False
