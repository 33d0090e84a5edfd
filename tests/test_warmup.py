"""geomprobe/_warmup.py: background compilation of the analysis kernels into numba's disk cache.

The slow test checks the point of it: after the warm-up jobs (and the final one) ran in other processes, a fresh process
that analyses a real-shaped activations file through ``geomprobe analyze`` compiles no geomprobe
kernel (every one is loaded from the cache the jobs wrote).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from geomprobe import _warmup

_COUNT_COMPILES = r"""
import json, sys, numpy as np
from numba.core import event
compiled = []
class L(event.Listener):
    def on_start(self, ev): pass
    def on_end(self, ev):
        f = ev.data["dispatcher"].py_func
        if f.__module__.startswith("geomprobe"):
            compiled.append(f.__module__ + "." + f.__name__)
event.register("numba:compile", L())
from geomprobe.analysis import AnalyzeOptions, analyze
analyze([sys.argv[1]], AnalyzeOptions(seed=3, n_reps=2, n_t=8, per_class=12), outdir=sys.argv[2], force=True)
print(json.dumps(compiled))
"""


def test_unknown_job_is_refused():
    with pytest.raises(ValueError, match="warm-up job must be one of centers, anchors, final, got 'nope'"):
        _warmup.run_job("nope")


def test_wait_kills_a_job_past_its_timeout():
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    t0 = time.perf_counter()
    _warmup.wait([p], timeout=0.5)
    assert time.perf_counter() - t0 < 30
    assert p.poll() is not None and p.returncode != 0


def test_stop_leaves_finished_jobs_alone():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    _warmup.stop([p])
    assert p.returncode == 0


def test_tiny_input_has_the_types_of_real_activations():
    X, labels = _warmup._tiny()
    assert X.dtype == np.float32 and X.flags.c_contiguous and labels.dtype == np.int64
    assert X.shape[0] == labels.shape[0] and np.unique(labels).size >= 2


@pytest.mark.slow
def test_after_warmup_a_fresh_analysis_compiles_nothing(tmp_path):
    from geomprobe.io import save_activations

    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    procs = [subprocess.Popen([sys.executable, "-m", "geomprobe._warmup", job], env=env) for job in _warmup.JOBS]
    for p in procs:
        assert p.wait(900) == 0
    final = subprocess.run([sys.executable, "-m", "geomprobe._warmup", _warmup.FINAL], env=env, timeout=900)
    assert final.returncode == 0
    rng = np.random.default_rng(11)   # other sizes and seed than the warm-up's own input
    P, M, N = 9, 30, 40
    X = (np.repeat(4 * rng.standard_normal((P, N)), M, axis=0) + rng.standard_normal((P * M, N))).astype(np.float32)
    labels = np.repeat(np.arange(P), M)
    split = np.where(np.arange(P * M) % 3 == 0, "test", "train")
    path = tmp_path / "acts.npz"
    save_activations(path, labels, {"l1": X, "l2": np.tanh(X)}, split=split, permuted=np.arange(P * M) % 3 == 1,
                     train_labels=labels)
    out = subprocess.run([sys.executable, "-c", _COUNT_COMPILES, str(path), str(tmp_path / "out")], env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr
    compiled = json.loads(out.stdout.strip().splitlines()[-1])
    assert compiled == [], f"kernels compiled after the warm-up: {compiled}"


# ---------------------------------------------------------------- local process runner (geomprobe.local_runner)
def test_process_runner_gives_the_serial_rows(tmp_path):
    from geomprobe.analysis import AnalyzeOptions, analyze
    from geomprobe.io import save_activations
    from geomprobe.local_runner import process_runner

    rng = np.random.default_rng(5)
    P, M, N = 5, 12, 16
    X = (np.repeat(3 * rng.standard_normal((P, N)), M, axis=0) + rng.standard_normal((P * M, N))).astype(np.float32)
    labels = np.repeat(np.arange(P), M)
    path = tmp_path / "a.npz"
    save_activations(path, labels, {"l1": X, "l2": np.abs(X)}, split=np.where(np.arange(P * M) % 3, "train", "test"))
    opts = AnalyzeOptions(seed=2, n_reps=2, n_t=6)
    serial = analyze([path], opts)
    parallel = analyze([path], opts, runner=process_runner(2))
    assert len(serial.rows) > 20 and any(r["metric"] == "capacity" for r in serial.rows)
    assert parallel.rows == serial.rows and not parallel.errors


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_process_runner_refuses_bad_jobs(bad):
    from geomprobe import InputError
    from geomprobe.local_runner import process_runner

    with pytest.raises(InputError, match=r"jobs must be an integer >= 1, got"):
        process_runner(bad)


def test_children_import_this_geomprobe_not_one_in_their_working_directory(tmp_path):
    """`pip install . && geomprobe demo` run in a source checkout: `python -m geomprobe._warmup` would
    import the checkout's geomprobe (its cwd comes first on sys.path) and fill another kernel cache
    than the installed copy's (a CI run lost 32 s to it); the children get this process's sys.path."""
    import geomprobe

    decoy = tmp_path / "geomprobe"
    decoy.mkdir()
    (decoy / "__init__.py").write_text("raise ImportError('decoy geomprobe imported')\n")
    out = subprocess.run(_warmup.child_argv("import geomprobe; print(geomprobe.__file__)"), cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == geomprobe.__file__
    # and the old way does pick the decoy up, so the test could fail
    old = subprocess.run([sys.executable, "-m", "geomprobe._warmup", "final"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert "decoy geomprobe imported" in old.stderr
