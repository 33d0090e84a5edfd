"""The command line through its real entry point: exit codes, stderr, outputs, no overwrite."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from geomprobe.cli.main import main
from geomprobe.io import save_activations
from geomprobe.synthetic import synthetic_activations


@pytest.fixture
def acts(tmp_path):
    p = tmp_path / "acts.npz"
    save_activations(p, **synthetic_activations(1, n_classes=4, per_class=6, n_test_per_class=4, dim=8))
    return p


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_analyze_writes_long_format_csv_and_json(acts, tmp_path, capsys):
    out = tmp_path / "res"
    code, stdout, err = run(["analyze", acts, "-o", out, "--no-mftma"], capsys)
    assert code == 0, err
    assert "layer1" in stdout and "unpermuted" in stdout and "omega" in stdout
    with open(out / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["file", "layer", "subset", "metric", "class", "value"]
    assert {r["subset"] for r in rows} == {"unpermuted", "permuted", "restored", "test"}
    per_class = [r for r in rows if r["metric"] == "rep_omega" and r["class"] != ""]
    assert per_class and all(r["class"].lstrip("-").isdigit() for r in per_class)
    data = json.loads((out / "metrics.json").read_text())
    assert len(data["rows"]) == len(rows) and data["errors"] == []


def test_existing_outdir_is_left_untouched_without_force(acts, tmp_path, capsys):
    out = tmp_path / "res"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, _, err = run(["analyze", acts, "-o", out, "--no-mftma"], capsys)
    assert code == 2 and "already exists" in err and "--force" in err and "Traceback" not in err
    assert os.listdir(out) == ["keep.txt"]
    code, _, _ = run(["analyze", acts, "-o", out, "--no-mftma", "--force"], capsys)
    assert code == 0 and (out / "metrics.csv").exists() and (out / "keep.txt").read_text() == "precious"


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: None, "no such file"),
        (lambda p: p.write_bytes(b"\x80\x04junk"), "not a zip archive"),
        (lambda p: np.savez(p, labels=np.arange(3), **{"act/l": np.ones((4, 2))}), "has 4 rows but 'labels' has 3"),
        (lambda p: np.savez(p, labels=np.arange(2), **{"act/l": np.array([[1.0, np.inf], [0, 0]])}),
         r"'act/l' contains 1 non-finite value\(s\).*first at row 0, column 1"),
    ],
)
def test_bad_input_exit_code_2_message_names_file(tmp_path, capsys, make, match):
    import re

    p = tmp_path / "bad.npz"
    make(p)
    code, _, err = run(["analyze", p, "-o", tmp_path / "o", "--no-mftma"], capsys)
    assert code == 2
    assert re.search(match, err) and str(p) in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()  # nothing written before the input is validated


def test_drop_nonfinite_excludes_rows_and_reports_them(tmp_path, capsys):
    a = np.random.default_rng(0).standard_normal((10, 3))
    a[3, 1] = np.nan
    p = tmp_path / "n.npz"
    np.savez(p, labels=np.arange(10) % 2, **{"act/l": a})
    code, _, err = run(["analyze", p, "-o", tmp_path / "o", "--no-mftma", "--drop-nonfinite"], capsys)
    assert code == 0 and "dropped 1 row(s) holding NaN or Inf" in err
    rows = json.loads((tmp_path / "o" / "metrics.json").read_text())["rows"]
    assert {r["metric"]: r["value"] for r in rows}["n_examples"] == 9


def test_one_example_class_is_reported_skipped(tmp_path, capsys):
    p = tmp_path / "one.npz"
    np.savez(p, labels=np.array([0, 0, 0, 1]), **{"act/l": np.random.default_rng(0).standard_normal((4, 3))})
    code, _, err = run(["analyze", p, "-o", tmp_path / "o", "--no-mftma"], capsys)
    assert code == 0 and "class 1 has 1 example(s); Omega needs at least 2: skipped" in err


def test_unknown_layer_and_subset_are_usage_errors(acts, tmp_path, capsys):
    code, _, err = run(["analyze", acts, "-o", tmp_path / "o", "--no-mftma", "--layers", "nope"], capsys)
    assert code == 2 and "no layer 'nope'" in err and "layer1" in err
    code, _, err = run(["analyze", acts, "-o", tmp_path / "o", "--no-mftma", "--subsets", "bogus"], capsys)
    assert code == 2 and "subsets must be among" in err and "bogus" in err


def test_several_files_gradients_and_selection(tmp_path, capsys, rng):
    files = []
    for epoch in range(2):
        p = tmp_path / f"e{epoch}.npz"
        y = np.repeat(np.arange(3), 5)
        save_activations(p, y, {"h": rng.standard_normal((15, 4))},
                         grads={"fc": {"weight": rng.standard_normal((15, 2, 3))}}, meta={"epoch": epoch})
        files.append(p)
    code, stdout, err = run(["analyze", *files, "-o", tmp_path / "o", "--no-mftma"], capsys)
    assert code == 0, err
    rows = json.loads((tmp_path / "o" / "metrics.json").read_text())["rows"]
    assert {os.path.basename(r["file"]) for r in rows} == {"e0.npz", "e1.npz"}
    metrics = {r["metric"] for r in rows if r["layer"] == "fc/weight"}
    assert {"grad_omega_in_class", "grad_diversity", "grad_sign_stiffness", "grad_confusion_min_cosine"} <= metrics


def test_same_seed_same_numbers(acts, tmp_path, capsys):
    """MFTMA on (capacity, radius, dimension draw random directions): the same seed gives the same file,
    another seed other numbers, so the test could fail."""
    small = ["--layers", "layer1", "--subsets", "test", "--n-t", "10", "--n-reps", "1"]
    for name, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        code, _, err = run(["analyze", acts, "-o", tmp_path / name, "--seed", seed, *small], capsys)
        assert code == 0, err
    a = (tmp_path / "a" / "metrics.csv").read_text()
    assert "capacity" in a and "radius" in a
    assert a == (tmp_path / "b" / "metrics.csv").read_text()
    assert a != (tmp_path / "c" / "metrics.csv").read_text()


def test_console_script_demo_and_usage_error(tmp_path):
    exe = os.path.join(os.path.dirname(sys.executable), "geomprobe")
    # the real demo trains the feed-forward net (4 hidden layers relu1..relu4); 2 epochs keep the test quick
    r = subprocess.run([exe, "demo", "--out", str(tmp_path / "d"), "--no-mftma", "--epochs", "2"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "relu4" in r.stdout and (tmp_path / "d" / "analysis" / "metrics.csv").exists()
    assert (tmp_path / "d" / "summary.json").exists() and (tmp_path / "d" / "report" / "report.md").exists()
    # the torch-free path keeps its layered synthetic activations
    r = subprocess.run([exe, "demo", "--out", str(tmp_path / "s"), "--no-mftma", "--synthetic"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "layer4" in r.stdout and (tmp_path / "s" / "analysis" / "metrics.csv").exists()
    r = subprocess.run([exe, "analyze"], capture_output=True, text=True)
    assert r.returncode == 2 and "usage" in r.stderr
