"""One rule per kind of argument, for every interface: integers, floats, choices, booleans, networks' modes.

Errors are ``OptionError`` (a ``ValueError``; ``OptionTypeError`` is also a ``TypeError``) carrying the API keyword
they are about in ``.option``. ``str(error)`` names the Python keyword; ``error.render(spelling)`` names it as
another interface spells it (the command line: ``--t-star`` for ``t_star``, see ``diffpure_fast.cli``), remedies
included, so no interface ever suggests an option it does not have.

The integer rule: a Python ``int`` or a NumPy integer is accepted (and returned as ``int``); ``bool`` is refused,
and so is a float even when integral (``20.0``): nothing is rounded.

This module sits below everything else in the package (it imports only numpy and torch), so that every layer,
``attacks`` included, checks its arguments with the same rules.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from torch import nn

__all__ = ["API", "FlagSpelling", "OptionError", "OptionFileNotFoundError", "OptionTypeError", "Spelling", "check_bool",
           "check_choice", "check_eval_mode", "check_float", "check_int", "check_value_range"]


class Spelling:
    """How an interface spells its arguments; this base class is the Python API's (keywords as they are)."""

    def name(self, key: str) -> str:
        """The argument ``key`` (an API keyword) as the user writes it in this interface."""
        return key

    def setting(self, key: str, value) -> str:
        """How to give ``key`` the value ``value`` in this interface (``trust_checkpoint=True``)."""
        return f"{key}={value!r}"


API = Spelling()


class FlagSpelling(Spelling):
    """A command line's spelling: each API keyword is the flag ``flags`` maps it to (``"--" + key`` with "-" for
    "_" when absent); ``negated`` lists keywords whose flag sets them to False (``random_start``:
    ``--no-random-start``)."""

    def __init__(self, flags: dict[str, str] | None = None, negated: frozenset[str] = frozenset()):
        self.flags, self.negated = dict(flags or {}), negated

    def name(self, key: str) -> str:
        return self.flags.get(key) or "--" + key.replace("_", "-")

    def setting(self, key: str, value) -> str:
        flag = self.name(key)
        if isinstance(value, bool):
            return flag if value != (key in self.negated) else f"no {flag}"
        if isinstance(value, (tuple, list)):
            return f"{flag} {' '.join(str(v) for v in value)}"
        return f"{flag} {value}"


class OptionError(ValueError):
    """A bad argument. ``option``: its API keyword; ``detail``: the rest of the message, a str or a function of a
    ``Spelling`` for messages that name other arguments (remedies such as "pass value_range"); ``where``: what
    inside the argument is meant (a file, an entry: ``checkpoint 'model.pt'['model']: ...``)."""

    def __init__(self, option: str, detail: str | Callable[[Spelling], str], *, where: str | None = None):
        self.option, self.detail, self.where = option, detail, where
        super().__init__(self.render())

    def render(self, spelling: Spelling = API) -> str:
        """The message with every argument spelled as ``spelling`` says (default: the Python keywords)."""
        detail = self.detail(spelling) if callable(self.detail) else self.detail
        return f"{spelling.name(self.option)}{' ' + self.where if self.where else ''}: {detail}"

    def __reduce__(self):  # picklable (a lambda detail is not): the detail in the API's spelling
        detail = self.detail(API) if callable(self.detail) else self.detail
        return _rebuild, (type(self), self.option, detail, self.where)


class OptionTypeError(OptionError, TypeError):
    """An argument of the wrong type (both a ``ValueError`` and a ``TypeError``)."""


class OptionFileNotFoundError(OptionError, FileNotFoundError):
    """A file or folder named by an argument does not exist (both a ``ValueError`` and a ``FileNotFoundError``)."""


def _rebuild(cls, option, detail, where):
    return cls(option, detail, where=where)


def _bound(low, high, kind: str) -> str:
    if high is None:
        return f"{kind} >= {low}" if low is not None else kind
    return f"{kind} in [{low}, {high}]" if low is not None else f"{kind} <= {high}"


def check_int(name: str, v, *, low: int | None = 1, high: int | None = None) -> int:
    """``v`` as an ``int`` if it is a Python or NumPy integer in [low, high] (None: unbounded); else an error
    naming ``name`` and the bound. bool is refused, and so is any float, integral or not (never rounded)."""
    bound = _bound(low, high, "an int")
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        what = " (a float is never rounded to an int)" if isinstance(v, (float, np.floating)) else ""
        raise OptionTypeError(name, f"expected {bound}, got {v!r} of type {type(v).__name__}{what}")
    v = int(v)
    if (low is not None and v < low) or (high is not None and v > high):
        raise OptionError(name, f"expected {bound}, got {v}")
    return v


def check_float(name: str, v, *, low: float | None = None, high: float | None = None,
                low_open: bool = False) -> float:
    """``v`` as a finite ``float`` (Python or NumPy int or float, not bool) within the bounds."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise OptionTypeError(name, f"expected a finite float, got {v!r} of type {type(v).__name__}")
    f = float(v)
    if not math.isfinite(f):
        raise OptionError(name, f"expected a finite float, got {v!r}")
    if low is not None and (f <= low if low_open else f < low):
        raise OptionError(name, f"expected a value {'>' if low_open else '>='} {low}, got {v!r}")
    if high is not None and f > high:
        raise OptionError(name, f"expected a value <= {high}, got {v!r}")
    return f


def check_value_range(name: str, v) -> tuple[float, float]:
    """A finite pair (low, high) with low < high, returned as floats."""
    if (not isinstance(v, (tuple, list)) or len(v) != 2
            or not all(isinstance(b, (int, float, np.integer, np.floating)) and not isinstance(b, (bool, np.bool_))
                       and math.isfinite(b) for b in v) or not v[0] < v[1]):
        raise OptionError(name, f"expected a finite pair (low, high) with low < high, got {v!r}")
    return float(v[0]), float(v[1])


def check_choice(name: str, v, choices):
    """``v`` if it is one of ``choices``."""
    if v not in choices:
        raise OptionError(name, f"expected one of {tuple(choices)}, got {v!r}")
    return v


def check_bool(name: str, v) -> bool:
    """``v`` if it is a bool (a NumPy bool is returned as ``bool``); 0/1 and strings are refused."""
    if not isinstance(v, (bool, np.bool_)):
        raise OptionTypeError(name, f"expected a bool, got {type(v).__name__}")
    return bool(v)


def check_eval_mode(name: str, module, *, remedy: str | None = None) -> None:
    """Refuse a network with any submodule in training mode (``module`` itself included).

    The package never switches a caller's network between modes (the exact adjoint calls it again in the backward
    pass, outside any context the forward could have set up), so a network in training mode is an error naming the
    argument ``name``: dropout and batch norm would make purification random and its gradient wrong. Callables that
    are not ``nn.Module`` have no mode. ``remedy``: what to call (default ``{name}.eval()``)."""
    if not isinstance(module, nn.Module) or not any(m.training for m in module.modules()):
        return
    path = next(n for n, m in module.named_modules() if m.training)
    where = "is in training mode" if path == "" else f"has a submodule in training mode ({path!r})"
    raise OptionError(name, f"{where}; dropout and batch norm would make the results random and their gradients "
                            f"wrong; call {remedy or name + '.eval()'} first (the package never switches it)")
