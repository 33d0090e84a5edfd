"""Markdown table of the effects measured by finished runs (docs/reproducing.md).

    python bench/reproduce_table.py DIR [DIR ...]

For every run folder (holding summary.json written by `geomprobe train` / `geomprobe report`) prints
one row per effect: experiment, preset, seed, effect, passed, and the headline numbers of `measured`.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

HEADLINE = {
    "memorization_at_largest_sigma": ("final_train_acc", "final_test_acc"),
    "gradient_alignment_decreases_with_sigma": ("grad_alignment", "spearman_sigma"),
    "representation_alignment_decreases_with_sigma": ("rep_alignment", "spearman_sigma"),
    "best_test_accuracy_correlates_with_alignment": ("pearson_best_test_vs_grad_alignment", "best_test_acc"),
    "best_epoch_permuted_capacity_at_lower_bound": ("max_ratio_to_bound", "restored_test_rel_spread", "agree_rel_spread"),
    "final_epoch_permuted_rises_restored_falls_in_last_layers": ("permuted_rise_last_layer", "restored_best",
                                                                 "restored_final"),
    "rewinding_last_layers_recovers_test_accuracy": ("best_test_acc", "final_test_acc", "rewound_test_acc",
                                                     "rewound_layer", "rewind_epoch", "recovered_fraction", "any_layer"),
    "gradient_split_unpermuted_dominates_early": ("mean_ratio",),
    "shallow_convnet_learns_identity": ("identity_at_rho0", "constant_at_rho0"),
    "deep_convnet_learns_constant": ("constant_minus_identity", "shallowest_constant_minus_identity"),
    "normalized_losses_on_a_line": ("r2", "slope", "intercept", "random_label_relative_residual"),
    "unnormalized_losses_not_on_a_line": ("r2", "random_label_relative_residual"),
    "test_error_grows_with_norm_product": ("spearman", "test_error"),
}


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    if isinstance(v, dict):
        return "; ".join(f"{k}: {_fmt(x)}" for k, x in v.items())
    return str(v)


def main(dirs: list[str]) -> None:
    print("| experiment | seed | effect | passed | measured |")
    print("|---|---|---|---|---|")
    for d in dirs:
        s = json.loads((Path(d) / "summary.json").read_text())
        for e in s["effects"]:
            m = e["measured"]
            keys = HEADLINE.get(e["name"], ())
            if e["name"] == "fcn_drift_to_constant_with_depth" and "missing" not in m:
                shown = "; ".join(f"{fam}: s = {_fmt(v['constant_minus_identity'])}" for fam, v in m.items())
            elif "missing" in m:
                shown = f"missing: {m['missing']}"
            else:
                shown = ", ".join(f"{k} {_fmt(m[k])}" for k in keys if k in m)
            print(f"| {s['experiment']} ({s.get('preset', '')}) | {s.get('seed', '')} | `{e['name']}` | "
                  f"{'yes' if e['passed'] else '**no**'} | {shown} |")


if __name__ == "__main__":
    main(sys.argv[1:])
