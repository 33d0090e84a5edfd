"""Common checks over every metric `geomprobe analyze` emits (scikit-learn's test_common style):
each is classified in geomprobe.registry, and its declared invariances hold on real output."""
import numpy as np
import pytest

from geomprobe.analysis import AnalyzeOptions, analyze
from geomprobe.io import save_activations
from geomprobe.registry import METRICS
from geomprobe.synthetic import synthetic_activations


def _file(path, scale=1.0, perm=None, with_grads=True):
    kw = synthetic_activations(3, n_classes=4, per_class=8, n_test_per_class=6, n_layers=2, dim=12)
    n = len(kw["labels"])
    order = np.arange(n) if perm is None else perm
    kw["activations"] = {k: v[order] * scale for k, v in kw["activations"].items()}
    for key in ("labels", "train_labels", "permuted", "split"):
        kw[key] = kw[key][order]
    if with_grads:
        g = np.random.default_rng(0).standard_normal((n, 3, 5)) + 0.3
        kw["grads"] = {"fc": {"weight": g[order] * scale}}
    save_activations(path, **kw)
    return path


def _values(report):
    return {(r["layer"], r["subset"], r["metric"], r["class"]): r["value"] for r in report.rows}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("common")
    opts = AnalyzeOptions(seed=5, n_t=40, n_reps=2, per_class=None, glue=True, companion=True)
    return d, opts, _values(analyze([_file(d / "base.npz")], opts))


def test_every_emitted_metric_is_classified(base):
    _, _, vals = base
    emitted = {k[2] for k in vals}
    assert emitted - set(METRICS) == set(), f"unclassified metrics: {sorted(emitted - set(METRICS))}"
    for info in METRICS.values():
        assert info.better in ("higher", "lower", "neither")


def _compare(a, b, predicate):
    checked = 0
    for key, v in a.items():
        if predicate(METRICS[key[2]]) and isinstance(v, float):
            assert b[key] == pytest.approx(v, rel=1e-6, abs=1e-9), key
            checked += 1
    assert checked > 10


def test_declared_scale_invariance_holds(base):
    d, opts, vals = base
    scaled = _values(analyze([_file(d / "scaled.npz", scale=3.5)], opts))
    _compare(vals, scaled, lambda i: i.scale_invariant and not i.random)


def test_declared_permutation_invariance_holds(base):
    d, opts, vals = base
    perm = np.random.default_rng(1).permutation(56)
    shuffled = _values(analyze([_file(d / "perm.npz", perm=perm)], opts))
    _compare(vals, shuffled, lambda i: i.perm_invariant and not i.random)


def test_same_seed_same_numbers_for_random_metrics(base):
    d, opts, vals = base
    again = _values(analyze([d / "base.npz"], opts))
    assert again == vals
    other = _values(analyze([d / "base.npz"], AnalyzeOptions(seed=6, n_t=40, n_reps=2, per_class=None, glue=True,
                                                                   companion=True)))
    assert any(other[k] != v for k, v in vals.items() if METRICS[k[2]].random and k[2] == "capacity")
