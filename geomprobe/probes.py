"""Deprecated home of the paper 002 / 004 measures: a thin re-export of the modules that own them.

Import from the owning module instead (each holds its function, result type, rows and registry entry):

- :mod:`geomprobe.identity_probes`: ``make_probe_inputs``, ``probe_correlations``, ``probe_heatmap``
- :mod:`geomprobe.layer_collapse`: ``averaging_classifier``, ``layerwise_collapse``
- :mod:`geomprobe.weights`: ``weight_distance``, ``frobenius_norm_product``, ``normalized_loss``,
  ``normalized_loss_fit``
- :mod:`geomprobe.closed_form`: ``one_layer_linear_solution``, ``one_layer_linear_prediction``

``geomprobe.probes`` keeps every name it had (and ``probe_rows``, the rows of both probe families), so
old code keeps working; the top-level ``geomprobe`` package re-exports the public functions too.
"""
from __future__ import annotations

from typing import Any

from .closed_form import one_layer_linear_prediction, one_layer_linear_solution
from .identity_probes import (
    ProbeCorrelations,
    ProbeHeatmap,
    ProbeInputs,
    Row,
    correlation_rows,
    make_probe_inputs,
    probe_correlations,
    probe_heatmap,
)
from .layer_collapse import (
    AveragingClassifierResult,
    LayerCollapse,
    averaging_classifier,
    collapse_rows,
    layerwise_collapse,
)
from .weights import (
    LossFit,
    NormalizedLoss,
    WeightDistance,
    frobenius_norm_product,
    normalized_loss,
    normalized_loss_fit,
    weight_distance,
)

__all__ = [
    "ProbeInputs",
    "ProbeCorrelations",
    "ProbeHeatmap",
    "AveragingClassifierResult",
    "LayerCollapse",
    "WeightDistance",
    "NormalizedLoss",
    "LossFit",
    "make_probe_inputs",
    "probe_correlations",
    "probe_heatmap",
    "averaging_classifier",
    "layerwise_collapse",
    "weight_distance",
    "frobenius_norm_product",
    "normalized_loss",
    "normalized_loss_fit",
    "one_layer_linear_solution",
    "one_layer_linear_prediction",
    "probe_rows",
]


def probe_rows(f: Any) -> tuple[list[Row], list[str]]:
    """Rows (layer, subset, metric, class, value) and notes of both probe families of an activations
    file, in this order: :func:`geomprobe.identity_probes.correlation_rows` (probe predictions), then
    :func:`geomprobe.layer_collapse.collapse_rows` (layer-wise collapse). See docs/format.md, "Probe keys".
    """
    rows, notes = correlation_rows(f)
    more_rows, more_notes = collapse_rows(f)
    return rows + more_rows, notes + more_notes
