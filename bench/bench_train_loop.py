"""Benchmark: examples/s of each experiment's training loop (``trainers.train.train``) against a bare
PyTorch loop with the same model, batch and optimiser, side by side in one process.

    python bench/bench_train_loop.py [--device cpu|cuda] [--experiments e1,e2,e3,e4] [--steps 20]
                                     [--batch-cap B] [--width W] [--threads N] [--amp]

Per experiment (paper-preset model, batch and optimiser; synthetic data of the real shape, held on
the device like ``train()`` holds a dataset that fits):

* ``bare``: ``zero_grad; loss(model(x[idx]), y[idx]).backward(); opt.step()`` over a random order;
* ``train() off``: ``train()`` with statistics off (``align_every=0``);
* ``bare + recorder``: the bare loop with every step inside ``gradstats.recorder`` and its
  ``stats()`` read every step;
* ``train() recorder``: ``train(..., align_every=1, align_route='recorder')``: the recorder inside every
  step plus what the experiments log with it (gradient/weight norm ratios, representation alignment).

Only the steps are timed (from the end of the first step to the end of the last, through
``on_step``; the per-epoch evaluation and checkpoints are outside the window). Targets (issue 17, on a
GPU): ``train() off`` >= 0.8x the bare loop, with the recorder at every step >= 0.7x.
``--batch-cap`` / ``--width`` shrink the paper sizes for CPU runs (printed in the table).
"""
from __future__ import annotations

import argparse
import platform
import time

import torch
import torch.nn.functional as F

from geomprobe.trainers import gradstats
from geomprobe.trainers.models import build_model
from geomprobe.trainers.options import options_for
from geomprobe.trainers.train import TrainConfig, train


def cases(batch_cap: int, width: float):
    """(key, label, model builder, input shape, classes or None for regression, batch, optimiser, lr)."""
    o1 = options_for("extreme-memorization", "paper")
    o2 = options_for("label-noise-geometry", "paper")
    o3 = options_for("identity-crisis", "paper")
    o4 = options_for("normalized-loss", "paper")
    w = lambda n: max(1, int(round(n * width)))  # noqa: E731
    cap = lambda b: min(b, batch_cap) if batch_cap else b  # noqa: E731
    return [
        ("e1", f"E1 mlp 3072-{w(o1.hidden)}-10 sin", lambda: build_model(
            "mlp", (3, 32, 32), 10, hidden=w(o1.hidden), phi=o1.phi, sigma=0.01, seed=0),
         (3, 32, 32), 10, cap(o1.batch_size), "sgd", o1.lr),
        ("e2", f"E2 {o2.model} x{o2.width_factor * width:g}, 100 classes", lambda: build_model(
            o2.model, (3, 32, 32), 100, width=o2.width_factor * width, seed=0),
         (3, 32, 32), 100, cap(o2.batch_size), o2.optimizer, o2.lr),
        ("e3", f"E3 deep-convnet d{max(o3.conv_depths)} c{w(o3.conv_channels)}, one image", lambda: build_model(
            "deep-convnet", (1, 28, 28), depth=max(o3.conv_depths), channels=w(o3.conv_channels), seed=0),
         (1, 28, 28), None, 1, o3.conv_optimizer, o3.conv_lr),
        ("e4", f"E4 convnet3 c{w(o4.channels)}", lambda: build_model(
            "convnet3", (3, 32, 32), 10, channels=w(o4.channels), init_std=0.05, seed=0),
         (3, 32, 32), 10, cap(o4.batch_size), "sgd", o4.lr),
    ]


def make_opt(model, name, lr):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=lr) if name == "sgd" else torch.optim.Adam(params, lr=lr)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bare_loop(build, X, Y, batch, opt_name, lr, steps, device, regression, with_recorder=False):
    model = build().to(device)
    model.train()
    opt = make_opt(model, opt_name, lr)
    n = X.shape[0]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0)).to(device)
    t0 = None
    for s in range(steps):
        idx = order[(s * batch) % n:(s * batch) % n + batch]
        xb, yb = X[idx], Y[idx]
        opt.zero_grad(set_to_none=True)
        if with_recorder:
            with gradstats.recorder(model, labels=yb) as rec:
                F.cross_entropy(model(xb), yb).backward()
            rec.stats()
        else:
            z = model(xb)
            loss = 0.5 * ((z - yb) ** 2).flatten(1).sum(1).mean() if regression else F.cross_entropy(z, yb)
            loss.backward()
        opt.step()
        if s == 0:
            sync(device)
            t0 = time.perf_counter()
    sync(device)
    return (steps - 1) * batch / (time.perf_counter() - t0)


def train_loop(build, X, Y, batch, opt_name, lr, steps, device, regression, align_every, amp):
    model = build()
    marks = {}

    def on_step(step, _m):
        if step in (1, steps):
            sync(device)
            marks[step] = time.perf_counter()

    cfg = TrainConfig(epochs=1, max_steps=steps, batch_size=batch, optimizer=opt_name, lr=lr,
                      loss="mse" if regression else "ce", device=device.type, align_every=align_every,
                      keep_every=0, eval_batch_size=max(batch, 256), progress="off", amp=amp,
                      repeat=max(1, -(-steps * batch // X.shape[0])))
    train(model, X, Y, cfg=cfg, on_step=on_step, align_route="recorder")
    return (steps - 1) * batch / (marks[steps] - marks[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--experiments", default="e1,e2,e3,e4")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-cap", type=int, default=0, help="cap the paper batch sizes (CPU runs); 0: none")
    ap.add_argument("--width", type=float, default=1.0, help="scale the paper widths (CPU runs)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--amp", action="store_true", help="train() with bf16 autocast (CUDA; the amp option)")
    args = ap.parse_args()
    if args.steps < 2:
        raise SystemExit("--steps must be >= 2 (the first step is the warm-up)")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    want = [e for e in args.experiments.split(",") if e]
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"# {dev_name}, torch {torch.__version__}, {args.steps} steps (first one not timed), "
          f"batch cap {args.batch_cap or 'none'}, width x{args.width}, amp {args.amp}")
    print("| experiment (paper preset) | batch | bare ex/s | train() off ex/s (x bare) | bare + recorder ex/s (x bare) "
          "| train() recorder every step ex/s (x bare) |")
    print("|---|---|---|---|---|---|")
    for key, label, build, shape, classes, batch, opt_name, lr in cases(args.batch_cap, args.width):
        if key not in want:
            continue
        regression = classes is None
        gen = torch.Generator().manual_seed(0)
        n = batch * min(args.steps, 8)  # a synthetic training set of the real example shape
        X = torch.randn(n, *shape, generator=gen)
        Y = X.clone() if regression else torch.randint(0, classes, (n,), generator=gen)
        Xd, Yd = X.to(device), Y.to(device)
        bare = bare_loop(build, Xd, Yd, batch, opt_name, lr, args.steps, device, regression)
        off = train_loop(build, X, Y, batch, opt_name, lr, args.steps, device, regression, 0, args.amp)
        coupled = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in build().modules())
        if regression or coupled:
            why = "mse loss: no classes" if regression else "BatchNorm in train mode"
            rec_cell = tr_cell = f"n/a ({why})"
        else:
            r = bare_loop(build, Xd, Yd, batch, opt_name, lr, args.steps, device, regression, with_recorder=True)
            t = train_loop(build, X, Y, batch, opt_name, lr, args.steps, device, regression, 1, args.amp)
            rec_cell, tr_cell = f"{r:.1f} ({r / bare:.2f}x)", f"{t:.1f} ({t / bare:.2f}x)"
        print(f"| {label} | {batch} | {bare:.1f} | {off:.1f} ({off / bare:.2f}x) | {rec_cell} | {tr_cell} |",
              flush=True)
        del X, Y, Xd, Yd
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
