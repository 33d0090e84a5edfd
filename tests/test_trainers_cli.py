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
        assert rc == 0, capsys.readouterr().err  # every task of the file analyses
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
    assert res.resumed and res.result["runs"][0]["final_test_acc"] == ref.result["runs"][0]["final_test_acc"]
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

    from geomprobe.cli.train import read_config

    cfg = read_config(str(Path(__file__).parents[1] / "docs" / "configs" / "e2_small_spheres.json"))
    o = options_for("label-noise-geometry", "small", cfg)
    assert (o.dataset, o.model, o.n_classes, o.capture_per_class) == ("spheres", "feedforward", 50, 20)
    assert SPECS["label-noise-geometry"].presets["small"]["model"] == "alexnet"


def test_e2_half_width_config_file_restores_the_session_4_preset():
    """docs/configs/e2_small_alexnet_half.json: E2's small preset of session 4 (AlexNet at half width for
    60 epochs), kept for comparison; on top of today's small preset it differs only in those options."""
    from pathlib import Path

    from geomprobe.cli.train import read_config

    cfg = read_config(str(Path(__file__).parents[1] / "docs" / "configs" / "e2_small_alexnet_half.json"))
    o = options_for("label-noise-geometry", "small", cfg)
    now = options_for("label-noise-geometry", "small")
    assert (o.model, o.width_factor, o.epochs, o.keep_every) == ("alexnet", 0.5, 60, 4)
    diff = {k for k in vars(o) if getattr(o, k) != getattr(now, k)}
    assert diff == {"width_factor", "epochs", "keep_every"}



# -- issue 14: trainer options and files that gave tracebacks, and what a run may touch in --out ---------

E1_FAST = ["--set", "sigmas=0.1", "--set", "align_every=0", "--set", "epochs=1", "--set", "n_train=100",
           "--set", "n_test=50", "--device", "cpu", "--quiet"]


@pytest.mark.parametrize("name, sets, match", [
    ("extreme-memorization", ["sigmas=[]"], r"option sigmas must be a non-empty list of numbers > 0.*got \[\]"),
    ("extreme-memorization", ["sigmas=-1,0"], r"option sigmas must be a list of numbers > 0.*bad: -1, 0\)"),
    ("extreme-memorization", ["loss=mse"], r"option loss must be one of ce, hinge, squared .*got 'mse'"),
    ("normalized-loss", ["init_stds=[0]"], r"option init_stds must be a list of numbers > 0 .*bad: 0\)"),
    ("normalized-loss", ["random_label_std=0"], r"option random_label_std must be a number > 0, or negative"),
    ("identity-crisis", ["rho=[2]"], r"option rho must be a list of numbers in \[0, 1\]"),
    ("label-noise-geometry", ["eps=1.5"], r"option eps must be a number in \[0, 1\], got 1.5"),
])
def test_bad_option_values_exit_2_before_any_work(tmp_path, capsys, name, sets, match):
    argv = ["train", name, "--out", str(tmp_path / "o")]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1
    import re

    assert re.search(match, err), err
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_out_pointing_at_a_file_exit_2(tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("mine")
    for out in (f, f / "sub"):
        assert main(["train", "extreme-memorization", "--out", str(out)] + E1_FAST) == 2
        assert "is not a directory" in capsys.readouterr().err
    assert f.read_text() == "mine"


def _tree(d):
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_train_never_destroys_files_it_did_not_write(tmp_path, capsys):
    """Issue 14: `--out userdir` deleted train/checkpoints/mymodel.pt and overwrote summary.json etc. Now a
    folder without a run is refused unless --force; --force never touches a file geomprobe did not write,
    and refuses when such a file sits under a name a run writes; a later --force run deletes only what the
    earlier run owned (its manifest), so nothing stale from it is left."""
    from geomprobe.trainers.experiments import MANIFEST

    out = tmp_path / "userdir"
    (out / "train" / "checkpoints").mkdir(parents=True)
    mine = {"train/checkpoints/mymodel.pt": b"my weights", "notes.txt": b"my notes"}
    for k, v in mine.items():
        (out / k).write_bytes(v)
    assert main(["train", "extreme-memorization", "--out", str(out)] + E1_FAST) == 2
    assert "holds no geomprobe run" in capsys.readouterr().err and _tree(out) == mine
    (out / "summary.json").write_bytes(b"my summary")
    assert main(["train", "extreme-memorization", "--out", str(out), "--force"] + E1_FAST) == 2
    err = capsys.readouterr().err
    assert "holds files geomprobe did not write under names a run writes (summary.json)" in err
    assert _tree(out) == dict(mine, **{"summary.json": b"my summary"})
    (out / "summary.json").unlink()
    # --force next to the user's files: they stay byte for byte
    assert main(["train", "extreme-memorization", "--out", str(out), "--force"] + E1_FAST) == 0, capsys.readouterr().err
    tree = _tree(out)
    assert all(tree[k] == v for k, v in mine.items())
    manifest = json.loads((out / MANIFEST).read_text())
    assert sorted(manifest["foreign"]) == sorted(mine) and not set(manifest["owned"]) & set(mine)
    assert "sigma_0.1/checkpoints/last.pt" in manifest["owned"] and "summary.json" in manifest["owned"]
    # another run with --force: the old run's files (sigma_0.1/...) go, the user's stay
    sets2 = [a if a != "sigmas=0.1" else "sigmas=0.2" for a in E1_FAST]
    assert main(["train", "extreme-memorization", "--out", str(out), "--force"] + sets2) == 0, capsys.readouterr().err
    tree = _tree(out)
    assert all(tree[k] == v for k, v in mine.items())
    assert not (out / "sigma_0.1").exists() and (out / "sigma_0.2" / "acts_final.npz").is_file()
    assert sorted(json.loads((out / MANIFEST).read_text())["foreign"]) == sorted(mine)


def _running_state(out, name, sets):
    """experiment.json of an unfinished run with these options (what a killed run leaves)."""
    import dataclasses

    o = options_for(name, "tiny", None, sets)
    out.mkdir(parents=True, exist_ok=True)
    (out / "experiment.json").write_text(json.dumps({"experiment": name, "preset": "tiny", "status": "running",
                                                     "options": dataclasses.asdict(o)}))


def _sets(argv):
    return [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]


def _killed_e1_run(out, monkeypatch, sets, at_step):
    """An E1 run stopped by Ctrl-C at optimizer step ``at_step`` (what a killed run leaves)."""
    from geomprobe.trainers import experiments as E
    from geomprobe.trainers import train as T

    opts = options_for("extreme-memorization", "tiny", sets=sets, device="cpu", progress="off")
    real_train = T.train

    def dying(*a, **kw):
        def boom(step, model):
            if step == at_step:
                raise KeyboardInterrupt
        kw["on_step"] = boom
        return real_train(*a, **kw)

    monkeypatch.setattr(E, "train", dying)
    with pytest.raises(KeyboardInterrupt):
        E.run_experiment("extreme-memorization", opts, out, summarize=False)
    monkeypatch.setattr(E, "train", real_train)


def test_resume_from_damaged_checkpoint_or_label_noise_exit_2(tmp_path, monkeypatch, capsys):
    import torch

    out = tmp_path / "e1"
    _killed_e1_run(out, monkeypatch, _sets(E1_FAST), 1)
    ck = out / "sigma_0.1" / "checkpoints" / "last.pt"
    state = torch.load(ck, weights_only=True)
    torch.save(torch.zeros(3), ck)  # a bare tensor
    assert main(["train", "extreme-memorization", "--out", str(out)] + E1_FAST) == 2
    err = capsys.readouterr().err
    assert "last.pt: a geomprobe checkpoint holds a dict with keys model, optimizer" in err and "holds a Tensor" in err
    key = next(k for k in state["model"] if k.endswith("weight"))
    state["model"][key] = torch.zeros(2, 2)  # wrong shape
    torch.save(state, ck)
    assert main(["train", "extreme-memorization", "--out", str(out)] + E1_FAST) == 2
    err = capsys.readouterr().err
    assert f"last.pt: its weights do not fit the model (shapes differ: {key} (2, 2)" in err and "Traceback" not in err
    e2 = tmp_path / "e2"
    e2_sets = ["epochs=1", "rewind=false"]
    _running_state(e2, "label-noise-geometry", e2_sets)
    (e2 / "label_noise.npz").write_bytes(b"garbage")
    argv = ["train", "label-noise-geometry", "--out", str(e2), "--device", "cpu", "--quiet"]
    for s in e2_sets:
        argv += ["--set", s]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "label_noise.npz: not a readable label-noise file" in err and "Traceback" not in err


def test_resume_keeps_valid_log_lines_around_a_damaged_one(tmp_path, monkeypatch, capsys):
    """One corrupt line in metrics.jsonl used to drop every later valid line when a run resumed."""
    out = tmp_path / "r"
    sets = ["sigmas=0.1", "align_every=0", "epochs=3", "n_train=100", "n_test=50"]
    _killed_e1_run(out, monkeypatch, sets, 5)  # inside epoch 3 (2 steps per epoch)
    log = out / "sigma_0.1" / "metrics.jsonl"
    lines = log.read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [0, 1, 2]
    log.write_text(lines[0] + "\n{not json\n" + "\n".join(lines[1:]) + "\n")
    argv = ["train", "extreme-memorization", "--out", str(out), "--device", "cpu", "--quiet"]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 0
    assert "skipped 1 unreadable line(s) (2)" in capsys.readouterr().err
    assert [json.loads(x)["epoch"] for x in log.read_text().splitlines()] == [0, 1, 2, 3]


def test_train_hint_command_runs(tmp_path, capsys):
    """The `next:` command `geomprobe train` prints runs as printed (it used to name OUT/analysis, which
    the summary had already filled: exit 2)."""
    import glob
    import shlex

    out = tmp_path / "run"
    argv = ["train", "extreme-memorization", "--out", str(out)] + [a for a in E1_FAST if a != "--quiet"]
    assert main(argv) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("next: "))
    words = shlex.split(line[len("next: "):])
    assert words[:2] == ["geomprobe", "analyze"]
    files = [f for w in words[2:words.index("-o")] for f in sorted(glob.glob(w))]  # as a shell expands it
    assert files
    rest = words[words.index("-o"):]
    assert main(["analyze"] + files + rest + ["--no-mftma", "--quiet"]) == 0


def test_demo_shows_progress_and_the_reason_of_every_effect_not_shown(tmp_path, capsys):
    """Issue 16: progress for training and analysis when stderr is not a terminal (one line at the end of
    each phase at least), and a reason under every effect not shown (here capacity is off: --no-mftma)."""
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--epochs", "2", "--no-mftma"]) == 0
    cap = capsys.readouterr()
    assert "geomprobe demo: training 2/2 epochs" in cap.err
    assert "geomprobe demo: analysis 48/48 tasks" in cap.err  # 2 files x 6 layers x 4 subsets
    lines = cap.out.splitlines()
    assert "label-noise-geometry (demo, seed 0): " in cap.out and "effects shown" in cap.out
    for i, line in enumerate(lines):
        if line.startswith("  [ ] "):  # every effect not shown is followed by its reason
            assert lines[i + 1].startswith("      not shown: "), lines[i:i + 2]
    assert sum(x.startswith("  [ ] best_epoch_permuted") for x in lines) == 1
    assert any(x.startswith("  [-] rewinding_last_layers_recovers_test_accuracy: not measured: paper 003")
               for x in lines)
    report = (out / "report" / "report.md").read_text()
    assert "## Analysis" in report and "--no-mftma" in report
