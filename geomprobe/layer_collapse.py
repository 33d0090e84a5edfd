"""Layer-wise collapse (paper 002, section 3.4): the correlation-weighted averaging classifier and its
test error at each layer; the rows it gives in ``geomprobe analyze``.

One home per measure: formula here (docs/metrics.md, "Identity-crisis probes ..."), kernels
``geomprobe/_kernels/probes.py::class_direction_sums`` and ``averaging_scores``, numpy twins and tests
in ``tests/test_layer_collapse.py``. (Not to be confused with ``geomprobe.collapse``: neural-collapse
NC1/NC2 of class means.)
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._kernels import probes as _k
from ._probe_checks import KINDS
from ._validation import InputError, check_choice, check_labels, check_matrix, describe_shape
from .registry import MetricInfo, register

__all__ = [
    "AveragingClassifierResult",
    "LayerCollapse",
    "averaging_classifier",
    "layerwise_collapse",
    "collapse_rows",
    "METRICS",
]

# The rows collapse_rows emits (subset "test", class None).
METRICS = register({
    "collapse_error": MetricInfo("error of the correlation-weighted averaging classifier on a layer",
                                 better="lower"),
    "collapse_error_baseline": MetricInfo("the averaging classifier on the raw inputs", better="lower"),
    "collapse_chance": MetricInfo("chance error 1 - 1/K of the collapse classifier"),
})

Row = tuple[str, str, str, object, float]


# ------------------------------------------------------------------------------------------------
# correlation-weighted averaging classifier (paper 002, section 3.4)
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AveragingClassifierResult:
    """error = fraction of test rows whose prediction differs from their label.

    ``scores`` (n_test, n_classes) = (1/n_train) sum_i corr(test, train_i) onehot(y_i), columns in
    ``classes`` order; ``predictions`` are class labels (first argmax: ties go to the smallest class).
    """

    error: float
    predictions: np.ndarray
    scores: np.ndarray
    classes: np.ndarray
    n_train: int
    n_test: int
    n_zero_train: int
    n_zero_test: int
    n_unseen_test: int
    chance_error: float
    kind: str
    notes: tuple[str, ...]


def averaging_classifier(
    train: Any, train_labels: Any, test: Any, test_labels: Any, *, kind: str = "cosine"
) -> AveragingClassifierResult:
    """Paper 002 section 3.4: predict argmax_c of the mean one-hot training label weighted by corr(test, train_i).

    Because the correlation is linear in the normalised test vector, sum_i corr(t, x_i) onehot(y_i)_c =
    <t/||t||, S_c> with S_c = sum_{y_i = c} x_i/||x_i||; the kernel streams over rows, so memory is
    O(n_classes * features), never n_test * n_train, and time O((n_train + n_test) * features * K).
    Rows of zero norm have correlation 0 with everything (counted and reported).
    """
    check_choice(kind, "kind", KINDS)
    Xtr = check_matrix(train, "train", flatten=True)
    Xte = check_matrix(test, "test", flatten=True)
    if Xtr.shape[1] != Xte.shape[1]:
        raise InputError(f"test has {Xte.shape[1]} features but train has {Xtr.shape[1]}")
    ytr = check_labels(train_labels, Xtr.shape[0], "train_labels", rows_name="train")
    yte = check_labels(test_labels, Xte.shape[0], "test_labels", rows_name="test")
    classes, codes = np.unique(ytr, return_inverse=True)
    codes = codes.reshape(-1).astype(np.int64)
    centre = kind == "pearson"
    S, zero_tr = _k.class_direction_sums(Xtr, codes, classes.size, centre)
    scores, pred_codes, zero_te = _k.averaging_scores(Xte, S, centre)
    scores /= Xtr.shape[0]
    pred = classes[pred_codes]
    unseen = int(np.sum(~np.isin(yte, classes)))
    notes = []
    if zero_tr.any():
        notes.append(f"{int(zero_tr.sum())} of {Xtr.shape[0]} train row(s) have zero norm: correlation 0, no vote")
    if zero_te.any():
        notes.append(f"{int(zero_te.sum())} of {Xte.shape[0]} test row(s) have zero norm: all scores 0, "
                     f"predicted the smallest class {classes[0]}")
    if unseen:
        notes.append(f"{unseen} test row(s) have a label absent from train: always counted as errors")
    return AveragingClassifierResult(
        error=float(np.mean(pred != yte)), predictions=pred, scores=scores, classes=classes,
        n_train=Xtr.shape[0], n_test=Xte.shape[0], n_zero_train=int(zero_tr.sum()),
        n_zero_test=int(zero_te.sum()), n_unseen_test=unseen, chance_error=1.0 - 1.0 / classes.size,
        kind=kind, notes=tuple(notes),
    )


@dataclass(frozen=True)
class LayerCollapse:
    """Averaging-classifier test error per layer (``error``, layer order kept) and on the raw inputs."""

    layers: tuple[str, ...]
    error: np.ndarray
    baseline_error: float | None
    chance_error: float
    results: Mapping[str, AveragingClassifierResult]
    notes: tuple[str, ...]


def _split_mask(split: Any, n: int) -> np.ndarray:
    s = np.asarray(split)
    if s.ndim != 1 or s.shape[0] != n:
        raise InputError(f"split must be 1-D with {n} entries (one per labelled row), got shape {describe_shape(s.shape)}")
    if s.dtype == np.bool_:
        return ~s  # True = test given as a boolean mask -> train mask is its complement
    s = s.astype(str)
    bad = ~np.isin(s, ("train", "test"))
    if np.any(bad):
        i = int(np.flatnonzero(bad)[0])
        raise InputError(f"split must hold 'train' or 'test', got {str(s[i])!r} at index {i}")
    return s == "train"


def layerwise_collapse(
    representations: Mapping[str, Any],
    labels: Any,
    split: Any,
    *,
    inputs: Any = None,
    kind: str = "cosine",
) -> LayerCollapse:
    """Layer-wise collapse (paper 002 section 3.4): averaging-classifier test error at each layer.

    ``representations`` maps layer -> (n, ...) array over the same n labelled rows (layer order kept);
    ``split`` marks each row 'train' or 'test' (or a bool array, True = test); ``inputs`` (n, ...) are
    the raw inputs of those rows, giving the baseline error. A layer that computes the identity keeps
    the baseline error; a collapsed layer approaches ``chance_error`` = 1 - 1/n_classes.
    """
    if not isinstance(representations, Mapping) or not representations:
        raise InputError("representations must be a non-empty mapping layer -> (n, ...) array")
    y = check_labels(labels)
    is_train = _split_mask(split, y.shape[0])
    if not is_train.any() or is_train.all():
        raise InputError(
            f"split must mark at least one 'train' and one 'test' row, got {int(is_train.sum())} train and "
            f"{int((~is_train).sum())} test"
        )

    def run(arr: Any, name: str) -> AveragingClassifierResult:
        A = check_matrix(arr, name, flatten=True)
        if A.shape[0] != y.shape[0]:
            raise InputError(f"{name} has {A.shape[0]} rows but labels has {y.shape[0]} entries")
        return averaging_classifier(A[is_train], y[is_train], A[~is_train], y[~is_train], kind=kind)

    results = {str(layer): run(arr, f"representations[{layer!r}]") for layer, arr in representations.items()}
    base = run(inputs, "inputs") if inputs is not None else None
    notes = [f"{layer}: {note}" for layer, res in results.items() for note in res.notes]
    if base is not None:
        notes += [f"inputs: {note}" for note in base.notes]
    first = next(iter(results.values()))
    return LayerCollapse(
        layers=tuple(results), error=np.array([res.error for res in results.values()]),
        baseline_error=None if base is None else base.error, chance_error=first.chance_error,
        results=results, notes=tuple(notes),
    )


# ------------------------------------------------------------------------------------------------
# activations-file rows (docs/format.md, "Probe keys")
# ------------------------------------------------------------------------------------------------
class _LazyLayers(Mapping):
    """layer -> f.layer(layer), loaded on access (so that layerwise_collapse holds one layer at a time)."""

    def __init__(self, f: Any, layers: Sequence[str]):
        self._f, self._layers = f, list(layers)

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._layers:
            raise KeyError(key)
        return self._f.layer(key)

    def __iter__(self):
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)


def collapse_rows(f: Any) -> tuple[list[Row], list[str]]:
    """Rows for the layer-wise collapse of an activations file: ``act/<layer>`` with ``labels`` and a
    ``split`` holding train and test rows give ``collapse_error`` per layer (subset "test", class None)
    and, when the file has ``probe/collapse_inputs`` (the raw inputs of the same n rows),
    ``collapse_error_baseline`` with layer "input". ``collapse_chance`` (1 - 1/n_classes) is reported
    once with layer "input". Returns (rows, notes).
    """
    src = getattr(f, "path", "activations file")
    keys = list(f.keys())
    rows: list[Row] = []
    notes: list[str] = []
    preds = [k for k in keys if k.startswith("probe/pred/")]
    layers = list(getattr(f, "layers", []) or [])
    split = getattr(f, "split", None)
    labels = getattr(f, "labels", None)
    base_key = "probe/collapse_inputs"
    if layers and split is not None and labels is not None:
        s = np.asarray(split).astype(str)
        if not (np.any(s == "train") and np.any(s == "test")):
            notes.append(f"{src}: split has no {'train' if not np.any(s == 'train') else 'test'} rows: "
                         "no layer-wise collapse")
        else:
            reps = _LazyLayers(f, layers)  # one layer in memory at a time
            base = f.array(base_key) if base_key in keys else None
            try:
                col = layerwise_collapse(reps, labels, s, inputs=base)
            except InputError as exc:
                raise InputError(f"{src}: layer-wise collapse: {exc}") from None
            for layer, err in zip(col.layers, col.error):
                rows.append((layer, "test", "collapse_error", None, float(err)))
            if col.baseline_error is not None:
                rows.append(("input", "test", "collapse_error_baseline", None, float(col.baseline_error)))
            rows.append(("input", "test", "collapse_chance", None, float(col.chance_error)))
            notes.extend(f"{src}: collapse: {note}" for note in col.notes)
            if base is None:
                notes.append(f"{src}: no '{base_key}': no raw-input baseline for the collapse error")
    elif layers and split is None and (preds or base_key in keys):
        notes.append(f"{src}: no 'split' (train/test): no layer-wise collapse")
    return rows, notes
