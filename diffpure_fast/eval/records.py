"""Per-sample JSON-lines records: written as each batch finishes, read back for resume, merged across ranks.

Layout of an output folder: ``config.json`` (every option that decides a number), ``records-RRR.jsonl`` (one per
rank that wrote, one JSON object per sample, appended and fsync'ed per batch), ``records.jsonl`` (all samples
merged, sorted by index; written by rank 0 at the end), then the report files.

Nothing lost, nothing counted twice: a sample is done when its line is complete in any records file; a run killed
mid-write leaves at most one partial last line, which the reader ignores and the writer of that file truncates
before appending; a sample found twice must carry the same results (a mismatch is an error, never averaged).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .._validate import OptionError

__all__ = ["TIMING_FIELDS", "RecordWriter", "check_config", "comparable", "merge_records", "read_records"]

CONFIG_FILE = "config.json"
MERGED_FILE = "records.jsonl"
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
    """Every finished sample, sorted by index, also written to ``records.jsonl``."""
    folder = Path(folder)
    merged = [r for _, r in sorted(read_records(folder).items())]
    tmp = folder / (MERGED_FILE + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in merged))
    os.replace(tmp, folder / MERGED_FILE)
    return merged


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
    ``overwrite``, which deletes its records and report first.
    """
    folder = Path(folder)
    path = folder / CONFIG_FILE
    if path.exists() and overwrite:
        for p in [*_record_files(folder), folder / MERGED_FILE, path]:
            p.unlink(missing_ok=True)
    if path.exists():
        old = json.loads(path.read_text())
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
