"""Effects (summary.json), figures and the report of the four experiments (spec E1-E4).

Fast tests train reduced tiny configurations once per module (seconds each) and check that summarize()
lists every effect in a well-formed summary.json, that the report is rebuilt from saved results only and
that every figure has a title, axis labels and a legend or colour bar (via matplotlib objects). Slow tests
(``-m slow``) train reduced real configurations and assert the direction of each experiment's main effect.
"""
import json
import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("matplotlib")

from geomprobe._validation import InputError  # noqa: E402
from geomprobe.cli.main import main  # noqa: E402
from geomprobe.trainers import effects, figures  # noqa: E402
from geomprobe.trainers.experiments import run_experiment  # noqa: E402
from geomprobe.trainers.options import options_for  # noqa: E402

# tiny presets made smaller still: the point is the plumbing, not the effect
FAST = {
    "extreme-memorization": ["epochs=2", "hidden=16", "n_train=120", "n_test=60", "capture_per_class=4",
                             "sigmas=0.01,0.1,10"],
    "label-noise-geometry": ["epochs=2", "n_classes=4", "n_train_per_class=12", "n_test_per_class=6", "width=16",
                             "capture_classes=4", "capture_per_class=4", "split_batch=32"],
    "identity-crisis": ["steps=5", "fcn_hidden=1,2", "fcn_widths=16", "conv_depths=1,2", "conv_channels=4",
                        "fcn_activations=relu", "collapse_per_class=2"],
    "normalized-loss": ["epochs=1", "n_train=60", "n_test=40", "channels=4", "init_stds=0.01,0.05,0.1",
                        "capture_per_class=2"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("reproduce")
    out = {}
    for name, sets in FAST.items():
        o = options_for(name, "tiny", sets=sets, device="cpu", progress="off")
        d = base / name
        run_experiment(name, o, d, preset="tiny", summarize=False)
        out[name] = d
    return out


@pytest.mark.parametrize("name", list(FAST))
def test_summarize_lists_every_effect_well_formed(runs, name):
    s = effects.summarize(runs[name], n_reps=1, n_t=20)
    on_disk = json.loads((runs[name] / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(s))
    assert s["experiment"] == name and s["n_effects"] == len(effects.EFFECT_NAMES[name])
    assert [e["name"] for e in s["effects"]] == effects.EFFECT_NAMES[name]
    for e in s["effects"]:
        assert set(e) == {"name", "passed", "measured", "criterion"}
        assert isinstance(e["passed"], bool) and e["criterion"] and e["measured"] is not None
    assert s["n_passed"] == sum(e["passed"] for e in s["effects"])
    assert isinstance(s["missing"], list)
    json.dumps(s, allow_nan=False)  # strict JSON: no NaN


def test_summarize_e2_uses_mftma_rows_and_caches_them(runs):
    d = runs["label-noise-geometry"]
    s = effects.summarize(d, n_reps=1, n_t=20)
    assert (d / "analysis" / "metrics.csv").exists()
    cap = s["data"]["metrics"]["best"]["permuted"]["capacity"]
    assert set(cap) == set(s["data"]["layers"]) and all(v > 0 for v in cap.values())
    assert s["data"]["capacity_lower_bound"] == pytest.approx(2 / 4)
    mtime = (d / "analysis" / "metrics.json").stat().st_mtime_ns
    effects.summarize(d, n_reps=1, n_t=20)  # same files: the cached analysis is reused
    assert (d / "analysis" / "metrics.json").stat().st_mtime_ns == mtime


def test_summarize_errors_name_the_problem(tmp_path, runs):
    with pytest.raises(InputError, match="no experiment.json"):
        effects.summarize(tmp_path)
    (tmp_path / "experiment.json").write_text(json.dumps({"experiment": "nope"}))
    with pytest.raises(InputError, match="unknown experiment 'nope'"):
        effects.summarize(tmp_path)
    exp = json.loads((runs["normalized-loss"] / "experiment.json").read_text())
    (tmp_path / "experiment.json").write_text(json.dumps(dict(exp, status="running")))
    with pytest.raises(InputError, match="status is 'running'"):
        effects.summarize(tmp_path)


def test_missing_artefact_is_listed_not_dropped(runs, tmp_path):
    import shutil

    d = tmp_path / "e2"
    shutil.copytree(runs["label-noise-geometry"], d)
    (d / "rewind.json").unlink()
    (d / "gradient_split.jsonl").unlink()
    s = effects.summarize(d, mftma=False)
    by = {e["name"]: e for e in s["effects"]}
    assert not by["rewinding_last_layers_recovers_test_accuracy"]["passed"]
    assert by["rewinding_last_layers_recovers_test_accuracy"]["measured"] == {"missing": "rewind.json"}
    assert any("rewind.json" in m for m in s["missing"]) and any("gradient_split" in m for m in s["missing"])
    assert any("MFTMA" in m for m in s["missing"])  # mftma=False: capacity effects cannot be measured


def test_rewinding_effect_reads_the_rewind_table(runs, tmp_path):
    """Known rewind table: only layers of the last half and epochs 0 < e < final count; the best rewind over
    every layer is reported as context; recovered fraction = (rewound - final) / (best - final)."""
    import shutil

    d = tmp_path / "e2"
    shutil.copytree(runs["label-noise-geometry"], d)
    exp = json.loads((d / "experiment.json").read_text())
    exp["result"]["best"]["test_acc"], exp["result"]["final"]["test_acc"] = 0.8, 0.5
    exp["result"]["final_epoch"] = 10
    (d / "experiment.json").write_text(json.dumps(exp))
    acc = {("a", 5): 0.79, ("b", 5): 0.55, ("c", 5): 0.62, ("d", 5): 0.6,   # a: first half, best of all
           ("c", 0): 0.9, ("d", 10): 0.95}                                 # epoch 0 and the final epoch: excluded
    rows = [{"layer": k[0], "epoch": k[1], "train_acc": 1.0, "test_acc": v} for k, v in acc.items()]
    (d / "rewind.json").write_text(json.dumps(rows))
    s = effects.summarize(d, mftma=False)
    e = next(e for e in s["effects"] if e["name"] == "rewinding_last_layers_recovers_test_accuracy")
    m = e["measured"]
    assert m["layers_considered"] == ["c", "d"] and (m["rewound_layer"], m["rewind_epoch"]) == ("c", 5)
    assert m["recovered_fraction"] == pytest.approx((0.62 - 0.5) / 0.3) and not e["passed"]
    assert m["any_layer"]["layer"] == "a" and m["any_layer"]["recovered_fraction"] == pytest.approx(0.29 / 0.3)
    rows.append({"layer": "d", "epoch": 7, "train_acc": 1.0, "test_acc": 0.66})  # (0.66 - 0.5) / 0.3 >= 0.5
    (d / "rewind.json").write_text(json.dumps(rows))
    e = next(e for e in effects.summarize(d, mftma=False)["effects"]
             if e["name"] == "rewinding_last_layers_recovers_test_accuracy")
    assert e["passed"] and e["measured"]["rewound_layer"] == "d"


def _check_axes(fig, name):
    from matplotlib.colorbar import Colorbar  # noqa: F401

    assert fig._suptitle is not None and fig._suptitle.get_text(), name
    cbar_axes = {ax for ax in fig.axes if ax.get_label() == "<colorbar>"}
    main_axes = [ax for ax in fig.axes if ax not in cbar_axes]
    for ax in main_axes:
        if not ax.get_xticks().size and not ax.get_yticks().size and name == "e3_predictions":
            continue  # image grid cells: the figure title and row/column labels say what they are
        assert ax.get_title(), (name, ax)
        assert ax.get_xlabel() and ax.get_ylabel(), (name, ax.get_title())
        has_legend = ax.get_legend() is not None
        has_cbar = bool(ax.images) and bool(cbar_axes)
        assert has_legend or has_cbar, (name, ax.get_title())


@pytest.mark.parametrize("name", list(FAST))
def test_figures_have_titles_labels_and_legends(runs, name):
    s = effects.summarize(runs[name], n_reps=1, n_t=20)
    for stem, fn, needs_dir, optional in figures.FIGURES[name]:
        if optional == "umap":
            continue  # slow to import and compile; drawn by the slow test
        fig = fn(runs[name], s) if needs_dir else fn(s)
        _check_axes(fig, stem)


def test_report_rebuilds_from_saved_results_without_training(runs, capsys):
    d = runs["normalized-loss"]
    effects.summarize(d)
    ckpt_mtimes = {p: p.stat().st_mtime_ns for p in d.rglob("*.pt")}
    code = main(["report", str(d), "--no-umap"])
    assert code == 0
    out = capsys.readouterr().out
    assert "normalized_losses_on_a_line" in out and "report:" in out
    md = (d / "report" / "report.md").read_text()
    assert "| effect | passed | measured | criterion |" in md and "![e4_losses](e4_losses.png)" in md
    assert (d / "report" / "e4_losses.png").stat().st_size > 1000
    assert {p: p.stat().st_mtime_ns for p in d.rglob("*.pt")} == ckpt_mtimes  # nothing retrained
    (d / "summary.json").unlink()  # rebuilt from the artefacts when missing
    assert main(["report", str(d), "--no-umap", "--quiet"]) == 0
    assert (d / "summary.json").exists()


def test_report_cli_refuses_a_folder_without_a_run(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no experiment.json" in capsys.readouterr().err


def test_import_effects_does_not_import_torch_or_matplotlib():
    import subprocess
    import sys

    code = ("import sys; import geomprobe.trainers.effects, geomprobe.trainers.report, geomprobe.cli.report; "
            "bad = [m for m in ('torch', 'matplotlib', 'umap') if m in sys.modules]; print(bad); sys.exit(bool(bad))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


# -- slow: reduced real configurations, direction of the main effect -------------------------------


def _run(tmp_path, name, preset, sets):
    o = options_for(name, preset, sets=sets, device="cpu", progress="off")
    run_experiment(name, o, tmp_path / name, preset=preset)
    return effects.summarize(tmp_path / name, n_reps=2, n_t=50)


def _needs_fashion_mnist():
    """Skip unless Fashion-MNIST is installed (Debian package dataset-fashion-mnist or GEOMPROBE_DATA)."""
    from geomprobe.trainers import data as D

    try:
        D.load_fashion_mnist()
    except InputError as exc:
        pytest.skip(f"Fashion-MNIST not available: {exc}")


def _eff(s, name):
    return next(e for e in s["effects"] if e["name"] == name)["measured"]


@pytest.mark.slow
def test_e1_large_sigma_memorizes_and_loses_alignment(tmp_path):
    s = _run(tmp_path, "extreme-memorization", "tiny",
             ["sigmas=0.01,10", "hidden=256", "epochs=60", "n_train=500", "n_test=300", "lr=0.05", "batch_size=64"])
    runs = sorted([r for r in s["data"]["runs"] if r["labels"] == "true"], key=lambda r: r["sigma"])
    small, big = runs[0], runs[-1]
    assert big["best_test_acc"] < small["best_test_acc"] - 0.2
    assert big["grad_alignment"] < small["grad_alignment"] and big["rep_alignment"] < small["rep_alignment"]


@pytest.mark.slow
def test_e2_permuted_capacity_rises_in_last_layer_after_best_epoch(tmp_path):
    from geomprobe.cli.demo import DEMO_OPTIONS

    sets = [f"{k}={v}" for k, v in DEMO_OPTIONS.items() if k not in ("device", "progress")]
    s = _run(tmp_path, "label-noise-geometry", "tiny", sets)
    m = _eff(s, "final_epoch_permuted_rises_restored_falls_in_last_layers")
    assert m["permuted_final"][-1] > m["permuted_best"][-1]
    assert m["restored_final"][-1] < m["restored_best"][-1]
    fig = figures.e2_umap(tmp_path / "label-noise-geometry", s)
    _check_axes(fig, "e2_umap")


@pytest.mark.slow
def test_e2_small_preset_rewinding_a_last_layer_recovers_test_accuracy(tmp_path):
    """The small preset's AlexNet (1/8 width, 150 epochs) on Fashion-MNIST, with fewer test images,
    checkpoints and captured points: memorising the permuted labels costs test accuracy, and putting one
    layer of the last half back to an earlier epoch wins most of it back (60-72 % over 11 seeds on a GPU,
    docs/reproducing.md; asserted with a margin for the smaller test set)."""
    _needs_fashion_mnist()
    s = _run(tmp_path, "label-noise-geometry", "small", ["n_test=2000", "keep_every=10", "split_every=0",
                                                          "capture_per_class=10", "analysis_seeds=1"])
    m = _eff(s, "rewinding_last_layers_recovers_test_accuracy")
    assert m["layers_considered"] == ["conv4", "conv5", "out"]
    assert m["drop"] >= 0.1
    assert m["rewound_test_acc"] > m["final_test_acc"] + 0.4 * m["drop"]


@pytest.mark.slow
def test_e3_deeper_fcn_is_more_constant(tmp_path):
    s = _run(tmp_path, "identity-crisis", "tiny", ["steps=200", "fcn_hidden=1,5", "fcn_widths=64",
                                                    "fcn_activations=relu", "conv_depths=1,6", "conv_channels=8"])
    per = _eff(s, "fcn_drift_to_constant_with_depth")
    fam = per["fcn-relu-w64"]
    assert fam["constant_minus_identity"][-1] > fam["constant_minus_identity"][0]


@pytest.mark.slow
def test_e3_shallow_convnet_identity_deep_convnet_constant(tmp_path):
    _needs_fashion_mnist()
    s = _run(tmp_path, "identity-crisis", "small", ["fcn_hidden=[]", "one_layer=false", "conv_depths=1,14",
                                                     "conv_channels=16", "conv_steps=300"])
    sh = _eff(s, "shallow_convnet_learns_identity")
    dp = _eff(s, "deep_convnet_learns_constant")
    assert sh["identity_at_rho0"] > sh["constant_at_rho0"]
    assert dp["constant_minus_identity"] > dp["shallowest_constant_minus_identity"]


@pytest.mark.slow
def test_e4_normalized_losses_fit_a_line_better_than_unnormalized(tmp_path):
    _needs_fashion_mnist()
    s = _run(tmp_path, "normalized-loss", "small", ["n_train=200", "n_test=200", "init_stds=0.03,0.07,0.13"])
    assert not s["data"]["excluded_nets"]          # every net reached zero training error
    fn, fu = s["data"]["fit_normalized"], s["data"]["fit_unnormalized"]
    assert fn["r2"] >= 0.9
    # the true-label line predicts the random-label net's test loss after normalisation only
    assert fn["random_label_relative_residual"] < fu["random_label_relative_residual"]


def test_train_command_writes_summary_and_report(tmp_path, capsys):
    d = tmp_path / "e4"
    sets = sum((["--set", s] for s in FAST["normalized-loss"]), [])
    assert main(["train", "normalized-loss", "--preset", "tiny", "--device", "cpu", "--out", str(d), "--quiet"] + sets) == 0
    s = json.loads((d / "summary.json").read_text())
    assert [e["name"] for e in s["effects"]] == effects.EFFECT_NAMES["normalized-loss"]
    assert (d / "report" / "report.md").exists() and (d / "report" / "e4_losses.png").exists()
    assert capsys.readouterr().out == ""  # --quiet
    assert main(["train", "normalized-loss", "--preset", "tiny", "--device", "cpu", "--out", str(d), "--force"] + sets) == 0
    out = capsys.readouterr().out
    assert f"normalized-loss (tiny, seed 0): {s['n_passed']}/3 effects shown" in out
    assert "[x] normalized_losses_on_a_line" in out or "[ ] normalized_losses_on_a_line" in out
    assert f"report: {d / 'report' / 'report.md'}" in out


def test_e2_capacities_are_the_mean_over_the_analysis_seeds(runs, tmp_path):
    d = runs["label-noise-geometry"]
    one = effects.summarize(d, n_reps=1, n_t=20, write=False)
    three = effects.summarize(d, n_reps=1, n_t=20, analysis_seeds=3, write=False)
    seeds = three["data"]["analysis_seeds"]
    assert len(set(seeds)) == 3 and seeds[0] == one["data"]["analysis_seeds"][0] == 0  # the run's seed first
    assert seeds == effects.e2_analysis_seeds(0, 3)                                      # reproducible
    per_seed = [json.loads((d / "analysis" / sub / "metrics.json").read_text())
                for sub in ["", *(f"seed-{s}" for s in seeds[1:])]]
    assert [p["options"]["seed"] for p in per_seed] == seeds
    tag_of = {v["file"]: k for k, v in three["data"]["files"].items()}

    def value(rows, tag, subset, layer):
        hit = [r for r in rows if r["class"] == "" and r["metric"] == "capacity" and r["subset"] == subset
               and r["layer"] == layer and tag_of.get(r["file"].rsplit("/", 1)[-1]) == tag]
        assert len(hit) == 1
        return float(hit[0]["value"])

    cap3, cap1 = three["data"]["metrics"]["best"]["permuted"]["capacity"], one["data"]["metrics"]["best"]["permuted"]["capacity"]
    for layer, v in cap3.items():
        vals = [value(p["rows"], "best", "permuted", layer) for p in per_seed]
        assert v == pytest.approx(sum(vals) / 3, rel=1e-5)
        assert cap1[layer] == pytest.approx(vals[0], rel=1e-5)   # one seed: that seed's analysis alone
    # a cached analysis made with another seed is not reused
    other = effects.summarize(d, n_reps=1, n_t=20, seed=seeds[1], write=False)
    assert other["data"]["metrics"]["best"]["permuted"]["capacity"] == pytest.approx(
        {layer: value(per_seed[1]["rows"], "best", "permuted", layer) for layer in cap3}, rel=1e-5)
    with pytest.raises(InputError, match="analysis_seeds must be an integer >= 1, got 0"):
        effects.summarize(d, analysis_seeds=0, write=False)


def test_analysis_seeds_option_is_checked_before_training_and_does_not_define_the_run(tmp_path):
    o = options_for("label-noise-geometry", "tiny", sets=FAST["label-noise-geometry"] + ["analysis_seeds=0"],
                    device="cpu", progress="off")
    with pytest.raises(InputError, match="analysis_seeds must be an integer >= 1, got 0"):
        run_experiment("label-noise-geometry", o, tmp_path / "r", preset="tiny", summarize=False)
    assert not (tmp_path / "r" / "train").exists()
    # a run resumed or compared with another analysis_seeds is the same run (it only shapes the summary)
    from geomprobe.trainers.experiments import _run_options

    o2 = options_for("label-noise-geometry", "tiny", sets=["analysis_seeds=4"])
    assert _run_options(o2) == _run_options(options_for("label-noise-geometry", "tiny"))


def test_report_analysis_seeds_needs_resummarize_and_a_positive_count(runs, capsys):
    d = str(runs["label-noise-geometry"])
    assert main(["report", d, "--analysis-seeds", "2"]) == 2
    assert "--analysis-seeds changes the summary: give --resummarize too" in capsys.readouterr().err
    assert main(["report", d, "--resummarize", "--analysis-seeds", "0"]) == 2
    assert "--analysis-seeds must be >= 1, got 0" in capsys.readouterr().err


def test_e2_analysis_per_class_draws_that_many_captured_points_per_seed(tmp_path):
    sets = FAST["label-noise-geometry"] + ["capture_per_class=6", "analysis_per_class=3", "analysis_seeds=2"]
    o = options_for("label-noise-geometry", "tiny", sets=sets, device="cpu", progress="off")
    d = tmp_path / "r"
    run_experiment("label-noise-geometry", o, d, preset="tiny", summarize=False)
    s = effects.summarize(d, n_reps=1, n_t=20, write=False)
    assert s["data"]["M"] == 3 and s["data"]["capacity_lower_bound"] == pytest.approx(2 / 3)
    seeds = s["data"]["analysis_seeds"]
    per_seed = [json.loads((d / "analysis" / sub / "metrics.json").read_text()) for sub in ["", f"seed-{seeds[1]}"]]
    assert [p["options"]["per_class"] for p in per_seed] == [3, 3]
    # each seed drew its own 3 of the 6 captured points per class: the capacities differ between seeds
    caps = [{(r["file"], r["subset"], r["layer"]): r["value"] for r in p["rows"]
             if r["metric"] == "capacity" and r["class"] == ""} for p in per_seed]
    assert caps[0].keys() == caps[1].keys() and caps[0] != caps[1]
    for p in per_seed:  # every (layer, subset) analysis subsampled its manifolds to 3 points
        sub = [n for n in p["notes"] if "subsampled to 3 examples (per_class)" in n]
        assert len(sub) == len({(r["file"], r["layer"], r["subset"]) for r in p["rows"] if r["metric"] == "capacity"})


@pytest.mark.parametrize("value", ["7", "-1"])
def test_e2_analysis_per_class_outside_the_capture_is_refused_before_training(tmp_path, value):
    sets = FAST["label-noise-geometry"] + ["capture_per_class=6", f"analysis_per_class={value}"]
    o = options_for("label-noise-geometry", "tiny", sets=sets, device="cpu", progress="off")
    with pytest.raises(InputError, match=rf"analysis_per_class must be an integer in 0..capture_per_class \(6\) "
                                         rf"\(0: all captured examples\), got {value}"):
        run_experiment("label-noise-geometry", o, tmp_path / "r", preset="tiny", summarize=False)
    assert not (tmp_path / "r" / "train").exists()


def test_report_states_the_analysis_and_its_command_reproduces_the_numbers(runs, tmp_path, capsys):
    """Issue 16: the E2 report (and so the demo's) writes its analysis options and the `geomprobe analyze`
    command; running exactly that command gives the same rows as the summary's cached analysis."""
    import shlex

    from geomprobe.trainers.report import build_report

    d = runs["label-noise-geometry"]
    s = effects.summarize(d, n_reps=1, n_t=20, tags=("best", "final"))
    a = s["data"]["analysis"]
    assert a["files"] == ["acts_best.npz", "acts_final.npz"] and (a["n_reps"], a["n_t"], a["per_class"]) == (1, 20, 4)
    text = build_report(d, umap=False, quiet=True).read_text()
    assert "## Analysis" in text and "n_reps 1, n_t 20, per_class 4 (M)" in text
    cmds = [x for x in text.split("```sh\n", 1)[1].split("```")[0].splitlines() if x.startswith("geomprobe analyze")]
    assert len(cmds) == len(a["seeds"]) == 1
    argv = shlex.split(cmds[0])[1:]
    out = argv[argv.index("-o") + 1]
    argv[argv.index("-o") + 1] = str(tmp_path / "again")  # the same command, into a fresh folder
    assert main(argv + ["--quiet"]) == 0, capsys.readouterr().err
    mine = json.loads((tmp_path / "again" / "metrics.json").read_text())
    cached = json.loads((d / "analysis" / "metrics.json").read_text())
    assert out.endswith("reanalysis") and mine["options"] == cached["options"]
    assert mine["rows"] == cached["rows"] and any(r["metric"] == "capacity" for r in mine["rows"])
