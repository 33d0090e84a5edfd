"""E1, extreme memorization (paper 000): memorization at the largest sigma, alignment vs sigma and vs
best test accuracy."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .common import CRITERIA, EFFECT_NAMES, _effect, _missing, _n_classes, _pearson, _read_jsonl, _spearman


def _e1_run(rdir: Path) -> dict:
    recs = _read_jsonl(rdir / "metrics.jsonl")
    epochs = [r for r in recs if r.get("kind") == "epoch"]
    align = [r for r in recs if r.get("kind") == "align"]
    ratio = [r for r in recs if r.get("kind") == "grad_ratio"]
    g_tensor = next(iter(align[0]["stats"])) if align else None
    g_curve = [(r["step"] if "step" in r else i, r["epoch"], r["stats"][g_tensor].get("omega_in_class"))
               for i, r in enumerate(align) if g_tensor in r.get("stats", {})]
    hidden = None
    if ratio and ratio[0].get("rep_omega_in_class"):
        keys = [k for k in ratio[0]["rep_omega_in_class"] if k != "out"]
        hidden = keys[0] if keys else None
    r_curve = [(r.get("step", 0), r["epoch"], r["rep_omega_in_class"].get(hidden)) for r in ratio
               if hidden and r.get("rep_omega_in_class")]
    gr_curve = [(r.get("step", 0), r["epoch"], r.get("grad_over_weight", {}).get(g_tensor)) for r in ratio]

    def mean(curve):
        vals = [v for *_, v in curve if v is not None and math.isfinite(v)]
        return float(np.mean(vals)) if vals else float("nan")

    return {"history": [{k: e.get(k) for k in ("epoch", "step", "train_acc", "test_acc", "train_loss", "test_loss")}
                       for e in epochs],
            "grad_tensor": g_tensor, "hidden_layer": hidden,
            "grad_alignment_curve": g_curve, "rep_alignment_curve": r_curve, "grad_over_weight_curve": gr_curve,
            "grad_alignment": mean(g_curve), "rep_alignment": mean(r_curve)}


def _e1(out: Path, exp: dict, missing: list[str]):
    o = exp["options"]
    runs = exp.get("result", {}).get("runs", [])
    chance = 1.0 / _n_classes(o.get("dataset", ""))
    table = []
    for r in runs:
        info = _e1_run(out / r["run"])
        table.append({"run": r["run"], "sigma": float(r["sigma"]), "labels": r["labels"],
                      "final_train_acc": r.get("final_train_acc"), "final_test_acc": r.get("final_test_acc"),
                      "best_test_acc": r.get("best_test_acc"), "epochs": r.get("epochs"), **info})
    true = sorted([t for t in table if t["labels"] == "true"], key=lambda t: t["sigma"])
    names = EFFECT_NAMES["extreme-memorization"]
    data = {"chance": chance, "runs": table}
    if len(true) < 2:
        missing.append("at least two sigmas with true labels")
        crit = "needs >= 2 sigmas"
        return [_missing(n, "fewer than 2 sigmas with true labels", crit) for n in names], data
    if all(t["grad_tensor"] is None for t in true):
        missing.append("gradient alignment records (kind 'align') in metrics.jsonl: set align_every > 0")
    if all(t["hidden_layer"] is None for t in true):
        missing.append("representation alignment (kind 'grad_ratio', rep_omega_in_class) in metrics.jsonl")
    sig = [t["sigma"] for t in true]
    big = true[-1]
    c = CRITERIA
    eff = [_effect(names[0], (big["final_train_acc"] or 0) >= c["e1_train_acc"]
                   and abs((big["final_test_acc"] or 0) - chance) <= c["e1_chance_margin"],
                   {"sigma": big["sigma"], "final_train_acc": big["final_train_acc"],
                    "final_test_acc": big["final_test_acc"], "chance": chance},
                   f"at the largest sigma: train accuracy >= {c['e1_train_acc']} and |test accuracy - chance| "
                   f"<= {c['e1_chance_margin']}")]
    for key, n in (("grad_alignment", names[1]), ("rep_alignment", names[2])):
        vals = [t[key] for t in true]
        rho = _spearman(sig, vals)
        ok = all(math.isfinite(v) for v in vals)
        eff.append(_effect(n, ok and rho < 0 and vals[-1] < vals[0],
                           {"sigma": sig, key: vals, "spearman_sigma": rho},
                           f"mean in-class {key.replace('_', ' ')} over training: Spearman(sigma, value) < 0 and "
                           "value at the largest sigma < value at the smallest"))
    best = [t["best_test_acc"] for t in true]
    r_g = _pearson(best, [t["grad_alignment"] for t in true])
    r_r = _pearson(best, [t["rep_alignment"] for t in true])
    eff.append(_effect(names[3], math.isfinite(r_g) and r_g >= c["e1_min_correlation"],
                       {"pearson_best_test_vs_grad_alignment": r_g, "pearson_best_test_vs_rep_alignment": r_r,
                        "best_test_acc": best},
                       f"Pearson r(best test accuracy, gradient alignment) across sigma >= {c['e1_min_correlation']}"))
    shuffled = [t for t in table if t["labels"] == "shuffled"]
    if shuffled:  # spec: shuffled labels give lower representation alignment than true labels
        by = {t["sigma"]: t for t in true}
        data["shuffled_vs_true_rep_alignment"] = [
            {"sigma": s["sigma"], "shuffled": s["rep_alignment"], "true": by[s["sigma"]]["rep_alignment"]}
            for s in shuffled if s["sigma"] in by]
    return eff, data
