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
        """Write atomically (a temporary file renamed over ``path``): never a half-written file."""
        import io

        from geomprobe.io import atomic_write_bytes

        buf = io.BytesIO()
        np.savez(buf, true_labels=self.true_labels, train_labels=self.train_labels, permuted=self.permuted,
                 eps=np.float64(self.eps), seed=np.int64(-1 if self.seed is None else self.seed))
        atomic_write_bytes(path, buf.getvalue(), force=True)

    @classmethod
    def load(cls, path) -> "LabelNoise":
        """Read a file written by :meth:`save`; a damaged or foreign file is an InputError naming it."""
        try:
            with np.load(path, allow_pickle=False) as z:
                keys = ("true_labels", "train_labels", "permuted", "eps", "seed")
                missing = [k for k in keys if k not in z.files]
                if missing:
                    raise InputError(f"{path}: not a label-noise file: missing {', '.join(missing)} "
                                     f"(holds {', '.join(z.files) or 'nothing'})")
                true, train, perm = (np.asarray(z[k]) for k in keys[:3])
                seed, eps = int(z["seed"]), float(z["eps"])
        except InputError:
            raise
        except Exception as exc:  # zipfile, pickle refusal, OSError, ValueError: a damaged file
            raise InputError(f"{path}: not a readable label-noise file ({type(exc).__name__}: {exc}); delete it or "
                             "pass --force to start the run over") from None
        if not (true.ndim == train.ndim == perm.ndim == 1 and true.shape == train.shape == perm.shape):
            raise InputError(f"{path}: true_labels, train_labels and permuted must be 1-D of one length, got "
                             f"{true.shape}, {train.shape}, {perm.shape}")
        return cls(true.astype(np.int64), train.astype(np.int64), perm.astype(bool), eps, None if seed < 0 else seed)


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
