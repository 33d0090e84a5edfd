"""geomprobe: measure how a neural network stores what it learns.

The core is framework-agnostic (numpy, numba, scipy, cvxpy) and never imports torch.
"""
from ._validation import AnalysisError, GeomprobeError, InputError
from .alignment import (
    AlignmentAccumulator,
    alignment,
    cosine_stiffness,
    gradient_confusion,
    gradient_diversity,
    minibatch_alignment,
    pairwise_stats,
    sign_stiffness,
)
from .io import ActivationFile, open_activations, save_activations

__version__ = "0.1.0"

__all__ = [
    "ActivationFile",
    "AlignmentAccumulator",
    "AnalysisError",
    "GeomprobeError",
    "InputError",
    "__version__",
    "alignment",
    "cosine_stiffness",
    "gradient_confusion",
    "gradient_diversity",
    "minibatch_alignment",
    "open_activations",
    "pairwise_stats",
    "save_activations",
    "sign_stiffness",
]
