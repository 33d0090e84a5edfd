"""Post-hoc effects of the four experiments (spec: experiments.md E1-E4), computed from a run's artefacts.

    from geomprobe.trainers.effects import summarize
    summary = summarize("geomprobe-runs/label-noise-geometry-small")   # writes DIR/summary.json

``summarize(outdir)`` reads ``experiment.json`` to learn which experiment ran, then the logs and
activation files it left (for E2 it runs :func:`geomprobe.analysis.analyze` on the activation files
for MFTMA and caches the rows in ``DIR/analysis``), measures every effect the spec asks for and writes
``DIR/summary.json`` atomically::

    {"experiment", "preset", "seed", "effects": [{"name", "passed", "measured", "criterion"}, ...],
     "data": {... the tables the figures are drawn from ...}, "missing": [... what the run did not log ...]}

No training happens here and torch is not imported: a report can be rebuilt on any machine from the
saved results. The thresholds of every criterion are stated in docs/reproducing.md next to the values
measured with several seeds. An effect that cannot be measured (an artefact is missing) is listed with
``passed: false`` and a ``measured`` that says what is missing, never silently dropped.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np

from geomprobe._validation import InputError, check_positive_int
from geomprobe.io import atomic_write_text, open_activations

__all__ = ["summarize", "load_summary", "EFFECT_NAMES", "CRITERIA", "SUMMARY_FILE"]

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


# -- entry point ---------------------------------------------------------------------------------


def summarize(outdir: str | Path, *, mftma: bool = True, recompute: bool = False, n_reps: int = 2,
              n_t: int = 50, seed: int | None = None, analysis_seeds: int | None = None, write: bool = True,
              tags: tuple[str, ...] | None = None, progress: Callable[[int, int], None] | None = None) -> dict:
    """Measure every effect of the run in ``outdir`` and write ``outdir/summary.json`` (atomically).

    ``mftma``: run MFTMA on E2's activation files (else only alignment; capacity effects are then
    listed as missing); ``recompute``: analyse again even if ``outdir/analysis/metrics.json`` holds
    rows for the same files; ``n_reps``/``n_t``: MFTMA repetitions and sampled directions; ``seed``:
    the analysis seed (default: the run's seed); ``analysis_seeds``: E2's capacities are the mean over
    this many analysis seeds (default: the run's option ``analysis_seeds``, 1 for runs without it);
    ``tags``: E2, analyse only these activation files (``acts_<tag>.npz``; default all, the demo uses
    best and final); ``progress(done, total)``: called after every finished E2 analysis task.
    The E2 analysis options are recorded in ``summary["data"]["analysis"]`` with the ``geomprobe
    analyze`` command line that reproduces the cached rows.
    """
    out = Path(outdir)
    exp = _experiment(out)
    name = exp["experiment"]
    o = exp.get("options", {})
    if exp.get("status") != "done":
        raise InputError(f"{out}/experiment.json: status is {exp.get('status')!r}, not 'done' (the run did not finish)")
    seed = int(o.get("seed", 0)) if seed is None else int(seed)
    missing: list[str] = []
    fn = {"extreme-memorization": _e1, "label-noise-geometry": _e2, "identity-crisis": _e3,
          "normalized-loss": _e4}[name]
    kw = dict(mftma=mftma, recompute=recompute, n_reps=n_reps, n_t=n_t, seed=seed,
              analysis_seeds=analysis_seeds, tags=tags, progress=progress) if name == "label-noise-geometry" \
        else {}
    effects, data = fn(out, exp, missing, **kw)
    assert [e["name"] for e in effects] == EFFECT_NAMES[name]  # internal invariant, not user input
    summary = {"format": "geomprobe-summary", "format_version": 1, "experiment": name,
               "preset": exp.get("preset", ""), "seed": int(o.get("seed", 0)), "options": o,
               "n_passed": sum(e["passed"] for e in effects), "n_effects": len(effects),
               "effects": effects, "missing": missing, "data": _clean(data)}
    if write:
        atomic_write_text(out / SUMMARY_FILE, json.dumps(summary, indent=1, allow_nan=False))
    return summary


# -- E1: extreme memorization --------------------------------------------------------------------


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


# -- E2: label-noise geometry --------------------------------------------------------------------

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
             seeds: list[int], per_class: int, progress: Callable[[int, int], None] | None = None) \
        -> list[list[dict]]:
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
            rows = _e2_analyze(a, want, mftma=mftma, n_reps=n_reps, n_t=n_t, seed=s, per_class=per_class, tick=tick)
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
                tick=None) -> list[dict]:
    from geomprobe.analysis import AnalyzeOptions, analyze

    opts = AnalyzeOptions(seed=seed, mftma=mftma, n_reps=n_reps, n_t=n_t, per_class=per_class)
    rep = analyze(want, opts, outdir=adir, force=True, progress=tick)
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
        seed: int, analysis_seeds: int | None, tags: tuple[str, ...] | None = None, progress=None):
    o = exp["options"]
    res = exp.get("result", {})
    names = EFFECT_NAMES["label-noise-geometry"]
    c = CRITERIA
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
    eff: list[dict] = []
    tags = {t for t, _, _ in files}
    if analysis_seeds is None:  # runs from before the option: one seed, as they were summarised
        n_seeds = check_positive_int(o.get("analysis_seeds", 1), f"{out}/experiment.json: options.analysis_seeds")
    else:
        n_seeds = check_positive_int(analysis_seeds, "analysis_seeds")
    seeds = e2_analysis_seeds(seed, n_seeds)
    table = _e2_table(_e2_rows(out, [p for _, p, _ in files], mftma=mftma, recompute=recompute, n_reps=n_reps,
                               n_t=n_t, seeds=seeds, per_class=M, progress=progress), files) if files else {}
    data["metrics"] = table
    data["analysis_seeds"] = seeds
    names_ = sorted(p.name for _, p, _ in files)
    data["analysis"] = {"files": names_, "seeds": seeds, "n_reps": n_reps, "n_t": n_t, "per_class": M, "mftma": mftma}

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
        eff += [_missing(names[0], why, crit0), _missing(names[1], why, crit1)]
    else:
        best = {s: cap("best", s) for s in ("unpermuted", "permuted", "restored", "test")}
        eff.append(_e2_best_epoch_effect(best, layers, bound, crit0))
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
    # rewinding
    crit2 = (f"max over (layer in the last half of the layers, 0 < epoch < final epoch) of test accuracy after rewinding "
             f"recovers >= {c['e2_rewind_recovery']} of the best - final test accuracy drop (drop >= {c['e2_min_drop']})")
    rewind_path = out / "rewind.json"
    if not rewind_path.is_file():
        missing.append("rewind.json (set rewind=true)")
        eff.append(_missing(names[2], "rewind.json", crit2))
    else:
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
            eff.append(_missing(names[2], "test accuracies in experiment.json / rewind rows", crit2))
        else:
            drop = best_acc - final_acc

            def recovered(a: float) -> float:
                return (a - final_acc) / drop if drop > 0 else float("nan")

            acc, layer, ep = max(cand)
            frac = recovered(acc)
            any_acc, any_layer, any_ep = max(rewound)  # context, not part of the criterion: any layer
            eff.append(_effect(names[2], drop >= c["e2_min_drop"] and frac >= c["e2_rewind_recovery"],
                               {"best_test_acc": best_acc, "final_test_acc": final_acc, "drop": drop,
                                "rewound_test_acc": acc, "rewound_layer": layer, "rewind_epoch": ep,
                                "recovered_fraction": frac, "layers_considered": last,
                                "any_layer": {"layer": any_layer, "rewind_epoch": any_ep, "rewound_test_acc": any_acc,
                                              "recovered_fraction": recovered(any_acc)}}, crit2))
    # gradient split
    crit3 = (f"mean over the early epochs (1 .. best epoch) of the per-example label-dependent gradient norm "
             f"(dependent_total / n) of unpermuted over permuted examples > {c['e2_split_ratio']}")
    split = [r for r in _read_jsonl(out / "gradient_split.jsonl") if r.get("epoch", 0) > 0]
    if not split:
        missing.append("gradient_split.jsonl (set split_every > 0)")
        eff.append(_missing(names[3], "gradient_split.jsonl", crit3))
    else:
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
        data["gradient_split"] = curve
        best_ep = int(res.get("best_epoch") or 0)
        early = [q for q in curve if q["epoch"] <= max(best_ep, 1)] or curve[:1]
        ratios = [q["unpermuted_dependent"] / q["permuted_dependent"] for q in early if q["permuted_dependent"]]
        mean_ratio = float(np.mean(ratios)) if ratios else float("nan")
        eff.append(_effect(names[3], mean_ratio > c["e2_split_ratio"],
                           {"early_epochs": [q["epoch"] for q in early], "ratios": ratios, "mean_ratio": mean_ratio,
                            "max_tensor_ratio_early": max((max(q["tensor_ratio"].values(), default=float("nan"))
                                                           for q in early), default=float("nan"))}, crit3))
    return eff, data


# -- E3: identity crisis -------------------------------------------------------------------------

_FCN = re.compile(r"^fcn-(?P<act>[a-z]+)-h(?P<h>\d+)(?:-w(?P<w>\d+))?$")
_CONV = re.compile(r"^conv-d(?P<d>\d+)-c(?P<c>\d+)$")


def _e3(out: Path, exp: dict, missing: list[str]):
    from geomprobe.probes import probe_correlations

    names = EFFECT_NAMES["identity-crisis"]
    runs = exp.get("result", {}).get("runs", [])
    models = []
    for r in runs:
        if "activation_file" not in r:
            models.append({"run": r["run"], "diverged": r.get("diverged", "no activation file")})
            continue
        with open_activations(out / r["activation_file"]) as f:
            inputs = f.array("probe/inputs")
            pred = f.array(f"probe/pred/{r['run']}")
            x_hat = f.array("probe/x_hat")
            rho = f.array("probe/rho")
        pc = probe_correlations(inputs, pred, x_hat, rho)
        m = _FCN.match(r["run"])
        mc = _CONV.match(r["run"])
        if m:
            family = f"fcn-{m['act']}" + (f"-w{m['w']}" if m["w"] else "")
            depth = int(m["h"])
        elif mc:
            family, depth = f"conv-c{mc['c']}", int(mc["d"])
        else:
            family, depth = "other", 0
        lo = pc.rho < 1.0
        loss = r.get("final_train_loss")
        # the training loss is 0.5 ||f(x) - x||^2: relative to the zero map's, 0.5 ||x||^2
        rel = float(loss) / (0.5 * float(np.sum(np.asarray(x_hat, np.float64) ** 2))) if loss is not None else None
        models.append({"run": r["run"], "family": family, "depth": depth, "rho": pc.rho,
                       "relative_train_loss": rel,
                       "identity": pc.identity_mean, "constant": pc.constant_mean,
                       "final_train_loss": loss, "steps": r.get("steps"),
                       "eq1_max_abs_diff": r.get("eq1_max_abs_diff"),
                       "constant_minus_identity": float(np.nanmean(pc.constant_mean[lo] - pc.identity_mean[lo]))
                       if lo.any() else float("nan"),
                       "identity_at_rho0": float(pc.identity_mean[0]), "constant_at_rho0": float(pc.constant_mean[0]),
                       "activation_file": r["activation_file"]})
    diverged = [m["run"] for m in models if "diverged" in m]
    if diverged:
        missing.append(f"diverged (no predictions): {', '.join(diverged)}")
    # as in the paper, only nets that fit their one example count (E4 likewise keeps nets at zero training error)
    unfit = [m for m in models if "family" in m and not (m["relative_train_loss"] is not None
                                                         and m["relative_train_loss"] <= CRITERIA["e3_fit"])]
    if unfit:
        rels = [m["relative_train_loss"] for m in unfit]
        shown = [f"{m['run']} ({'no loss logged' if v is None else format(v, '.3g')})" for m, v in zip(unfit, rels)]
        missing.append(f"not fitted (final loss > {CRITERIA['e3_fit']:g} x the zero map's 0.5 ||x||^2), left out of "
                       "the effects: " + ", ".join(shown))
    ok_models = [m for m in models if "family" in m and m not in unfit]
    data = {"models": models}
    fam: dict[str, list] = {}
    for m in ok_models:
        fam.setdefault(m["family"], []).append(m)
    for v in fam.values():
        v.sort(key=lambda m: m["depth"])
    fcns = {k: v for k, v in fam.items() if k.startswith("fcn-") and len({m["depth"] for m in v}) >= 2}
    convs = [m for k, v in fam.items() if k.startswith("conv-") for m in v]
    convs.sort(key=lambda m: m["depth"])
    eff = []
    crit0 = ("every FCN family (activation, width): s = mean over rho < 1 of (constant - identity correlation) "
             "has Spearman(depth, s) > 0 and s(deepest) > s(shallowest)")
    if not fcns:
        missing.append("FCNs of at least two depths")
        eff.append(_missing(names[0], "FCNs of at least two depths", crit0))
    else:
        per = {}
        for k, v in fcns.items():
            d = [m["depth"] for m in v]
            s = [m["constant_minus_identity"] for m in v]
            per[k] = {"depths": d, "constant_minus_identity": s, "spearman": _spearman(d, s)}
        ok = all(p["spearman"] > 0 and p["constant_minus_identity"][-1] > p["constant_minus_identity"][0]
                 for p in per.values())
        eff.append(_effect(names[0], ok, per, crit0))
    crit1 = (f"shallowest ConvNet: identity correlation on orthogonal inputs (rho = 0) >= {CRITERIA['e3_identity_min']} "
             "and > its constant correlation")
    crit2 = ("deepest ConvNet: mean over rho < 1 of constant correlation > identity correlation (s > 0), and s larger "
             "than the shallowest ConvNet's")
    if len(convs) < 2:
        missing.append("ConvNets of at least two depths")
        eff += [_missing(names[1], "ConvNets of at least two depths", crit1),
                _missing(names[2], "ConvNets of at least two depths", crit2)]
    else:
        sh, dp = convs[0], convs[-1]
        eff.append(_effect(names[1], sh["identity_at_rho0"] >= CRITERIA["e3_identity_min"]
                           and sh["identity_at_rho0"] > sh["constant_at_rho0"],
                           {"run": sh["run"], "depth": sh["depth"], "identity_at_rho0": sh["identity_at_rho0"],
                            "constant_at_rho0": sh["constant_at_rho0"]}, crit1))
        eff.append(_effect(names[2], dp["constant_minus_identity"] > 0
                           and dp["constant_minus_identity"] > sh["constant_minus_identity"],
                           {"run": dp["run"], "depth": dp["depth"], "constant_minus_identity": dp["constant_minus_identity"],
                            "shallowest_constant_minus_identity": sh["constant_minus_identity"],
                            "by_depth": {m["depth"]: m["constant_minus_identity"] for m in convs}}, crit2))
    return eff, data


# -- E4: normalised loss -------------------------------------------------------------------------


def _fit(x, y) -> dict:
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 3 or np.ptp(x) == 0:
        return {"slope": float("nan"), "intercept": float("nan"), "r2": float("nan"), "rmse": float("nan"), "n": len(x)}
    from geomprobe.probes import normalized_loss_fit

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
