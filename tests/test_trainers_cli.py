"""`geomprobe train`: every experiment's tiny preset runs and writes files `geomprobe analyze` reads."""
import json

import numpy as np
import pytest

pytest.importorskip("torch")

from geomprobe.cli import train as train_cli  # noqa: E402
from geomprobe.cli.main import main  # noqa: E402
from geomprobe.io import open_activations  # noqa: E402
from geomprobe.trainers.options import SPECS, options_for, parse_value  # noqa: E402

EXPERIMENTS = ["extreme-memorization", "label-noise-geometry", "identity-crisis", "normalized-loss"]


def test_help_lists_experiments(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in EXPERIMENTS:
        assert name in out
    with pytest.raises(SystemExit):
        main(["train", "label-noise-geometry", "--help"])
    out = capsys.readouterr().out
    assert "--preset {tiny,small,paper}" in out and "eps" in out and "capture_per_class" in out


def test_add_parser_standalone():
    import argparse

    p = argparse.ArgumentParser()
    sub = p.add_subparsers()
    train_cli.add_parser(sub)
    args = p.parse_args(["train", "identity-crisis", "--set", "steps=3"])
    assert args.experiment == "identity-crisis" and args.sets == ["steps=3"] and args.run is train_cli.run


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_tiny_preset_writes_readable_activation_files(tmp_path, name, capsys):
    out = tmp_path / name
    rc = main(["train", name, "--preset", "tiny", "--out", str(out), "--device", "cpu", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    state = json.loads((out / "experiment.json").read_text())
    assert state["status"] == "done" and state["preset"] == "tiny"
    files = sorted(out.rglob("acts_*.npz"))
    assert files
    for f in files:
        a = open_activations(f, scan_values=True)
        assert a.layers and a.meta["experiment"] == name
    assert list(out.rglob("metrics.jsonl")) and list(out.rglob("last.pt"))
    if name == "label-noise-geometry":
        a = open_activations(out / "acts_final.npz")
        assert set(a.subsets()) == {"unpermuted", "permuted", "restored", "test"}
        assert a.layers[0] == "input"
        rows = json.loads((out / "rewind.json").read_text())
        assert {r["epoch"] for r in rows} == {0, 1, 2, 3} and "test_acc" in rows[0]
        assert (out / "gradient_split.jsonl").read_text().count("\n") == 4
    if name == "identity-crisis":
        res = state["result"]["runs"]
        assert res[0]["run"] == "fcn-linear-h0" and res[0]["eq1_max_abs_diff"] < 0.05
        a = open_activations(out / "acts_conv-d1-c8.npz")
        assert "probe/pred/conv-d1-c8" in a.keys()
    if name == "normalized-loss":
        rows = [json.loads(s) for s in (out / "normalized_loss.jsonl").read_text().splitlines()]
        assert len(rows) == 3 and rows[-1]["random_labels"]
    # a finished run is refused without --force (exit 2, one line on stderr)
    capsys.readouterr()
    rc = main(["train", name, "--out", str(out), "--device", "cpu", "--quiet"])
    assert rc == 2 and "pass --force" in capsys.readouterr().err
    if name == "identity-crisis":  # analyze reads the probes
        rc = main(["analyze", str(out / "acts_conv-d1-c8.npz"), "-o", str(tmp_path / "ana"), "--no-mftma", "--quiet"])
        assert rc in (0, 1)
        text = (tmp_path / "ana" / "metrics.csv").read_text()
        assert "identity_corr" in text


def test_bad_options_exit_2(tmp_path, capsys):
    rc = main(["train", "identity-crisis", "--out", str(tmp_path), "--set", "steps=abc"])
    assert rc == 2 and "option steps: cannot parse 'abc' as int" in capsys.readouterr().err
    rc = main(["train", "identity-crisis", "--out", str(tmp_path), "--set", "nope=1"])
    assert rc == 2 and "unknown option 'nope' for identity-crisis" in capsys.readouterr().err
    rc = main(["train", "identity-crisis", "--out", str(tmp_path), "--config", str(tmp_path / "none.json")])
    assert rc == 2 and "no such file" in capsys.readouterr().err
    (tmp_path / "c.json").write_text("[1]")
    rc = main(["train", "identity-crisis", "--out", str(tmp_path), "--config", str(tmp_path / "c.json")])
    assert rc == 2 and "must hold a JSON object" in capsys.readouterr().err
    rc = main(["train", "normalized-loss", "--out", str(tmp_path / "x"), "--set", "dataset=cifar10", "--set",
               f"data_root={tmp_path}"])
    err = capsys.readouterr().err
    assert rc == 2 and "dataset 'cifar10' not found" in err and "never downloads" in err


def test_options_resolution(tmp_path):
    o = options_for("label-noise-geometry", "tiny", {"eps": 0.25}, ["capture_epochs=1,2", "rewind=false"], seed=3)
    assert o.eps == 0.25 and o.capture_epochs == [1, 2] and o.rewind is False and o.seed == 3
    assert o.n_classes == SPECS["label-noise-geometry"].presets["tiny"]["n_classes"]
    assert parse_value("[0.1, 1]", [1.0], "sigmas") == [0.1, 1]
    assert parse_value("0.5,2", [1.0], "sigmas") == [0.5, 2]
    with pytest.raises(Exception, match="option eps must be a number"):
        options_for("label-noise-geometry", "tiny", {"eps": "half"})
    for name, spec in SPECS.items():  # every preset only names known options
        for preset in spec.presets:
            options_for(name, preset)


def test_resume_experiment_after_interruption(tmp_path, monkeypatch):
    """An experiment killed mid-run resumes (same options) and finishes with the uninterrupted result."""
    from geomprobe.trainers import experiments as E
    from geomprobe.trainers import train as T

    opts = options_for("extreme-memorization", "tiny", sets=["sigmas=0.1", "align_every=0"], device="cpu",
                       progress="off")
    ref = E.run_experiment("extreme-memorization", opts, tmp_path / "ref")
    real_train = T.train

    def dying(*a, **kw):
        def boom(step, model):
            if step == 7:
                raise KeyboardInterrupt
        kw["on_step"] = boom
        return real_train(*a, **kw)

    monkeypatch.setattr(E, "train", dying)
    with pytest.raises(KeyboardInterrupt):
        E.run_experiment("extreme-memorization", opts, tmp_path / "run")
    monkeypatch.setattr(E, "train", real_train)
    res = E.run_experiment("extreme-memorization", opts, tmp_path / "run")
    assert res["runs"][0]["final_test_acc"] == ref["runs"][0]["final_test_acc"]
    a = open_activations(tmp_path / "ref" / "sigma_0.1" / "acts_final.npz")
    b = open_activations(tmp_path / "run" / "sigma_0.1" / "acts_final.npz")
    np.testing.assert_array_equal(a.layer("act1"), b.layer("act1"))


def test_demo_options_do_not_depend_on_a_preset():
    """The demo is the feed-forward net on spheres whatever the presets say: it sets every option the
    tiny preset (its base) sets, and the model and dataset explicitly."""
    from geomprobe.cli.demo import DEMO_OPTIONS

    tiny = SPECS["label-noise-geometry"].presets["tiny"]
    assert set(tiny) - set(DEMO_OPTIONS) == set()
    o = options_for("label-noise-geometry", "tiny", DEMO_OPTIONS)
    assert (o.model, o.dataset) == ("feedforward", "spheres")
    assert {k: getattr(o, k) for k in DEMO_OPTIONS} == DEMO_OPTIONS


def test_e2_spheres_config_file_selects_the_feed_forward_net(tmp_path):
    """docs/configs/e2_small_spheres.json (E2's small preset before session 4, kept for comparison) loads
    through --config on top of the small preset and names only known options."""
    from pathlib import Path

    from geomprobe.cli.train import _read_config

    cfg = _read_config(str(Path(__file__).parents[1] / "docs" / "configs" / "e2_small_spheres.json"))
    o = options_for("label-noise-geometry", "small", cfg)
    assert (o.dataset, o.model, o.n_classes, o.capture_per_class) == ("spheres", "feedforward", 50, 20)
    assert SPECS["label-noise-geometry"].presets["small"]["model"] == "alexnet"


def test_e2_half_width_config_file_restores_the_session_4_preset():
    """docs/configs/e2_small_alexnet_half.json: E2's small preset of session 4 (AlexNet at half width for
    60 epochs), kept for comparison; on top of today's small preset it differs only in those options."""
    from pathlib import Path

    from geomprobe.cli.train import _read_config

    cfg = _read_config(str(Path(__file__).parents[1] / "docs" / "configs" / "e2_small_alexnet_half.json"))
    o = options_for("label-noise-geometry", "small", cfg)
    now = options_for("label-noise-geometry", "small")
    assert (o.model, o.width_factor, o.epochs, o.keep_every) == ("alexnet", 0.5, 60, 4)
    diff = {k for k in vars(o) if getattr(o, k) != getattr(now, k)}
    assert diff == {"width_factor", "epochs", "keep_every"}

