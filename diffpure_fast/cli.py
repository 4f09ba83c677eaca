"""``diffpure-fast`` (also ``python -m diffpure_fast``): demo | purify | info.

Errors in what the user gave (missing or unreadable files, wrong shapes or channel counts, a checkpoint of the
wrong family, an output that exists) print one line and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

__all__ = ["main", "build_parser"]

from .methods import METHODS

USER_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, OSError)


def _add_solver_args(p: argparse.ArgumentParser, *, steps_default, t_star_default) -> None:
    p.add_argument("--t-star", type=float, default=t_star_default,
                   help=f"diffusion time t* in (0, 1] (default {t_star_default or '0.1, DiffPure only'})")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--steps", type=int, default=steps_default,
                   help="solver steps (euler: equal steps over [1e-5, t*]; ddpm: respaced levels)"
                        + (f" (default {steps_default})" if steps_default else ""))
    g.add_argument("--dt", type=float, default=None, help="Euler step size instead of --steps (DiffPure: 1e-3)")
    p.add_argument("--seed", type=int, default=0, help="noise seed; a sample's noise depends on the seed and its "
                   "index only, not on the batch size (default 0)")
    p.add_argument("--batch-size", type=int, default=64, help="images per purification batch (default 64)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="diffpure-fast", description="DiffPure adversarial purification: fused "
                                 "kernels, exact gradients, official checkpoints.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="{demo,purify,info}")

    d = sub.add_parser("demo", help="attack and purify handwritten digits with the embedded models (CPU, minutes)",
                       description="Clean, PGD, transfer and adaptive PGD-EOT accuracies with 95%% Wilson intervals "
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
    d.add_argument("--guided-eot", type=int, default=dc.guided_eot,
                   help=f"EOT noise draws per adaptive step for the guided methods (default {dc.guided_eot})")
    d.add_argument("--full-steps", action="store_true",
                   help="use DiffPure's dt = 1e-3 (100 steps at t* 0.1) instead of --steps; about 5x slower")
    _add_solver_args(d, steps_default=dc.steps, t_star_default=dc.t_star)
    d.set_defaults(batch_size=dc.batch_size)

    p = sub.add_parser("purify", help="purify images from a folder, .npy/.npz or .pt, written back in the same kind",
                       description="Purify a batch of images in [0, 1] (uint8 arrays and image files are read as "
                       "0..255) with DiffPure and write them back in the same kind.")
    p.add_argument("--model", required=True, choices=("digits", "score_sde", "guided_diffusion"),
                   help="score model: the embedded digits model, or an official checkpoint family")
    p.add_argument("--checkpoint", default=None, help="checkpoint path (score_sde, guided_diffusion); never "
                   "downloaded")
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
                        "--dt and --solver are DiffPure's options")
    p.add_argument("--solver", default=None, choices=("euler", "ddpm"), help="reverse solver (default euler)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_solver_args(p, steps_default=None, t_star_default=None)

    i = sub.add_parser("info", help="versions, device, and the active kernel implementations",
                       description="Print versions, devices and which fused-step implementation each device uses.")
    i.add_argument("--json", action="store_true", help="print JSON instead of aligned text")
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


def _cmd_purify(args) -> int:
    import torch
    from tqdm.auto import tqdm

    from .engine import purify
    from .image_io import kind_of, read_images, write_images
    from .models.loading import load_score_model

    src, dst = Path(args.input), Path(args.output)
    if dst.exists() and not args.overwrite:
        raise FileExistsError(f"{dst}: exists; pass --overwrite to replace it")
    batch = read_images(src)
    out_kind = kind_of(dst) if dst.suffix else "folder"
    if out_kind != batch.kind:
        raise ValueError(f"--output: the input is a {batch.kind}, so the output must be one too, got {dst}")
    if args.model != "digits" and args.checkpoint is None:
        raise ValueError(f"--checkpoint: --model {args.model} needs a checkpoint path (nothing is downloaded)")
    model = load_score_model(args.model, args.checkpoint, device=args.device,
                             trust_checkpoint=args.trust_checkpoint)
    x = batch.x.to(args.device)
    diffpure_opts = {"--t-star": args.t_star, "--steps": args.steps, "--dt": args.dt, "--solver": args.solver}
    if args.method == "diffpure":
        options = dict(t_star=0.1 if args.t_star is None else args.t_star, steps=args.steps,
                       dt=args.dt if args.dt is not None else (1e-3 if args.steps is None else None),
                       solver=args.solver or "euler")
    else:
        given = [k for k, v in diffpure_opts.items() if v is not None]
        if given:
            raise ValueError(f"{given[0]}: an option of --method diffpure; --method {args.method} runs at its "
                             "released defaults")
        options = {}
    outs = []
    for i in tqdm(range(0, len(x), args.batch_size), desc="purify", disable=args.no_progress):
        ids = torch.arange(i, min(i + args.batch_size, len(x)), device=x.device)
        try:
            outs.append(purify(x[i:i + args.batch_size], model, method=args.method, seed=args.seed, noise_ids=ids,
                               **options).cpu())
        except (ValueError, TypeError) as e:  # purify's checks (channels, size, range) name x: say which file
            raise ValueError(f"{src}: {e}") from None
    write_images(dst, batch, torch.cat(outs), overwrite=args.overwrite)
    return 0


def _cmd_demo(args) -> int:
    from .demo import DemoConfig, run_demo

    cfg = DemoConfig(n_images=args.n_images, adaptive_images=args.adaptive_images or args.n_images,
                     t_star=args.t_star, steps=None if (args.full_steps or args.dt) else args.steps, eps=args.eps,
                     pgd_steps=args.pgd_steps, adaptive_steps=args.adaptive_steps, eot=args.eot, seed=args.seed,
                     guided_images=args.guided_images, guided_eot=args.guided_eot,
                     batch_size=args.batch_size, device=args.device)
    command = "diffpure-fast " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    report = run_demo(args.output, cfg, overwrite=args.overwrite, command=command)
    print((Path(args.output) / "report.md").read_text())
    print(f"wrote {args.output}/report.md, report.json, grid.png in {report['timings_s']['total']:.0f} s")
    return 0


def _check_common(args) -> None:
    """Options purify/demo share that torch would otherwise reject with a RuntimeError (a traceback)."""
    import torch

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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _check_common(args)
        return {"info": _cmd_info, "purify": _cmd_purify, "demo": _cmd_demo}[args.command](args)
    except USER_ERRORS as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"diffpure-fast {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("diffpure-fast: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
