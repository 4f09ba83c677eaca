"""What is installed and which kernel implementation each device would use (``diffpure_fast.info()``)."""

from __future__ import annotations

import platform

import torch

__all__ = ["cpu_model", "info"]


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else ``platform.processor()``, else "unknown"."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def info() -> dict:
    """Versions, devices and the active fused-step implementation per device (no compilation is triggered)."""
    from . import __version__, ops

    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # triton is an optional extra
        triton_version = None
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return {
        "diffpure_fast": __version__,
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda_available": torch.cuda.is_available(),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "implementations_available": {name: ops.available(name) for name in ops.IMPLS},
        "active_implementation": {d: ops.default_impl_name(torch.device(d)) for d in devices},
        "impl_env_override": ops.IMPL_ENV,
    }
