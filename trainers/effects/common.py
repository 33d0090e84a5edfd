"""What every experiment's effects share: the thresholds (CRITERIA), the effect names, the summary file,
the effect record and small statistics (Pearson, Spearman)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from geomprobe._validation import InputError

__all__ = ["SUMMARY_FILE", "CRITERIA", "EFFECT_NAMES", "load_summary"]

SUMMARY_FILE = "summary.json"

# Thresholds (docs/reproducing.md gives the values measured with several seeds next to them).
CRITERIA = {
    # E1
    "e1_chance_margin": 0.05,  # test accuracy at the largest sigma within 5 points of chance
    "e1_train_acc": 0.999,  # ... while train accuracy is 100 %
    "e1_min_correlation": 0.5,  # Pearson r(best test accuracy, gradient alignment) across sigma
    # E2
    "e2_perm_capacity_factor": 2.0,  # permuted capacity at best epoch <= factor * 2/M in every layer
    "e2_agree_rel_spread": 0.35,  # (max - min) / mean: restored vs test in every layer; with unpermuted too
    # in the first half of the layers (paper 003: early layers show no difference; last layers separate
    # unpermuted more, appendix A.8)
    "e2_perm_rise": 1.25,  # final / best permuted capacity in the last layer
    "e2_rewind_recovery": 0.5,  # fraction of the best-to-final test-accuracy drop recovered by rewinding
    "e2_min_drop": 0.02,  # a drop smaller than this (2 points) is no memorization to undo
    "e2_split_ratio": 1.0,  # early epochs: unpermuted / permuted label-dependent gradient norm > this
    # E3
    "e3_fit": 0.05,  # a net enters the E3 effects only if its final loss <= this x the zero map's 0.5 ||x||^2
    "e3_identity_min": 0.5,  # shallow ConvNet: identity correlation on orthogonal inputs (rho = 0)
    # E4
    "e4_train_acc": 0.999,  # nets enter the E4 fits only at zero training error (as in the paper)
    "e4_min_r2": 0.9,  # normalised train vs test loss line
    "e4_on_line": 0.10,  # normalised: random-label net's |residual| <= this x range of true-label test losses
    "e4_off_line": 0.5,  # unnormalised: random-label net's |residual| >= this x range of true-label test losses
    "e4_max_unnorm_r2": 0.5,  # without a random-label net: unnormalised R^2 of the true-label nets <= this
}

EFFECT_NAMES = {
    "extreme-memorization": ["memorization_at_largest_sigma", "gradient_alignment_decreases_with_sigma",
                             "representation_alignment_decreases_with_sigma",
                             "best_test_accuracy_correlates_with_alignment"],
    "label-noise-geometry": ["best_epoch_permuted_capacity_at_lower_bound",
                             "final_epoch_permuted_rises_restored_falls_in_last_layers",
                             "rewinding_last_layers_recovers_test_accuracy",
                             "gradient_split_unpermuted_dominates_early"],
    "identity-crisis": ["fcn_drift_to_constant_with_depth", "shallow_convnet_learns_identity",
                        "deep_convnet_learns_constant"],
    "normalized-loss": ["normalized_losses_on_a_line", "unnormalized_losses_not_on_a_line",
                        "test_error_grows_with_norm_product"],
}


# -- small helpers -------------------------------------------------------------------------------


def _effect(name: str, passed: bool, measured: Any, criterion: str) -> dict:
    return {"name": name, "passed": bool(passed), "measured": _clean(measured), "criterion": criterion}


def _missing(name: str, what: str, criterion: str) -> dict:
    return _effect(name, False, {"missing": what}, criterion)


def _clean(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _clean(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)  # 6 significant digits: small values (eq. 1 residuals, fitted losses) keep their size
        return float(f"{v:.6g}") if math.isfinite(v) else None
    return obj


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a half-written last line of a killed run
                continue
    return out


def _rankdata(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=float)
    for v in np.unique(x):  # average ranks of ties
        sel = x == v
        ranks[sel] = ranks[sel].mean()
    return ranks


def _pearson(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def _spearman(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    ok = np.isfinite(a) & np.isfinite(b)
    return _pearson(_rankdata(a[ok]), _rankdata(b[ok]))


def _n_classes(dataset: str) -> int:
    return {"cifar100": 100}.get(dataset, 10)


def load_summary(outdir: str | Path) -> dict:
    p = Path(outdir) / SUMMARY_FILE
    if not p.is_file():
        raise InputError(f"{p}: no such file; run `geomprobe report {outdir}` (or summarize()) first")
    return json.loads(p.read_text())


def _experiment(out: Path) -> dict:
    p = out / "experiment.json"
    if not p.is_file():
        raise InputError(f"{out}: no experiment.json (not a `geomprobe train` output folder)")
    try:
        exp = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{p}: not valid JSON ({exc})") from None
    if exp.get("experiment") not in EFFECT_NAMES:
        raise InputError(f"{p}: unknown experiment {exp.get('experiment')!r}; known: {', '.join(EFFECT_NAMES)}")
    return exp
