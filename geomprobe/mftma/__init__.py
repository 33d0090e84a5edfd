"""MFTMA: replica mean-field theoretic manifold analysis (spec: shared/spec/mftma.md).

Public API: manifold_analysis, empirical_capacity, anchor_points, ball_capacity (and their results),
mftma_rows (long-format rows for the command line).
"""
from .anchors import AnchorResult, anchor_points
from .capacity import ManifoldAnalysisResult, ball_capacity, manifold_analysis
from .rows import mftma_rows
from .simcap import EmpiricalCapacityResult, empirical_capacity

__all__ = [
    "AnchorResult",
    "EmpiricalCapacityResult",
    "ManifoldAnalysisResult",
    "anchor_points",
    "ball_capacity",
    "empirical_capacity",
    "manifold_analysis",
    "mftma_rows",
]
