"""``diffpure-fast`` (also ``python -m diffpure_fast``): demo | purify | eval | certify | report | bench | conformance |
info.

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

import numpy as np

__all__ = ["main", "build_parser"]

from ._optional import missing_module, require
from ._validate import FlagSpelling, OptionError
from .config import RESIZE_MODES
from .methods import DIFFUSION_TYPES, GUIDANCE_GRADS, METHODS
from .solvers import SOLVERS
from .solvers.ddim import DDIM_GRIDS
from .solvers.ddpm import VAR_TYPES

USER_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, OSError)
MODELS = ("digits", "score_sde", "guided_diffusion", "celebahq_ddpm")
# One batch size for purify and eval (and the API's EvalConfig): images per purification batch / samples per attack
# batch. 16 keeps an exact-gradient batch of DiffPure's CIFAR-10 NCSN++ with EOT copies within a few GB.
BATCH_SIZE = 16
SOLVER_HELP = ("DiffPure's reverse solver (--diffusion-type sde): euler (default, Euler–Maruyama), ddpm (ancestral), "
               "ddim (--eta), dpm-solver (--order), dpm-solver++ (2M), heun (stochastic Heun); the few-step ones need "
               "--steps, counted in network calls")

# The one table between API keywords and flags: where a flag is not "--" + the keyword with "-" for "_" (those
# are found in each sub-command's parser). Keys (scope, keyword): scope None holds in every sub-command; the
# others where one keyword means another flag (EvalConfig's steps are the attack's, --attack-steps).
_FLAGS = {
    (None, "family"): "--model", (None, "scale"): "--guidance-scale", (None, "random_start"): "--no-random-start",
    (None, "folder"): "FOLDER", ("purify", "x"): "--input", ("eval", "x"): "--data", ("eval", "method"): "--method",
    ("eval", "defense"): "--method", ("attack", "steps"): "--attack-steps", ("runner", "step_size"): "--dt",
    ("purify", "data"): "--input", ("classifier", "name"): "--classifier",
    ("classifier", "checkpoint"): "--classifier-checkpoint", ("classifier", "normalize"): "--classifier-normalize",
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


def _add_classifier_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--classifier", default=None, help="a DiffPure classifier name (cifar10-wideresnet-28-10, "
                   "cifar10-wideresnet-70-16, cifar10-wrn-70-16-dropout, cifar10-resnet-50, imagenet-resnet18/50/101, "
                   "imagenet-wideresnet-50-2, imagenet-deit-s, celebahq__<Attribute>) with --classifier-checkpoint, "
                   "robustbench:NAME / torchvision:NAME / timm:NAME (the library installed), digits (the default "
                   "with the digits model, and only there), a TorchScript file, or module:function returning an "
                   "nn.Module (inputs in [0, 1]; the module is imported from the current directory or PYTHONPATH)")
    p.add_argument("--data", default=None, help="digits:test (the default with the digits model, and only there), "
                   "cifar10:ROOT[:test|:train] (the cifar-10-batches-py folder or torchvision's root holding it), an "
                   "image folder (class sub-folders such as ImageNet's synsets, or images with a labels.txt of one "
                   "integer per line in file-name order), .npz (x, y) or .npy with --labels")


def _classifier_and_data(args, family: str) -> tuple[str, str]:
    """--classifier and --data, whose digits defaults fit only the embedded digits model: another model needs both."""
    if family != "digits":
        for flag, value in (("--classifier", args.classifier), ("--data", args.data)):
            if value is None:
                raise ValueError(f"{flag}: required with --model {family} (the default is the digits one, which "
                                 f"fits only the embedded digits model)")
    return args.classifier or "digits", args.data or "digits:test"


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


def _load_model(args, family: str, quiet: bool, config=None):
    """load_score_model, with a line on stderr first where it reads a checkpoint (a 2 GB file takes a while)."""
    import os

    from .models.loading import load_score_model

    if args.checkpoint is not None and not quiet and os.path.isfile(args.checkpoint):
        size = os.path.getsize(args.checkpoint)
        print(f"diffpure-fast: loading the {family} checkpoint {args.checkpoint} ({size / 1e6:,.0f} MB) ...",
              file=sys.stderr, flush=True)
    return load_score_model(family, args.checkpoint, config, device=args.device,
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
    r.add_argument("--eta", type=float, default=None, help="ldsde: eta (default 5); sde with --solver ddim: DDIM's "
                   "eta in [0, 1] (default 0: deterministic; 1: ancestral)")
    r.add_argument("--order", type=int, default=None, help="sde with --solver dpm-solver: its order, 1 or 2 "
                   "(default 2)")
    r.add_argument("--time-grid", default=None, choices=DDIM_GRIDS,
                   help="sde with --solver ddim, dpm-solver, dpm-solver++ or heun: the time grid from t* to 1e-5 "
                   "(default uniform; levels: ddim only, the ddpm solver's respaced levels)")
    r.add_argument("--var-type", default=None, choices=VAR_TYPES,
                   help="celebahq-ddpm: the fixed variance (default fixedsmall, celeba.yml's)")


def _add_defense_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="the score model's official config, JSON or YAML (DiffPure's "
                   "configs/*.yml; for guided_diffusion its model section or create_model's keywords); default: "
                   "DiffPure's config of the family")
    p.add_argument("--resize", default=None, choices=tuple(m for m in RESIZE_MODES if m),
                   help="resize inputs of another size to the score model's and back, inside the defense (DiffPure's "
                   "ImageNet pipeline: 224 -> 256 -> 224, bilinear, align_corners=False); the attack's budget stays "
                   "in the input's space")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="read .pt/.pth checkpoints with the full unpickler. By default only tensors, numbers, "
                   "containers and the NumPy scalars of official score_sde checkpoints are unpickled, because a "
                   "pickle can run arbitrary code; pass this only for files whose source you trust")


def _add_selection_args(p: argparse.ArgumentParser, *, range_flags: bool) -> None:
    if range_flags:
        p.add_argument("--n-images", type=int, default=None, help="samples to take (default: all)")
        p.add_argument("--start", type=int, default=0, help="index of the first sample (default 0)")
    p.add_argument("--subset", type=int, default=None, help="instead of --start/--n-images, DiffPure's seeded random "
                   "subset of N samples (its --num_sub: np.random.RandomState(--data-seed).choice)")
    p.add_argument("--data-seed", type=int, default=None, help="the seed of --subset (DiffPure's --data_seed; "
                   "default 0)")
    p.add_argument("--class-index", default=None, help="for a folder of class sub-folders: the file mapping folder "
                   "names to labels (torchvision's imagenet_class_index.json, a JSON {name: index}, or one name per "
                   "line); default: integer folder names are the labels, other names are sorted as torchvision's "
                   "ImageFolder sorts them")


def _read_config(path: str | None, family: str):
    """A config file as a dict (JSON, or YAML with PyYAML); guided_diffusion takes a DiffPure yml's model section."""
    if path is None:
        return None
    text = Path(path).read_text() if Path(path).is_file() else None
    if text is None:
        raise FileNotFoundError(f"--config: no such file: {path}")
    if path.endswith((".yml", ".yaml")):
        from ._optional import require

        config = require("yaml", "reading a YAML --config").safe_load(text)
    else:
        try:
            config = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--config: {path} is not JSON ({e}); YAML files end in .yml or .yaml") from None
    if not isinstance(config, dict):
        raise ValueError(f"--config: {path} does not hold a mapping")
    if family in ("guided_diffusion", "adm") and "image_size" not in config and isinstance(config.get("model"), dict):
        config = config["model"]   # DiffPure's imagenet.yml: create_model's keywords under model:
    return config


def _check_model_first(args, shape, config, where: str) -> None:
    """The cheap checks of the score model's options: a checkpoint path given and present, and images the model can
    take (its size from the config), before its (possibly multi-GB) checkpoint is read."""
    from .models.loading import config_image_size

    family = _model_family(args)
    if family != "digits" and not Path(args.checkpoint).exists():
        raise FileNotFoundError(f"--checkpoint: file not found: {args.checkpoint!r}")
    size = config_image_size(family, config)
    if args.resize is None and size is not None and tuple(shape[2:]) != (size, size):
        raise OptionError("x", f"images of {shape[2]}x{shape[3]}, but --model {family} is configured for {size}x"
                               f"{size}; pass --resize bilinear to resize inside the defense (DiffPure's ImageNet "
                               f"pipeline: 224 -> 256 and back)", where=where)


# The flags of each DiffPure runner and the option each sets (--t-star: t*; --dt: the step size).
RUNNER_FLAGS = {
    "sde": {"--t-star": "t_star", "--steps": "steps", "--dt": "dt", "--solver": "solver", "--eta": "eta",
            "--order": "order", "--time-grid": "time_grid"},
    "ode": {"--t-star": "t_star", "--dt": "step_size"},
    "ldsde": {"--t-star": "t_star", "--dt": "dt", "--sigma2": "sigma2", "--lambda-ld": "lambda_ld", "--eta": "eta"},
    "ddpm": {"--t-star": "t_star"},
    "celebahq-ddpm": {"--t-star": "t_star", "--var-type": "var_type"},
}
_RUNNER_ONLY = ("--diffusion-type", "--sigma2", "--lambda-ld", "--eta", "--var-type", "--order", "--time-grid")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="diffpure-fast", description="DiffPure adversarial purification: fused "
                                 "kernels, exact gradients, official checkpoints.")
    sub = ap.add_subparsers(dest="command", required=True,
                            metavar="{demo,purify,eval,certify,report,bench,conformance,info}")

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
    p.add_argument("--input", required=True, help="a folder of PNG/JPEG images (flat, or in class sub-folders as "
                   "eval reads them), cifar10:ROOT[:test|:train], digits:SPLIT, an .npy/.npz array (N, C, H, W) or "
                   "a .pt tensor")
    p.add_argument("--output", required=True, help="where to write: a folder for a folder (the same relative file "
                   "names, as PNG unless --image-format keep, and labels.txt when the input had one), an .npz (x, y, "
                   "index) for cifar10:/digits:, else the array kind its extension names (.npy, .npz, .pt; an .npz "
                   "input's other arrays are kept, so it is written as .npz)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output (outputs are always written "
                   "to a temporary file and renamed into place, so an interrupted run leaves no partial file)")
    p.add_argument("--method", default="diffpure", choices=tuple(METHODS),
                   help="purification method, at its released defaults (default diffpure); --t-star, --steps, "
                        "--dt, --solver and the runner flags are DiffPure's options (--t-star and --steps also "
                        "AGDM's)")
    p.add_argument("--solver", default=None, choices=tuple(SOLVERS), help=SOLVER_HELP)
    p.add_argument("--value-range", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                   help="the range of a float input's values, kept in the output (default 0 1; e.g. 0 255 for "
                        "float images in 0..255); uint8 arrays and image files are always 0..255")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--image-format", default="png", choices=("png", "keep"), help="a folder's output files: png "
                   "(default; lossless, a.jpg is written as a.png) or keep (each input's name and format)")
    p.add_argument("--jpeg-quality", type=int, default=95, help="JPEG quality 1..95 of --image-format keep for JPEG "
                   "inputs (default 95)")
    _add_defense_args(p)
    _add_selection_args(p, range_flags=True)
    _add_solver_args(p, steps_default=None, t_star_default=None)
    _add_runner_args(p)
    _add_agdm_args(p)

    sub.add_parser("conformance", add_help=False, help="replay vectors recorded from the official DiffPure code "
                       "(diffpure-fast conformance --help for its options)")

    i = sub.add_parser("info", help="versions, device, and the active kernel implementations",
                       description="Print versions, devices and which fused-step implementation each device uses.")
    i.add_argument("--json", action="store_true", help="print JSON instead of aligned text")

    _add_eval_parsers(sub)
    _add_bench_parser(sub)
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


def _purify_input(args):
    """(get(positions) -> images (B, C, H, W), the ImageBatch that says how to write the output, the selected source
    indices (the noise ids), a description for errors) of purify's --input, as eval reads data where the layouts
    are shared (image folders, cifar10:, digits:), else an array file read whole."""
    import torch

    from .eval.datasets import load_data, select_indices
    from .image_io import ImageBatch, kind_of, read_images

    src = args.input
    selection = dict(start=args.start, n_images=args.n_images, subset=args.subset, data_seed=args.data_seed)
    selecting = args.subset is not None or args.start != 0 or args.n_images is not None
    if src.startswith(("cifar10:", "digits:")) or Path(src).is_dir():
        source = load_data(src, class_index=args.class_index, need_labels=False)
        idx = select_indices(len(source), **selection, description=source.description)
        if source.folder is None:   # cifar10:, digits: an .npz with the images, their labels and indices
            if kind_of(Path(args.output)) != "npz":
                raise ValueError(f"--output: {src} is written as an .npz (x, y, index), got {args.output}")
            _, y = source.get(idx)
            batch = ImageBatch(torch.empty(0), "npz", key="x", uint8=True,
                               extra={"y": y.numpy(), "index": np.asarray(idx, dtype=np.int64)})
        else:
            names = [source.names[i] for i in idx]
            labels = None
            if source.has_labels and "/" not in names[0]:   # a flat folder with labels.txt: one for what is written
                labels = source.get(idx)[1].tolist()
            batch = ImageBatch(torch.empty(0), "folder", names=names, uint8=True, labels=labels)
        return (lambda pos: source.get([idx[p] for p in pos])[0]), batch, idx, src
    if args.class_index is not None:
        raise ValueError(f"--class-index: maps the class sub-folders of an image folder; {src} is not a folder")
    batch = read_images(Path(src))
    idx = select_indices(len(batch.x), **selection, description=src)
    if selecting:
        if batch.kind != "npz":
            raise ValueError(f"--subset/--start/--n-images: a selection of a .{batch.kind} input would be written "
                             f"without saying which rows it holds; use an .npz input (written with an 'index' array)")
        n = len(batch.x)   # the input's other arrays of one row per image follow the selection
        batch.extra = {**{k: v[idx] if v.ndim and len(v) == n else v for k, v in batch.extra.items()},
                       "index": np.asarray(idx, dtype=np.int64)}
    x = batch.x
    return (lambda pos: x[[idx[p] for p in pos]]), batch, idx, src


def _cmd_purify(args) -> int:
    import torch
    from tqdm.auto import tqdm

    from .bench import count_network_calls
    from .engine import purify
    from .image_io import kind_of, write_images

    family = _model_family(args)   # the flags first: a wrong combination fails before any file is read
    dst = Path(args.output)
    if dst.exists() and not args.overwrite:
        raise FileExistsError(f"{dst}: exists; pass --overwrite to replace it")
    get, batch, idx, src = _purify_input(args)
    out_kind = kind_of(dst) if dst.suffix else "folder"
    if (out_kind == "folder") != (batch.kind == "folder"):
        raise ValueError(f"--output: the input is {'a folder' if batch.kind == 'folder' else 'an array'}, so the "
                         f"output must be {'a folder' if batch.kind == 'folder' else 'a .npy, .npz or .pt file'}, "
                         f"got {dst}")
    if args.value_range is not None and batch.uint8:
        raise ValueError(f"--value-range: {src} holds 0..255 integers (uint8 or image files), read as [0, 1] and "
                         f"written back as 0..255; --value-range is for float inputs")
    config = _read_config(args.config, family)
    _check_model_first(args, get([0]).shape, config, str(src))
    model = _load_model(args, family, args.no_progress, config)
    options = _method_options(args, args.method)
    if args.value_range is not None:
        options["value_range"] = tuple(args.value_range)
    outs = []
    starts = range(0, len(idx), args.batch_size)
    # Progress per network call, not per batch: one large batch of an ImageNet model is minutes of calls.
    with tqdm(total=None, desc="purify", unit="net call", disable=args.no_progress, dynamic_ncols=True) as bar, \
            count_network_calls(model, on_call=bar.update) as calls:
        for k, i in enumerate(starts):
            pos = list(range(i, min(i + args.batch_size, len(idx))))
            ids = torch.tensor([idx[p] for p in pos], device=args.device)   # a sample's noise follows its index
            bar.set_postfix_str(f"batch {k + 1}/{len(starts)}")
            try:
                outs.append(purify(get(pos).to(args.device), model, method=args.method, seed=args.seed,
                                   noise_ids=ids, resize=args.resize, **options).cpu())
            except OptionError as e:
                if e.option == "x":   # purify's checks of the images (channels, size, range): name the file
                    e.where = str(src)
                raise
            if k == 0:   # every batch makes the same number of calls: the total is known after the first
                bar.total = calls.calls * len(starts)
                bar.refresh()
    write_images(dst, batch, torch.cat(outs), overwrite=args.overwrite, image_format=args.image_format,
                 jpeg_quality=args.jpeg_quality)
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
    command = "diffpure-fast " + shlex.join(args.argv)
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
    _add_classifier_data_args(e)
    e.add_argument("--classifier-checkpoint", default=None, help="the classifier's weights in the official layout "
                   "(Standard.pt, weights-best.pt, weights.pt, resnet50-0676ba61.pth, "
                   "deit_small_patch16_224-cd65a155.pth, net_best.pth, ...; robustbench: its model folder); never "
                   "downloaded")
    e.add_argument("--classifier-normalize", nargs=2, default=None, metavar=("MEAN", "STD"),
                   help="(x - MEAN) / STD before a classifier of one's own, each one value or one per channel "
                   "separated by commas (e.g. 0.485,0.456,0.406 0.229,0.224,0.225)")
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
    e.add_argument("--solver", default=None, choices=tuple(SOLVERS), help=SOLVER_HELP)
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
    _add_selection_args(e, range_flags=True)
    e.add_argument("--chunk-size", type=int, default=None, help="at most this many image copies per purifier "
                   "call (memory budget; default a whole batch x EOT)")
    e.add_argument("--output", required=True, help="output folder (records, report.md/json, curve.png, grid.png); "
                   "rerunning the same command there resumes")
    e.add_argument("--overwrite", action="store_true", help="discard records of another configuration there")
    e.add_argument("--save-adversarial", action="store_true", help="also save every judged adversarial image "
                   "(float32, as judged) under OUTPUT/adversarial/, one .npz (x_adv, index, label) per batch "
                   "(diffpure_fast.eval.records.read_adversarial reads them back)")
    e.add_argument("--quiet", action="store_true", help="no progress bar, no report on stdout")
    _add_defense_args(e)
    _add_solver_args(e, steps_default=None, t_star_default=None)
    _add_runner_args(e)
    _add_agdm_args(e)

    _add_certify_parser(sub)

    r = sub.add_parser("report", help="rebuild report.md/json and the plots of an eval or certify folder from its "
                       "records", description="Rebuild report.md, report.json and the plots (eval: curve.png, "
                       "grid.png; certify: radius.png) from the records alone.")
    r.add_argument("folder", help="the --output folder of diffpure-fast eval or certify")
    r.add_argument("--quiet", action="store_true", help="do not print the report")


def _add_certify_parser(sub) -> None:
    from .eval.certify import CERTIFY_DENOISERS, MULTISTEP_DEFAULTS, CertifyConfig

    dc = CertifyConfig()
    c = sub.add_parser("certify", help="L2 certified robustness by randomized smoothing with a diffusion denoiser "
                       "(records, report, radius plot)", description="Cohen et al.'s CERTIFY with denoised smoothing "
                       "(Carlini et al. 2023: one network call predicts x0 at the noise level matching --sigma; "
                       "--denoiser multistep: DensePure-style majority over --votes reverse solves). Counter-based "
                       "noise: reproducible certificates; resumable (rerun the same command).")
    _add_model_args(c)
    _add_classifier_data_args(c)
    c.add_argument("--labels", default=None, help="labels .npy for an .npy --data")
    c.add_argument("--sigma", type=float, required=True, help="smoothing noise std in [0, 1] pixel units")
    c.add_argument("--n0", type=int, default=dc.n0, help=f"selection draws (default {dc.n0})")
    c.add_argument("--n", type=int, default=dc.n, help=f"estimation draws (default {dc.n})")
    c.add_argument("--alpha", type=float, default=dc.alpha, help=f"failure probability per certificate (default "
                   f"{dc.alpha})")
    c.add_argument("--denoiser", default=dc.denoiser, choices=CERTIFY_DENOISERS,
                   help="one-shot (default: one network call per draw) or multistep (DensePure-style votes)")
    c.add_argument("--votes", type=int, default=None, help=f"multistep: reverse solves per draw (default "
                   f"{MULTISTEP_DEFAULTS['votes']})")
    c.add_argument("--solver", default=None, choices=tuple(s for s in SOLVERS if s != "ddpm"),
                   help=f"multistep: the reverse solver (default {MULTISTEP_DEFAULTS['solver']}, eta "
                        f"{MULTISTEP_DEFAULTS['eta']}: the ancestral chain)")
    c.add_argument("--steps", type=int, default=None, help=f"multistep: network calls per reverse solve (default "
                   f"{MULTISTEP_DEFAULTS['steps']})")
    c.add_argument("--eta", type=float, default=None, help="multistep with --solver ddim: DDIM's eta")
    c.add_argument("--order", type=int, default=None, help="multistep with --solver dpm-solver: its order")
    c.add_argument("--time-grid", default=None, choices=DDIM_GRIDS[:-1], help="multistep: the reverse time grid")
    c.add_argument("--n-images", type=int, default=None, help="samples to certify (default: all)")
    c.add_argument("--start", type=int, default=0, help="index of the first sample (default 0)")
    c.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    c.add_argument("--batch-size", type=int, default=dc.batch_size, help=f"noise draws per network batch (memory, "
                   f"not results; default {dc.batch_size})")
    c.add_argument("--device", default="cpu", help="torch device (default cpu)")
    c.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    c.add_argument("--output", required=True, help="output folder (records, report.md/json, radius.png); rerunning "
                   "the same command there resumes")
    c.add_argument("--overwrite", action="store_true", help="discard records of another configuration there")
    c.add_argument("--quiet", action="store_true", help="no progress bar, no report on stdout")


def _cmd_certify(args) -> int:
    from .eval.certify import CertifyConfig, certify

    family = _model_family(args)
    classifier, data = _classifier_and_data(args, family)
    cfg = CertifyConfig(sigma=args.sigma, n0=args.n0, n=args.n, alpha=args.alpha, denoiser=args.denoiser,
                        votes=args.votes, solver=args.solver, steps=args.steps, eta=args.eta, order=args.order,
                        time_grid=args.time_grid, n_images=args.n_images, start=args.start, seed=args.seed,
                        batch_size=args.batch_size)
    model = _load_model(args, family, args.quiet)
    command = "diffpure-fast " + shlex.join(args.argv)
    certify(model, classifier, data, args.output, config=cfg, labels=args.labels, device=args.device,
            progress=not args.quiet, overwrite=args.overwrite, command=command)
    if not args.quiet:
        print((Path(args.output) / "report.md").read_text())
    return 0


def _normalize(pair):
    """--classifier-normalize MEAN STD: each a number or numbers separated by commas."""
    if pair is None:
        return None
    try:
        return tuple(tuple(float(v) for v in part.split(",")) for part in pair)
    except ValueError:
        raise ValueError(f"--classifier-normalize: expected MEAN STD, each a number or numbers separated by commas "
                         f"(0.485,0.456,0.406 0.229,0.224,0.225), got {' '.join(pair)}") from None


def _cmd_eval(args) -> int:
    from .eval.classifiers import load_classifier_spec
    from .eval.datasets import load_data, select_indices
    from .eval.defenses import build_defense
    from .eval.harness import EvalConfig, evaluate

    grad_mode = args.grad_mode or ("bpda" if args.attack == "bpda-eot" else "full")
    family = _model_family(args)
    classifier, data = _classifier_and_data(args, family)
    try:
        cfg = EvalConfig(attack=args.attack, norm=args.norm, eps=args.eps, attack_steps=args.attack_steps,
                         step_size=args.step_size, random_start=False if args.no_random_start else None,
                         restarts=args.restarts, loss=args.loss, eot=args.eot, eot_reduce=args.eot_reduce,
                         aa_version=args.aa_version, aa_package=args.aa_package, aa_mode=args.aa_mode,
                         aa_queries=args.aa_queries, n_select=args.n_select, n_eval=args.n_eval,
                         fixed_noise=True if args.fixed_noise else None, n_targets=args.n_targets,
                         dev_weight=args.dev_weight, dev_every=args.dev_every, bound=args.bound, lpips=args.lpips,
                         lf_factor=args.lf_factor, smoothness=args.smoothness,
                         n_images=args.n_images, start=args.start, subset=args.subset, data_seed=args.data_seed,
                         seed=args.seed, batch_size=args.batch_size, chunk_size=args.chunk_size)
    except OptionError as e:
        e.cli_scope = "attack"   # EvalConfig's steps are the attack's: --attack-steps
        raise
    # The data and the classifier first: a shape the model cannot take is refused before a large checkpoint is read.
    source = load_data(data, labels=args.labels, class_index=args.class_index)
    first = select_indices(len(source), start=cfg.start, n_images=cfg.n_images, subset=cfg.subset,
                           data_seed=cfg.data_seed, description=source.description)[:1]
    shape = source.get(first)[0].shape
    try:
        clf = load_classifier_spec(classifier, args.device, checkpoint=args.classifier_checkpoint,
                                   normalize=_normalize(args.classifier_normalize),
                                   trust_checkpoint=args.trust_checkpoint)
    except OptionError as e:
        e.cli_scope = "classifier"   # load_classifier's checkpoint/normalize are the classifier's flags here
        raise
    defense = None
    if args.method != "none":
        config = _read_config(args.config, family)
        _check_model_first(args, shape, config, source.description)
        model = _load_model(args, family, args.quiet, config)
        defense = build_defense(model, method=args.method, grad_mode=grad_mode, guidance_grad=args.guidance_grad,
                                surrogate_steps=args.surrogate_steps, resize=args.resize,
                                **_method_options(args, args.method))
    elif args.resize is not None:
        raise ValueError("--resize: resizes inside a purification defense; --method none has none")
    command = "diffpure-fast " + shlex.join(args.argv)
    report = evaluate(defense, clf, source, args.output, config=cfg, device=args.device, progress=not args.quiet,
                      overwrite=args.overwrite, command=command, save_adversarial=args.save_adversarial)
    if report is not None and not args.quiet:
        print((Path(args.output) / "report.md").read_text())
    return 0


def _cmd_report(args) -> int:
    from .eval.records import CONFIG_FILE
    from .eval.report import write_report, write_study_report

    folder = Path(args.folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    config = folder / CONFIG_FILE
    if config.exists() and "certify" in json.loads(config.read_text()):
        from .eval.certify import certify_report

        certify_report(folder)
    elif config.is_file():
        write_report(folder)
    else:  # a study: one evaluation per sub-folder
        write_study_report(folder)
    if not args.quiet:
        print((folder / "report.md").read_text())
    return 0


# ---------------------------------------------------------------------------------------------------------------
# bench: latency, throughput, memory and network calls of purification on the user's model (diffpure_fast.bench).

# --quick: what each of these flags is set to when not given (a tiny run: about a minute on the digits model).
_QUICK = {"batch_sizes": "1,2", "steps": "5", "grad_modes": "none,full", "repeats": 2}


def _add_bench_parser(sub) -> None:
    from .bench import BENCH_GRAD_MODES, DTYPES, BenchConfig

    bc = BenchConfig()
    b = sub.add_parser("bench", help="latency, throughput, peak memory and network calls of purification on your "
                       "model, against DiffPure's torchsde pipeline", description="Measure DiffPure purification "
                       "(reverse SDE, Euler–Maruyama, dt = t* / steps) for every combination of batch size, steps, "
                       "grad mode, device and dtype: median latency and spread over --repeats after --warmup "
                       "excluded calls, images/s, peak memory, network calls counted per purification and the "
                       "gradient's cost in no-grad units; and, where torchsde is installed, the official pipeline "
                       "on the same network and noise. Writes bench.md, bench.json, bench.csv and bench.png to --out.")
    b.add_argument("--model", default="digits", choices=MODELS, help="score model (default: the embedded digits "
                   "model)")
    b.add_argument("--checkpoint", default=None, help="checkpoint path (score_sde, guided_diffusion, "
                   "celebahq_ddpm); never downloaded")
    b.add_argument("--config", default=None, help="the model's official configuration: a .json file, or .yaml/.yml "
                   "(needs PyYAML); default the family's DiffPure config")
    b.add_argument("--trust-checkpoint", action="store_true", help="read a .pt/.pth checkpoint with the full "
                   "unpickler (only for a file whose source you trust)")
    b.add_argument("--image-shape", type=int, nargs=3, default=None, metavar=("C", "H", "W"),
                   help="input shape, when the model does not state its channels and size")
    b.add_argument("--batch-sizes", default=None, help="comma-separated batch sizes (default "
                   f"{','.join(map(str, bc.batch_sizes))})")
    b.add_argument("--steps", default=None, help="comma-separated solver step counts; dt = t* / steps "
                   f"(default {','.join(map(str, bc.steps))}: DiffPure's dt 1e-3 at t* 0.1)")
    b.add_argument("--grad-modes", default=None, help=f"comma-separated subset of {','.join(BENCH_GRAD_MODES)} "
                   "(full_cache: full keeping every step's graph) (default "
                   f"{','.join(bc.grad_modes)})")
    b.add_argument("--devices", default="cpu", help="comma-separated devices, e.g. cpu,cuda (default cpu)")
    b.add_argument("--dtypes", default="float32", help=f"comma-separated subset of {','.join(DTYPES)}: the score "
                   "network in float32 or under autocast (default float32)")
    b.add_argument("--t-star", type=float, default=bc.t_star, help=f"diffusion time t* (default {bc.t_star})")
    b.add_argument("--repeats", type=int, default=None, help=f"timed calls per row (default {bc.repeats})")
    b.add_argument("--warmup", type=int, default=bc.warmup, help=f"untimed calls first per row (default "
                   f"{bc.warmup})")
    b.add_argument("--no-official", action="store_true", help="skip DiffPure's torchsde pipeline rows")
    b.add_argument("--seed", type=int, default=0, help="input and noise seed (default 0)")
    b.add_argument("--threads", type=int, default=None, help="torch CPU threads (default torch's own: all cores; "
                   "the number that ran is printed)")
    b.add_argument("--quick", action="store_true", help="a tiny run: batch sizes 1,2, 5 steps, grad modes "
                   "none,full, 2 repeats (flags given explicitly still apply)")
    b.add_argument("--out", required=True, help="output folder for bench.md, bench.json, bench.csv, bench.png")
    b.add_argument("--overwrite", action="store_true", help="replace earlier bench outputs in --out")


def _comma_list(key: str, text: str, kind=str) -> tuple:
    items = [v.strip() for v in str(text).split(",")]
    try:
        return tuple(kind(v) for v in items)
    except ValueError:
        raise OptionError(key, f"expected a comma-separated list of {kind.__name__}s, got {text!r}") from None


def _cmd_bench(args) -> int:
    import torch

    from .bench import BenchConfig, machine_header, run_bench
    from .bench_report import OUTPUTS, write_outputs
    from .models.loading import load_score_model

    require("matplotlib", "bench's plot")  # before minutes of measuring, not after
    out = Path(args.out)
    if out.resolve().is_relative_to(Path(__file__).resolve().parent):
        raise ValueError(f"--out: {args.out} is inside the installed package; choose a folder of your own")
    existing = [name for name in OUTPUTS if (out / name).exists()]
    if existing and not args.overwrite:
        raise FileExistsError(f"--out: {out / existing[0]} exists; pass --overwrite to replace it")
    if args.model != "digits" and args.checkpoint is None:
        raise ValueError(f"--checkpoint: --model {args.model} needs a checkpoint path (nothing is downloaded)")
    # flags left out keep BenchConfig's defaults, or --quick's
    options = {k: v for k, v in ((k, getattr(args, k)) for k in _QUICK) if v is not None}
    if args.quick:
        options = {**_QUICK, **options}
    lists = {"batch_sizes": int, "steps": int, "grad_modes": str, "devices": str, "dtypes": str}
    options.update(devices=args.devices, dtypes=args.dtypes)
    options = {k: _comma_list(k, v, lists[k]) if k in lists else v for k, v in options.items()}
    cfg = BenchConfig(**options, t_star=args.t_star, warmup=args.warmup, official=not args.no_official,
                      seed=args.seed)
    config = None if args.config is None else _read_config(args.config, args.model)

    def load(device):
        return load_score_model(args.model, args.checkpoint, config, device=device,
                                trust_checkpoint=args.trust_checkpoint)

    command = "diffpure-fast " + shlex.join(args.argv)
    header = {**machine_header(command, devices=cfg.devices), "model": args.model
              + (f" ({args.checkpoint})" if args.checkpoint else " (embedded)"), "t_star": cfg.t_star}
    print(f"torch CPU threads: {torch.get_num_threads()} ({'--threads' if args.threads else 'torch default'})",
          flush=True)

    def progress(row):
        what = (f"{row['engine']} {row['device']} {row['dtype']} batch {row['batch']} steps {row.get('steps', '-')} "
                f"{row['grad_mode']}")
        done = f"{row['median_s']:.3f} s, {row['network_calls']} calls" if row["status"] == "ok" else row["status"]
        print(f"  {what}: {done}", file=sys.stderr, flush=True)

    rows = run_bench(load, cfg, image_shape=None if args.image_shape is None else tuple(args.image_shape),
                     on_row=progress)
    print(write_outputs(out, header, rows, warmup=cfg.warmup))
    print(f"wrote {', '.join(str(out / name) for name in OUTPUTS)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["conformance"]:  # its own parser (diffpure_fast.conformance), every argument passed through
        from .conformance import main as conformance_main

        return conformance_main(argv[1:])
    args = build_parser().parse_args(argv)
    args.argv = argv  # the command as given, for records and results headers
    try:
        _check_common(args)
        return {"info": _cmd_info, "purify": _cmd_purify, "demo": _cmd_demo, "eval": _cmd_eval,
                "certify": _cmd_certify, "report": _cmd_report, "bench": _cmd_bench}[args.command](args)
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
