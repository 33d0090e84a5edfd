"""Cost of per-example score recording (issue 19): training epochs with and without a ScoreRecorder,
side by side in one run, printed as a table. Target: recording adds <= 5 % to an epoch.

The network and data shape of the label-noise small preset: AlexNet at 1/8 width on 32 x 32 one-channel
images, 10 classes, batch 128, Adam (random images: timing only). Epochs with and without the recorder
alternate (off, on, off, on, ...) on fresh models so that a change of machine load hits both; the table
gives the median and best of each, and the recorder's own calls (on_batch + end_epoch) timed inside
the recorded epochs, which does not depend on the load of the rest of the epoch. The one-off work after
training (per-layer gradient norms of every example and writing scores.csv) is timed separately with
``--grad-norms``.

Run:  python bench/bench_scores.py [--n 5000] [--epochs 3] [--device cpu|cuda] [--grad-norms]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time


def _timed(obj, name: str, sink: list) -> None:
    """Wrap obj.name so that each call's duration is appended to sink."""
    orig = getattr(obj, name)

    def wrapper(*a, **k):
        t = time.perf_counter()
        r = orig(*a, **k)
        sink.append(time.perf_counter() - t)
        return r
    setattr(obj, name, wrapper)


def run(n: int, epochs: int, device: str, grad_norms: bool) -> dict:
    import torch

    from geomprobe.trainers import models as Mo
    from geomprobe.trainers.scores import ScoreRecorder
    from geomprobe.trainers.train import TrainConfig, train

    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 32, 32, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    epoch_time = {False: [], True: []}
    own, after = [], []
    for _ in range(epochs):
        for rec_on in (False, True):
            model = Mo.build_model("alexnet", (1, 32, 32), 10, width=0.125, seed=0)
            rec = ScoreRecorder(n, el2n_epoch=1, grad_norms=grad_norms) if rec_on else None
            calls: list[float] = []
            if rec is not None:
                _timed(rec, "on_batch", calls)
                _timed(rec, "end_epoch", calls)
                _timed(rec, "finish", after)
            with tempfile.TemporaryDirectory() as out:
                res = train(model, x, y, cfg=TrainConfig(epochs=1, batch_size=128, optimizer="adam", lr=1e-3,
                                                         progress="off", keep_every=0, device=device),
                            out=out, scores=rec)
            epoch_time[rec_on].append(res.history[-1]["time"])
            if rec is not None:
                own.append(sum(calls))
    return {"off": epoch_time[False], "on": epoch_time[True], "own": own, "after": after}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=5000, help="training images (small preset: 5,000)")
    ap.add_argument("--epochs", type=int, default=3, help="epochs of each kind (alternating)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--grad-norms", action="store_true", help="also time the one-off per-layer gradient norms")
    a = ap.parse_args()
    load0 = os.getloadavg()
    r = run(a.n, a.epochs, a.device, a.grad_norms)
    load1 = os.getloadavg()
    off_med, on_med = statistics.median(r["off"]), statistics.median(r["on"])
    own_med = statistics.median(r["own"])
    print(f"device {a.device}, {os.cpu_count()} cores; load average {load0[0]:.1f} at the start, {load1[0]:.1f} at "
          f"the end; {a.n:,} images, batch 128, {a.epochs} epoch(s) of each kind alternating\n")
    print("| one training epoch | median | best | / median without |")
    print("|---|---|---|---|")
    print(f"| without recorder | {off_med:.2f} s | {min(r['off']):.2f} s | 1.000 |")
    print(f"| with ScoreRecorder (forgetting, AUM, EL2N) | {on_med:.2f} s | {min(r['on']):.2f} s | "
          f"{on_med / off_med:.3f} |")
    print(f"| of which the recorder's own calls (on_batch + end_epoch) | {own_med:.3f} s | {min(r['own']):.3f} s | "
          f"{own_med / off_med:.4f} (target <= 0.05) |")
    if r["after"]:
        t = statistics.median(r["after"])
        what = "per-layer gradient norms + scores.csv" if a.grad_norms else "scores.csv (no --grad-norms)"
        print(f"| once after training: {what} | {t:.2f} s | {min(r['after']):.2f} s | "
              f"{t / off_med:.3f} |")
    print("\nper-epoch times without: " + ", ".join(f"{t:.2f}" for t in r["off"])
          + "; with: " + ", ".join(f"{t:.2f}" for t in r["on"]))


if __name__ == "__main__":
    main()
