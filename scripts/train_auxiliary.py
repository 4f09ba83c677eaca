#!/usr/bin/env python
"""Train AGDM's auxiliary network for the embedded digits model (CPU, no downloads), reproducibly.

TRADES-like adversarial training (``diffpure_fast.train.auxiliary``) of an ``AuxiliaryCNN`` on scikit-learn's digits
(16x16, [0, 1]); writes ``digits_auxiliary.safetensors`` and ``auxiliary_log.json`` into ``--out`` and prints the
clean, PGD and noisy-input accuracies measured on the file as written.

    python scripts/train_auxiliary.py --out diffpure_fast/weights                 # the shipped network
    python scripts/train_auxiliary.py --out /tmp/aux --check diffpure_fast/weights/digits_auxiliary.safetensors
    python scripts/train_auxiliary.py --out /tmp/aux --noise-prob 0               # no noise augmentation

``--check FILE`` retrains and compares every tensor with FILE (exit 1 on any difference): same seed, same thread
count, same machine, same weights.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from diffpure_fast.data import load_digits_dataset
from diffpure_fast.info import cpu_model
from diffpure_fast.models.auxiliary import AuxiliaryCNN, load_auxiliary
from diffpure_fast.models.digits import save_weights
from diffpure_fast.train import AuxTrainConfig, auxiliary_accuracy, init_auxiliary, noisy_accuracy, train_auxiliary

NOISY_LEVELS = (10, 35, 69)   # the levels AGDM's t* = 0.07 chain visits: early, middle, first step


def parse_args(argv=None):
    d = AuxTrainConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "diffpure_fast" / "weights", help="output directory")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads (1: bit-reproducible whatever else runs on the machine)")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--eps", type=float, default=d.eps, help="L-inf radius of the inner maximisation ([0, 1] units)")
    p.add_argument("--pgd-steps", type=int, default=d.pgd_steps)
    p.add_argument("--lam", type=float, default=d.lam, help="weight of the robust term (TRADES' beta)")
    p.add_argument("--distance", choices=("feature_mse", "kl"), default=d.distance)
    p.add_argument("--noise-prob", type=float, default=d.noise_prob,
                   help="fraction of each batch replaced by a noised copy (0: no augmentation)")
    p.add_argument("--noise-level", type=int, default=d.noise_level)
    p.add_argument("--channels", type=int, nargs=2, default=(16, 32))
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--eval-eps", type=float, default=0.1, help="L-inf radius of the PGD evaluation")
    p.add_argument("--eval-steps", type=int, default=20)
    p.add_argument("--check", type=Path, default=None, help="compare the trained weights with this file")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = AuxTrainConfig(epochs=args.epochs, batch=args.batch, lr=args.lr, eps=args.eps, pgd_steps=args.pgd_steps,
                         lam=args.lam, distance=args.distance, noise_prob=args.noise_prob,
                         noise_level=args.noise_level, seed=args.seed)
    x, y = load_digits_dataset("train")
    x_test, y_test = load_digits_dataset("test")
    arch = dict(in_channels=1, num_classes=10, resolution=x.shape[-1], channels=list(args.channels),
                hidden=args.hidden)
    net = init_auxiliary(lambda: AuxiliaryCNN.from_config(arch), cfg.seed)

    t0 = time.perf_counter()
    history = train_auxiliary(net, x, y, cfg, x_test=x_test, y_test=y_test,
                              progress=lambda e: print(json.dumps(e), flush=True))
    train_s = time.perf_counter() - t0

    args.out.mkdir(parents=True, exist_ok=True)
    path = save_weights(net, args.out / "digits_auxiliary.safetensors", arch, kind="auxiliary",
                        extra={"train_config": asdict(cfg)})
    loaded = load_auxiliary(path=path)   # measure the file as written
    metrics = {
        "clean_acc": auxiliary_accuracy(loaded, x_test, y_test),
        "pgd_acc": auxiliary_accuracy(loaded, x_test, y_test, eps=args.eval_eps, steps=args.eval_steps),
        "pgd": {"eps": args.eval_eps, "steps": args.eval_steps, "loss": "ce", "random_start": True},
        "noisy_acc": {str(lv): noisy_accuracy(loaded, x_test, y_test, lv) for lv in NOISY_LEVELS},
    }
    log = {
        "command": "python scripts/train_auxiliary.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "train_config": asdict(cfg),
        "architecture": arch,
        "environment": {"torch": torch.__version__, "python": platform.python_version(), "threads": args.threads,
                        "machine": f"{cpu_model()}, {os.cpu_count()} logical CPUs"},
        "train_seconds": round(train_s, 1),
        "history": history,
        "test": metrics,
    }
    (args.out / "auxiliary_log.json").write_text(json.dumps(log, indent=1) + "\n")
    print(json.dumps({"train_seconds": log["train_seconds"], **metrics}, indent=1))

    if args.check is not None:
        want, got = load_file(str(args.check)), load_file(str(path))
        diff = sorted(k for k in want.keys() | got.keys() if k not in want or k not in got
                      or not torch.equal(want[k], got[k]))
        print(f"check against {args.check}: {'identical' if not diff else 'DIFFERENT: ' + ', '.join(diff)}")
        return 1 if diff else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
