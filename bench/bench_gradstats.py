"""Benchmark: per-example gradient statistics against a plain training step, side by side in one process.

    python bench/bench_gradstats.py [--device cpu|cuda] [--models mlp,convnet3,alexnet,resnet18,transformer]
                                    [--batch 256,1024] [--width 1.0] [--repeats 5] [--threads N] [--skip-vmap]
                                    [--profile MODEL] [--check]

For every model and batch it prints the median wall time (after a warm-up; the first three routes
run interleaved, so that a change of the machine's load hits them alike) of

* ``plain step``: zero_grad + forward + mean cross-entropy + backward (the model in eval mode, as the
  issue-17 measurements; BatchNorm in train mode has no per-example gradients);
* ``step + recorder``: the same step inside ``gradstats.recorder`` plus ``rec.stats()`` (every
  statistic of every tensor, per class, and the per-example norms, on the host);
* ``one-shot``: ``gradstats.gradient_stats(model, x, y)`` (its own forward and backward);
* ``vmap route``: ``torch.func.vmap(grad(...))`` over ``functional_call`` materialising every
  per-example gradient and taking its norm (per-example norms only),

and the ratios to the plain step. Targets (issue 17): recorder <= 1.3x, one-shot <= 2x, both faster
than the vmap route. Models are this repository's builders (paper presets): ``mlp`` 3072-1024-10 no
bias, ``convnet3`` (64 channels), ``alexnet`` (100 classes), ``resnet18`` (100 classes), and
``transformer``: token embedding + 4 ``nn.TransformerEncoderLayer`` (d_model 256, 8 heads, sequence
128) + linear head. ``--width`` scales the widths (CPU runs), ``--seq`` the transformer's sequence.
``--profile MODEL`` prints the torch profiler's top operators of the recorder step for one model;
``--check`` compares the recorder's statistics with the one-shot route (float32) before timing.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from geomprobe.trainers import gradstats
from geomprobe.trainers.models import build_model


class TokenTransformer(nn.Module):
    def __init__(self, vocab=1000, d_model=256, heads=8, layers=4, classes=10):
        super().__init__()
        self.emb = nn.Embedding(vocab, d_model)
        layer = nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, classes)

    def forward(self, x):
        return self.head(self.enc(self.emb(x)).mean(1))


def make(name: str, batch: int, width: float, seq: int, device, dtype, gen):
    w = lambda n: max(1, int(round(n * width)))  # noqa: E731
    img = lambda: torch.randn(batch, 3, 32, 32, generator=gen)  # noqa: E731
    if name == "mlp":
        model, x, classes = build_model("mlp", (3, 32, 32), 10, hidden=w(1024)), img(), 10
    elif name == "convnet3":
        model, x, classes = build_model("convnet3", (3, 32, 32), 10, channels=w(64)), img(), 10
    elif name == "alexnet":
        model, x, classes = build_model("alexnet", (3, 32, 32), 100, width=width), img(), 100
    elif name == "resnet18":
        model, x, classes = build_model("resnet18", (3, 32, 32), 100, width=width), img(), 100
    elif name == "transformer":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = TokenTransformer(d_model=w(256), heads=8 if w(256) % 8 == 0 else 1)
        x, classes = torch.randint(0, 1000, (batch, seq), generator=gen), 10
    else:
        raise SystemExit(f"unknown model {name!r}")
    y = torch.randint(0, classes, (batch,), generator=gen)
    model = model.to(device=device, dtype=dtype).eval()
    x = x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device)
    return model, x, y.to(device), classes


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


def timed_interleaved(fns, repeats, device):
    """Median wall time of each of ``fns``, run in turn (route 1, 2, 3, 1, 2, 3, ...) after one
    warm-up each, so that a change of the machine's load hits every route alike."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[k].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def routes(model, x, y, classes):
    def step():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    def step_recorder():
        model.zero_grad(set_to_none=True)
        with gradstats.recorder(model, labels=y, num_classes=classes) as rec:
            F.cross_entropy(model(x), y).backward()
        return rec.stats(per_example_norms=True)

    def one_shot():
        return gradstats.gradient_stats(model, x, y, num_classes=classes)

    def vmap_route():
        from torch.func import functional_call, grad, vmap

        params = {k: v.detach() for k, v in model.named_parameters()}

        def f(p, xi, yi):
            return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

        g = vmap(grad(f), in_dims=(None, 0, 0))(params, x, y)
        return {k: v.flatten(1).norm(dim=1) for k, v in g.items()}

    return step, step_recorder, one_shot, vmap_route


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--models", default="mlp,convnet3,alexnet,resnet18,transformer")
    ap.add_argument("--batch", default="256,1024")
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--skip-vmap", action="store_true", help="skip the vmap route (n x params memory)")
    ap.add_argument("--profile", default=None, help="print the torch profiler's top operators for this model")
    ap.add_argument("--check", action="store_true", help="compare recorder and one-shot statistics first")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    names = [m for m in args.models.split(",") if m]
    batches = [int(b) for b in args.batch.split(",") if b]
    threads = torch.get_num_threads()
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU {platform.processor() or platform.machine()}, {threads} threads"
    print(f"# {dev_name}, torch {torch.__version__}, {args.dtype}, width x{args.width}, "
          f"transformer seq {args.seq}, median of {args.repeats}")
    print("| model | batch | plain step ms | step + recorder ms (x step) | one-shot gradient_stats ms (x step) "
          "| vmap per-example norms ms (x step) |")
    print("|---|---|---|---|---|---|")
    for name in names:
        for batch in batches:
            model, x, y, classes = make(name, batch, args.width, args.seq, device, dtype, gen)
            step, rec, one, vm = routes(model, x, y, classes)
            if args.check:
                a, b = rec(), one()
                worst = max(abs(a[k]["omega"] - b[k]["omega"]) for k in b if b[k]["omega"] is not None)
                print(f"# check {name} {batch}: max |omega recorder - one-shot| = {worst:.2e}")
            if args.profile == name:
                from torch.profiler import ProfilerActivity, profile

                acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
                rec()
                with profile(activities=acts) as prof:
                    rec()
                key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
                print(prof.key_averages().table(sort_by=key, row_limit=15))
            t_step, t_rec, t_one = timed_interleaved((step, rec, one), args.repeats, device)
            if args.skip_vmap:
                vm_cell = "skipped"
            else:
                try:
                    t_vm = timed(vm, max(1, args.repeats // 2), device)
                    vm_cell = f"{t_vm * 1e3:.2f} ({t_vm / t_step:.1f}x)"
                except (RuntimeError, MemoryError) as exc:  # out of memory: n x params
                    vm_cell = f"failed ({type(exc).__name__})"
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
            print(f"| {name} | {batch} | {t_step * 1e3:.2f} | {t_rec * 1e3:.2f} ({t_rec / t_step:.2f}x) | "
                  f"{t_one * 1e3:.2f} ({t_one / t_step:.2f}x) | {vm_cell} |", flush=True)
            del model, x, y
            if device.type == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
