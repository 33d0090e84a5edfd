"""geomprobe: measure how a neural network stores what it learns.

The core is framework-agnostic (numpy, numba, scipy, cvxpy) and never imports torch.
"""
from ._validation import AnalysisError, GeomprobeError, InputError

__version__ = "0.1.0"

__all__ = ["AnalysisError", "GeomprobeError", "InputError", "__version__"]
