"""Label noise of paper 003 (appendix A.3): a seeded permutation of a fraction eps of training labels.

The chosen examples' labels are shuffled among themselves. A permuted example may land on its true
label by chance; it still counts as permuted (otherwise the permuted label would carry information
about the true one, see the paper's A.3).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from geomprobe._validation import InputError, check_labels, check_seed

__all__ = ["LabelNoise", "permute_labels"]


@dataclass(frozen=True)
class LabelNoise:
    """true_labels, train_labels (what the net is trained on) and the permuted mask, all (n,)."""

    true_labels: np.ndarray
    train_labels: np.ndarray
    permuted: np.ndarray
    eps: float
    seed: int | None

    @property
    def n_permuted(self) -> int:
        return int(self.permuted.sum())

    @property
    def n_changed(self) -> int:
        """Permuted examples whose training label differs from the true one."""
        return int((self.train_labels != self.true_labels).sum())

    def save(self, path) -> None:
        np.savez(path, true_labels=self.true_labels, train_labels=self.train_labels, permuted=self.permuted,
                 eps=np.float64(self.eps), seed=np.int64(-1 if self.seed is None else self.seed))

    @classmethod
    def load(cls, path) -> "LabelNoise":
        with np.load(path, allow_pickle=False) as z:
            seed = int(z["seed"])
            return cls(z["true_labels"].astype(np.int64), z["train_labels"].astype(np.int64),
                       z["permuted"].astype(bool), float(z["eps"]), None if seed < 0 else seed)


def permute_labels(labels, eps: float, seed: int) -> LabelNoise:
    """Choose round(eps * n) examples with a seeded Generator and permute their labels among them."""
    y = check_labels(labels)
    try:
        eps = float(eps)
    except (TypeError, ValueError):
        raise InputError(f"eps must be a number in [0, 1], got {eps!r}") from None
    if not 0.0 <= eps <= 1.0:
        raise InputError(f"eps must be a number in [0, 1], got {eps}")
    rng = check_seed(seed)
    n = y.size
    k = int(round(eps * n))
    chosen = np.sort(rng.choice(n, size=k, replace=False)) if k else np.zeros(0, np.int64)
    train = y.copy()
    train[chosen] = y[chosen][rng.permutation(k)]
    mask = np.zeros(n, bool)
    mask[chosen] = True
    return LabelNoise(y.copy(), train, mask, eps, None if isinstance(seed, np.random.Generator) else int(seed))
