"""Alignment statistics from additive sums, for callers that form the sums themselves.

The torch trainers (``geomprobe.trainers.gradstats``) compute, per class, ``n``, the number of
non-zero vectors ``m``, ``sum ||v||``, ``sum ||v||^2``, ``||sum v||^2`` and ``||sum v/||v|| ||^2``
without ever materialising the vectors; this module turns those numbers into Omega, gradient
diversity and mean cosine stiffness with the formulas of :mod:`geomprobe.alignment` (one home per
measure: nothing is re-derived here). Undefined values are NaN (diversity with ``||sum v|| = 0`` and
``sum ||v||^2 > 0`` is ``inf``), exactly as ``AlignmentAccumulator.compute`` gives them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .alignment import _diversity, _mean_cos, omega_from_sums

__all__ = ["SumStats", "stats_from_sums"]


@dataclass(frozen=True)
class SumStats:
    """Per-row statistics (one row per class, or one row overall); NaN where undefined."""

    omega: np.ndarray
    diversity: np.ndarray
    cosine_stiffness: np.ndarray


def stats_from_sums(n, n_nonzero, sum_norm, sum_sq_norm, sq_norm_of_sum, sq_norm_of_unit_sum) -> SumStats:
    """Omega, diversity and mean cosine stiffness for each row of the given 1-D sums (float64).

    ``n``: vectors per row; ``n_nonzero``: of them non-zero (zero vectors have no direction and are
    left out of the cosine mean); ``sum_norm`` = sum ||v||; ``sum_sq_norm`` = sum ||v||^2;
    ``sq_norm_of_sum`` = ||sum v||^2; ``sq_norm_of_unit_sum`` = ||sum v/||v|| ||^2 over non-zero v.
    """
    arrs = [np.atleast_1d(np.asarray(a, np.float64)) for a in
            (n, n_nonzero, sum_norm, sum_sq_norm, sq_norm_of_sum, sq_norm_of_unit_sum)]
    n, m, sn, ssq, sqs, squ = np.broadcast_arrays(*arrs)
    omega = np.array([omega_from_sums(float(n[k]), float(sqs[k]), float(sn[k]), float(ssq[k]))
                      for k in range(n.size)])
    div = np.array([_diversity(float(ssq[k]), float(sqs[k])) for k in range(n.size)])
    cos = np.array([_mean_cos(float(squ[k]), int(round(m[k]))) for k in range(n.size)])
    return SumStats(omega, div, cos)
