"""Reading a network's sizes from its state dict: errors name the argument (``checkpoint``), the file and the key."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..._validate import OptionError

__all__ = ["count_indexed", "need"]


def need(state: Mapping[str, torch.Tensor], key: str, where: str = "") -> torch.Tensor:
    """``state[key]``, or an error naming the key (a wrong prefix or another network's file ends here)."""
    v = state.get(key)
    if not isinstance(v, torch.Tensor):
        some = ", ".join(repr(k) for k in list(state)[:4])
        raise OptionError("checkpoint", f"missing key {key!r}, which this network's sizes are read from (the "
                                        f"state dict's keys start {some}, ...)", where=where)
    return v


def count_indexed(state: Mapping[str, torch.Tensor], pattern: str, where: str = "") -> int:
    """How many of ``pattern.format(0)``, ``pattern.format(1)``, ... are keys, in a row from 0 (at least one)."""
    need(state, pattern.format(0), where)
    n = 1
    while pattern.format(n) in state:
        n += 1
    return n
