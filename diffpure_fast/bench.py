"""Measuring purification: latency, throughput, peak memory and counted network calls (``diffpure-fast bench``).

One implementation for the command line and the repository's ``benchmarks/`` scripts:

* :func:`count_network_calls`: counts (and times) the score network calls of a ``ScoreModel`` while a block runs.
  A forward hook on a loaded model never fires: the engine calls ``model.eps(x, t)``, which calls the wrapped
  network ``model.net`` directly, not ``model.__call__``; hook ``model.net`` or use this counter.
* :func:`reset_peak_rss` / :func:`peak_rss_since_reset`: the process's peak resident memory (Linux only:
  ``/proc/self/clear_refs`` and ``VmHWM``), :func:`measure_call`: time and peak memory of a callable (CPU: RSS
  high-water mark above the RSS before; CUDA: ``max_memory_allocated`` above the allocation before, reset per call).
* :func:`purify_row`: one measured configuration (batch, steps, grad_mode, device, dtype) of ``dpf.purify``, and
  :func:`official_row`: DiffPure's own pipeline (its ``RevVPSDE`` over ``torchsde.sdeint``) on the same network,
  input and noise.
* :func:`machine_header`: the command, CPU, threads that ran, and versions, for every results file.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .info import cpu_model
from .models.base import ScoreModel

__all__ = ["BENCH_GRAD_MODES", "DTYPES", "BenchConfig", "CallCounter", "count_network_calls", "machine_header",
           "measure_call", "median_time", "network_call_seconds", "official_row", "peak_rss_since_reset", "purify_row",
           "reset_peak_rss", "run_bench"]

# --dtypes: float32, or the score network under autocast (purify's autocast option): bf16 / fp16.
DTYPES = {"float32": None, "bf16": "bf16", "fp16": "fp16"}
# "full_cache": grad_mode "full" keeping every step's graph (grad_cache_steps = steps), the memory-for-time end.
BENCH_GRAD_MODES = ("none", "bpda", "full", "full_cache", "adjoint", "surrogate")


def _sync(device: torch.device) -> Callable[[], None]:
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


@dataclass
class CallCounter:
    """What :func:`count_network_calls` saw: ``calls`` (``eps`` and ``eps_and_variance`` calls) and ``seconds``
    spent inside them (CUDA synchronised around each call when ``timed``)."""

    calls: int = 0
    seconds: float = 0.0
    timed: bool = False

    def reset(self) -> None:
        self.calls, self.seconds = 0, 0.0


@contextlib.contextmanager
def count_network_calls(model: ScoreModel, *, timed: bool = False,
                        on_call: Callable[[], object] | None = None) -> Iterator[CallCounter]:
    """Count the score network calls ``model`` makes inside the block (the supported way: see the module doc).

    Every network evaluation of the engine goes through ``model.eps`` or ``model.eps_and_variance``; this wraps
    both on this instance for the block's duration (restored after, also on an error), so purify, gradients,
    torchsde's ``RevVPSDE`` and autocast (which wraps the model) are all counted. A VJP through a network's graph
    is not a call (no new forward pass); an exact adjoint's recomputed forward is.

        with dpf.bench.count_network_calls(model) as calls:
            dpf.purify(x, model, t_star=0.1)          # dt 1e-3: calls.calls == 100

    timed: also sum the seconds inside the calls (synchronising CUDA around each, which perturbs async runs).
    on_call: called after every call (e.g. a progress bar's ``update``: the CLI's purify shows network calls).
    Raises TypeError naming ``model`` for an object without ``eps``.
    """
    if not callable(getattr(model, "eps", None)):
        raise TypeError(f"model: expected a ScoreModel (with an eps method), got {type(model).__name__}")
    counter = CallCounter(timed=timed)
    patched = []
    for name in ("eps", "eps_and_variance"):
        inner = getattr(model, name)

        def wrapper(x, *args, _inner=inner, **kwargs):
            counter.calls += 1
            if not timed:
                out = _inner(x, *args, **kwargs)
            else:
                sync = _sync(x.device)
                sync()
                t0 = time.perf_counter()
                out = _inner(x, *args, **kwargs)
                sync()
                counter.seconds += time.perf_counter() - t0
            if on_call is not None:
                on_call()
            return out

        had = name in vars(model)
        patched.append((name, had, vars(model).get(name)))
        object.__setattr__(model, name, wrapper)
    try:
        yield counter
    finally:
        for name, had, old in patched:
            if had:
                object.__setattr__(model, name, old)
            else:
                object.__delattr__(model, name)


def _status_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field_name}")


def reset_peak_rss() -> int:
    """Reset the kernel's peak-RSS mark (Linux: write 5 to ``/proc/self/clear_refs``); returns the current RSS in
    bytes. Raises OSError where there is no such file (not Linux)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS") * 1024


def peak_rss_since_reset() -> int:
    """The process's peak RSS in bytes since the last :func:`reset_peak_rss` (``VmHWM``)."""
    return _status_kib("VmHWM") * 1024


def median_time(fn: Callable, repeats: int, warmup: int = 1, device: torch.device | None = None) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` calls after ``warmup`` untimed ones (CUDA
    synchronised around each call)."""
    return statistics.median(_times(fn, repeats, warmup, device))


def _times(fn, repeats: int, warmup: int, device: torch.device | None) -> list[float]:
    dev = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = _sync(dev)
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return out


def measure_call(fn: Callable, device: torch.device) -> tuple[float, int | None, int | None, object]:
    """(seconds, peak bytes, peak extra bytes, result) of one ``fn()``. CPU: the process's RSS high-water mark
    during the call (model, Python and torch included) and that mark above the RSS before the call; CUDA:
    ``max_memory_allocated`` during the call (the peak counter reset first) and that above the memory allocated
    before. The CPU "extra" figure misses memory an earlier call freed to the allocator and this one reused, so
    after a warm-up it can read near 0: the total is the honest upper bound. Both are None on a CPU without
    ``/proc/self/clear_refs`` (not Linux): not measured, rather than a wrong number."""
    sync = _sync(device)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        try:
            base = reset_peak_rss()
        except OSError:
            base = None
    t0 = time.perf_counter()
    result = fn()
    sync()
    seconds = time.perf_counter() - t0
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    elif base is None:
        return seconds, None, None, result
    else:
        peak = peak_rss_since_reset()
    return seconds, peak, max(peak - base, 0), result


def network_call_seconds(model: ScoreModel, x: torch.Tensor, *, dtype: str = "float32", repeats: int = 10,
                         warmup: int = 2) -> float:
    """Median time of one no-grad ``model.eps(x, t)`` (x: (B, C, H, W), the batch of the rows it is the unit of):
    the unit of a "cost in network calls" column. Time it in the process and right after the rows it divides: a
    shared machine's speed drifts by 20% between processes (a call timed elsewhere once turned a 100-call
    purification into 79 calls)."""
    t = torch.full((x.shape[0],), 0.05, device=x.device)
    autocast = DTYPES[dtype]
    ctx = (torch.autocast(x.device.type, dtype=torch.bfloat16 if autocast == "bf16" else torch.float16)
           if autocast else contextlib.nullcontext())
    with torch.no_grad(), ctx:
        return median_time(lambda: model.eps(x * 2 - 1, t), repeats, warmup, x.device)


def _mib(peak: int | None, extra: int | None) -> dict:
    return {"peak_mib": None if peak is None else peak / 2**20,
            "peak_extra_mib": None if extra is None else extra / 2**20}


def _stats(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "repeats": len(times)}


def purify_row(model: ScoreModel, x: torch.Tensor, *, t_star: float, dt: float, grad_mode: str = "none",
               dtype: str = "float32", repeats: int = 3, warmup: int = 1, seed: int = 0) -> dict:
    """Measure ``dpf.purify(x, model, t_star=t_star, dt=dt, grad_mode=...)`` (DiffPure's reverse SDE, counter noise
    from ``seed``) and, with a ``grad_mode`` other than "none", the backward pass of ``<w, purify(x)>`` for a fixed
    random w.

    x: (B, C, H, W) in [0, 1] on the model's device. grad_mode: one of ``BENCH_GRAD_MODES``. dtype: a key of
    ``DTYPES``. ``warmup`` untimed calls first (compilation, lazy initialisation, allocator growth), then
    ``repeats`` timed calls; the first timed call also gives the peak memory and the counted network calls.
    Returns a dict: steps, network_calls (counted), median_s / min_s / max_s / repeats, images_per_s, peak_mib and
    peak_extra_mib (:func:`measure_call`).
    """
    import diffpure_fast as dpf

    mode = "full" if grad_mode == "full_cache" else grad_mode
    kw = dict(t_star=t_star, dt=dt, seed=seed, grad_mode=mode, autocast=DTYPES[dtype])
    steps = len(dpf.PurifyConfig.build(t_star=t_star, dt=dt).plan())
    if grad_mode == "full_cache":
        kw["grad_cache_steps"] = steps
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 1)).to(x.device)

    def run():
        if grad_mode == "none":
            with torch.no_grad():
                return dpf.purify(x, model, **kw)
        xg = x.clone().requires_grad_(True)
        return torch.autograd.grad((dpf.purify(xg, model, **kw) * w).sum(), xg)[0]

    for _ in range(warmup):
        run()
    with count_network_calls(model) as counter:
        first, peak, extra, _ = measure_call(run, x.device)
    times = [first] + _times(run, repeats - 1, 0, x.device)
    stats = _stats(times)
    return {"steps": steps, "network_calls": counter.calls, **stats,
            "images_per_s": x.shape[0] / stats["median_s"], **_mib(peak, extra)}


def official_row(model: ScoreModel, x: torch.Tensor, *, t_star: float, dt: float, repeats: int = 3,
                 warmup: int = 1, seed: int = 0) -> dict:
    """DiffPure's pipeline as the official ``runners/diffpure_sde.py`` runs it (its ``RevVPSDE`` over
    ``torchsde.sdeint``, Euler, no grad) on ``model``, ``x`` and the same noise as ``dpf.purify`` given the same
    forward noise and Brownian increments (replayed into torchsde). Same keys as :func:`purify_row`, plus
    ``max_abs_diff``: the largest difference between the two outputs in [-1, 1] on that noise (float32: about 1e-6).

    Needs torchsde (``pip install torchsde``): ImportError otherwise."""
    import torchsde  # noqa: F401  (a clear ImportError before any work)

    import diffpure_fast as dpf

    from .chain import forward_diffuse
    from .solvers import reverse_time_grid
    from .testing.torchsde_reference import torchsde_purify

    g = torch.Generator().manual_seed(seed)
    grid = torch.as_tensor(reverse_time_grid(t_star, dt), dtype=torch.float32)
    z = torch.randn(x.shape, generator=g).to(x.device)
    increments = (torch.randn(len(grid) - 1, *x.shape, generator=g)
                  * (grid[1:] - grid[:-1]).sqrt().view(-1, *[1] * x.dim())).to(x.device)
    schedule = model.schedule

    x_pm = x * 2 - 1

    def run():
        with torch.no_grad():
            x_t = forward_diffuse(x_pm, z, t_star, schedule)
            return torchsde_purify(x_t, model, t_star, increments=increments, grid=grid.to(x.device), dt=dt)

    for _ in range(warmup):
        run()
    with count_network_calls(model) as counter:
        first, peak, extra, official = measure_call(run, x.device)
    times = [first] + _times(run, repeats - 1, 0, x.device)
    with torch.no_grad():
        ours = dpf.purify(x_pm, model, t_star=t_star, dt=dt, forward_noise=z, increments=increments,
                          value_range=(-1, 1))
    stats = _stats(times)
    return {"steps": len(grid) - 1, "network_calls": counter.calls, **stats,
            "images_per_s": x.shape[0] / stats["median_s"], **_mib(peak, extra),
            "max_abs_diff": (official - ours).abs().max().item()}


def machine_header(command: str, *, threads: int | None = None, devices=("cpu",)) -> dict:
    """The facts every results file states: the command, CPU, logical CPUs, torch's CPU threads that ran
    (``threads``; default ``torch.get_num_threads()`` of this process), GPUs of ``devices``, versions, load."""
    import diffpure_fast as dpf

    gpus = sorted({torch.cuda.get_device_name(torch.device(d)) for d in devices if torch.device(d).type == "cuda"})
    return {"command": command, "cpu": cpu_model(), "logical_cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads() if threads is None else threads,
            "gpu": ", ".join(gpus) or "none used", "python": platform.python_version(), "torch": torch.__version__,
            "diffpure_fast": dpf.__version__,
            "load_average_1_5_15": [round(v, 2) for v in os.getloadavg()]}


@dataclass
class BenchConfig:
    """What ``diffpure-fast bench`` measures: every combination of ``devices`` x ``dtypes`` x ``batch_sizes`` x
    ``steps`` x ``grad_modes`` (DiffPure's reverse SDE, Euler–Maruyama with dt = t_star / steps on torchsde's grid,
    as the official runner steps it), each ``warmup`` untimed then ``repeats`` timed calls; with ``official``, one
    row of DiffPure's torchsde pipeline per (device, batch, steps) in float32 (skipped, and said so, without
    torchsde). Errors are ``OptionError`` naming the keyword."""

    batch_sizes: tuple = (1, 4)
    steps: tuple = (100,)
    grad_modes: tuple = ("none", "full")
    devices: tuple = ("cpu",)
    dtypes: tuple = ("float32",)
    t_star: float = 0.1
    repeats: int = 3
    warmup: int = 1
    official: bool = True
    seed: int = 0

    def __post_init__(self):
        from ._validate import OptionError, check_bool, check_choice, check_float, check_int

        for name, check in (("batch_sizes", lambda n, v: check_int(n, v, low=1)),
                            ("steps", lambda n, v: check_int(n, v, low=1)),
                            ("grad_modes", lambda n, v: check_choice(n, v, BENCH_GRAD_MODES)),
                            ("dtypes", lambda n, v: check_choice(n, v, tuple(DTYPES))),
                            ("devices", _check_device)):
            values = getattr(self, name)
            if isinstance(values, (str, int)) or not values:
                raise OptionError(name, f"expected a non-empty list, got {values!r}")
            for v in values:
                check(name, v)
            if len(set(values)) != len(values):
                raise OptionError(name, f"names a value twice: {list(values)}")
            setattr(self, name, tuple(values))
        self.t_star = check_float("t_star", self.t_star, low=0.0, high=1.0, low_open=True)
        self.repeats = check_int("repeats", self.repeats, low=1)
        self.warmup = check_int("warmup", self.warmup, low=0)
        self.official = check_bool("official", self.official)
        self.seed = check_int("seed", self.seed, low=0)


def _check_device(name: str, v) -> None:
    from ._validate import OptionError

    try:
        dev = torch.device(v)
    except (RuntimeError, TypeError):
        raise OptionError(name, f"expected cpu or cuda[:N], got {v!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise OptionError(name, f"expected cpu or cuda[:N], got {v!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise OptionError(name, f"{v!r} requested but no CUDA device is available")


def run_bench(load_model: Callable[[torch.device], ScoreModel], cfg: BenchConfig, *,
              image_shape: tuple[int, int, int] | None = None, on_row: Callable[[dict], None] | None = None
              ) -> list[dict]:
    """Measure every configuration of ``cfg``; returns the rows (dicts, the JSON/CSV columns of
    ``diffpure_fast.bench_report``), calling ``on_row(row)`` after each.

    load_model(device): the score model on that device (called once per device). image_shape: (C, H, W) of the
    random inputs in [0, 1] (default the model's ``in_channels``, ``image_size``; OptionError naming
    ``image_shape`` when the model does not say). Beyond :func:`purify_row`'s keys each row has engine, device,
    dtype, batch, dt, grad_mode, status, call_ms (one no-grad network call on that batch, timed in this run),
    cost_calls (median time in units of that call) and cost_nograd (median time over the "none" row of the same
    device, dtype, batch and steps, when measured)."""
    from ._validate import OptionError

    rows = []

    def emit(row):
        rows.append(row)
        if on_row is not None:
            on_row(row)

    for device in cfg.devices:
        dev = torch.device(device)
        model = load_model(dev)
        shape = image_shape or (model.in_channels, model.image_size, model.image_size)
        if None in shape:
            raise OptionError("image_shape", f"{type(model).__name__} does not state its input channels and size; "
                                             "give the (C, H, W) of its images")
        for dtype in cfg.dtypes:
            for batch in cfg.batch_sizes:
                x = torch.rand(batch, *shape, generator=torch.Generator().manual_seed(cfg.seed)).to(dev)
                call_s = network_call_seconds(model, x, dtype=dtype)
                for steps in cfg.steps:
                    dt = cfg.t_star / steps
                    base = dict(device=str(dev), dtype=dtype, batch=batch, steps=steps, dt=dt, call_ms=1e3 * call_s)
                    nograd = None
                    for mode in cfg.grad_modes:
                        r = purify_row(model, x, t_star=cfg.t_star, dt=dt, grad_mode=mode, dtype=dtype,
                                       repeats=cfg.repeats, warmup=cfg.warmup, seed=cfg.seed)
                        nograd = r["median_s"] if mode == "none" else nograd
                        emit({"engine": "dpf.purify", **base, "grad_mode": mode, "status": "ok", **r,
                              "cost_calls": r["median_s"] / call_s,
                              "cost_nograd": None if nograd is None else r["median_s"] / nograd})
                    if cfg.official and dtype == "float32":
                        emit(_official(model, x, cfg, dt, base, call_s, nograd))
    return rows


def _official(model, x, cfg: BenchConfig, dt: float, base: dict, call_s: float, nograd: float | None) -> dict:
    row = {"engine": "official (torchsde)", **base, "grad_mode": "none"}
    try:
        import torchsde  # noqa: F401
    except ImportError:
        return {**row, "status": "skipped: torchsde is not installed (pip install torchsde)"}
    r = official_row(model, x, t_star=cfg.t_star, dt=dt, repeats=cfg.repeats, warmup=cfg.warmup, seed=cfg.seed)
    return {**row, "status": "ok", **r, "cost_calls": r["median_s"] / call_s,
            "cost_nograd": None if nograd is None else r["median_s"] / nograd}
