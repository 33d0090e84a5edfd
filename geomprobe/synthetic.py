"""Seeded synthetic activations (no torch): class manifolds that separate more in deeper "layers",
with a label-noise (permuted) subset that deeper layers memorise. Used by ``geomprobe demo`` and tests.
"""
from __future__ import annotations

import numpy as np

from ._validation import check_positive_int, check_seed

__all__ = ["synthetic_activations"]


def synthetic_activations(
    seed=0,
    *,
    n_classes: int = 10,
    per_class: int = 40,
    n_test_per_class: int = 20,
    n_layers: int = 4,
    dim: int = 64,
    permuted_fraction: float = 0.5,
) -> dict:
    """Return the arguments of :func:`geomprobe.io.save_activations` for a synthetic network.

    Layer l (t = l / (n_layers - 1)) maps an example of true class c with noise u to
    ``(0.3 + 1.7 t) mu_c + u`` for clean and test examples; a permuted training example (training
    label c') drifts to ``(0.3 + 1.7 t)((1 - t^2) mu_c + t^2 mu_c') + u``, i.e. deeper layers
    memorise its wrong label, as in paper 003.
    """
    rng = check_seed(seed)
    K = check_positive_int(n_classes, "n_classes", minimum=2)
    m = check_positive_int(per_class, "per_class", minimum=2)
    mt = check_positive_int(n_test_per_class, "n_test_per_class")
    L = check_positive_int(n_layers, "n_layers", minimum=2)
    d = check_positive_int(dim, "dim", minimum=2)
    mu = rng.standard_normal((K, d)) * (1.0 / np.sqrt(d)) * 3.0
    labels = np.concatenate([np.repeat(np.arange(K), m), np.repeat(np.arange(K), mt)])
    n_train = K * m
    split = np.array(["train"] * n_train + ["test"] * (K * mt))
    permuted = np.zeros(labels.size, bool)
    n_perm = int(round(permuted_fraction * n_train))
    chosen = rng.choice(n_train, size=n_perm, replace=False)
    permuted[chosen] = True
    train_labels = labels.copy()
    train_labels[chosen] = labels[chosen][rng.permutation(n_perm)]  # a permutation (paper 003, A.3)
    noise = rng.standard_normal((labels.size, d)) * (1.0 / np.sqrt(d))
    acts = {}
    for layer in range(L):
        t = layer / (L - 1)
        scale = 0.3 + 1.7 * t
        target = mu[labels].copy()
        target[permuted] = (1 - t * t) * mu[labels[permuted]] + t * t * mu[train_labels[permuted]]
        acts[f"layer{layer + 1}"] = (scale * target + noise).astype(np.float32)
    return {
        "labels": labels,
        "activations": acts,
        "train_labels": train_labels,
        "permuted": permuted,
        "split": split,
        "meta": {"provenance": "geomprobe.synthetic.synthetic_activations", "seed": seed if isinstance(seed, int) else None,
                 "n_classes": K, "per_class": m, "n_layers": L, "dim": d, "permuted_fraction": permuted_fraction},
    }
