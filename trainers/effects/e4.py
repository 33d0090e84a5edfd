"""E4, normalised loss (paper 004): normalised train vs test cross-entropy on a line (the fit is
:func:`geomprobe.weights.normalized_loss_fit`), the unnormalised one not; test error vs norm product."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .common import CRITERIA, EFFECT_NAMES, _effect, _missing, _read_jsonl, _spearman


def _fit(x, y) -> dict:
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 3 or np.ptp(x) == 0:
        return {"slope": float("nan"), "intercept": float("nan"), "r2": float("nan"), "rmse": float("nan"), "n": len(x)}
    from geomprobe.weights import normalized_loss_fit

    f = normalized_loss_fit(x, y)
    return {"slope": f.slope, "intercept": f.intercept, "r2": f.r2, "rmse": f.rmse, "n": f.n}


def _e4(out: Path, exp: dict, missing: list[str]):
    names = EFFECT_NAMES["normalized-loss"]
    all_rows = _read_jsonl(out / "normalized_loss.jsonl")
    data = {"nets": all_rows}
    c = CRITERIA
    # the paper compares networks at zero training error: a net that did not get there is left out of
    # every fit and named in `missing` (its row stays in data.nets)
    rows = [r for r in all_rows if r.get("train_acc", 0.0) >= c["e4_train_acc"]]
    left = [r["net"] for r in all_rows if r.get("train_acc", 0.0) < c["e4_train_acc"]]
    if left:
        missing.append(f"nets below {c['e4_train_acc']:.3f} train accuracy, left out of the fits: {', '.join(left)}")
    data["excluded_nets"] = left
    crit0 = (f"least-squares line test = a * train + b of the normalised cross-entropy over all nets at zero training error (random-label "
             f"net included): R^2 >= {c['e4_min_r2']}; and the random-label net lies on the true-label nets' line: "
             f"|residual| <= {c['e4_on_line']} x the range of their normalised test losses")
    crit1 = (f"the unnormalised cross-entropy does not predict the test loss: the random-label net lies off the "
             f"true-label nets' least-squares line, |residual| >= {c['e4_off_line']} x the range of their test losses "
             f"(without a random-label net: R^2 of that line <= {c['e4_max_unnorm_r2']}); R^2 over all nets reported")
    crit2 = "true-label nets: Spearman(log product of norms, test error) > 0"
    if len(rows) < 3:
        why = "normalized_loss.jsonl with >= 3 nets at zero training error"
        missing.append(why)
        return [_missing(n, why, cr) for n, cr in zip(names, (crit0, crit1, crit2))], data
    true = [r for r in rows if not r.get("random_labels")]
    rand = [r for r in rows if r.get("random_labels")]
    if not rand:
        missing.append("a random-label net (random_label_std >= 0)")

    def line(kind: str) -> tuple[dict, float | None]:
        """Fit over all nets, and the random-label net's residual from the true-label nets' line relative to
        the range of their test losses (None without a random-label net or with < 3 true-label nets)."""
        tr, te = f"train_{kind}", f"test_{kind}"
        fit = _fit([r[tr] for r in rows], [r[te] for r in rows])
        if not rand or len(true) < 3:
            return fit, None
        ft = _fit([r[tr] for r in true], [r[te] for r in true])
        span = float(np.ptp([r[te] for r in true]))
        resid = rand[0][te] - (ft["slope"] * rand[0][tr] + ft["intercept"])
        fit.update(true_only=ft, random_label_residual=float(resid),
                   random_label_relative_residual=float(abs(resid) / span) if span > 0 else float("nan"))
        return fit, fit["random_label_relative_residual"]

    fit_n, rel_n = line("normalized_loss")
    fit_u, rel_u = line("loss")
    data["fit_normalized"], data["fit_unnormalized"] = fit_n, fit_u
    r2n = fit_n["r2"]
    ok0 = math.isfinite(r2n) and r2n >= c["e4_min_r2"] and (rel_n is None or rel_n <= c["e4_on_line"])
    if rel_u is None:
        r2_true = fit_u.get("true_only", fit_u)["r2"]
        ok1 = math.isfinite(r2_true) and r2_true <= c["e4_max_unnorm_r2"]
    else:
        ok1 = math.isfinite(rel_u) and rel_u >= c["e4_off_line"]
    eff = [_effect(names[0], ok0, fit_n, crit0), _effect(names[1], ok1, fit_u, crit1)]
    lp = [r["log_norm_product"] for r in true]
    err = [1.0 - r["test_acc"] for r in true]
    rho = _spearman(lp, err)
    eff.append(_effect(names[2], math.isfinite(rho) and rho > 0,
                       {"spearman": rho, "log_norm_product": lp, "test_error": err,
                        "train_acc": [r["train_acc"] for r in true]}, crit2))
    return eff, data
