"""Optional dependencies: imported where they are used, and missing ones reported as a user error, never a crash.

The package needs torch, numpy, tqdm and safetensors (``setup.py``'s ``install_requires``). Everything else is
optional and serves one feature: scikit-learn (the digits data set), Pillow (image folders, the demo's grid),
matplotlib (an evaluation report's plots), scipy (certify's exact binomial bound), an AutoAttack package, triton
(a GPU kernel; the package falls back without it), robustbench / torchvision / timm (the ``robustbench:``,
``torchvision:``, ``timm:`` classifiers). A feature whose package is missing either refuses before any work starts
(``require``, raising ``MissingDependency`` with the install command), or degrades and says so in its output (the
plots of a report).
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["INSTALL", "MissingDependency", "available", "missing_module", "require"]

# How to install the distribution that provides each optional top-level module.
INSTALL = {
    "sklearn": "pip install scikit-learn",
    "PIL": "pip install pillow",
    "matplotlib": "pip install matplotlib",
    "autoattack": "pip install git+https://github.com/fra31/auto-attack",
    "pyautoattack": "pip install pyautoattack",
    "triton": "pip install triton",
    "torchsde": "pip install torchsde",
    "yaml": "pip install pyyaml",
    "scipy": "pip install scipy",
    # the extras of the library classifiers (setup.py's extras_require), named so the message says which extra
    "robustbench": "pip install 'diffpure_fast[robustbench]'",
    "torchvision": "pip install 'diffpure_fast[torchvision]' (a torchvision built for the installed torch)",
    "timm": "pip install 'diffpure_fast[timm]'",
}


class MissingDependency(ImportError):
    """An optional package a requested feature needs is not installed; the message says how to install it."""


def _install(module: str) -> str:
    return INSTALL.get(module, f"pip install {module}")


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` (e.g. ``"sklearn.datasets"``) or raise ``MissingDependency``: "<package> is not installed
    (needed for ``purpose``); <install command>"."""
    top = module.split(".")[0]
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependency(f"{top} is not installed (needed for {purpose}); {_install(top)}") from exc
    except Exception as exc:  # installed but broken, e.g. a torchvision built for another torch (RuntimeError)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise MissingDependency(f"{top} is installed but does not import ({type(exc).__name__}: {first}); needed "
                                f"for {purpose}; {_install(top)}") from exc


def available(module: str) -> bool:
    """Whether ``module`` imports (a feature that degrades without it asks this before doing its work)."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def missing_module(exc: BaseException) -> str | None:
    """For an ImportError raised by a third-party import (not by this package itself): a one-line message naming
    the missing module and how to install it; None for anything else (a bug, to be reported as one)."""
    if isinstance(exc, MissingDependency):
        return str(exc)
    name = getattr(exc, "name", None)
    if not isinstance(exc, ImportError) or not name or name.split(".")[0] == "diffpure_fast":
        return None
    top = name.split(".")[0]
    return f"{top} is not installed; {_install(top)}"
