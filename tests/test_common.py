"""Common checks over every metric geomprobe emits (scikit-learn's test_common style): every emitted
metric is declared in geomprobe.registry and every declared one is emitted by the fixture below (or
listed in NOT_FROM_ANALYZE with the reason), and each declared invariance holds on real output.

The fixture file holds every key of the format (docs/format.md): labels, train_labels, permuted,
split, activations, gradients, and the probe keys (x_hat, inputs, rho, a model's predictions with one
zero-norm prediction, the raw collapse inputs); the analysis runs MFTMA with the empirical capacity,
GLUE, the companion measures and --drop-nonfinite (one gradient row holds a NaN).
"""
import re
from pathlib import Path

import numpy as np
import pytest

from geomprobe.analysis import AnalyzeOptions, analyze
from geomprobe.identity_probes import make_probe_inputs
from geomprobe.io import save_activations
from geomprobe.registry import METRICS
from geomprobe.synthetic import synthetic_activations

# Declared metrics that `geomprobe analyze` does not emit, and where they are emitted instead.
NOT_FROM_ANALYZE = {
    "nc3": "needs the last layer's weights: geomprobe.collapse.collapse_rows(weights=) (tests/test_collapse.py)",
    "nc4": "needs the network's logits: geomprobe.collapse.collapse_rows(logits=) (tests/test_collapse.py)",
    **{m: "per-example training scores: geomprobe.scores.scores_rows over train/scores.csv (tests/test_scores.py)"
       for m in ("score_forgetting_mean", "score_never_learned_frac", "score_el2n_mean", "score_aum_mean",
                 "score_grad_norm_mean", "score_auroc")},
}
OPTIONS = dict(seed=5, n_t=20, n_reps=1, per_class=None, glue=True, companion=True, empirical_capacity=True,
               drop_nonfinite=True)
N = 56  # rows of the synthetic file


def _file(path, scale=1.0, perm=None, nonfinite=True):
    """Every key of the format; ``scale`` multiplies every per-example vector (activations, gradients,
    probe predictions, collapse inputs), ``perm`` reorders the examples."""
    kw = synthetic_activations(3, n_classes=4, per_class=8, n_test_per_class=6, n_layers=2, dim=12)
    assert len(kw["labels"]) == N
    order = np.arange(N) if perm is None else perm
    kw["activations"] = {k: v[order] * scale for k, v in kw["activations"].items()}
    for key in ("labels", "train_labels", "permuted", "split"):
        kw[key] = kw[key][order]
    rng = np.random.default_rng(0)
    g = rng.standard_normal((N, 3, 5)) + 0.3
    if nonfinite:
        g[7, 0, 0] = np.nan  # a gradient row dropped with --drop-nonfinite: n_dropped_nonfinite
    kw["grads"] = {"fc": {"weight": g[order] * scale}}
    x_hat = rng.random((2, 3))
    p = make_probe_inputs(x_hat, [0.0, 0.5, 1.0], 3, seed=2)
    pred = 0.5 * p.inputs + 0.2 * x_hat
    pred[4] = 0.0  # one zero-norm prediction: n_undefined
    kw["extra"] = {"probe/x_hat": x_hat, "probe/inputs": p.inputs, "probe/rho": p.rho,
                   "probe/pred/net": pred * scale,
                   "probe/collapse_inputs": rng.standard_normal((N, 12))[order] * scale}
    save_activations(path, **kw)
    return path


def _values(report):
    return {(r["layer"], r["subset"], r["metric"], r["class"]): r["value"] for r in report.rows}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("common")
    opts = AnalyzeOptions(**OPTIONS)
    report = analyze([_file(d / "base.npz")], opts)
    assert report.errors == []
    return d, opts, _values(report)


def test_every_metric_is_declared_and_every_declared_metric_is_emitted(base):
    d, _, vals = base
    emitted = {k[2] for k in vals}
    # the similarity family (similarity.csv) comes from --compare over two files
    sim = analyze([_file(d / "a.npz", nonfinite=False), _file(d / "b.npz", scale=2.0, nonfinite=False)],
                  AnalyzeOptions(mftma=False, alignment=False, probes=False, compare=True))
    emitted |= {r["metric"] for r in sim.similarity}
    assert emitted - set(METRICS) == set(), f"emitted but not declared: {sorted(emitted - set(METRICS))}"
    assert set(NOT_FROM_ANALYZE) <= set(METRICS) and not set(NOT_FROM_ANALYZE) & emitted
    missing = set(METRICS) - emitted - set(NOT_FROM_ANALYZE)
    assert missing == set(), f"declared but emitted by no fixture: {sorted(missing)}"
    for info in METRICS.values():
        assert info.better in ("higher", "lower", "neither")


def _compare(a, b, predicate, rel, skip=()):
    checked = set()
    for key, v in a.items():
        if key[2] not in skip and predicate(METRICS[key[2]]) and isinstance(v, float) and np.isfinite(v):
            assert b[key] == pytest.approx(v, rel=rel, abs=1e-9), key
            checked.add(key[2])
    return checked


def _violated(a, b, names):
    """The metrics of ``names`` whose value moved on some row (beyond 1e-6 relative)."""
    return {k[2] for k, v in a.items() if k[2] in names and isinstance(v, float) and np.isfinite(v)
            and b[k] != pytest.approx(v, rel=1e-6, abs=1e-9)}


# Random metrics (GLUE, empirical capacity) are compared with the same seed: the random draws are then
# the same, and what remains is the solvers' tolerance.
RANDOM_REL = 1e-4
# Declared invariances that this fixture shows do NOT hold row by row (measured in this session; the
# owners of the families are told). The test asserts they are still violated, so a fix makes it fail
# until the entry is removed.
KNOWN_VIOLATIONS = {
    "scale": {m: "MFTMA with the same seed: the center-model fit draws a data-dependent number of random "
                 "starts, so the t-vectors differ after a common rescaling (rows moved up to 65 % at n_t=20)"
              for m in ("capacity", "radius", "dimension")},
    "perm": {m: "the probe's train/test split is drawn by row position, so reordering the examples changes "
                "it (declared permutation invariant and not random in geomprobe/linear_probe.py)"
             for m in ("linear_probe_acc", "averaging_probe_acc", "linear_probe_acc_train_labels")},
}


def test_declared_scale_invariance_holds(base):
    d, opts, vals = base
    scaled = _values(analyze([_file(d / "scaled.npz", scale=3.5)], opts))
    known = KNOWN_VIOLATIONS["scale"]
    checked = _compare(vals, scaled, lambda i: i.scale_invariant and not i.random, 1e-6, known)
    checked |= _compare(vals, scaled, lambda i: i.scale_invariant and i.random, RANDOM_REL, known)
    assert {"empirical_capacity", "glue_capacity", "identity_corr", "collapse_error", "rep_omega"} <= checked
    assert _violated(vals, scaled, known) == set(known)
    # and a metric declared not scale invariant does change
    moved = [k for k, v in vals.items() if not METRICS[k[2]].scale_invariant and isinstance(v, float)
             and np.isfinite(v) and v != 0 and scaled[k] != pytest.approx(v, rel=1e-6)]
    assert moved


def test_declared_permutation_invariance_holds(base):
    d, opts, vals = base
    perm = np.random.default_rng(1).permutation(N)
    shuffled = _values(analyze([_file(d / "perm.npz", perm=perm)], opts))
    known = KNOWN_VIOLATIONS["perm"]
    checked = _compare(vals, shuffled, lambda i: i.perm_invariant and not i.random, 1e-6, known)
    checked |= _compare(vals, shuffled, lambda i: i.perm_invariant and i.random, RANDOM_REL, known)
    assert {"capacity", "empirical_capacity", "collapse_error", "grad_omega", "identity_corr"} <= checked
    assert _violated(vals, shuffled, known) == set(known)


def test_same_seed_same_numbers_for_random_metrics(base):
    d, opts, vals = base
    again = _values(analyze([d / "base.npz"], opts))
    assert again.keys() == vals.keys()
    assert all(again[k] == v or (v != v and again[k] != again[k]) for k, v in vals.items())
    other = _values(analyze([d / "base.npz"], AnalyzeOptions(**{**OPTIONS, "seed": 6, "glue": False,
                                                                 "companion": False, "empirical_capacity": False,
                                                                 "layers": ("layer1",)})))
    assert any(other[k] != v for k, v in vals.items() if METRICS[k[2]].random and k[2] == "capacity")


def test_docs_metric_list_matches_the_registry():
    """docs/developing.md lists every declared metric once (section "Every metric row"), with its
    direction and invariances as declared; regenerate the table from the registry if this fails."""
    text = (Path(__file__).parents[1] / "docs" / "developing.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `([A-Za-z0-9_]+)` \| (higher|lower|neither) \| (yes|no) \| (yes|no) \| (yes|no) \|",
                      text, flags=re.M)
    listed = {name: (better, s, p, r) for name, better, s, p, r in rows}
    assert len(listed) == len(rows), "a metric is listed twice"
    yn = {True: "yes", False: "no"}
    declared = {m: (i.better, yn[i.scale_invariant], yn[i.perm_invariant], yn[i.random]) for m, i in METRICS.items()}
    assert listed == declared, "docs/developing.md's metric table differs from geomprobe.registry:\n" + "\n".join(
        f"| `{m}` | {b} | {s} | {p} | {r} | {METRICS[m].description} |" for m, (b, s, p, r) in declared.items())


def test_table_columns_are_declared_metrics():
    from geomprobe.cli._common import TABLE_METRICS

    names = [m for m, _ in TABLE_METRICS]
    assert len(set(names)) == len(names)
    assert set(names) <= set(METRICS), sorted(set(names) - set(METRICS))


def test_docs_name_every_fastmath_kernel():
    """docs/developing.md names every kernel compiled with fastmath (and only those)."""
    root = Path(__file__).parents[1]
    found = set()
    for path in (root / "geomprobe" / "_kernels").glob("*.py"):
        found |= {f"{path.stem}.{name}" for name in
                  re.findall(r"^@njit\([^)]*fastmath[^)]*\)\s*\ndef (\w+)", path.read_text(), flags=re.M)}
    text = (root / "docs" / "developing.md").read_text(encoding="utf-8")
    para = text[text.index("`fastmath` is off"):text.index("- **Randomness**")]
    named = set(re.findall(r"`(\w+\.\w+)`", para))
    assert found and named == found
