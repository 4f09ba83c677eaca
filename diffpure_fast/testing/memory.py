"""A counting allocator for CPU tests: peak bytes of live tensor storages created while the mode is active.

``torch.cuda.max_memory_allocated`` has no CPU twin and tracemalloc does not see torch's allocator, so this
TorchDispatchMode sees every op's outputs, counts each new storage once, and uncounts it when it is freed."""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["PeakMemoryCounter"]


class PeakMemoryCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen = {}

    def _free(self, key, nbytes):
        if self._seen.pop(key, None) is not None:
            self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                st = t.untyped_storage()
                key = st.data_ptr()
                if key and key not in self._seen:
                    nbytes = st.nbytes()
                    self._seen[key] = nbytes
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(st, self._free, key, nbytes)
        return out
