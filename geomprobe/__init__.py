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
from .glue import GlueResult, glue_analysis
from .collapse import CollapseResult, neural_collapse
from .companion import companion_rows
from .io import ActivationFile, open_activations, save_activations
from .linear_probe import ProbeResult, linear_probe
from .writer import ActivationWriter
from .mftma import (
    AnchorResult,
    EmpiricalCapacityResult,
    ManifoldAnalysisResult,
    anchor_points,
    ball_capacity,
    empirical_capacity,
    manifold_analysis,
)
from .probes import (
    averaging_classifier,
    frobenius_norm_product,
    layerwise_collapse,
    make_probe_inputs,
    normalized_loss,
    normalized_loss_fit,
    one_layer_linear_prediction,
    one_layer_linear_solution,
    probe_correlations,
    probe_heatmap,
    weight_distance,
)
from .scores import ScoreTable, aum_margin, el2n, forgetting_events, read_scores, score_summary
from .similarity import (SimilarityResult, layer_similarity, linear_cka, procrustes_distance, similarity_rows,
                         write_similarity_csv)
from .spectral import SpectrumResult, effective_rank, participation_ratio, spectrum

__version__ = "0.1.0"

__all__ = [
    "CollapseResult",
    "ProbeResult",
    "ScoreTable",
    "SimilarityResult",
    "SpectrumResult",
    "aum_margin",
    "companion_rows",
    "effective_rank",
    "el2n",
    "forgetting_events",
    "layer_similarity",
    "linear_cka",
    "linear_probe",
    "neural_collapse",
    "participation_ratio",
    "procrustes_distance",
    "read_scores",
    "score_summary",
    "similarity_rows",
    "spectrum",
    "write_similarity_csv",
    "ActivationFile",
    "ActivationWriter",
    "AnchorResult",
    "EmpiricalCapacityResult",
    "ManifoldAnalysisResult",
    "anchor_points",
    "ball_capacity",
    "empirical_capacity",
    "manifold_analysis",
    "AlignmentAccumulator",
    "AnalysisError",
    "GeomprobeError",
    "InputError",
    "__version__",
    "alignment",
    "GlueResult",
    "glue_analysis",
    "averaging_classifier",
    "frobenius_norm_product",
    "layerwise_collapse",
    "make_probe_inputs",
    "normalized_loss",
    "normalized_loss_fit",
    "one_layer_linear_prediction",
    "one_layer_linear_solution",
    "probe_correlations",
    "probe_heatmap",
    "weight_distance",
    "cosine_stiffness",
    "gradient_confusion",
    "gradient_diversity",
    "minibatch_alignment",
    "open_activations",
    "pairwise_stats",
    "save_activations",
    "sign_stiffness",
]
