"""Training throughput of the paper-000 MLP with gradient-alignment logging off / fast / per-example.

    python bench/bench_trainers.py [--device cpu|cuda] [--hidden 1024] [--batch 256] [--steps 20]

Routes, each one SGD step per batch on CIFAR-shaped random data (3072 inputs, 10 classes):

* ``off``          plain training step (forward, backward, SGD update);
* ``gradstats``    plus ``gradient_stats`` on the batch (per-tensor Omega, diversity, stiffness without
                   per-example gradient tensors: one extra forward/backward) -- alignment every step;
* ``per-example``  plus in-class Omega from per-example gradients: a loop of one backward per example,
                   streaming the per-class sums (sum g, sum ||g||, sum ||g||^2) so memory stays
                   O(classes x parameters) -- alignment every step. (``gradient_stats_oracle`` keeps
                   all n x parameters gradients: ~6 GB here, so it is not timed.)

Prints examples per second and the ratio to ``off`` (measured side by side in one process).
"""
from __future__ import annotations

import argparse
import platform
import time

import torch
from torch.nn import functional as F

from geomprobe.trainers import gradstats
from geomprobe.trainers.models import build_model


def _step(model, opt, x, y):
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()


def per_example_omega(model, x, y, loss_fn) -> dict[str, float]:
    """In-class Omega per weight tensor from a loop over examples (streaming sums, spec alignment.md §1)."""
    params = [(n, p) for n, p in model.named_parameters() if p.ndim >= 2]
    sums: dict[int, list] = {}
    for i in range(x.shape[0]):
        c = int(y[i])
        grads = torch.autograd.grad(loss_fn(model(x[i:i + 1]), y[i:i + 1]).sum(), [p for _, p in params])
        acc = sums.setdefault(c, [[torch.zeros_like(p), 0.0, 0.0] for _, p in params] + [0])
        for a, g in zip(acc, grads):
            a[0] += g
            sq = float(g.pow(2).sum())
            a[1] += sq ** 0.5
            a[2] += sq
        acc[-1] += 1
    out = {}
    for k, (name, _) in enumerate(params):
        vals = []
        for acc in sums.values():
            n = acc[-1]
            s, sn, ssq = acc[k]
            if n >= 2 and sn > 0:
                vals.append(n * (float(s.pow(2).sum()) - ssq) / ((n - 1) * sn * sn))
        out[name] = sum(vals) / len(vals) if vals else float("nan")
    return out


def _time(fn, steps: int, device: torch.device) -> float:
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--per-example-steps", type=int, default=2)
    p.add_argument("--phi", default="sin")
    p.add_argument("--check", action="store_true", help="compare per-example Omega with gradient_stats and exit")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (args.batch,), generator=g).to(device)
    model = build_model("mlp", (3, 32, 32), 10, hidden=args.hidden, phi=args.phi, sigma=0.1, seed=0).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss = gradstats.per_example_cross_entropy

    if args.check:
        fast = gradstats.gradient_stats(model, x, y, loss)
        slow = per_example_omega(model, x, y, loss)
        for name, v in slow.items():
            print(f"{name}: per-example {v:.6g}  gradstats {fast[name]['omega_in_class']:.6g}")
        return
    routes = {
        "off": (lambda: _step(model, opt, x, y), args.steps),
        "gradstats": (lambda: (gradstats.gradient_stats(model, x, y, loss), _step(model, opt, x, y)), args.steps),
        "per-example": (lambda: (per_example_omega(model, x, y, loss), _step(model, opt, x, y)),
                        args.per_example_steps),
    }
    print(f"# paper-000 MLP 3072-{args.hidden}-10 ({args.phi}), batch {args.batch}, device {device}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}, {platform.processor() or platform.machine()}")
    print(f"{'route':<12} {'s/step':>9} {'examples/s':>11} {'vs off':>7}")
    base = None
    for name, (fn, steps) in routes.items():
        dt = _time(fn, steps, device)
        base = base or dt
        print(f"{name:<12} {dt:9.4f} {args.batch / dt:11.0f} {base / dt:7.3f}")


if __name__ == "__main__":
    main()
