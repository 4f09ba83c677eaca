#!/usr/bin/env python
"""Train the embedded default model of diffpure_fast on scikit-learn's bundled digits (CPU, no downloads).

Trains, reproducibly (fixed seeds, seeded data order):

1. ``DigitsClassifier`` (cross-entropy, Adam, cosine schedule, +-1 pixel random shifts);
2. a small NCSN++ as a continuous VP-SDE epsilon model (score_sde's continuous DSM loss, beta in [0.1, 20],
   t ~ U(1e-5, 1), data in [-1, 1], Adam lr 2e-4 with warmup, grad clip 1, EMA of the weights; the EMA is shipped);

then writes ``digits_classifier.safetensors``, ``digits_score.safetensors``, ``training_log.json`` and
``loss_curve.png`` into ``--out`` and prints the final metrics (measured on the files as written).

    python scripts/train_digits.py --out diffpure_fast/weights
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from diffpure_fast.data import DIGITS_RESOLUTION, load_digits_dataset
from diffpure_fast.models.base import EpsModel
from diffpure_fast.models.classifier import DigitsClassifier
from diffpure_fast.models.digits import (
    DIGITS_SCORE_CONFIG,
    build_digits_score_net,
    digits_dsm_loss,
    load_digits_classifier,
    load_digits_score_model,
    save_weights,
)
from diffpure_fast.schedule import DIFFPURE_SCHEDULE

T_EPS = 1e-5


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "diffpure_fast" / "weights", help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2,
                   help="torch.set_num_threads (use 1 when other jobs share the cores: 2 threads on 2 busy cores "
                        "can be many times slower)")
    p.add_argument("--skip-classifier", action="store_true", help="keep the existing classifier file")
    p.add_argument("--skip-score", action="store_true", help="keep the existing score-model file")
    # classifier
    p.add_argument("--clf-epochs", type=int, default=20)
    p.add_argument("--clf-batch", type=int, default=64)
    p.add_argument("--clf-lr", type=float, default=2e-3)
    # score model
    p.add_argument("--score-steps", type=int, default=6000)
    p.add_argument("--score-batch", type=int, default=64)
    p.add_argument("--score-lr", type=float, default=2e-4)
    p.add_argument("--score-warmup", type=int, default=500)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--eval-every", type=int, default=1000, help="EMA test-loss evaluation interval (steps)")
    p.add_argument("--score-dtype", choices=("float16", "float32"), default="float32",
                   help="storage dtype of the shipped score weights")
    # purification sanity check
    p.add_argument("--purify-t", type=float, nargs="*", default=[0.05, 0.1, 0.2],
                   help="t* values for the purification check (empty to skip)")
    return p.parse_args(argv)


def seeded_batches(n: int, batch: int, gen: torch.Generator, drop_last: bool):
    perm = torch.randperm(n, generator=gen)
    stop = n - n % batch if drop_last else n
    for i in range(0, stop, batch):
        yield perm[i:i + batch]


def random_shift(x: torch.Tensor, gen: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Shift each image by up to ``max_shift`` pixels in each direction (zero fill)."""
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4)
    dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=gen)
    dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=gen)
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])


@torch.no_grad()
def accuracy(model, x, y, batch: int = 512) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), batch):
        correct += (model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum().item()
    return correct / len(x)


def train_classifier(args, out: Path, log: dict) -> None:
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    xtr, ytr = load_digits_dataset("train")
    xte, yte = load_digits_dataset("test")
    model = DigitsClassifier(resolution=DIGITS_RESOLUTION)
    opt = torch.optim.AdamW(model.parameters(), lr=args.clf_lr, weight_decay=1e-4)
    steps_per_epoch = len(xtr) // args.clf_batch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.clf_lr, total_steps=args.clf_epochs * steps_per_epoch)
    history = []
    t0 = time.perf_counter()
    bar = tqdm(range(args.clf_epochs), desc="classifier", unit="epoch")
    for epoch in bar:
        model.train()
        total, count = 0.0, 0
        for idx in seeded_batches(len(xtr), args.clf_batch, gen, drop_last=True):
            xb = random_shift(xtr[idx], gen)
            loss = F.cross_entropy(model(xb), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            count += len(idx)
        acc = accuracy(model, xte, yte)
        history.append({"epoch": epoch + 1, "train_loss": total / count, "test_acc": acc})
        bar.set_postfix(loss=f"{total / count:.4f}", test_acc=f"{acc:.4f}")
    wall = time.perf_counter() - t0
    cfg = model.config
    path = save_weights(model, out / "digits_classifier.safetensors", cfg, kind="classifier", dtype=torch.float32,
                        extra={"seed": args.seed, "epochs": args.clf_epochs})
    shipped = load_digits_classifier(path=path)
    final_acc = accuracy(shipped, xte, yte)
    log["classifier"] = {
        "config": cfg, "epochs": args.clf_epochs, "batch": args.clf_batch, "lr": args.clf_lr,
        "optimizer": "AdamW (weight decay 1e-4) + OneCycle",
        "augmentation": "random +-1 pixel shifts", "history": history, "wall_s": wall,
        "test_accuracy": final_acc, "train_accuracy": accuracy(shipped, xtr, ytr),
        "file_bytes": path.stat().st_size,
    }
    print(f"classifier: test accuracy {final_acc:.4f} ({wall:.1f} s)")


class Ema:
    """score_sde's ExponentialMovingAverage: decay min(decay, (1 + n) / (10 + n))."""

    def __init__(self, params, decay: float):
        self.params = list(params)
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self):
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach(), 1.0 - decay)

    @torch.no_grad()
    def copy_to(self, params):
        for s, p in zip(self.shadow, params):
            p.copy_(s)


def fixed_eval_noise(x0: torch.Tensor, seed: int, repeats: int):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(repeats):
        t = torch.rand(x0.shape[0], generator=gen) * (1.0 - T_EPS) + T_EPS
        z = torch.randn(x0.shape, generator=gen)
        out.append((t, z))
    return out


@torch.no_grad()
def eval_dsm(model, x0: torch.Tensor, noise, batch: int = 400) -> float:
    model.eval()
    total, count = 0.0, 0
    for t, z in noise:
        for i in range(0, len(x0), batch):
            sl = slice(i, i + batch)
            n = x0[sl].numel()
            total += digits_dsm_loss(model, x0[sl], t[sl], z[sl]).item() * n
            count += n
    return total / count


def train_score(args, out: Path, log: dict) -> None:
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    xtr = load_digits_dataset("train")[0] * 2 - 1
    xte = load_digits_dataset("test")[0] * 2 - 1
    test_noise = fixed_eval_noise(xte, seed=12345, repeats=4)
    net = build_digits_score_net(DIGITS_SCORE_CONFIG)
    model = EpsModel(net, time_input="continuous")
    n_params = sum(p.numel() for p in net.parameters())
    baseline = eval_dsm(model, xte, test_noise)
    print(f"score net: {n_params} parameters; untrained test DSM loss {baseline:.4f}")
    ema_net = build_digits_score_net(DIGITS_SCORE_CONFIG)
    ema_model = EpsModel(ema_net, time_input="continuous")
    params = list(net.parameters())
    opt = torch.optim.Adam(params, lr=args.score_lr, betas=(0.9, 0.999), eps=1e-8)
    ema = Ema(params, args.ema)
    schedule = DIFFPURE_SCHEDULE

    def batches():
        while True:
            yield from seeded_batches(len(xtr), args.score_batch, gen, drop_last=True)

    it = batches()
    train_curve, eval_curve = [], []
    running, running_n = 0.0, 0
    t0 = time.perf_counter()
    bar = tqdm(range(1, args.score_steps + 1), desc="score model", unit="step", mininterval=2.0)
    for step in bar:
        model.train()
        x0 = xtr[next(it)]
        t = torch.rand(x0.shape[0], generator=gen) * (1.0 - T_EPS) + T_EPS
        z = torch.randn(x0.shape, generator=gen)
        loss = digits_dsm_loss(model, x0, t, z)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        lr = args.score_lr * min(step / args.score_warmup, 1.0) if args.score_warmup > 0 else args.score_lr
        for g in opt.param_groups:
            g["lr"] = lr
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, max_norm=args.grad_clip)
        opt.step()
        ema.update()
        running += loss.item()
        running_n += 1
        if step % 50 == 0 or step == args.score_steps:
            train_curve.append({"step": step, "train_loss": running / running_n})
            bar.set_postfix(loss=f"{running / running_n:.4f}")
            running, running_n = 0.0, 0
        if step % args.eval_every == 0 or step == args.score_steps:
            ema.copy_to(ema_net.parameters())
            ema_loss = eval_dsm(ema_model, xte, test_noise)
            eval_curve.append({"step": step, "ema_test_loss": ema_loss, "elapsed_s": time.perf_counter() - t0})
            tqdm.write(f"step {step}: EMA test DSM loss {ema_loss:.4f} ({time.perf_counter() - t0:.0f} s)")
    wall = time.perf_counter() - t0
    ema.copy_to(ema_net.parameters())
    dtype = torch.float16 if args.score_dtype == "float16" else torch.float32
    path = save_weights(ema_net, out / "digits_score.safetensors", DIGITS_SCORE_CONFIG, kind="score", dtype=dtype,
                        extra={"seed": args.seed, "steps": args.score_steps, "ema": args.ema,
                               "beta_min": schedule.beta_min, "beta_max": schedule.beta_max})
    shipped = load_digits_score_model(path=path)
    final = eval_dsm(shipped, xte, test_noise)
    final_train = eval_dsm(shipped, xtr, fixed_eval_noise(xtr, seed=54321, repeats=1))
    log["score"] = {
        "config": DIGITS_SCORE_CONFIG, "parameters": n_params, "steps": args.score_steps, "batch": args.score_batch,
        "lr": args.score_lr, "warmup": args.score_warmup, "ema": args.ema, "grad_clip": args.grad_clip,
        "loss": "mean (eps(x_t, 999 t) - z)^2, t ~ U(1e-5, 1), continuous VP beta in [0.1, 20], data in [-1, 1]",
        "storage_dtype": args.score_dtype, "train_curve": train_curve, "eval_curve": eval_curve, "wall_s": wall,
        "untrained_test_loss": baseline, "ema_test_loss": final, "ema_train_loss": final_train,
        "eval_protocol": "360 test images x 4 fixed (t, z) draws (seed 12345)",
        "file_bytes": path.stat().st_size,
    }
    print(f"score model: EMA test DSM loss {final:.4f} (untrained {baseline:.4f}), {wall:.1f} s")


@torch.no_grad()
def forward_time(model, batch: int = 200, reps: int = 20) -> float:
    x = torch.randn(batch, 1, DIGITS_RESOLUTION, DIGITS_RESOLUTION)
    t = torch.full((batch,), 0.05)
    for _ in range(3):
        model.eps(x, t)
    times = []
    for _ in range(reps):
        s = time.perf_counter()
        model.eps(x, t)
        times.append(time.perf_counter() - s)
    times.sort()
    return times[len(times) // 2]


@torch.no_grad()
def purify_reference(model, x01: torch.Tensor, t_star: float, *, dt: float = 1e-3, seed: int = 0) -> torch.Tensor:
    """DiffPure by hand: discrete one-shot diffusion to level round(1000 t*), reverse Euler-Maruyama to 1e-5."""
    schedule = model.schedule
    gen = torch.Generator().manual_seed(seed)
    x0 = x01 * 2 - 1
    level = schedule.level_of(t_star)
    a = schedule.discrete_alpha_bar()[level - 1].item()
    x = math.sqrt(a) * x0 + math.sqrt(1 - a) * torch.randn(x0.shape, generator=gen)
    n = max(1, math.ceil((t_star - T_EPS) / dt - 1e-9))
    ts = torch.linspace(t_star, T_EPS, n + 1, dtype=torch.float64)
    for i in range(n):
        t, h = ts[i].item(), (ts[i] - ts[i + 1]).item()
        beta = schedule.beta(t)
        score = model.score(x, torch.full((x.shape[0],), t, dtype=torch.float32))
        x = x + h * (0.5 * beta * x + beta * score) + math.sqrt(beta * h) * torch.randn(x.shape, generator=gen)
    return ((x + 1) / 2).clamp(0, 1)


def purification_check(args, out: Path, log: dict) -> None:
    if not args.purify_t:
        return
    score = load_digits_score_model(path=out / "digits_score.safetensors")
    clf = load_digits_classifier(path=out / "digits_classifier.safetensors")
    xte, yte = load_digits_dataset("test")
    clean = accuracy(clf, xte, yte)
    try:
        from diffpure_fast import purify  # the engine, when available
        how = "diffpure_fast.purify"
    except ImportError:
        purify = None
        how = "scripts/train_digits.py purify_reference (discrete forward, reverse Euler-Maruyama)"
    results = []
    for t_star in args.purify_t:
        s = time.perf_counter()
        if purify is not None:
            xp = purify(xte, score, t_star=t_star, dt=1e-3, seed=0, value_range=(0, 1))
        else:
            xp = purify_reference(score, xte, t_star, dt=1e-3, seed=0)
        acc = accuracy(clf, xp, yte)
        results.append({"t_star": t_star, "purified_accuracy": acc, "drop_points": 100 * (clean - acc),
                        "wall_s": time.perf_counter() - s})
        print(f"purify t*={t_star}: accuracy {acc:.4f} (clean {clean:.4f}, drop {100 * (clean - acc):.1f} points)")
    log["purification"] = {"method": how, "dt": 1e-3, "seed": 0, "clean_accuracy": clean, "results": results}


def draw_curves(log: dict, path: Path) -> None:
    from PIL import Image, ImageDraw

    w, h, pad = 640, 240, 36
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    panels = []
    if "classifier" in log:
        hist = log["classifier"]["history"]
        panels.append(("classifier: train CE (blue), test error (red), log10",
                       [([r["epoch"] for r in hist], [r["train_loss"] for r in hist], (30, 60, 200)),
                        ([r["epoch"] for r in hist], [max(1 - r["test_acc"], 1e-3) for r in hist], (200, 30, 30))]))
    if "score" in log:
        tc, ec = log["score"]["train_curve"], log["score"]["eval_curve"]
        panels.append(("score: train DSM (blue), EMA test DSM (red), log10",
                       [([r["step"] for r in tc], [r["train_loss"] for r in tc], (30, 60, 200)),
                        ([r["step"] for r in ec], [r["ema_test_loss"] for r in ec], (200, 30, 30))]))
    if not panels:
        return
    pw = w // len(panels)
    for k, (title, series) in enumerate(panels):
        x0, x1, y0, y1 = k * pw + pad, (k + 1) * pw - 8, 20, h - 22
        draw.rectangle([x0, y0, x1, y1], outline=(0, 0, 0))
        draw.text((k * pw + 4, 4), title, fill=(0, 0, 0))
        xs_all = [x for xs, _, _ in series for x in xs]
        ys_all = [math.log10(max(y, 1e-6)) for _, ys, _ in series for y in ys]
        if not xs_all:
            continue
        xmin, xmax = min(xs_all), max(xs_all)
        ymin, ymax = math.floor(min(ys_all) * 2) / 2, math.ceil(max(ys_all) * 2) / 2
        ymax = ymax if ymax > ymin else ymin + 0.5
        xmax = xmax if xmax > xmin else xmin + 1
        draw.text((k * pw + 2, y0), f"{ymax:g}", fill=(0, 0, 0))
        draw.text((k * pw + 2, y1 - 10), f"{ymin:g}", fill=(0, 0, 0))
        draw.text((x0, y1 + 4), f"{xmin:g}", fill=(0, 0, 0))
        draw.text((x1 - 40, y1 + 4), f"{xmax:g}", fill=(0, 0, 0))
        for xs, ys, color in series:
            pts = [(x0 + (x - xmin) / (xmax - xmin) * (x1 - x0),
                    y1 - (math.log10(max(y, 1e-6)) - ymin) / (ymax - ymin) * (y1 - y0)) for x, y in zip(xs, ys)]
            if len(pts) > 1:
                draw.line(pts, fill=color, width=1)
            for px, py in pts if len(pts) <= 40 else []:
                draw.ellipse([px - 2, py - 2, px + 2, py + 2], outline=color)
    img = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    img.save(path, optimize=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "training_log.json"
    log = json.loads(log_path.read_text()) if log_path.is_file() and (args.skip_classifier or args.skip_score) else {}
    log["command"] = " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else str(argv)
    log["args"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    log["environment"] = {"torch": torch.__version__, "python": platform.python_version(),
                          "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                          "resolution": DIGITS_RESOLUTION}
    t0 = time.perf_counter()
    if not args.skip_classifier:
        train_classifier(args, out, log)
    if not args.skip_score:
        train_score(args, out, log)
    log["training_wall_s"] = time.perf_counter() - t0
    if (out / "digits_score.safetensors").is_file():
        log.setdefault("score", {})["forward_ms_batch200"] = 1e3 * forward_time(
            load_digits_score_model(path=out / "digits_score.safetensors"))
        print(f"score model forward, batch 200 at {DIGITS_RESOLUTION}x{DIGITS_RESOLUTION}: "
              f"{log['score']['forward_ms_batch200']:.1f} ms")
    if (out / "digits_score.safetensors").is_file() and (out / "digits_classifier.safetensors").is_file():
        purification_check(args, out, log)
    sizes = {p.name: p.stat().st_size for p in sorted(out.glob("*.safetensors"))}
    log["file_bytes"] = {**sizes, "total_safetensors": sum(sizes.values())}
    draw_curves(log, out / "loss_curve.png")
    log_path.write_text(json.dumps(log, indent=1) + "\n")
    print(json.dumps({"files": log["file_bytes"], "wall_s": round(log["training_wall_s"], 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
