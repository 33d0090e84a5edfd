"""`geomprobe plot OUTDIR`: figures from any analysis output, driven by the rows present; radius as the
per-class median with its interquartile band; legends outside the axes; clean errors."""
import csv
import json
import sys

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from geomprobe import InputError  # noqa: E402
from geomprobe.cli.main import main  # noqa: E402
from geomprobe.plots import build_figures, file_labels, load_metrics, series  # noqa: E402

FILES = ["runs/e2/acts_final.npz", "runs/e2tty/acts_final.npz"]  # same basename: labels must differ
RADII = {"conv1": [1.0, 1.2, 1.4, 100.0], "conv2": [0.5, 0.7, 0.9, 1.1]}  # one class with a huge radius


def _rows():
    rows = []
    for k, f in enumerate(FILES):
        for layer, radii in RADII.items():
            for subset in ("unpermuted", "test"):
                def add(metric, value, cls=""):
                    rows.append({"file": f, "layer": layer, "subset": subset, "metric": metric, "class": cls,
                                 "value": value})
                add("n_examples", 40)
                add("rep_omega", 0.1 * (k + 1))
                add("capacity", 0.2 + 0.1 * k + (layer == "conv2") * 0.05)
                add("radius", float(np.mean(radii)) * (k + 1))
                for c, r in enumerate(radii):
                    add("radius", r * (k + 1), c)
                add("dimension", 3.0)
                add("center_correlation", 0.3)
                add("K", 1)
                add("glue_capacity", 0.5 + k)
                add("cka", 0.9 - 0.1 * k)
                add("empty_metric", "")
        rows.append({"file": f, "layer": "fc/weight", "subset": "unpermuted", "metric": "grad_diversity",
                     "class": "", "value": 2.0 + k})
    return rows


@pytest.fixture
def outdir(tmp_path):
    out = tmp_path / "analysis"
    out.mkdir()
    with open(out / "metrics.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["file", "layer", "subset", "metric", "class", "value"])
        w.writeheader()
        w.writerows(_rows())
    (out / "metrics.json").write_text(json.dumps({"files": FILES, "options": {"seed": 3, "n_t": 200}, "notes": []}))
    return out


def test_radius_is_the_per_class_median_with_quartiles_and_mean_on_request(outdir):
    t = load_metrics(outdir)
    med = series(t, "radius", "test")
    assert list(med) == FILES
    layers, y, lo, hi = med[FILES[1]]
    assert layers == ["conv1", "conv2"]
    for i, layer in enumerate(layers):
        vals = np.array(RADII[layer]) * 2
        assert y[i] == pytest.approx(np.median(vals))
        assert (lo[i], hi[i]) == pytest.approx(tuple(np.percentile(vals, [25, 75])))
    assert y[0] == pytest.approx(2 * 1.3)  # the median ignores the one huge class; the mean does not
    mean = series(t, "radius", "test", radius="mean")
    assert mean[FILES[1]][1][0] == pytest.approx(2 * np.mean(RADII["conv1"])) and mean[FILES[1]][2] is None
    cap = series(t, "capacity", "unpermuted")
    np.testing.assert_allclose(cap[FILES[0]][1], [0.2, 0.25])


def test_every_family_present_is_drawn_with_legends_outside_the_axes(outdir):
    figs = build_figures(load_metrics(outdir))
    assert list(figs) == ["mftma", "alignment", "glue", "other"]  # data-driven: glue_* and cka found
    assert "radius" in figs["mftma"][1] and "median" in figs["mftma"][1]
    for name, (fig, _) in figs.items():
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        assert len(fig.legends) == 1
        leg = fig.legends[0].get_window_extent(renderer)
        texts = [t.get_text() for t in fig.legends[0].get_texts()]
        assert texts == ["e2/acts_final.npz", "e2tty/acts_final.npz"]
        for ax in fig.axes:
            assert not leg.overlaps(ax.get_window_extent(renderer)), f"{name}: legend covers an axes"
    mftma_axes = figs["mftma"][0].axes
    assert len(mftma_axes) == 4 * 2  # capacity, radius, dimension, center_correlation x two subsets
    assert [a.get_ylabel() for a in mftma_axes[::2]][:2] == ["capacity", "radius (median over classes, IQR band)"]


def test_file_labels_are_the_shortest_distinct_suffixes():
    assert file_labels(["a/x.npz", "b/x.npz", "c/y.npz"]) == {"a/x.npz": "a/x.npz", "b/x.npz": "b/x.npz",
                                                              "c/y.npz": "y.npz"}
    assert file_labels(["r/e1/a.npz", "s/e1/a.npz"]) == {"r/e1/a.npz": "r/e1/a.npz", "s/e1/a.npz": "s/e1/a.npz"}


def test_cli_writes_pngs_and_a_report_and_refuses_to_overwrite(outdir, capsys):
    assert main(["plot", str(outdir), "--dpi", "40"]) == 0
    out = capsys.readouterr().out
    pdir = outdir / "plots"
    names = sorted(p.name for p in pdir.iterdir())
    assert names == ["alignment.png", "glue.png", "mftma.png", "other.png", "report.md"]
    for n in names[:-1]:
        assert (pdir / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (pdir / "report.md").read_text()
    assert "![mftma](mftma.png)" in report and "`e2tty/acts_final.npz`" in report and "seed=3" in report
    assert "| e2tty/acts_final.npz | conv2 (0.35) | conv2 (0.35) |" in report
    assert f"report: {pdir / 'report.md'}" in out
    assert main(["plot", str(outdir)]) == 2
    assert "already exists and is not empty; pass --force" in capsys.readouterr().err
    assert main(["plot", str(outdir), "--force", "--radius", "mean", "-o", str(outdir / "p2"), "--quiet",
                 "--dpi", "40"]) == 0
    assert "mean over classes" in (outdir / "p2" / "report.md").read_text()


def test_cli_errors_exit_2_without_traceback(tmp_path, outdir, capsys, monkeypatch):
    assert main(["plot", str(tmp_path / "nope")]) == 2
    assert "nope: not a directory" in capsys.readouterr().err
    assert main(["plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no metrics.csv (not an output folder of `geomprobe analyze`); did you mean" in err
    assert str(outdir) in err  # a `geomprobe train` folder holds its analysis one level down
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.csv").write_text("file,layer,value\nx,y,1\n")
    with pytest.raises(InputError, match=r"missing column\(s\) class, metric, subset"):
        load_metrics(bad)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if matplotlib were not installed
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert main(["plot", str(outdir)]) == 2
    err = capsys.readouterr().err
    assert "plots need matplotlib: pip install 'geomprobe[report]'" in err and "Traceback" not in err
    assert not (outdir / "plots").exists()  # nothing written before the check
