"""``geomprobe demo``: the embedded default. Trains a real network on a CPU and analyses it.

Default (needs torch, matplotlib): the feed-forward net of paper 003 on synthetic spheres with half of the
training labels permuted (eps = 0.5), activations saved at init / best / final epoch, MFTMA analysis of
the best and final epochs (``OUT/analysis/metrics.csv``), the key table (capacity per layer and subset
at the best vs the final epoch), the effects (with the reason of any not shown), ``OUT/summary.json``
and the report ``OUT/report/report.md``, whose section "Analysis" gives the ``geomprobe analyze``
command that reproduces the numbers. Progress goes to stderr: tqdm bars in a terminal, otherwise a
line at most every 10 s. Timings: docs/reproducing.md, "The demo".

``--synthetic`` (and the fallback when torch is not installed, said on stderr): a seeded synthetic
activations file analysed without torch.
"""
from __future__ import annotations

import os
import sys
import time

from geomprobe import _warmup
from geomprobe._validation import InputError
from geomprobe.local_runner import available_cores

from ._common import summary_table

# The demo's network and data: label-noise-geometry (spec E2) with the feed-forward net on synthetic
# spheres (paper 003, appendix A.5), scaled down. Every option the tiny preset sets is set here, so the
# demo does not depend on any preset. More classes (30) than captured points per class (M = 20): with
# fewer classes the collapsed last layers hold only ~P distinct clusters per permuted manifold and its
# capacity sits near 2/P, not the bound 2/M.
DEMO_OPTIONS = dict(dataset="spheres", model="feedforward", n_classes=30, n_train_per_class=100, n_test_per_class=50,
                    ambient_dim=128, intrinsic_dim=20, radius=3.0, width=256, depth=4, eps=0.5, epochs=25,
                    batch_size=128, lr=1e-3, keep_every=5, capture_classes=30, capture_per_class=20, split_batch=256,
                    rewind=False, device="cpu", progress="off")
# the analysis behind the printed capacities (effects.summarize; report.md states it with the
# `geomprobe analyze` command that reproduces it): the best and final epochs' files only
DEMO_FILES = ("best", "final")
DEMO_ANALYSIS = dict(n_reps=2, n_t=50)  # per_class: all captured examples (capture_per_class = 20)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="run the embedded default: train a small net on label-noisy synthetic spheres (CPU) and "
        "analyse its geometry",
        description="Train the feed-forward net of paper 003 on synthetic spheres with half of the training labels "
        "permuted, save activations at the best and final epochs, run the MFTMA analysis, print capacity per "
        "layer and subset (best vs final epoch) and the effects (with the reason of any not shown), and write "
        "summary.json and report/report.md (with the analysis options and the `geomprobe analyze` command "
        "that reproduces the numbers) into --out. "
        "--synthetic analyses a synthetic activations file instead (no torch needed).",
    )
    p.add_argument("--out", default="geomprobe-demo", help="output directory (default: geomprobe-demo)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output directory")
    p.add_argument("--no-mftma", action="store_true", help="alignment only (no capacity)")
    p.add_argument("--synthetic", action="store_true",
                   help="no training: analyse seeded synthetic activations (torch-free)")
    p.add_argument("--epochs", type=int, default=DEMO_OPTIONS["epochs"],
                   help=f"training epochs (default {DEMO_OPTIONS['epochs']}; fewer for a quick smoke test)")
    p.add_argument("--umap", action="store_true", help="also draw the UMAP figure (slower; needs umap-learn)")
    p.add_argument("--quiet", action="store_true", help="no progress (bars in a terminal, a line every 10 s otherwise)")
    p.set_defaults(run=run)


def _check_out(out: str, force: bool) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise InputError(f"output directory {out} exists and is not a directory")
    if os.path.exists(out) and os.listdir(out) and not force:
        raise InputError(f"output directory {out} already exists and is not empty; pass --force to overwrite")


def run(args) -> int:
    if args.seed < 0:
        raise InputError(f"--seed must be >= 0, got {args.seed}")
    if args.epochs < 1:
        raise InputError(f"--epochs must be >= 1, got {args.epochs}")
    _check_out(args.out, args.force)
    if not args.synthetic:
        try:
            import torch  # noqa: F401
        except ModuleNotFoundError:
            print("geomprobe demo: PyTorch is not installed, so no network is trained; analysing synthetic "
                  "activations instead (pip install 'geomprobe[train]' for the real demo)", file=sys.stderr)
            return _run_synthetic(args)
        return _run_trained(args)
    return _run_synthetic(args)


def _run_synthetic(args) -> int:
    from geomprobe.analysis import AnalyzeOptions, analyze
    from geomprobe.io import save_activations
    from geomprobe.synthetic import synthetic_activations

    out = args.out
    os.makedirs(out, exist_ok=True)
    acts = os.path.join(out, "activations.npz")
    save_activations(acts, **synthetic_activations(args.seed), force=True)
    options = AnalyzeOptions(seed=args.seed, mftma=not args.no_mftma, n_reps=3)
    report = analyze([acts], options, outdir=os.path.join(out, "analysis"), force=True)
    print(f"geomprobe demo: synthetic activations (seed {args.seed}) in {acts}")
    print(summary_table(report.rows))
    print(f"wrote {out}/analysis/metrics.json and metrics.csv")
    for key, err in report.errors:
        print(f"geomprobe demo: task {key} failed: {err}", file=sys.stderr)
    return 1 if report.errors else 0


def key_table(summary: dict, metric: str = "capacity") -> str:
    """Rows = layers; columns = the metric of each subset at the best and the final epoch."""
    d = summary["data"]
    m = d.get("metrics", {})
    cols = [(tag, s) for s in ("permuted", "restored", "unpermuted", "test") for tag in ("best", "final")
            if metric in m.get(tag, {}).get(s, {})]
    head = ["layer"] + [f"{s}@{tag}" for tag, s in cols]
    body = []
    for layer in d["layers"]:
        body.append([layer] + [f"{m[tag][s][metric].get(layer, float('nan')):.4f}" for tag, s in cols])
    widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in [head] + body]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


class Progress:
    """Progress on stderr: a tqdm bar when stderr is a terminal, otherwise one log line at most every
    ``every`` seconds and one at the end (count, elapsed, ETA), so batch jobs and pipes see it too."""

    def __init__(self, total: int, desc: str, unit: str, *, quiet: bool = False, every: float = 10.0) -> None:
        self.total, self.desc, self.unit, self.quiet, self.every = total, desc, unit, quiet, every
        self.done, self.t0 = 0, time.perf_counter()
        self.last = self.t0
        self.bar = None
        if not quiet and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False)

    def update(self, done: int, info: str = "", total: int | None = None) -> None:
        if total is not None:
            self.total = total
            if self.bar is not None:
                self.bar.total = total
        step, self.done = done - self.done, done
        if self.bar is not None:
            if info:
                self.bar.set_postfix_str(info, refresh=False)
            self.bar.update(step)
            return
        now = time.perf_counter()
        if self.quiet or (now - self.last < self.every and done < self.total):
            return
        self.last = now
        el = now - self.t0
        eta = el / done * (self.total - done) if done else 0.0
        print(f"geomprobe demo: {self.desc} {done}/{self.total} {self.unit}s, {el:.0f} s elapsed"
              + (f", ETA {eta:.0f} s" if 0 < done < self.total else "") + (f" ({info})" if info else ""),
              file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# the demo does not measure rewinding (DEMO_OPTIONS rewind=False), and says why
_NOT_MEASURED = {
    "rewinding_last_layers_recovers_test_accuracy":
        "paper 003 shows rewinding for conv nets on images; in this MLP on spheres the memorisation is not in the "
        "last layers (rewinding one recovers about 10 % of the lost test accuracy, docs/reproducing.md); "
        "`geomprobe train label-noise-geometry --preset small` measures it on AlexNet / Fashion-MNIST",
}


def _run_trained(args) -> int:
    from geomprobe.trainers.options import options_for

    opts = options_for("label-noise-geometry", "tiny", dict(DEMO_OPTIONS, epochs=args.epochs), seed=args.seed)
    print(f"geomprobe demo: training a {opts.depth}-layer feed-forward net (width {opts.width}) on {opts.n_classes} "
          f"synthetic spheres, eps = {opts.eps} of the training labels permuted, {opts.epochs} epochs on the CPU ...",
          file=sys.stderr)
    # the analysis kernels compile (first run of an install only) in background processes while the net
    # trains on one thread: geomprobe/_warmup.py
    warm = _warmup.start() if not args.no_mftma else []
    try:
        return _train_and_analyse(args, opts, warm)
    finally:
        _warmup.stop(warm)


def _train_and_analyse(args, opts, warm) -> int:
    import torch

    from geomprobe.trainers.effects import summarize
    from geomprobe.trainers.experiments import run_experiment

    from .report import effects_lines

    out = args.out
    quiet = getattr(args, "quiet", False)
    t0, c0 = time.perf_counter(), _cpu()
    bar = Progress(opts.epochs, "training", "epoch", quiet=quiet)
    threads = torch.get_num_threads()
    # a net this small trains as fast on one thread, and one thread does not stall when other processes
    # share the cores (docs/reproducing.md, "The demo")
    torch.set_num_threads(1)
    try:
        res = run_experiment("label-noise-geometry", opts, out, force=True, preset="demo", summarize=False,
                             progress=lambda ep, total, rec: bar.update(ep, f"test acc {rec.get('test_acc', 0):.3f}"))
    finally:
        torch.set_num_threads(threads)
        bar.close()
    if warm and any(p.poll() is None for p in warm):
        print("geomprobe demo: waiting for the analysis kernels to compile (first run of this install only; "
              "later runs load them from numba's cache) ...", file=sys.stderr, flush=True)
    _warmup.wait(warm)
    t1, c1 = time.perf_counter(), _cpu()
    print(f"geomprobe demo: trained in {t1 - t0:.0f} s (best test accuracy at epoch {res.result['best_epoch']}); "
          f"analysing acts_best.npz and acts_final.npz (MFTMA n_reps {DEMO_ANALYSIS['n_reps']}, n_t "
          f"{DEMO_ANALYSIS['n_t']}, {opts.capture_per_class} examples per class) ...", file=sys.stderr)
    bar = Progress(0, "analysis", "task", quiet=quiet)
    try:
        # the analysis tasks on every core (geomprobe.local_runner; the numbers do not depend on it)
        summary = summarize(out, mftma=not args.no_mftma, tags=DEMO_FILES, n_reps=DEMO_ANALYSIS["n_reps"],
                            n_t=DEMO_ANALYSIS["n_t"], progress=lambda done, total: bar.update(done, total=total),
                            jobs=available_cores())
    finally:
        bar.close()
    t2, c2 = time.perf_counter(), _cpu()
    metric = "capacity" if not args.no_mftma else "rep_omega_in_class"
    d = summary["data"]
    print(f"geomprobe demo: {metric} per layer and subset at the best epoch ({d['files']['best']['epoch']}) and the "
          f"final epoch ({d['files']['final']['epoch']})" +
          (f"; lower bound 2/M = {d['capacity_lower_bound']:.3g}" if metric == "capacity" else ""))
    print(key_table(summary, metric))
    print()
    print("\n".join(effects_lines(summary, skip=_NOT_MEASURED)))
    try:
        from geomprobe.trainers.report import build_report

        path = build_report(out, umap=args.umap, quiet=True)
        print(f"report: {path} (its section 'Analysis' gives the `geomprobe analyze` command that reproduces "
              "these numbers)")
    except ModuleNotFoundError as exc:
        if exc.name != "matplotlib":
            raise
        print("geomprobe demo: matplotlib is not installed: no report figures (pip install 'geomprobe[report]')",
              file=sys.stderr)
    print(f"wrote {out}/analysis/metrics.json and metrics.csv, {out}/summary.json "
          f"({t1 - t0:.0f} s training, {t2 - t1:.0f} s analysis, {time.perf_counter() - t0:.0f} s in all; CPU time "
          f"{c1 - c0:.0f} + {c2 - c1:.0f} s, {_cpu() - c0:.0f} s in all)")
    return 0


def _cpu() -> float:
    """CPU seconds of this process, all threads (wall time above it means cores shared with others)."""
    return time.process_time()
