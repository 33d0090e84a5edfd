"""Training-time gradient statistics without per-example gradient tensors (spec alignment.md §3, §4).

For a layer whose per-example weight gradient is ``g_i = D_i^T A_i`` (inputs ``A_i``, output
gradients ``D_i`` of the per-example loss, T positions), everything the alignment measures need comes
from additive sums that one forward and one backward give:

* ``sum_i g_i = Delta^T A`` (the ordinary sum-reduced gradient);
* ``||g_i||^2 = ||d_i||^2 ||a_i||^2`` (T = 1) or ``<D_i D_i^T, A_i A_i^T>_F`` (T > 1);
* ``sum_i g_i/||g_i|| = (Delta with row i scaled by 1/||g_i||)^T A`` (no extra backward);
* for T = 1 the Gram ``<g_i, g_j> = <d_i, d_j><a_i, a_j>``.

:func:`recorder` takes them from a training step's own backward; :func:`gradient_stats` is the
one-shot convenience over it; :func:`per_example_norms` and :func:`write_gradients` give per-example
gradient norms by tensor or layer and stream per-example gradients into an activations file.
:func:`register_rule` adds a module type. Also here: the label-dependent / label-independent
gradient split, the normalised loss and the relative weight distance. See docs/trainers_gradstats.md.
"""
from .engine import DEFAULT_BUDGET as _DEFAULT_BUDGET
from .engine import block_sq as _block_sq
from .oneshot import (gradient_stats, gradient_stats_oracle, gradient_sums, oracle_gradients,
                      per_example_cross_entropy, per_example_norms, write_gradients)
from .recorder import GradientRecorder, recorder
from .rules import Explicit, Factors, Scatter, register_rule
from .split import gradient_split, gradient_split_norms, normalized_loss, relative_weight_distance
from .sums import GradientSums, TensorSums

__all__ = [
    "recorder",
    "GradientRecorder",
    "gradient_stats",
    "gradient_sums",
    "gradient_stats_oracle",
    "oracle_gradients",
    "per_example_norms",
    "write_gradients",
    "register_rule",
    "Factors",
    "Explicit",
    "Scatter",
    "GradientSums",
    "TensorSums",
    "gradient_split",
    "gradient_split_norms",
    "normalized_loss",
    "relative_weight_distance",
    "per_example_cross_entropy",
]


def _sq_norms(D, A, budget=_DEFAULT_BUDGET):
    """||g_i||^2 of g_i = D_i^T A_i, D (n, T, p), A (n, T, q) (tests)."""
    return _block_sq(Factors(D, A), budget)
