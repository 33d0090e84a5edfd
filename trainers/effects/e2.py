"""E2, label-noise geometry (paper 003): MFTMA capacity of the unpermuted / permuted / restored / test
manifolds at the best and final epoch (through :func:`geomprobe.analysis.analyze`, cached in
DIR/analysis), layer rewinding and the gradient split."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from geomprobe._validation import InputError, check_positive_int
from geomprobe.io import open_activations

from .common import CRITERIA, EFFECT_NAMES, _effect, _missing, _read_jsonl

__all__ = ["e2_analysis_seeds", "analysis_dir", "analyze_command"]

_TAG_ORDER = {"init": 0, "best": 2, "final": 3}


def _e2_files(out: Path, tags: tuple[str, ...] | None = None) -> list[tuple[str, Path, int]]:
    found = []
    for p in sorted(out.glob("acts_*.npz")):
        tag = p.stem[len("acts_"):]
        if tags is not None and tag not in tags:
            continue
        with open_activations(p) as f:
            meta = f.meta
        found.append((tag, p, int(meta.get("epoch", -1))))
    return sorted(found, key=lambda t: (t[2], _TAG_ORDER.get(t[0], 1)))


def e2_analysis_seeds(seed: int, n: int) -> list[int]:
    """The E2 summary's MFTMA seeds: the run's analysis seed, then n - 1 drawn from it (reproducible)."""
    return [int(seed)] + [int(v) for v in np.random.SeedSequence(int(seed)).generate_state(max(n - 1, 0))]


def analysis_dir(out: Path, k: int, seed: int) -> Path:
    """Where the E2 summary caches the rows of its k-th analysis seed."""
    return out / "analysis" / (f"seed-{seed}" if k else "")


def analyze_command(files: list[str], adir: str, *, seed: int, n_reps: int, n_t: int, per_class: int,
                    mftma: bool = True) -> str:
    """The `geomprobe analyze` command line that computes the same rows as the E2 summary's analysis
    (every option that differs from the command's defaults is spelled out)."""
    parts = ["geomprobe", "analyze", *files, "-o", adir, "--seed", str(seed)]
    parts += ["--n-reps", str(n_reps), "--n-t", str(n_t), "--per-class", str(per_class)] if mftma else ["--no-mftma"]
    return " ".join(parts)


def _e2_rows(out: Path, files: list[Path], *, mftma: bool, recompute: bool, n_reps: int, n_t: int,
             seeds: list[int], per_class: int, progress: Callable[[int, int], None] | None = None,
             jobs: int = 1) -> list[list[dict]]:
    """MFTMA rows of the activation files, one list per analysis seed (the first in out/analysis, the
    others in out/analysis/seed-S); each is reused while its files and options are unchanged."""
    want = sorted(str(p) for p in files)
    todo = [(analysis_dir(out, k, s), s) for k, s in enumerate(seeds)]
    cached = {str(a): _e2_cached(a, want, mftma=mftma, recompute=recompute, n_reps=n_reps, n_t=n_t, seed=s,
                                 per_class=per_class) for a, s in todo}
    tick = None
    if progress is not None:
        from geomprobe.analysis import AnalyzeOptions, plan_tasks

        per_seed = len(plan_tasks(want, AnalyzeOptions(mftma=mftma, per_class=per_class), scan_values=False))
        total = per_seed * sum(1 for a, _ in todo if cached[str(a)] is None)
        count = [0]

        def tick(_r) -> None:
            count[0] += 1
            progress(count[0], total)
    out_rows = []
    for a, s in todo:
        rows = cached[str(a)]
        if rows is None:
            rows = _e2_analyze(a, want, mftma=mftma, n_reps=n_reps, n_t=n_t, seed=s, per_class=per_class, tick=tick,
                               jobs=jobs)
        out_rows.append(rows)
    return out_rows


def _e2_cached(adir: Path, want: list[str], *, mftma: bool, recompute: bool, n_reps: int, n_t: int, seed: int,
               per_class: int) -> list[dict] | None:
    """The rows cached in adir/metrics.json when they were computed from these files with these options."""
    cached = adir / "metrics.json"
    if cached.is_file() and not recompute:
        try:
            prev = json.loads(cached.read_text())
            po = prev["options"]
            if (sorted(prev.get("files", [])) == want and bool(po.get("mftma")) >= mftma
                    and (po.get("seed"), po.get("n_reps"), po.get("n_t"), po.get("per_class"))
                    == (seed, n_reps, n_t, per_class)):
                return prev["rows"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
            pass
    return None


def _e2_analyze(adir: Path, want: list[str], *, mftma: bool, n_reps: int, n_t: int, seed: int, per_class: int,
                tick=None, jobs: int = 1) -> list[dict]:
    from geomprobe.analysis import AnalyzeOptions, analyze
    from geomprobe.local_runner import process_runner

    opts = AnalyzeOptions(seed=seed, mftma=mftma, n_reps=n_reps, n_t=n_t, per_class=per_class)
    rep = analyze(want, opts, outdir=adir, force=True, progress=tick, runner=process_runner(jobs))
    if rep.errors:
        raise InputError(f"analysis in {adir} failed for {len(rep.errors)} task(s), first: {rep.errors[0]}")
    return rep.rows


def _e2_table(rows_per_seed: list[list[dict]], files: list[tuple[str, Path, int]]) -> dict:
    """tag -> subset -> metric -> {layer: value} (aggregate rows only), the mean over the analysis seeds."""
    by_file = {str(p): tag for tag, p, _ in files}
    values: dict = {}
    for rows in rows_per_seed:
        for r in rows:
            if r["class"] != "" or r["file"] not in by_file:
                continue
            v = r["value"]
            if isinstance(v, str):
                v = float(v)
            key = (by_file[r["file"]], r["subset"], r["metric"], r["layer"])
            values.setdefault(key, []).append(float(v) if v is not None else float("nan"))
    table: dict = {}
    for (tag, subset, metric, layer), vs in values.items():
        # a seed without the row (or with NaN) makes the mean NaN: the effect then fails, nothing is hidden
        v = float(np.mean(vs)) if len(vs) == len(rows_per_seed) else float("nan")
        table.setdefault(tag, {}).setdefault(subset, {}).setdefault(metric, {})[layer] = v
    return table


def _e2_best_epoch_effect(capacity: dict[str, list[float]], layers: list[str], bound: float, criterion: str) -> dict:
    """Best-epoch effect of E2 from the capacity per subset and layer (``capacity[subset][i]``)."""
    c = CRITERIA

    def spread(subsets, i):
        v = np.array([capacity[s][i] for s in subsets])
        return float((v.max() - v.min()) / v.mean())

    perm = capacity["permuted"]
    n_early = (len(layers) + 1) // 2
    rt = [spread(("restored", "test"), i) for i in range(len(layers))]
    urt = [spread(("unpermuted", "restored", "test"), i) for i in range(len(layers))]
    # a NaN (a subset or layer without a value) must fail the effect, not vanish inside max()
    nonfinite = [f"{s}/{layer}" for s in ("unpermuted", "permuted", "restored", "test")
                 for layer, v in zip(layers, capacity[s]) if not np.isfinite(v)]
    ok = (not nonfinite and max(perm) <= c["e2_perm_capacity_factor"] * bound
          and max(rt) <= c["e2_agree_rel_spread"] and max(urt[:n_early]) <= c["e2_agree_rel_spread"])
    measured = {"lower_bound_2_over_M": bound, "layers": layers, "permuted_capacity": perm,
                "max_ratio_to_bound": max(perm) / bound, "restored_test_rel_spread": rt,
                "agree_rel_spread": urt, "first_half_layers": layers[:n_early]}
    if nonfinite:
        measured["nonfinite_capacity"] = nonfinite
    return _effect(EFFECT_NAMES["label-noise-geometry"][0], ok, measured, criterion)


def _e2(out: Path, exp: dict, missing: list[str], *, mftma: bool, recompute: bool, n_reps: int, n_t: int,
        seed: int, analysis_seeds: int | None, tags: tuple[str, ...] | None = None, progress=None, jobs: int = 1):
    """E2's four effects and data: capacity at the best / final epoch, rewinding, gradient split."""
    o = exp["options"]
    res = exp.get("result", {})
    files = _e2_files(out, tags)
    layers: list[str] = []
    if files:
        with open_activations(files[0][1]) as f:
            layers = list(f.layers)
    # 0 (or a run from before the option): every captured example
    per_class = check_positive_int(o.get("analysis_per_class", 0), f"{out}/experiment.json: options.analysis_per_class",
                                   minimum=0)
    M = per_class or int(o.get("capture_per_class", 50))
    bound = 2.0 / M
    epochs = [r for r in _read_jsonl(out / "train" / "metrics.jsonl") if r.get("kind") == "epoch"]
    data: dict[str, Any] = {"layers": layers, "M": M, "capacity_lower_bound": bound,
                            "files": {tag: {"file": p.name, "epoch": ep} for tag, p, ep in files},
                            "best_epoch": res.get("best_epoch"), "final_epoch": res.get("final_epoch"),
                            "curves": [{k: e.get(k) for k in ("epoch", "train_acc", "test_acc", "unpermuted_acc",
                                                              "permuted_acc", "restored_acc")} for e in epochs]}
    if analysis_seeds is None:  # runs from before the option: one seed, as they were summarised
        n_seeds = check_positive_int(o.get("analysis_seeds", 1), f"{out}/experiment.json: options.analysis_seeds")
    else:
        n_seeds = check_positive_int(analysis_seeds, "analysis_seeds")
    seeds = e2_analysis_seeds(seed, n_seeds)
    table = _e2_table(_e2_rows(out, [p for _, p, _ in files], mftma=mftma, recompute=recompute, n_reps=n_reps,
                               n_t=n_t, seeds=seeds, per_class=M, progress=progress, jobs=jobs), files) if files else {}
    data["metrics"] = table
    data["analysis_seeds"] = seeds
    names_ = sorted(p.name for _, p, _ in files)
    data["analysis"] = {"files": names_, "seeds": seeds, "n_reps": n_reps, "n_t": n_t, "per_class": M, "mftma": mftma}
    eff = _e2_capacity_effects(table, layers, {t for t, _, _ in files}, bound, mftma, missing)
    eff.append(_e2_rewind_effect(out, res, data, missing))
    eff.append(_e2_split_effect(out, res, data, missing))
    return eff, data


def _e2_capacity_effects(table: dict, layers: list[str], tags: set[str], bound: float, mftma: bool,
                         missing: list[str]) -> list[dict]:
    """Effects 0 and 1: the best epoch's capacities (permuted at the lower bound 2/M, the others agree)
    and the change from the best to the final epoch (permuted rises, restored falls, in the last layers)."""
    names = EFFECT_NAMES["label-noise-geometry"]
    c = CRITERIA

    def cap(tag, subset):
        return [table.get(tag, {}).get(subset, {}).get("capacity", {}).get(layer, float("nan")) for layer in layers]

    crit0 = (f"best epoch: permuted capacity <= {c['e2_perm_capacity_factor']} x 2/M in every layer; (max - min) / "
             f"mean capacity <= {c['e2_agree_rel_spread']} for restored vs test in every layer and for unpermuted, "
             "restored, test in the first half of the layers")
    crit1 = (f"last layer: permuted capacity final / best >= {c['e2_perm_rise']} and restored final < best; the "
             "first hidden layer changes less (relative) than the last")
    if not mftma or not {"best", "final"} <= tags or not table.get("best", {}).get("permuted", {}).get("capacity"):
        why = "MFTMA capacity rows of acts_best.npz / acts_final.npz (permuted, restored subsets)"
        missing.append(why)
        return [_missing(names[0], why, crit0), _missing(names[1], why, crit1)]
    best = {s: cap("best", s) for s in ("unpermuted", "permuted", "restored", "test")}
    eff = [_e2_best_epoch_effect(best, layers, bound, crit0)]
    pb, pf = best["permuted"], cap("final", "permuted")
    rb, rf = best["restored"], cap("final", "restored")
    first = 1 if len(layers) > 2 and layers[0] == "input" else 0
    rise_last = pf[-1] / pb[-1]
    change_first = abs(pf[first] - pb[first]) / pb[first]
    change_last = abs(pf[-1] - pb[-1]) / pb[-1]
    ok = rise_last >= c["e2_perm_rise"] and rf[-1] < rb[-1] and change_first < change_last
    eff.append(_effect(names[1], ok, {"layers": layers, "permuted_best": pb, "permuted_final": pf,
                                      "restored_best": rb, "restored_final": rf,
                                      "permuted_rise_last_layer": rise_last,
                                      "relative_change_first_hidden": change_first,
                                      "relative_change_last": change_last}, crit1))
    return eff


def _e2_rewind_effect(out: Path, res: dict, data: dict, missing: list[str]) -> dict:
    """Effect 2: rewinding a layer of the last half to an earlier epoch recovers the test accuracy lost
    between the best and the final epoch (rows of rewind.json; adds data["rewind"])."""
    name = EFFECT_NAMES["label-noise-geometry"][2]
    c = CRITERIA
    crit2 = (f"max over (layer in the last half of the layers, 0 < epoch < final epoch) of test accuracy after rewinding "
             f"recovers >= {c['e2_rewind_recovery']} of the best - final test accuracy drop (drop >= {c['e2_min_drop']})")
    rewind_path = out / "rewind.json"
    if not rewind_path.is_file():
        missing.append("rewind.json (set rewind=true)")
        return _missing(name, "rewind.json", crit2)
    rows = json.loads(rewind_path.read_text())
    rl = list(dict.fromkeys(r["layer"] for r in rows))
    re_ = sorted({int(r["epoch"]) for r in rows})
    grid = [[next((r.get("test_acc") for r in rows if r["layer"] == layer and r["epoch"] == e), None)
             for e in re_] for layer in rl]
    data["rewind"] = {"layers": rl, "epochs": re_, "test_acc": grid,
                      "train_acc": [[next((r.get("train_acc") for r in rows if r["layer"] == layer
                                           and r["epoch"] == e), None) for e in re_] for layer in rl]}
    best_acc = (res.get("best") or {}).get("test_acc")
    final_acc = (res.get("final") or {}).get("test_acc")
    final_ep = int(res.get("final_epoch") or max(re_))
    last = rl[len(rl) // 2:]
    rewound = [(r["test_acc"], r["layer"], r["epoch"]) for r in rows  # epochs strictly inside training
               if r.get("test_acc") is not None and 0 < r["epoch"] < final_ep]
    cand = [t for t in rewound if t[1] in last]
    if best_acc is None or final_acc is None or not cand:
        return _missing(name, "test accuracies in experiment.json / rewind rows", crit2)
    drop = best_acc - final_acc

    def recovered(a: float) -> float:
        return (a - final_acc) / drop if drop > 0 else float("nan")

    acc, layer, ep = max(cand)
    frac = recovered(acc)
    any_acc, any_layer, any_ep = max(rewound)  # context, not part of the criterion: any layer
    return _effect(name, drop >= c["e2_min_drop"] and frac >= c["e2_rewind_recovery"],
                   {"best_test_acc": best_acc, "final_test_acc": final_acc, "drop": drop,
                    "rewound_test_acc": acc, "rewound_layer": layer, "rewind_epoch": ep,
                    "recovered_fraction": frac, "layers_considered": last,
                    "any_layer": {"layer": any_layer, "rewind_epoch": any_ep, "rewound_test_acc": any_acc,
                                  "recovered_fraction": recovered(any_acc)}}, crit2)


def _e2_split_curve(split: list[dict]) -> list[dict]:
    """Per-example label-dependent / -independent gradient norms of unpermuted and permuted examples."""
    def per_ex(part, key):
        return part[key] / max(part.get("n", 1), 1)

    curve = []
    for r in split:
        u, p = r["split"]["unpermuted"], r["split"]["permuted"]
        curve.append({"epoch": r["epoch"], "n_unpermuted": u.get("n"), "n_permuted": p.get("n"),
                      "unpermuted_dependent": per_ex(u, "dependent_total"),
                      "permuted_dependent": per_ex(p, "dependent_total"),
                      "unpermuted_independent": per_ex(u, "independent_total"),
                      "permuted_independent": per_ex(p, "independent_total"),
                      "tensor_ratio": {k: (u["dependent"][k] / max(u.get("n", 1), 1))
                                       / (p["dependent"][k] / max(p.get("n", 1), 1))
                                       for k in u.get("dependent", {}) if p["dependent"].get(k)}})
    return curve


def _e2_split_effect(out: Path, res: dict, data: dict, missing: list[str]) -> dict:
    """Effect 3: early in training the label-dependent gradient of unpermuted examples dominates that of
    permuted ones (gradient_split.jsonl; adds data["gradient_split"])."""
    name = EFFECT_NAMES["label-noise-geometry"][3]
    c = CRITERIA
    crit3 = (f"mean over the early epochs (1 .. best epoch) of the per-example label-dependent gradient norm "
             f"(dependent_total / n) of unpermuted over permuted examples > {c['e2_split_ratio']}")
    split = [r for r in _read_jsonl(out / "gradient_split.jsonl") if r.get("epoch", 0) > 0]
    if not split:
        missing.append("gradient_split.jsonl (set split_every > 0)")
        return _missing(name, "gradient_split.jsonl", crit3)
    curve = _e2_split_curve(split)
    data["gradient_split"] = curve
    best_ep = int(res.get("best_epoch") or 0)
    early = [q for q in curve if q["epoch"] <= max(best_ep, 1)] or curve[:1]
    ratios = [q["unpermuted_dependent"] / q["permuted_dependent"] for q in early if q["permuted_dependent"]]
    mean_ratio = float(np.mean(ratios)) if ratios else float("nan")
    return _effect(name, mean_ratio > c["e2_split_ratio"],
                   {"early_epochs": [q["epoch"] for q in early], "ratios": ratios, "mean_ratio": mean_ratio,
                    "max_tensor_ratio_early": max((max(q["tensor_ratio"].values(), default=float("nan"))
                                                   for q in early), default=float("nan"))}, crit3)
