"""The compiled extension ``diffpure_fast._C`` (csrc/), when it is built.

Loading it runs its static registrations: the schemas of ``diffpure_fast::sde_step_z`` / ``sde_step_philox``, their
C++ CPU kernels, and their CUDA kernels when it was built with CUDA. ``_library`` loads it once, when the package is
imported, before it registers anything from Python; nothing is ever compiled here (build with
``pip install --no-build-isolation -e .``).
"""

from __future__ import annotations

import functools
import logging

import torch

__all__ = ["cpu_impl", "cuda_impl", "has_kernel", "load_error"]

log = logging.getLogger(__name__)

_PROBE_OP = "diffpure_fast::sde_step_philox"


@functools.cache
def _load() -> tuple[str | None, frozenset[str]]:
    """(None, the dispatch keys that got a C++ kernel) once ``diffpure_fast._C`` is loaded, else (why not, {}).

    The keys are read right after the load, before Python registers kernels of its own for the missing ones (the
    dispatcher would then report those keys too)."""
    try:
        from .. import _C  # noqa: F401  (loading the .so runs its TORCH_LIBRARY registrations)
    except ImportError as exc:
        log.debug("diffpure_fast._C not available: %s", exc)
        return f"{type(exc).__name__}: {exc}", frozenset()
    keys = frozenset(k for k in ("CPU", "CUDA") if torch._C._dispatch_has_kernel_for_dispatch_key(_PROBE_OP, k))
    return None, keys


def load_error() -> str | None:
    """Why the extension is not available, or None when it is (loads it on the first call)."""
    return _load()[0]


def has_kernel(dispatch_key: str) -> bool:
    """Whether the extension registered a C++ kernel of the step ops for ``dispatch_key`` ("CPU" or "CUDA")."""
    return dispatch_key in _load()[1]


class _Kernel:
    """The C++ kernels of one dispatch key, called directly: below autograd, past any Python kernel of another key.

    For tests and benchmarks, which compare an implementation's own output (and its own input checks) with the
    reference. A ``force_impl`` override of the same key (see ``_dispatch``) would run instead: it shadows the C++
    kernel in the dispatcher."""

    def __init__(self, dispatch_key: str):
        self.dispatch_key = dispatch_key
        self.keyset = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, dispatch_key))

    def __repr__(self) -> str:
        return f"diffpure_fast._C ({self.dispatch_key})"

    def sde_step_z(self, x, eps, z, a, b, c, guide=None):
        return torch.ops.diffpure_fast.sde_step_z.default.redispatch(self.keyset, x, eps, z, a, b, c, guide)

    def sde_step_philox(self, x, eps, a, b, c, seed, sample_ids, step, stream, guide=None):
        return torch.ops.diffpure_fast.sde_step_philox.default.redispatch(self.keyset, x, eps, a, b, c, seed,
                                                                          sample_ids, step, stream, guide)


@functools.cache
def cpu_impl() -> _Kernel | None:
    """The C++ CPU kernels, or None when ``diffpure_fast._C`` is not built."""
    return _Kernel("CPU") if has_kernel("CPU") else None


@functools.cache
def cuda_impl() -> _Kernel | None:
    """The CUDA kernels, or None when the extension was built without CUDA or no GPU is visible."""
    return _Kernel("CUDA") if has_kernel("CUDA") and torch.cuda.is_available() else None
