"""Benchmark: gradient_stats (one forward + one backward, no per-example gradients) against the
per-example oracles, on the paper-000 MLP (3072 -> 1024 -> 10, ReLU, no bias, batch 256).

    python bench/bench_gradstats.py [--batch 256] [--hidden 1024] [--repeats 3] [--device cpu]
                                    [--dtype float32] [--skip-vmap] [--skip-loop] [--oracle]

Prints one table: median wall time per call and the ratio to one ordinary training step
(forward + backward of the mean loss) and to the fast route. "materialise only" rows are the cost of
just forming the n per-example gradients (the least any per-example route pays); the full oracle
(--oracle) also evaluates the pairwise definitions.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from geomprobe.trainers.gradstats import gradient_stats, gradient_stats_oracle, gradient_sums


def timed(fn, repeats, device):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--d-in", type=int, default=3072)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--skip-vmap", action="store_true", help="skip the vmap oracle (n x params memory)")
    ap.add_argument("--skip-loop", action="store_true", help="skip the per-example loop")
    ap.add_argument("--oracle", action="store_true",
                    help="also time gradient_stats_oracle (pairwise definitions: n^2 d float64 work, minutes on CPU)")
    args = ap.parse_args()

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(args.d_in, args.hidden, bias=False), nn.ReLU(),
                          nn.Linear(args.hidden, args.classes, bias=False)).to(device=device, dtype=dtype)
    x = torch.randn(args.batch, args.d_in, generator=gen).to(device=device, dtype=dtype)
    y = torch.randint(0, args.classes, (args.batch,), generator=gen).to(device)

    def step():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    rows = [("training step (fwd+bwd, reference)", timed(step, args.repeats, device))]
    for method in ("auto", "explicit"):
        rows.append((f"gradient_stats method={method}",
                     timed(lambda: gradient_stats(model, x, y, method=method), args.repeats, device)))
    rows.append(("gradient_sums (mergeable, vectors kept)",
                 timed(lambda: gradient_sums(model, x, y), args.repeats, device)))
    params = [p for p in model.parameters()]

    def loop_materialise():
        return torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(
            F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), params)]) for i in range(args.batch)])

    def vmap_materialise():
        from torch.func import functional_call, grad, vmap

        pd = {k: v.detach() for k, v in model.named_parameters()}

        def f(p, xi, yi):
            return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

        return vmap(grad(f), in_dims=(None, 0, 0))(pd, x, y)

    if not args.skip_loop:
        rows.append(("per-example grads, loop (materialise only)", timed(loop_materialise, 1, device)))
    if not args.skip_vmap:
        rows.append(("per-example grads, vmap (materialise only)", timed(vmap_materialise, 1, device)))
    if args.oracle:
        rows.append(("gradient_stats_oracle how=loop (full)",
                     timed(lambda: gradient_stats_oracle(model, x, y, how="loop"), 1, device)))
    fast = rows[1][1]
    step_t = rows[0][1]
    threads = torch.get_num_threads()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or 'cpu'}, {threads} threads"
    print(f"# MLP {args.d_in}->{args.hidden}->{args.classes} no bias, batch {args.batch}, {args.dtype}, "
          f"device {name}, torch {torch.__version__}")
    print(f"| {'route':44s} | {'time (ms)':>10s} | {'x train step':>12s} | {'x gradient_stats':>16s} |")
    print(f"|{'-' * 46}|{'-' * 12}|{'-' * 14}|{'-' * 18}|")
    for label, t in rows:
        print(f"| {label:44s} | {t * 1e3:10.1f} | {t / step_t:12.2f} | {t / fast:16.2f} |")


if __name__ == "__main__":
    main()
