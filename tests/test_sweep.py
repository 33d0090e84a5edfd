"""geomprobe.trainers.sweep: one training per value (here or as Dask tasks), then the analyses.

Most tests use a fake, torch-free training function that writes synthetic activation files, so they
test the sweep machinery in seconds; the real tiny experiment runs in the slow tests.
"""
from __future__ import annotations

import json
import re

import pytest

from geomprobe import InputError
from geomprobe.analysis import AnalyzeOptions, analyze
from geomprobe.trainers.sweep import parse_sweep, run_sweep, value_dir

OPTIONS = AnalyzeOptions(mftma=False, probes=False)
DEADLINE_S = 120


@pytest.fixture(autouse=True)
def _blas_one_thread(blas_one_thread):
    """Every test here at 1 BLAS thread (conftest's blas_one_thread). (The module's ``local_report``
    is computed before this applies: it is the plain local run, default threads.)"""
    yield


def _fake_train(calls_dir=None, fail=None, kill_once=None):
    """A picklable (closure) training function: writes acts_final.npz from a seed derived from the
    value; records each call in calls_dir; raises for ``fail`` values; kills its worker process the
    first time it trains ``kill_once``."""

    def train(experiment, args, out_dir, force):
        import os as _os
        import uuid as _uuid
        from pathlib import Path as _Path

        from geomprobe import InputError as _InputError
        from geomprobe.io import save_activations as _save
        from geomprobe.synthetic import synthetic_activations as _synth

        value = args["sets"][-1].split("=", 1)[1]
        if calls_dir is not None:
            (_Path(calls_dir) / f"{value}-{_uuid.uuid4().hex}").write_text(experiment)
        if fail and value in fail:
            if fail[value] == "input":
                raise _InputError(f"option lr: cannot parse {value!r} as float")
            raise RuntimeError(f"diverged at value {value}")
        if kill_once is not None and value == kill_once:
            marker = _Path(out_dir).parent / ".killed-once"
            try:
                fd = _os.open(marker, _os.O_CREAT | _os.O_EXCL | _os.O_WRONLY)
            except FileExistsError:
                pass
            else:
                _os.close(fd)
                _os._exit(1)
        _Path(out_dir).mkdir(parents=True, exist_ok=True)
        kw = _synth(int(float(value) * 1000) % 997, n_classes=3, per_class=8, n_test_per_class=4, n_layers=2, dim=8)
        return [str(_save(_Path(out_dir) / "acts_final.npz", **kw, force=True))]

    return train


def _calls(d):
    return sorted(p.name.split("-")[0] for p in d.iterdir())


# -- parsing ---------------------------------------------------------------------------------------
def test_parse_sweep():
    assert parse_sweep("sigma=0.001,0.01, 1") == ("sigma", ["0.001", "0.01", "1"])
    assert parse_sweep("init-std=0.1") == ("init_std", ["0.1"])
    assert parse_sweep("widths=[[64,64],[128],\"x\"]") == ("widths", ["[64,64]", "[128]", "x"])


@pytest.mark.parametrize("text, message", [
    ("sigma", "--sweep expects KEY=V1,V2,..., got 'sigma'"),
    ("1x=1,2", "--sweep: option name must be a plain identifier, got '1x'"),
    ("lr=0.1,,0.2", "--sweep lr: needs one or more non-empty values, got ['0.1', '', '0.2']"),
    ("lr=0.1,0.1", "--sweep lr: value(s) given twice: 0.1"),
    ("data=a/b", "--sweep data: a value names a folder data=VALUE and may not hold '/'"),
    ("lr=[1,2", "--sweep lr: values '[1,2' are not a valid JSON list"),
])
def test_parse_sweep_errors(text, message):
    with pytest.raises(InputError, match=re.escape(message)):
        parse_sweep(text)


# -- local -----------------------------------------------------------------------------------------
def test_local_sweep_trains_each_value_then_analyses(tmp_path):
    calls = tmp_path / "calls"
    calls.mkdir()
    out = tmp_path / "sweep"
    seen = []
    report = run_sweep("fake", {"preset": "tiny", "sets": ["epochs=2"]}, "lr", ["0.1", "0.2", "0.3"], out=out,
                       analyze_options=OPTIONS, train_fn=_fake_train(calls), progress=lambda k, o: seen.append(k))
    assert report.ok and _calls(calls) == ["0.1", "0.2", "0.3"]
    assert [r.value for r in report.runs] == ["0.1", "0.2", "0.3"]
    for r in report.runs:
        assert r.out == str(value_dir(out, "lr", r.value)) and r.files == [f"{out}/lr={r.value}/acts_final.npz"]
    files = [f for r in report.runs for f in r.files]
    assert report.analysis.rows == analyze(files, OPTIONS).rows
    assert json.loads((out / "analysis" / "metrics.json").read_text())["rows"] == report.analysis.rows
    saved = json.loads((out / "sweep.json").read_text())
    assert saved["key"] == "lr" and [r["value"] for r in saved["runs"]] == ["0.1", "0.2", "0.3"]
    assert seen.count("train") == 3 and seen.count("analyze") == report.analysis.n_tasks


def test_failing_value_is_reported_others_go_on(tmp_path):
    report = run_sweep("fake", {}, "lr", ["0.1", "0.2", "0.3"], out=tmp_path / "s", analyze_options=OPTIONS,
                       train_fn=_fake_train(fail={"0.2": "runtime", "0.3": "input"}))
    assert dict(report.errors) == {"lr=0.2": "RuntimeError: diverged at value 0.2",
                                   "lr=0.3": "InputError: option lr: cannot parse '0.3' as float"}
    assert {r["file"] for r in report.analysis.rows} == {str(tmp_path / "s" / "lr=0.1" / "acts_final.npz")}


def test_resume_reuses_finished_values(tmp_path):
    calls = tmp_path / "calls"
    calls.mkdir()
    out = tmp_path / "s"
    first = run_sweep("fake", {}, "lr", ["0.1", "0.2"], out=out, analyze_options=OPTIONS,
                      train_fn=_fake_train(calls, fail={"0.2": "runtime"}))
    assert [k for k, _ in first.errors] == ["lr=0.2"]
    with pytest.raises(InputError, match=r"already exists and is not empty; pass --force to train again or --resume"):
        run_sweep("fake", {}, "lr", ["0.1", "0.2"], out=out, train_fn=_fake_train(calls))
    with pytest.raises(InputError, match=r"holds a sweep of 'fake' over 'lr', not 'fake' over 'seed'"):
        run_sweep("fake", {}, "seed", ["1"], out=out, resume=True, train_fn=_fake_train(calls))
    second = run_sweep("fake", {}, "lr", ["0.1", "0.2"], out=out, resume=True, analyze_options=OPTIONS,
                       train_fn=_fake_train(calls))
    assert second.ok and _calls(calls) == ["0.1", "0.2", "0.2"]  # 0.1 not trained again
    assert [r.reused for r in second.runs] == [True, False]
    assert second.analysis.n_resumed == first.analysis.n_tasks  # its analysis tasks are reused too
    files = [f for r in second.runs for f in r.files]
    assert second.analysis.rows == analyze(files, OPTIONS).rows


def test_options_are_checked_before_any_training(tmp_path):
    pytest.importorskip("geomprobe.trainers.options")
    with pytest.raises(InputError, match=r"--set: unknown option 'nope' for label-noise-geometry"):
        run_sweep("label-noise-geometry", {"preset": "tiny"}, "nope", ["1"], out=tmp_path / "a")
    with pytest.raises(InputError, match=r"option epochs: cannot parse 'x' as int"):
        run_sweep("label-noise-geometry", {"preset": "tiny"}, "epochs", ["2", "x"], out=tmp_path / "b")
    with pytest.raises(InputError, match=r"unknown experiment 'nope'"):
        run_sweep("nope", {}, "epochs", ["2"], out=tmp_path / "c")
    with pytest.raises(InputError, match=r"sweep base_args: unknown key\(s\) epochs"):
        run_sweep("label-noise-geometry", {"epochs": 2}, "seed", ["1"], out=tmp_path / "d")
    assert not (tmp_path / "b").exists()


# -- on a cluster ----------------------------------------------------------------------------------
def test_sweep_on_local_cluster_equals_local_and_survives_a_killed_worker(tmp_path):
    pytest.importorskip("distributed")
    calls = tmp_path / "calls"
    calls.mkdir()
    local = run_sweep("fake", {}, "lr", ["0.1", "0.2", "0.3"], out=tmp_path / "here", analyze_options=OPTIONS,
                      train_fn=_fake_train())
    report = run_sweep("fake", {}, "lr", ["0.1", "0.2", "0.3"], out=tmp_path / "dask", workers=2,
                       analyze_options=OPTIONS, train_fn=_fake_train(calls, kill_once="0.2", fail={"0.3": "runtime"}),
                       retries=1)
    assert (tmp_path / "dask" / ".killed-once").exists()
    assert _calls(calls).count("0.2") == 2  # killed once, rerun elsewhere
    assert _calls(calls).count("0.3") == 2  # RuntimeError: 1 retry, then reported
    assert dict(report.errors) == {"lr=0.3": "RuntimeError: diverged at value 0.3"}
    rows = [dict(r, file=r["file"].replace(str(tmp_path / "dask"), str(tmp_path / "here"))) for r in report.analysis.rows]
    assert rows == [r for r in local.analysis.rows if "lr=0.3" not in r["file"]]


# -- the real trainers (torch) ---------------------------------------------------------------------
@pytest.mark.slow
def test_real_tiny_sweep_locally_and_on_cluster(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("distributed")
    base = {"preset": "tiny", "device": "cpu", "progress": "off"}
    here = run_sweep("label-noise-geometry", base, "seed", ["0", "1"], out=tmp_path / "here", analyze_options=OPTIONS)
    assert here.ok and all(len(r.files) >= 2 for r in here.runs)
    dask = run_sweep("label-noise-geometry", base, "seed", ["0", "1"], out=tmp_path / "dask", workers=2,
                     analyze_options=OPTIONS)
    assert dask.ok
    rows = [dict(r, file=r["file"].replace(str(tmp_path / "dask"), str(tmp_path / "here"))) for r in dask.analysis.rows]
    assert rows == here.analysis.rows  # seeded training on CPU: the same networks, the same numbers
    again = run_sweep("label-noise-geometry", base, "seed", ["0", "1"], out=tmp_path / "dask", resume=True,
                      analyze_options=OPTIONS)
    assert [r.reused for r in again.runs] == [True, True] and again.analysis.n_resumed == again.analysis.n_tasks


# -- command line ----------------------------------------------------------------------------------
def _train_args(**kw):
    import argparse

    base = dict(experiment="fake", preset="tiny", config=None, sets=["epochs=2"], device=None, seed=None,
                out=None, force=False, quiet=True, sweep="lr=0.1,0.2", scheduler=None, workers=None,
                threads_per_worker=None, retries=2, stream_batch_rows=None, resume=False)
    base.update(kw)
    return argparse.Namespace(**base)


def test_run_sweep_command(tmp_path, capsys):
    from geomprobe.cli.sweep import run_sweep_command as run_sweep_from_args

    out = tmp_path / "s"
    assert run_sweep_from_args(_train_args(quiet=False), out, train_fn=_fake_train()) == 0
    err = capsys.readouterr().err
    assert "lr=0.1: done (1 activation file(s))" in err and "lr=0.2: done" in err
    saved = json.loads((out / "sweep.json").read_text())
    assert [r["value"] for r in saved["runs"]] == ["0.1", "0.2"] and all(not r["error"] for r in saved["runs"])
    with pytest.raises(InputError, match=re.escape("give either --scheduler (tcp://x:1) or --workers (2), not both")):
        run_sweep_from_args(_train_args(scheduler="tcp://x:1", workers=2), tmp_path / "t", train_fn=_fake_train())
    with pytest.raises(InputError, match=re.escape("--threads-per-worker (2) applies to a local cluster")):
        run_sweep_from_args(_train_args(threads_per_worker=2), tmp_path / "t", train_fn=_fake_train())


def test_sweep_config_is_read_like_a_single_runs(tmp_path):
    """--config with --sweep goes through cli/train.py's reading: a JSON list is refused by name."""
    from geomprobe.cli.sweep import run_sweep_command

    cfg = tmp_path / "c.json"
    cfg.write_text("[1, 2]")
    with pytest.raises(InputError, match=re.escape(f"--config {cfg}: must hold a JSON object of options, got list")):
        run_sweep_command(_train_args(config=str(cfg)), tmp_path / "t", train_fn=_fake_train())
    import geomprobe.trainers.sweep as ts

    assert not hasattr(ts, "run_sweep_from_args")  # the command line lives in cli/


@pytest.mark.slow
def test_cli_train_sweep(tmp_path, capsys):
    from geomprobe.cli.main import build_parser, main

    try:
        build_parser().parse_args(["train", "label-noise-geometry", "--sweep", "seed=0,1"])
    except SystemExit:
        pytest.skip("cli/train.py has no --sweep yet (see docs/scaling.md)")
    out = tmp_path / "s"
    code = main(["train", "label-noise-geometry", "--preset", "tiny", "--device", "cpu", "--quiet", "--out", str(out),
                 "--sweep", "seed=0,1", "--workers", "2"])
    assert code == 0, capsys.readouterr().err
    assert (out / "seed=0" / "experiment.json").exists() and (out / "seed=1" / "experiment.json").exists()
    assert (out / "analysis" / "metrics.json").exists()
