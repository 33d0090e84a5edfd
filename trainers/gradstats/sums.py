"""Per-class sums of one tensor's per-example gradients and their statistics.

The formulas (Omega, diversity, mean cosine stiffness) are the core's
(:func:`geomprobe.alignment_sums.stats_from_sums`); this module only holds the sums, merges them and
formats the JSON-able result (undefined values are None, never NaN).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from geomprobe._validation import InputError
from geomprobe.alignment_sums import stats_from_sums


@dataclass
class TensorSums:
    """Additive sums of one tensor's per-example gradients, per class (float64).

    ``n``, ``n_nonzero`` (examples with ||g_i|| > 0), ``sum_norm`` (sum ||g_i||), ``sum_sq``
    (sum ||g_i||^2) are arrays of length K over ``classes``. Either the vectors ``sum_g`` / ``sum_unit``
    (K x d: sum g_i and sum g_i/||g_i|| per class; mergeable across batches) are kept, or only the
    scalars needed for one batch's statistics: ``sq_g`` / ``sq_unit`` (K: ||sum_{i in c} g_i||^2 and
    ||sum_{i in c} u_i||^2) and ``total_sq_g`` / ``total_sq_unit`` (the same over all examples).
    """

    classes: list[int]
    n: np.ndarray
    n_nonzero: np.ndarray
    sum_norm: np.ndarray
    sum_sq: np.ndarray
    shape: tuple[int, ...]
    sum_g: torch.Tensor | None = None
    sum_unit: torch.Tensor | None = None
    sq_g: np.ndarray | None = None
    sq_unit: np.ndarray | None = None
    total_sq_g: float | None = None
    total_sq_unit: float | None = None

    @property
    def mergeable(self) -> bool:
        return self.sum_g is not None

    def merge(self, other: "TensorSums") -> "TensorSums":
        if not (self.mergeable and other.mergeable):
            raise InputError("only sums made with gradient_sums(...) (vectors kept) can be merged")
        if tuple(self.shape) != tuple(other.shape):
            raise InputError(f"cannot merge sums of shape {self.shape} with sums of shape {other.shape}")
        classes = sorted(set(self.classes) | set(other.classes))
        pos = {c: k for k, c in enumerate(classes)}
        K = len(classes)
        dev = self.sum_g.device
        d = self.sum_g.shape[1]
        out = {k: np.zeros(K) for k in ("n", "n_nonzero", "sum_norm", "sum_sq")}
        sg = torch.zeros(K, d, dtype=torch.float64, device=dev)
        su = torch.zeros(K, d, dtype=torch.float64, device=dev)
        for src in (self, other):
            idx = [pos[c] for c in src.classes]
            for k in out:
                np.add.at(out[k], idx, getattr(src, k))
            ii = torch.as_tensor(idx, device=dev, dtype=torch.long)
            sg.index_add_(0, ii, src.sum_g.to(dev))
            su.index_add_(0, ii, src.sum_unit.to(dev))
        return TensorSums(classes, out["n"], out["n_nonzero"], out["sum_norm"], out["sum_sq"],
                          tuple(self.shape), sum_g=sg, sum_unit=su)

    def to_accumulator(self):
        """The same sums as a torch-free ``geomprobe.alignment.AlignmentAccumulator`` (numpy float64).

        Its ``compute()`` adds what the scalars here do not give, e.g. the between-class cosine
        stiffness matrix. Needs sums made by :func:`gradient_sums` (vectors kept).
        """
        if not self.mergeable:
            raise InputError("to_accumulator needs sums made with gradient_sums(...) (vectors kept)")
        from geomprobe.alignment import AlignmentAccumulator

        acc = AlignmentAccumulator()
        classes = np.asarray(self.classes, np.int64)
        idx = acc._ensure(classes, int(self.sum_g.shape[1]))
        acc.counts[idx] = np.rint(self.n).astype(np.int64)
        acc.nonzero[idx] = np.rint(self.n_nonzero).astype(np.int64)
        acc.norm_sum[idx] = self.sum_norm
        acc.sq_sum[idx] = self.sum_sq
        acc.S[idx] = self.sum_g.cpu().numpy()
        acc.U[idx] = self.sum_unit.cpu().numpy()
        return acc

    def scalars(self):
        """(sq_g, sq_unit, total_sq_g, total_sq_unit) from whichever form is stored."""
        if not self.mergeable:
            return self.sq_g, self.sq_unit, self.total_sq_g, self.total_sq_unit
        sq_g = self.sum_g.pow(2).sum(1).cpu().numpy()
        sq_u = self.sum_unit.pow(2).sum(1).cpu().numpy()
        return sq_g, sq_u, float(self.sum_g.sum(0).pow(2).sum()), float(self.sum_unit.sum(0).pow(2).sum())

    def stats(self) -> dict:
        sq_g, sq_u, tot_g, tot_u = self.scalars()
        return summarise(self.classes, self.n, self.n_nonzero, self.sum_norm, self.sum_sq, sq_g, sq_u,
                         tot_g, tot_u, self.shape)


@dataclass
class GradientSums:
    """Mergeable per-tensor sums (``tensors[name] -> TensorSums`` with vectors kept).

    ``a.merge(b)`` (or ``a + b``) adds the sums of two batches / workers; ``stats()`` gives the same
    dict as :func:`gradient_stats` but for all merged examples together (a whole-dataset statistic,
    which differs from the mean of per-batch statistics).
    """

    tensors: dict[str, TensorSums] = field(default_factory=dict)

    def merge(self, other: "GradientSums") -> "GradientSums":
        if not self.tensors:
            return GradientSums(dict(other.tensors))
        if not other.tensors:
            return GradientSums(dict(self.tensors))
        if set(self.tensors) != set(other.tensors):
            raise InputError(
                f"cannot merge gradient sums over different tensors: {sorted(self.tensors)} vs {sorted(other.tensors)}"
            )
        return GradientSums({k: v.merge(other.tensors[k]) for k, v in self.tensors.items()})

    __add__ = merge

    def stats(self) -> dict[str, dict]:
        return {k: v.stats() for k, v in self.tensors.items()}


def _val(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _mean(values):
    vals = [v for v in values if v is not None]
    return float(sum(vals) / len(vals)) if vals else None


def entry(classes, per_class_vals, overall, shape) -> dict:
    """One tensor's result (plain JSON-able types; undefined values are None)."""
    per_class = {str(c): v for c, v in zip(classes, per_class_vals)}
    return {
        "shape": [int(s) for s in shape],
        **overall,
        "omega_in_class": _mean(v["omega"] for v in per_class_vals),
        "stiffness_in_class": _mean(v["stiffness"] for v in per_class_vals),
        "n_classes": len(classes),
        "classes_skipped": [int(c) for c, v in zip(classes, per_class_vals) if v["n"] < 2],
        "per_class": per_class,
    }


def summarise(classes, n, n_nonzero, sum_norm, sum_sq, sq_g, sq_u, tot_g, tot_u, shape) -> dict:
    n = np.asarray(n, np.float64)
    keep = n > 0  # classes declared (num_classes) but absent from the batch are left out
    classes = [c for c, k in zip(classes, keep) if k]
    n, n_nonzero, sum_norm, sum_sq, sq_g, sq_u = (np.asarray(a, np.float64)[keep] for a in
                                                   (n, n_nonzero, sum_norm, sum_sq, sq_g, sq_u))
    pc = stats_from_sums(n, n_nonzero, sum_norm, sum_sq, sq_g, sq_u)
    N, M = float(n.sum()), float(n_nonzero.sum())
    al = stats_from_sums(N, M, sum_norm.sum(), sum_sq.sum(), tot_g, tot_u)
    per = []
    for k in range(len(classes)):
        nk = int(round(n[k]))
        per.append({
            "n": nk,
            "omega": _val(pc.omega[k]),
            "stiffness": _val(pc.cosine_stiffness[k]),
            "n_zero": nk - int(round(n_nonzero[k])),
            "diversity": _val(pc.diversity[k]),
            "mean_norm": float(sum_norm[k] / nk),
        })
    Ni = int(round(N))
    overall = {
        "n": Ni,
        "mean_norm": float(sum_norm.sum() / Ni) if Ni else None,
        "omega": _val(al.omega[0]),
        "stiffness": _val(al.cosine_stiffness[0]),
        "n_zero": Ni - int(round(M)),
        "diversity": _val(al.diversity[0]),
    }
    return entry(classes, per, overall, shape)
