"""Companion-measure benchmarks (issue 19), side by side in one run, printed as a table.

1. Each per-layer measure on n = 50,000 x d = 4,096 float32 (10 classes) vs one ``X.T @ X`` (float32,
   numpy's syrk): participation ratio + effective rank (spectrum), neural collapse NC1/NC2, the ridge
   linear probe (true + a second label vector) and the averaging classifier; target <= 3x each.
2. Linear CKA (biased + unbiased) and the Procrustes angle between two such layers vs the same
   ``X.T @ X``: standalone (both self terms + the cross term + one SVD) and the marginal cost of one
   more pair when the layers' self terms are already prepared (a layer x layer matrix); target <= 3x.
3. Score recording in training (also bench/bench_scores.py, which reports medians and the load): one
   epoch of the label-noise small preset's network (AlexNet at 1/8 width, 5,000 32 x 32 images, batch
   128; random images, timing only) with and without a ScoreRecorder, alternating, best of
   ``--epochs``; plus the one-off per-layer gradient norms after training. Target <= 5 % per epoch.

4. ``--observe RUN``: the per-subset scores and per-layer companion rows of the final epoch of a
   finished ``geomprobe train label-noise-geometry`` run folder (which records train/scores.csv).

Run:  python bench/bench_companion.py [--small] [--skip-train] [--epochs 3] [--only spectrum,cka,...]
      python bench/bench_companion.py --observe RUN_FOLDER
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np


def best_of(fn, repeats=2):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def layer_measures(n: int, d: int, repeats: int, only: set[str] | None = None) -> list[tuple]:
    from geomprobe.collapse import neural_collapse
    from geomprobe.linear_probe import linear_probe
    from geomprobe.similarity import _pair, layer_similarity, prepare_layer
    from geomprobe.spectral import participation_ratio, spectrum

    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, n)
    X = rng.standard_normal((n, d), dtype=np.float32)
    X[:, :10] += 2 * np.eye(10, dtype=np.float32)[y]
    y2 = np.where(rng.random(n) < 0.5, rng.integers(0, 10, n), y)
    t0 = best_of(lambda: X.T @ X, repeats)
    rows = [("X.T @ X (float32)", t0, None)]

    print(f"| X.T @ X (float32) | {t0:.2f} s | 1.00x | |", flush=True)

    def add(name, fn, target, key=None):
        if only is not None and key not in only:
            return
        t = best_of(fn, repeats)
        rows.append((name, t, target))
        print(f"| {name} | {t:.2f} s | {t / t0:.2f}x | <= {target:g}x |", flush=True)

    add("participation ratio (trace / Frobenius only)", lambda: participation_ratio(X), 3.0, "pr")
    add("spectrum: PR + effective rank (+ eigvalsh d x d)", lambda: spectrum(X), 3.0, "spectrum")
    add("neural collapse NC1 + NC2 (10 classes)", lambda: neural_collapse(X, y), 3.0, "collapse")
    add("linear probe, 2 label vectors (ridge, 50 % split)",
        lambda: linear_probe(X, y, extra_labels={"noisy": y2}), 3.0, "probe")
    add("linear probe + averaging classifier", lambda: linear_probe(X, y, extra_labels={"noisy": y2},
                                                                    averaging=True), 3.0, "averaging")
    Y = np.maximum(X[:, ::-1] + 0.5 * rng.standard_normal((n, d), dtype=np.float32), 0)
    add("CKA + CKA_1, two layers, standalone (linear_cka)", lambda: layer_similarity(X, Y, procrustes=False), 3.0,
        "cka")
    add("CKA + CKA_1 + Procrustes, two layers, standalone", lambda: layer_similarity(X, Y), 3.0, "procrustes")
    if only is None or "pair" in only:
        a, b = prepare_layer(X), prepare_layer(Y)
        add("  one more pair, self terms prepared (cross term + nuclear norm)", lambda: _pair(a, b), 3.0, "pair")
        add("  one more pair, CKA only (cross term)", lambda: _pair(a, b, procrustes=False), 3.0, "pair")
    if only is None or "nuclear" in only:
        from geomprobe._moments import centered_cross, one_blas_thread
        from geomprobe.similarity import nuclear_norm

        a, b = prepare_layer(X), prepare_layer(Y)
        M = centered_cross(a.Z, b.Z, a.mean, b.mean)

        def svd_sum():
            with one_blas_thread():
                return np.linalg.svd(M, compute_uv=False).sum()
        add("  nuclear norm of the 4,096^2 cross term: SVD (before)", svd_sum, 3.0, "nuclear")
        add("  nuclear norm of the 4,096^2 cross term: eigvalsh(M^T M) (now)", lambda: nuclear_norm(M, rel_tol=1e-8),
            3.0, "nuclear")
    return rows


def train_overhead(epochs: int) -> list[tuple]:
    import torch

    from geomprobe.trainers import models as Mo
    from geomprobe.trainers.scores import ScoreRecorder
    from geomprobe.trainers.train import TrainConfig, train

    n = 5000
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 32, 32, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    times = {False: [], True: []}
    finish, inside, own = [], [], []
    for rep in range(epochs):
        for rec_on in (False, True):
            model = Mo.build_model("alexnet", (1, 32, 32), 10, width=0.125, seed=0)
            rec = ScoreRecorder(n, el2n_epoch=1, grad_norms=True) if rec_on else None
            if rec is not None:  # time on_batch / end_epoch (inside the epoch) and finish() (once) separately
                for meth in ("on_batch", "end_epoch"):
                    def timed_m(*a, _o=getattr(rec, meth), **k):
                        t = time.perf_counter()
                        r = _o(*a, **k)
                        inside.append(time.perf_counter() - t)
                        return r
                    setattr(rec, meth, timed_m)
                inside_before = len(inside)
                orig = rec.finish

                def timed(*a, _o=orig, **k):
                    t = time.perf_counter()
                    r = _o(*a, **k)
                    finish.append(time.perf_counter() - t)
                    return r
                rec.finish = timed
            import tempfile

            with tempfile.TemporaryDirectory() as out:
                res = train(model, x, y, cfg=TrainConfig(epochs=1, batch_size=128, optimizer="adam", lr=1e-3,
                                                         progress="off", keep_every=0), out=out, scores=rec)
            times[rec_on].append(res.history[-1]["time"])
            if rec is not None:
                own.append(sum(inside[inside_before:]))
    t_off, t_on = min(times[False]), min(times[True])
    return [("training epoch, no recorder (AlexNet/8, 5,000 images)", t_off, None),
            ("training epoch, ScoreRecorder (forgetting, AUM, EL2N)", t_on, 1.05),
            ("  of which the recorder's own calls (on_batch + end_epoch)", min(own), 0.05),
            ("after training: per-layer gradient norms + scores.csv (once)", min(finish), None)]


def observe(run: str) -> None:
    """Per-subset scores (train/scores.csv) and per-layer companion rows of the final epoch
    (acts_final.npz) of a finished label-noise-geometry run folder, as markdown tables."""
    from pathlib import Path

    from geomprobe.companion import companion_rows
    from geomprobe.io import open_activations
    from geomprobe.scores import read_scores, score_summary

    outp = Path(run)
    t = read_scores(outp)
    s = score_summary(t)
    print(f"{run}: EL2N at epoch {t.meta.get('el2n_epoch')}, {t.meta.get('epochs')} epochs")
    print("| subset | n | forgetting (learned) | never learned | EL2N | AUM |")
    print("|---|---|---|---|---|---|")
    for sub, d in s.per_subset.items():
        print(f"| {sub} | {d['n']:.0f} | {d['forgetting_mean']:.2f} | {d['never_learned_frac']:.2f} | "
              f"{d['el2n_mean']:.3f} | {d['aum_mean']:.2f} |")
    print("AUROC permuted vs unpermuted: " + ", ".join(f"{k} {v:.2f}" for k, v in s.auroc.items()))
    with open_activations(outp / "acts_final.npz") as f:
        subs = f.subsets()
        print("\n| layer | PR (unperm) | NC1 (unperm) | probe true labels (unperm) | probe noisy labels (permuted) "
              "| probe true labels (restored) |")
        print("|---|---|---|---|---|---|")
        for layer in f.layers:
            X = f.layer(layer)
            vals = {}
            for name in ("unpermuted", "permuted", "restored"):
                sub = subs[name]
                rows, _ = companion_rows(X[sub.rows], sub.labels, np.random.default_rng(0))
                vals[name] = {m: v for m, c, v in rows}
            u = vals["unpermuted"]
            print(f"| {layer} | {u['participation_ratio']:.1f} | {u['nc1']:.3g} | {u['linear_probe_acc']:.2f} | "
                  f"{vals['permuted']['linear_probe_acc']:.2f} | {vals['restored']['linear_probe_acc']:.2f} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true", help="n = 12,500 instead of 50,000")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--skip-layers", action="store_true")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--only", help="comma-separated rows: pr,spectrum,collapse,probe,averaging,cka,procrustes,pair,nuclear")
    ap.add_argument("--observe", metavar="RUN", help="tables of a finished label-noise-geometry run folder")
    a = ap.parse_args()
    if a.observe is not None:
        observe(a.observe)
        return
    n, d = (12_500 if a.small else 50_000), 4096
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    import atexit

    atexit.register(lambda: print(f"load average at the end {os.getloadavg()[0]:.1f}"))
    if not a.skip_layers:
        print(f"\n| n = {n:,} x d = {d:,} float32 | time | / X.T @ X | target |")
        print("|---|---|---|---|", flush=True)
        layer_measures(n, d, a.repeats, None if a.only is None else set(a.only.split(",")))  # prints each row
    if not a.skip_train:
        rows = train_overhead(a.epochs)
        base = rows[0][1]
        print("\n| training (CPU) | time | / epoch without | target |")
        print("|---|---|---|---|")
        for name, t, target in rows:
            print(f"| {name} | {t:.2f} s | {t / base:.3f} | {'' if target is None else f'<= {target:g}'} |")


if __name__ == "__main__":
    main()
