"""The optional row families of `geomprobe analyze` (--glue, --companion, --compare) through the real
entry point: their rows are present and registered, they never change another family's numbers, and
--compare refuses files with other examples before any work."""
import csv

import numpy as np
import pytest

from geomprobe.analysis import AnalyzeOptions, analyze
from geomprobe.cli.main import main
from geomprobe.io import save_activations
from geomprobe.registry import METRICS
from geomprobe.synthetic import synthetic_activations


@pytest.fixture(scope="module")
def acts(tmp_path_factory):
    d = tmp_path_factory.mktemp("families")
    kw = synthetic_activations(0, n_classes=4, per_class=10, n_test_per_class=6, n_layers=2, dim=12)
    save_activations(d / "a.npz", **kw)
    kw["activations"] = {k: v * 2.0 + 1.0 for k, v in kw["activations"].items()}
    save_activations(d / "b.npz", **kw)
    return d


def _metrics(report):
    return {(r["layer"], r["subset"], r["metric"], r["class"]): r["value"] for r in report.rows}


def test_glue_and_companion_rows_are_emitted_and_registered(acts):
    opts = AnalyzeOptions(seed=1, n_t=30, n_reps=2, glue=True, companion=True)
    vals = _metrics(analyze([acts / "a.npz"], opts))
    names = {k[2] for k in vals}
    for m in ("glue_capacity", "glue_radius", "glue_dimension", "glue_utility", "participation_ratio",
              "effective_rank", "nc1", "linear_probe_acc"):
        assert m in names, m
    assert names <= set(METRICS)
    for layer in ("layer1", "layer2"):
        for subset in ("unpermuted", "permuted", "restored", "test"):
            assert vals[(layer, subset, "glue_capacity", "")] > 0
            assert vals[(layer, subset, "participation_ratio", "")] >= 1.0
    # the permuted subset is analysed with its training labels, the restored one with the true labels:
    # the companion probe of the permuted subset also reports the noisy-label probe (train_labels given)
    assert ("layer1", "permuted", "linear_probe_acc_train_labels", "") in vals


def test_optional_families_do_not_change_the_default_numbers(acts):
    base = _metrics(analyze([acts / "a.npz"], AnalyzeOptions(seed=3, n_t=30, n_reps=2)))
    more = _metrics(analyze([acts / "a.npz"], AnalyzeOptions(seed=3, n_t=30, n_reps=2, glue=True, companion=True)))
    assert base.keys() < more.keys()
    assert all(more[k] == v for k, v in base.items())


def test_glue_dichotomies_change_the_glue_rows_only(acts):
    r = _metrics(analyze([acts / "a.npz"], AnalyzeOptions(seed=3, n_t=30, n_reps=2, glue=True)))
    o = _metrics(analyze([acts / "a.npz"], AnalyzeOptions(seed=3, n_t=30, n_reps=2, glue=True,
                                                          glue_dichotomies="one_vs_rest")))
    key = ("layer2", "test", "glue_capacity", "")
    assert r[key] != o[key]
    assert r[("layer2", "test", "capacity", "")] == o[("layer2", "test", "capacity", "")]


def test_compare_writes_similarity_csv(acts, tmp_path, capsys):
    out = tmp_path / "o"
    code = main(["analyze", str(acts / "a.npz"), str(acts / "b.npz"), "-o", str(out), "--no-mftma", "--compare",
                 "--quiet"])
    assert code == 0
    with open(out / "similarity.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["metric"] for r in rows} == {"cka", "cka_unbiased", "procrustes_angle"}
    # b's layers are an affine map (2 X + 1) of a's: CKA 1 and angle 0 between the same layer of both files
    same = [r for r in rows if r["layer_a"] == r["layer_b"] and r["file_a"] != r["file_b"]]
    assert len(same) == 2 * 3
    for r in same:
        # float32 activations: the angle is arccos of 1 - O(1e-8), so about 1e-4 rad of rounding
        want, tol = (0.0, 1e-3) if r["metric"] == "procrustes_angle" else (1.0, 1e-6)
        assert float(r["value"]) == pytest.approx(want, abs=tol), r
    # 4 (file, layer) items -> 6 unordered pairs x 3 metrics
    assert len(rows) == 18


def test_compare_refuses_files_with_other_examples_before_work(acts, tmp_path, capsys):
    kw = synthetic_activations(0, n_classes=3, per_class=5, n_layers=2, dim=6)
    save_activations(tmp_path / "c.npz", **kw)
    out = tmp_path / "o"
    code = main(["analyze", str(acts / "a.npz"), str(tmp_path / "c.npz"), "-o", str(out), "--compare", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert "--compare" in err and "other examples" in err and "c.npz" in err
    assert not out.exists()


def test_glue_option_is_validated():
    with pytest.raises(Exception, match="glue_dichotomies must be 'random' or 'one_vs_rest'; got 'bogus'"):
        AnalyzeOptions(glue=True, glue_dichotomies="bogus")


def test_glue_is_in_the_resume_key(acts, tmp_path):
    out = tmp_path / "r"
    analyze([acts / "a.npz"], AnalyzeOptions(seed=0, n_t=20, n_reps=1, mftma=False), outdir=out)
    rep = analyze([acts / "a.npz"], AnalyzeOptions(seed=0, n_t=20, n_reps=1, mftma=False, glue=True), outdir=out,
                  resume=True)
    assert rep.n_resumed == 0
    assert any(r["metric"] == "glue_capacity" for r in rep.rows)
    assert np.isfinite([r["value"] for r in rep.rows if r["metric"] == "glue_capacity"]).all()
