"""GLUE capacity vs simulated capacity on a Fashion-MNIST layer of a trained MLP (issue 18).

    nice -n 5 python bench/glue_fashion_check.py            # about 1-3 min on 2 cores
    python bench/glue_fashion_check.py --data DIR           # idx files elsewhere

Trains a 784-256-128-10 ReLU MLP (torch, one thread, --epochs passes over --n-train training
images, Adam 1e-3, seed 0), takes a hidden layer (after ReLU; --layer 1: 256 units, the default, 2: 128 units) of --per-class test
images of each of the 10 classes, and compares, for the `random` and the `one_vs_rest` ensembles:
GLUE (geomprobe.glue_analysis, n_t samples) against the simulation of the same ensemble
(geomprobe.empirical_capacity, hyperplanes through the origin as GLUE's QP, n_rep trials). The
mean of the simulated critical dimension minus 1/2 estimates GLUE's E[a] (docs/glue.md); the
table gives both with their standard errors, P / N_c of the bisection, the relative difference and
the number of simulated trials never separable in all N dimensions (critical n censored at N + 1:
then the simulation cannot check GLUE; relu2 with M = 50 is such a case for one-vs-rest).
Fashion-MNIST idx files: `dpkg -L dataset-fashion-mnist` (default /usr/share/datasets/fashion-mnist).
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np


def load(data: str):
    from geomprobe.trainers.data import read_idx

    def rd(name):
        for ext in ("", ".gz"):
            p = os.path.join(data, name + ext)
            if os.path.exists(p):
                return read_idx(p)
        raise SystemExit(f"{name}[.gz] not found in {data}")

    xtr = rd("train-images-idx3-ubyte").reshape(-1, 784).astype(np.float32) / 255.0
    ytr = rd("train-labels-idx1-ubyte").astype(np.int64)
    xte = rd("t10k-images-idx3-ubyte").reshape(-1, 784).astype(np.float32) / 255.0
    yte = rd("t10k-labels-idx1-ubyte").astype(np.int64)
    return xtr, ytr, xte, yte


def train_layer(xtr, ytr, xte, *, n_train, epochs, seed, layer):
    import torch

    torch.manual_seed(seed)
    torch.set_num_threads(1)
    net = torch.nn.Sequential(torch.nn.Linear(784, 256), torch.nn.ReLU(), torch.nn.Linear(256, 128),
                              torch.nn.ReLU(), torch.nn.Linear(128, 10))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    g = np.random.default_rng(seed)
    idx = g.permutation(xtr.shape[0])[:n_train]
    X = torch.from_numpy(xtr[idx])
    Y = torch.from_numpy(ytr[idx])
    for _ in range(epochs):
        perm = torch.from_numpy(g.permutation(n_train))
        for i in range(0, n_train, 128):
            b = perm[i:i + 128]
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(net(X[b]), Y[b])
            loss.backward()
            opt.step()
    with torch.no_grad():
        h = net[:2 * layer](torch.from_numpy(xte)).numpy().astype(np.float64)
        acc = float((net(torch.from_numpy(xte)).argmax(1).numpy() == test_labels).mean())
    return h, acc


def main(argv=None):
    global test_labels
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--n-train", type=int, default=20000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--per-class", type=int, default=50)
    ap.add_argument("--n-t", type=int, default=400)
    ap.add_argument("--n-rep", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ensembles", default="random,one_vs_rest")
    ap.add_argument("--layer", type=int, choices=(1, 2), default=1,
                    help="hidden layer: 1 = relu1 (N = 256, default), 2 = relu2 (N = 128)")
    args = ap.parse_args(argv)
    from geomprobe import empirical_capacity, glue_analysis

    t0 = time.perf_counter()
    xtr, ytr, xte, yte = load(args.data)
    test_labels = yte
    h, acc = train_layer(xtr, ytr, xte, n_train=args.n_train, epochs=args.epochs, seed=args.seed,
                         layer=args.layer)
    g = np.random.default_rng(args.seed + 1)
    Xs = [h[g.choice(np.flatnonzero(yte == c), args.per_class, replace=False)] for c in range(10)]
    print(f"# MLP 784-256-128-10, {args.epochs} epochs on {args.n_train} images: test accuracy {acc:.3f}; "
          f"layer relu{args.layer} (N = {h.shape[1]}), P = 10 classes x M = {args.per_class} test images; "
          f"load average {os.getloadavg()[0]:.1f}; training {time.perf_counter() - t0:.0f} s", flush=True)
    print(f"{'ensemble':<12}{'GLUE cap':>10}{'E[a] +- se':>18}{'sim crit-1/2 +- se':>22}{'sim P/N_c':>11}"
          f"{'rel diff':>10}{'mean-based':>11}{'never sep':>10}{'fallbacks':>10}")
    worst = 0.0
    for dich in args.ensembles.split(","):
        r = glue_analysis(Xs, dichotomies=dich, n_t=args.n_t, seed=args.seed + 2)
        e = empirical_capacity(Xs, dichotomies=dich, n_rep=args.n_rep, seed=args.seed + 3, bias=False)
        crit = e.critical_n.astype(float)
        se_a = r.a.std(ddof=1) / np.sqrt(r.a.size)
        se_c = crit.std(ddof=1) / np.sqrt(crit.size)
        rel = r.capacity / e.capacity - 1
        worst = max(worst, abs(rel))
        print(f"{dich:<12}{r.capacity:>10.4f}{r.E_a:>11.2f} +- {se_a:4.2f}{crit.mean() - 0.5:>15.2f} +- {se_c:4.2f}"
              f"{e.capacity:>11.4f}{rel:>+10.1%}{(crit.mean() - 0.5) / r.E_a - 1:>+11.1%}{int((crit > h.shape[1]).sum()):>10d}{r.n_cvxpy_fallback:>10d}",
              flush=True)
    print(f"# largest |GLUE / simulated - 1| = {worst:.1%} (target <= 5 %); n_t = {args.n_t}, n_rep = {args.n_rep}; "
          f"total {time.perf_counter() - t0:.0f} s")


test_labels = None

if __name__ == "__main__":
    main()
