"""``diffpure-fast`` (also ``python -m diffpure_fast``): demo | purify | eval | report | conformance | info.

Errors in what the user gave (missing or unreadable files, wrong shapes or channel counts, a checkpoint of the
wrong family, an output that exists, a missing optional package) print one line and exit with status 2, never a
traceback. An error of the Python API (``OptionError``) is printed in the command line's words: its arguments as
this command's flags (``--t-star`` for ``t_star``, through ``_FLAGS``), so a remedy never names an option the
command line does not have.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

__all__ = ["main", "build_parser"]

from ._optional import missing_module
from ._validate import FlagSpelling, OptionError
from .methods import DIFFUSION_TYPES, GUIDANCE_GRADS, METHODS
from .solvers.ddpm import VAR_TYPES

USER_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, OSError)
MODELS = ("digits", "score_sde", "guided_diffusion", "celebahq_ddpm")
# One batch size for purify and eval (and the API's EvalConfig): images per purification batch / samples per attack
# batch. 16 keeps an exact-gradient batch of DiffPure's CIFAR-10 NCSN++ with EOT copies within a few GB.
BATCH_SIZE = 16

# The one table between API keywords and flags: where a flag is not "--" + the keyword with "-" for "_" (those
# are found in each sub-command's parser). Keys (scope, keyword): scope None holds in every sub-command; the
# others where one keyword means another flag (EvalConfig's steps are the attack's, --attack-steps).
_FLAGS = {
    (None, "family"): "--model", (None, "scale"): "--guidance-scale", (None, "random_start"): "--no-random-start",
    (None, "folder"): "FOLDER", ("purify", "x"): "--input", ("eval", "x"): "--data", ("eval", "method"): "--method",
    ("eval", "defense"): "--method", ("attack", "steps"): "--attack-steps", ("runner", "step_size"): "--dt",
}
# Flags that set their keyword to False when given.
_NEGATED = frozenset({"random_start"})


class _CommandLine(FlagSpelling):
    """The spelling of one sub-command: an API keyword is its flag there (``_FLAGS``, else the parser's
    ``--keyword-with-dashes``); a keyword the sub-command has no flag for is said to be the Python API's."""

    def __init__(self, parser: argparse.ArgumentParser, command: str, scope: str | None = None):
        super().__init__(negated=_NEGATED)
        self.command, self.scope = command, scope
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
        self.actions = sub._option_string_actions

    def name(self, key: str) -> str:
        for scope in (self.scope, self.command, None):
            if (scope, key) in _FLAGS:
                return _FLAGS[(scope, key)]
        flag = super().name(key)
        if flag in self.actions:
            return flag
        return f"{key} (a Python API option with no flag in diffpure-fast {self.command})"


def _message(exc: BaseException, command: str) -> str:
    """The one-line message of a user error, in the command line's words."""
    if isinstance(exc, OptionError):
        msg = exc.render(_CommandLine(build_parser(), command, getattr(exc, "cli_scope", None)))
    else:
        msg = str(exc) or type(exc).__name__
    return msg.splitlines()[0]


_T_STAR_HELP = ("diffusion time t* in (0, 1] (default: the model's: 0.1 (CIFAR-10, digits), 0.15 for guided_diffusion "
               "(DiffPure's ImageNet --t 150); 0.5 with --diffusion-type celebahq-ddpm; 0.07 with --method agdm); "
               "the value used is in the report")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, choices=MODELS,
                   help="score model: the embedded digits model (default when no --checkpoint is given), or the "
                        "official checkpoint family of --checkpoint")
    p.add_argument("--checkpoint", default=None, help="checkpoint path of the --model family (score_sde, "
                   "guided_diffusion, celebahq_ddpm); never downloaded")


def _model_family(args) -> str:
    """--model, or digits when neither --model nor --checkpoint is given; a checkpoint must say its family."""
    if args.model is None:
        if args.checkpoint is not None:
            raise ValueError(f"--model: which family is --checkpoint {args.checkpoint}? expected --model one of "
                             f"{', '.join(m for m in MODELS if m != 'digits')} (or digits for a digits .safetensors)")
        return "digits"
    if args.model != "digits" and args.checkpoint is None:
        raise ValueError(f"--checkpoint: --model {args.model} needs a checkpoint path (nothing is downloaded)")
    return args.model


def _load_model(args, family: str, quiet: bool):
    """load_score_model, with a line on stderr first where it reads a checkpoint (a 2 GB file takes a while)."""
    import os

    from .models.loading import load_score_model

    if args.checkpoint is not None and not quiet and os.path.isfile(args.checkpoint):
        size = os.path.getsize(args.checkpoint)
        print(f"diffpure-fast: loading the {family} checkpoint {args.checkpoint} ({size / 1e6:,.0f} MB) ...",
              file=sys.stderr, flush=True)
    return load_score_model(family, args.checkpoint, device=args.device,
                            trust_checkpoint=getattr(args, "trust_checkpoint", False))


class _Deprecated(argparse.Action):
    """An old flag kept for one release: sets the new flag's value and says so on stderr."""

    def __init__(self, option_strings, dest, new: str, **kw):
        self.new = new
        super().__init__(option_strings, dest, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"diffpure-fast: warning: {option_string} is deprecated and will be removed in the next release; "
              f"use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _add_solver_args(p: argparse.ArgumentParser, *, steps_default, t_star_default) -> None:
    p.add_argument("--t-star", type=float, default=t_star_default,
                   help=f"diffusion time t* in (0, 1] (default {t_star_default})" if t_star_default else _T_STAR_HELP)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--steps", type=int, default=steps_default,
                   help="solver steps (euler: equal steps over [1e-5, t*]; ddpm: respaced levels)"
                        + (f" (default {steps_default})" if steps_default else ""))
    g.add_argument("--dt", type=float, default=None, help="Euler step size instead of --steps (DiffPure: 1e-3; "
                   "--diffusion-type ode: its step_size, 1e-3; ldsde: 1e-2)")
    p.add_argument("--seed", type=int, default=0, help="noise seed; a sample's noise depends on the seed and its "
                   "index only, not on the batch size (default 0)")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE,
                   help=f"images per batch (purify: per purification; eval: samples per attack batch; default "
                        f"{BATCH_SIZE})")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def _add_agdm_args(p: argparse.ArgumentParser) -> None:
    a = p.add_argument_group("AGDM (--method/--defense agdm)")
    a.add_argument("--auxiliary", default=None, help="the auxiliary network: digits (the shipped one, default), a "
                   "TorchScript file or module:function returning an nn.Module that maps images in [0, 1] to "
                   "(features, logits)")
    a.add_argument("--guidance-scale", type=float, default=None, help="the guidance scale s (default: AGDM's)")
    a.add_argument("--distance", default=None, choices=("feature_mse", "logit_mse", "kl"),
                   help="the latent distance D (default feature_mse)")


def _add_runner_args(p: argparse.ArgumentParser) -> None:
    r = p.add_argument_group("DiffPure's official runners (--method/--defense diffpure)")
    r.add_argument("--diffusion-type", default=None, choices=DIFFUSION_TYPES,
                   help="the official --diffusion_type: sde (default: reverse SDE), ode (probability-flow ODE), "
                   "ldsde (Langevin dynamics around the input), ddpm (guided-diffusion's sampler; a learned-variance "
                   "model), celebahq-ddpm (SDEdit's sampler)")
    r.add_argument("--sigma2", type=float, default=None, help="ldsde: sigma2 (default 1e-3)")
    r.add_argument("--lambda-ld", type=float, default=None, help="ldsde: lambda_ld (default 1e-2)")
    r.add_argument("--eta", type=float, default=None, help="ldsde: eta (default 5)")
    r.add_argument("--var-type", default=None, choices=VAR_TYPES,
                   help="celebahq-ddpm: the fixed variance (default fixedsmall, celeba.yml's)")


# The flags of each DiffPure runner and the option each sets (--t-star: t*; --dt: the step size).
RUNNER_FLAGS = {
    "sde": {"--t-star": "t_star", "--steps": "steps", "--dt": "dt", "--solver": "solver"},
    "ode": {"--t-star": "t_star", "--dt": "step_size"},
    "ldsde": {"--t-star": "t_star", "--dt": "dt", "--sigma2": "sigma2", "--lambda-ld": "lambda_ld", "--eta": "eta"},
    "ddpm": {"--t-star": "t_star"},
    "celebahq-ddpm": {"--t-star": "t_star", "--var-type": "var_type"},
}
_RUNNER_ONLY = ("--diffusion-type", "--sigma2", "--lambda-ld", "--eta", "--var-type")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="diffpure-fast", description="DiffPure adversarial purification: fused "
                                 "kernels, exact gradients, official checkpoints.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="{demo,purify,eval,report,conformance,info}")

    d = sub.add_parser("demo", help="attack and purify handwritten digits with the embedded models (CPU, minutes)",
                       description="Clean, PGD, transfer and adaptive PGD-EOT accuracies with 95% Wilson intervals "
                       "on the embedded digits models; writes report.md, report.json and grid.png.")
    from .demo import DemoConfig

    dc = DemoConfig()
    d.add_argument("--output", default="out/demo", help="output folder (default out/demo)")
    d.add_argument("--overwrite", action="store_true", help="replace an existing report in the output folder")
    d.add_argument("--n-images", type=int, default=dc.n_images, help=f"test images (default {dc.n_images})")
    d.add_argument("--adaptive-images", type=int, default=None,
                   help="of those, images for the adaptive attack (default: all of them)")
    d.add_argument("--eps", type=float, default=dc.eps, help=f"L-inf radius in [0, 1] units (default {dc.eps})")
    d.add_argument("--pgd-steps", type=int, default=dc.pgd_steps,
                   help=f"PGD steps on the undefended classifier (default {dc.pgd_steps})")
    d.add_argument("--adaptive-steps", type=int, default=dc.adaptive_steps,
                   help=f"adaptive PGD-EOT steps through the purifier (default {dc.adaptive_steps})")
    d.add_argument("--eot", type=int, default=dc.eot, help=f"EOT noise draws per adaptive step (default {dc.eot})")
    d.add_argument("--guided-images", type=int, default=dc.guided_images,
                   help=f"images for the guided methods' rows (GDMP, MimicDiffusion); 0 skips them "
                        f"(default {dc.guided_images})")
    d.add_argument("--n-eval", type=int, default=dc.n_eval,
                   help=f"fresh-noise judgements of each adaptive adversarial image (default {dc.n_eval})")
    d.add_argument("--ode-images", type=int, default=None,
                   help=f"images for the ODE-vs-SDE rows (the paper's noise-injection ablation; at most "
                        f"--adaptive-images); 0 skips them (default {dc.ode_images}, or every adaptive image when "
                        "fewer)")
    d.add_argument("--guided-eot", type=int, default=dc.guided_eot,
                   help=f"EOT noise draws per adaptive step for the guided methods (default {dc.guided_eot})")
    d.add_argument("--full-steps", action="store_true",
                   help="use DiffPure's dt = 1e-3 (100 steps at t* 0.1) instead of --steps; about 5x slower")
    _add_solver_args(d, steps_default=dc.steps, t_star_default=dc.t_star)
    d.set_defaults(batch_size=dc.batch_size)

    p = sub.add_parser("purify", help="purify images from a folder, .npy/.npz or .pt, written back in the same kind",
                       description="Purify a batch of images in [0, 1] (uint8 arrays and image files are read as "
                       "0..255) with DiffPure and write them back in the same kind.")
    _add_model_args(p)
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="read a .pt/.pth checkpoint with the full unpickler. By default only tensors, numbers, "
                   "containers and the NumPy scalars of official score_sde checkpoints are unpickled, because a "
                   "pickle can run arbitrary code; pass this only for a file whose source you trust")
    p.add_argument("--input", required=True, help="a folder of PNG/JPEG images, an .npy/.npz array (N, C, H, W) "
                   "or a .pt tensor")
    p.add_argument("--output", required=True, help="where to write, in the input's kind (folder, .npy, .npz, .pt)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output (outputs are always written "
                   "to a temporary file and renamed into place, so an interrupted run leaves no partial file)")
    p.add_argument("--method", default="diffpure", choices=tuple(METHODS),
                   help="purification method, at its released defaults (default diffpure); --t-star, --steps, "
                        "--dt, --solver and the runner flags are DiffPure's options (--t-star and --steps also "
                        "AGDM's)")
    p.add_argument("--solver", default=None, choices=("euler", "ddpm"), help="reverse solver (default euler)")
    p.add_argument("--value-range", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                   help="the range of a float input's values, kept in the output (default 0 1; e.g. 0 255 for "
                        "float images in 0..255); uint8 arrays and image files are always 0..255")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_solver_args(p, steps_default=None, t_star_default=None)
    _add_runner_args(p)
    _add_agdm_args(p)

    sub.add_parser("conformance", add_help=False, help="replay vectors recorded from the official DiffPure code "
                       "(diffpure-fast conformance --help for its options)")

    i = sub.add_parser("info", help="versions, device, and the active kernel implementations",
                       description="Print versions, devices and which fused-step implementation each device uses.")
    i.add_argument("--json", action="store_true", help="print JSON instead of aligned text")

    _add_eval_parsers(sub)
    return ap


def _cmd_info(args) -> int:
    from .info import info

    data = info()
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        width = max(map(len, data))
        for k, v in data.items():
            print(f"{k:<{width}}  {v}")
    return 0


def _method_options(args, method: str) -> dict:
    """DiffPure's options from --diffusion-type and the flags of that runner (RUNNER_FLAGS: --t-star, --steps, --dt,
    --solver; --sigma2, --lambda-ld, --eta; --var-type); AGDM's from --auxiliary, --t-star, --steps,
    --guidance-scale and --distance; GDMP and MimicDiffusion run at their released defaults, so those flags are an
    error with them."""
    given = {"--t-star": args.t_star, "--steps": args.steps, "--dt": args.dt, "--solver": args.solver,
             "--auxiliary": args.auxiliary, "--guidance-scale": args.guidance_scale, "--distance": args.distance,
             **{f: getattr(args, f[2:].replace("-", "_"), None) for f in _RUNNER_ONLY}}
    if method == "diffpure":
        kind = args.diffusion_type or "sde"
        flags = RUNNER_FLAGS[kind]
        options = {"diffusion_type": kind} if args.diffusion_type else {}
        # only what was given: the runner's options dataclass holds the defaults (sde: t* 0.1, dt 1e-3 for Euler
        # without --steps) and refuses what a run could not honour (--dt with --solver ddpm)
        options.update({opt: given[flag] for flag, opt in flags.items() if given[flag] is not None})
        own = ("--diffusion-type", *flags)
        wrong = [f for f in (*RUNNER_FLAGS["sde"], *_RUNNER_ONLY) if given[f] is not None and f not in own]
        if wrong:
            raise ValueError(f"{wrong[0]}: not an option of --diffusion-type {kind} (its flags: {', '.join(flags)})")
        _check_runner_options(options, flags)
    elif method == "agdm":
        from .eval.classifiers import load_auxiliary_spec

        options = {"auxiliary": load_auxiliary_spec(args.auxiliary or "digits", args.device)}
        for flag, key in (("--t-star", "t_star"), ("--steps", "steps"), ("--guidance-scale", "scale"),
                          ("--distance", "distance")):
            if given[flag] is not None:
                options[key] = given[flag]
        own = ("--auxiliary", "--t-star", "--steps", "--guidance-scale", "--distance")
    else:
        options, own = {}, ()
    named = [k for k, v in given.items() if v is not None and k not in own]
    if named:
        owner = "AGDM" if named[0] in ("--auxiliary", "--guidance-scale", "--distance") else "DiffPure"
        raise ValueError(f"{named[0]}: an option of {owner}; {method} "
                         f"{'does not take it' if method in ('diffpure', 'agdm') else 'runs at its released defaults'}")
    return options


def _check_runner_options(options: dict, flags: dict) -> None:
    """Validate a runner's options (and its chain) now, before any model is loaded; an error names the flag that set
    the value (``--dt`` for the ODE's step_size: the "runner" scope of ``_FLAGS``)."""
    from .config import PurifyConfig

    try:
        PurifyConfig.build("diffpure", **options)
    except OptionError as e:
        e.cli_scope = "runner"
        raise


def _cmd_purify(args) -> int:
    import torch
    from tqdm.auto import tqdm

    from .engine import purify
    from .image_io import kind_of, read_images, write_images

    family = _model_family(args)   # the flags first: a wrong combination fails before any file is read
    src, dst = Path(args.input), Path(args.output)
    if dst.exists() and not args.overwrite:
        raise FileExistsError(f"{dst}: exists; pass --overwrite to replace it")
    batch = read_images(src)
    out_kind = kind_of(dst) if dst.suffix else "folder"
    if out_kind != batch.kind:
        raise ValueError(f"--output: the input is a {batch.kind}, so the output must be one too, got {dst}")
    if args.value_range is not None and batch.uint8:
        raise ValueError(f"--value-range: {src} holds 0..255 integers (uint8 or image files), read as [0, 1] and "
                         f"written back as 0..255; --value-range is for float inputs")
    model = _load_model(args, family, args.no_progress)
    x = batch.x.to(args.device)
    options = _method_options(args, args.method)
    if args.value_range is not None:
        options["value_range"] = tuple(args.value_range)
    outs = []
    for i in tqdm(range(0, len(x), args.batch_size), desc="purify", disable=args.no_progress):
        ids = torch.arange(i, min(i + args.batch_size, len(x)), device=x.device)
        try:
            outs.append(purify(x[i:i + args.batch_size], model, method=args.method, seed=args.seed, noise_ids=ids,
                               **options).cpu())
        except OptionError as e:
            if e.option == "x":   # purify's checks of the images (channels, size, range): name the file
                e.where = str(src)
            raise
    write_images(dst, batch, torch.cat(outs), overwrite=args.overwrite)
    return 0


def _cmd_demo(args) -> int:
    from .demo import DemoConfig, run_demo

    if args.full_steps and args.dt is not None:
        raise ValueError("--full-steps: means DiffPure's --dt 0.001; give --full-steps or --dt, not both")
    full = args.full_steps or args.dt is not None
    # the ODE rows' default: DemoConfig's count, or all adaptive images when there are fewer (a default, not a cap:
    # an explicit --ode-images above --adaptive-images is an error of DemoConfig)
    adaptive = args.n_images if args.adaptive_images is None else args.adaptive_images
    ode_images = min(DemoConfig.ode_images, adaptive) if args.ode_images is None else args.ode_images
    cfg = DemoConfig(n_images=args.n_images, adaptive_images=args.adaptive_images, t_star=args.t_star,
                     steps=None if full else args.steps, dt=args.dt, eps=args.eps,
                     pgd_steps=args.pgd_steps, adaptive_steps=args.adaptive_steps, eot=args.eot, seed=args.seed,
                     guided_images=args.guided_images, guided_eot=args.guided_eot, n_eval=args.n_eval,
                     ode_images=ode_images,
                     batch_size=args.batch_size, device=args.device)
    command = "diffpure-fast " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    report = run_demo(args.output, cfg, overwrite=args.overwrite, command=command)
    print((Path(args.output) / "report.md").read_text())
    print(f"wrote {args.output}/report.md, report.json, grid.png in {report['timings_s']['total']:.0f} s")
    return 0


def _check_common(args) -> None:
    """Options purify/demo share that torch would otherwise reject with a RuntimeError (a traceback), and a
    forced kernel implementation (DIFFPURE_FAST_IMPL) that cannot run here (triton not installed, no CUDA kernels),
    which would fail only at the first solver step."""
    import torch

    from . import ops

    forced = ops.forced_impl()
    if forced is not None and args.command != "info" and not ops.available(forced):
        raise ValueError(f"{ops.IMPL_ENV}={forced}: that implementation is not available on this machine (for "
                         f"triton: pip install triton); unset {ops.IMPL_ENV} to use the default one")

    if getattr(args, "threads", None) is not None:
        if args.threads < 1:
            raise ValueError(f"--threads: expected an int >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if getattr(args, "batch_size", None) is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size: expected an int >= 1, got {args.batch_size}")
    if getattr(args, "device", None) is not None:
        try:
            dev = torch.device(args.device)
        except RuntimeError:
            raise ValueError(f"--device: expected a torch device such as cpu or cuda, got {args.device!r}") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device: {args.device!r} requested but no CUDA device is available")
        if dev.type not in ("cpu", "cuda"):
            raise ValueError(f"--device: expected cpu or cuda[:N], got {args.device!r}")


# ---------------------------------------------------------------------------------------------------------------
# eval / report: the evaluation harness (diffpure_fast.eval) on the command line.


def _radius(text: str) -> float:
    """A radius as a float or a fraction such as 8/255."""
    num, slash, den = text.partition("/")
    try:
        return float(num) / float(den) if slash else float(num)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected a number or a fraction like 8/255, got {text!r}") from None


def _add_eval_parsers(sub) -> None:
    from .attacks.autoattack import AA_MODES, AA_PACKAGES, AA_VERSIONS
    from .attacks.pgd import EOT_REDUCTIONS, LOSSES, NORMS, TARGETED_LOSSES
    from .eval.attacks import ATTACK_SPECS
    from .eval.defenses import DEFENSES

    e = sub.add_parser("eval", help="attack a purification defense and report robust accuracy (records, report, "
                       "plots)", description="Evaluate a defense against an adaptive attack with an explicit "
                       "protocol: clean and robust accuracy single-shot, mean, worst-of-N and majority vote over "
                       "--n-eval fresh-noise evaluations, each with a 95% Wilson interval. Resumable (rerun the "
                       "same command) and shardable (torchrun --nproc-per-node K -m diffpure_fast eval ...).")
    e.add_argument("--method", default="diffpure", choices=(*DEFENSES, "none"),
                   help="purification method, as in purify, or none for the undefended classifier (default diffpure)")
    e.add_argument("--defense", dest="method", choices=(*DEFENSES, "none"), action=_Deprecated, new="--method",
                   help="deprecated name of --method (removed in the next release)")
    _add_model_args(e)
    e.add_argument("--classifier", default=None, help="digits (the default with the digits model, and only "
                   "there), a TorchScript file, or module:function returning an nn.Module (inputs in [0, 1]; the "
                   "module is imported from the current directory or PYTHONPATH)")
    e.add_argument("--data", default=None, help="digits:test (the default with the digits model, and only there), "
                   "cifar10:FOLDER[:test|:train], an image folder (class sub-folders or labels.txt), .npz (x, y) or "
                   ".npy with --labels")
    e.add_argument("--labels", default=None, help="labels .npy for an .npy --data")
    e.add_argument("--attack", default="pgd-eot", choices=tuple(ATTACK_SPECS), help="; ".join(
        f"{name}: {spec.summary}" for name, spec in ATTACK_SPECS.items()) + " (default pgd-eot)")
    e.add_argument("--grad-mode", default=None, choices=("full", "adjoint", "bpda", "surrogate"),
                   help="the attack's gradient through the purifier: full (exact discrete adjoint), adjoint "
                   "(continuous adjoint), bpda (identity), surrogate (shorter DDPM chain); default full, bpda for "
                   "bpda-eot")
    e.add_argument("--surrogate-steps", type=int, default=10, help="DDPM steps of --grad-mode surrogate")
    e.add_argument("--guidance-grad", default="exact", choices=GUIDANCE_GRADS,
                   help="guided defenses with --grad-mode full: exact (through the guidance), detached (the "
                   "released evaluations' gradient), straight_through (mimic: declared sign surrogate); "
                   "default exact")
    e.add_argument("--solver", default=None, choices=("euler", "ddpm"), help="DiffPure's reverse solver "
                   "(default euler)")
    e.add_argument("--norm", default=None, choices=NORMS, help="threat model of the L-p attacks (default linf)")
    e.add_argument("--eps", type=_radius, default=None, help="radius of the L-p attacks in pixel units of [0, 1] "
                   "images: a number or a fraction such as 4/255 (default 8/255)")
    e.add_argument("--bound", type=float, default=None, help="the unrestricted attacks' bound instead of --eps: "
                   "LPIPS distance for lf and ppgd (default 0.5), flow size for stadv in grid_sample units (default "
                   "0.05)")
    e.add_argument("--lpips", default=None, help="lf, ppgd: the LPIPS network, read from a local file (never "
                   "downloaded): digits, alexnet:PATH or vgg16:PATH (a torchvision state dict), or module:function")
    e.add_argument("--lf-factor", type=int, default=None, help="lf: the perturbation lives on a grid this many times "
                   "coarser than the image (default 4)")
    e.add_argument("--smoothness", type=float, default=None, help="stadv: weight of the flow smoothness loss "
                   "(default 0.05)")
    e.add_argument("--fixed-noise", action="store_true", help="the attack optimises against one fixed set of --eot "
                   "purification draws per sample (the same noise at every step); the judge still uses fresh noise")
    e.add_argument("--n-targets", type=int, default=None, help="targeted losses: attack the top N classes after the "
                   "label, one run each (default 9; more than classes - 1 is an error)")
    e.add_argument("--dev-weight", type=float, default=None, help="diffattack: weight lambda of the "
                   "deviated-reconstruction loss (default 1.0)")
    e.add_argument("--dev-every", type=int, default=None, help="diffattack: the loss reads every k-th state of the "
                   "chain (default 1)")
    e.add_argument("--attack-steps", type=int, default=None, help="attack iterations (default pgd-eot 20, bpda-eot 50, "
                   "apgd-eot, diffattack, autoattack, lf, stadv 100, diffhammer 50, ppgd 10)")
    e.add_argument("--step-size", type=_radius, default=None, help="PGD step (default 2.5 eps / steps; bpda-eot "
                   "2/255); lf, stadv: their signed step (default 0.01)")
    e.add_argument("--eot", type=int, default=None, help="EOT draws per step (default 20; bpda-eot 15; autoattack "
                   "standard 1); diffhammer: its N paths per step (default 10)")
    e.add_argument("--eot-reduce", default=None, choices=EOT_REDUCTIONS, help="average the loss (default) or the "
                   "logits (bpda-eot) over the EOT draws")
    e.add_argument("--loss", default=None, choices=LOSSES + TARGETED_LOSSES, help="attack loss (default ce; cw for "
                   "lf, ppgd, stadv); the targeted ones run against each of --n-targets classes")
    e.add_argument("--restarts", type=int, default=None, help="restarts (default 1)")
    e.add_argument("--no-random-start", action="store_true", help="start PGD at x instead of a random point")
    e.add_argument("--n-select", type=int, default=None, help="fresh-noise evaluations that choose among a sample's "
                   "candidates when the attack leaves several (restarts, AutoAttack's runs); default --n-eval")
    e.add_argument("--aa-mode", default=None, choices=AA_MODES, help="AutoAttack: native (default: every sample "
                   "attacked, each run's best iterate a candidate, chosen by --n-select fresh-noise evaluations) or "
                   "as-released (the unpatched package, which falls back to the clean input on a randomized "
                   "defense; labelled so in the report)")
    e.add_argument("--aa-version", default=None, choices=AA_VERSIONS, help="AutoAttack version (default rand: "
                   "APGD-CE + APGD-DLR with 20 EOT)")
    e.add_argument("--aa-package", default=None, choices=("auto", *AA_PACKAGES),
                   help="AutoAttack package (default auto: autoattack if installed, else pyautoattack); the native "
                   "rand version runs no package code")
    e.add_argument("--aa-queries", type=int, default=None, help="Square's queries in the native standard version "
                   "(default 5000)")
    e.add_argument("--n-eval", type=int, default=10, help="fresh-noise evaluations per sample (default 10)")
    e.add_argument("--n-images", type=int, default=None, help="samples to evaluate (default: all)")
    e.add_argument("--start", type=int, default=0, help="index of the first sample (default 0)")
    e.add_argument("--chunk-size", type=int, default=None, help="at most this many image copies per purifier "
                   "call (memory budget; default a whole batch x EOT)")
    e.add_argument("--output", required=True, help="output folder (records, report.md/json, curve.png, grid.png); "
                   "rerunning the same command there resumes")
    e.add_argument("--overwrite", action="store_true", help="discard records of another configuration there")
    e.add_argument("--save-adversarial", action="store_true", help="also save every judged adversarial image "
                   "(float32, as judged) under OUTPUT/adversarial/, one .npz (x_adv, index, label) per batch "
                   "(diffpure_fast.eval.records.read_adversarial reads them back)")
    e.add_argument("--quiet", action="store_true", help="no progress bar, no report on stdout")
    _add_solver_args(e, steps_default=None, t_star_default=None)
    _add_runner_args(e)
    _add_agdm_args(e)

    r = sub.add_parser("report", help="rebuild report.md/json and the plots of an eval folder from its records",
                       description="Rebuild report.md, report.json, curve.png and grid.png from the records alone.")
    r.add_argument("folder", help="the --output folder of diffpure-fast eval")
    r.add_argument("--quiet", action="store_true", help="do not print the report")


def _cmd_eval(args) -> int:
    from .eval.defenses import build_defense
    from .eval.harness import EvalConfig, evaluate

    grad_mode = args.grad_mode or ("bpda" if args.attack == "bpda-eot" else "full")
    family = _model_family(args)
    # the embedded digits classifier and data fit the digits model only: another model needs them given
    if family != "digits":
        for flag, value in (("--classifier", args.classifier), ("--data", args.data)):
            if value is None:
                raise ValueError(f"{flag}: required with --model {family} (the default is the digits one, which "
                                 f"fits only the embedded digits model)")
    classifier, data = args.classifier or "digits", args.data or "digits:test"
    try:
        cfg = EvalConfig(attack=args.attack, norm=args.norm, eps=args.eps, steps=args.attack_steps,
                         step_size=args.step_size, random_start=False if args.no_random_start else None,
                         restarts=args.restarts, loss=args.loss, eot=args.eot, eot_reduce=args.eot_reduce,
                         aa_version=args.aa_version, aa_package=args.aa_package, aa_mode=args.aa_mode,
                         aa_queries=args.aa_queries, n_select=args.n_select, n_eval=args.n_eval,
                         fixed_noise=True if args.fixed_noise else None, n_targets=args.n_targets,
                         dev_weight=args.dev_weight, dev_every=args.dev_every, bound=args.bound, lpips=args.lpips,
                         lf_factor=args.lf_factor, smoothness=args.smoothness,
                         n_images=args.n_images, start=args.start, seed=args.seed, batch_size=args.batch_size,
                         chunk_size=args.chunk_size)
    except OptionError as e:
        e.cli_scope = "attack"   # EvalConfig's steps are the attack's: --attack-steps
        raise
    defense = None
    if args.method != "none":
        model = _load_model(args, family, args.quiet)
        defense = build_defense(model, method=args.method, grad_mode=grad_mode, guidance_grad=args.guidance_grad,
                                surrogate_steps=args.surrogate_steps, **_method_options(args, args.method))
    command = "diffpure-fast " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    report = evaluate(defense, classifier, data, args.output, config=cfg, labels=args.labels, device=args.device,
                      progress=not args.quiet, overwrite=args.overwrite, command=command,
                      save_adversarial=args.save_adversarial)
    if report is not None and not args.quiet:
        print((Path(args.output) / "report.md").read_text())
    return 0


def _cmd_report(args) -> int:
    from .eval.records import CONFIG_FILE
    from .eval.report import write_report, write_study_report

    folder = Path(args.folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    if (folder / CONFIG_FILE).is_file():
        write_report(folder)
    else:  # a study: one evaluation per sub-folder
        write_study_report(folder)
    if not args.quiet:
        print((folder / "report.md").read_text())
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["conformance"]:  # its own parser (diffpure_fast.conformance), every argument passed through
        from .conformance import main as conformance_main

        return conformance_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        _check_common(args)
        return {"info": _cmd_info, "purify": _cmd_purify, "demo": _cmd_demo, "eval": _cmd_eval,
                "report": _cmd_report}[args.command](args)
    except USER_ERRORS as e:
        print(f"diffpure-fast {args.command}: error: {_message(e, args.command)}", file=sys.stderr)
        return 2
    except ImportError as e:  # a missing optional package (scikit-learn, Pillow, AutoAttack, ...): a user error
        msg = missing_module(e)
        if msg is None:
            raise
        print(f"diffpure-fast {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("diffpure-fast: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
