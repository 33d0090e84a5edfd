"""geomprobe.distributed: the Dask runner gives the local run's numbers bit for bit, reports failing
tasks, reruns a task whose worker died, resumes after an interruption; streamed alignment; the CLI.

One 2-worker LocalCluster (processes, loopback, 1 thread each) is shared by the module; the CLI test
starts its own through the real entry point. Every wait is bounded (dask_runner's timeout_s).
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest

pytest.importorskip("distributed")

from geomprobe import InputError  # noqa: E402
from geomprobe.analysis import AnalyzeOptions, Task, analyze, plan_tasks, run_task  # noqa: E402
from geomprobe.cli.main import main  # noqa: E402
from geomprobe.distributed import (  # noqa: E402
    cluster_runner,
    connect,
    dask_runner,
    local_cluster,
    run_task_streamed,
    streaming_runner,
)
from geomprobe.cli.cluster import runner_from_args  # noqa: E402
from geomprobe.io import open_activations, save_activations  # noqa: E402
from geomprobe.synthetic import synthetic_activations  # noqa: E402

HAS_MFTMA = importlib.util.find_spec("geomprobe.mftma.rows") is not None
# MFTMA when another engineer's geomprobe.mftma.rows exists; small so that the module stays fast
OPTIONS = AnalyzeOptions(mftma=HAS_MFTMA, n_t=20, n_reps=2, per_class=8, probes=False)
DEADLINE_S = 120  # no runner call in this module may wait longer than this


def _write(path, seed, *, grads=True, compress=False):
    kw = synthetic_activations(seed, n_classes=4, per_class=10, n_test_per_class=5, n_layers=3, dim=12)
    n = kw["labels"].size
    g = np.random.default_rng(seed + 100).standard_normal((n, 3, 4)).astype(np.float32)
    return str(save_activations(path, **kw, grads={"layer2": {"w": g}} if grads else None, compress=compress))


@pytest.fixture(autouse=True)
def _blas_one_thread(blas_one_thread):
    """Every test here at 1 BLAS thread (conftest's blas_one_thread). (The module's ``local_report``
    is computed before this applies: it is the plain local run, default threads.)"""
    yield


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("acts")
    return [_write(d / f"epoch{i}.npz", i, compress=(i == 1)) for i in range(3)]


@pytest.fixture(scope="module")
def client():
    distributed = pytest.importorskip("distributed")
    cluster = local_cluster(2, 1, retries=2)
    c = None
    try:
        c = distributed.Client(cluster)
        yield c
    finally:
        if c is not None:
            c.close()
        cluster.close()


@pytest.fixture(scope="module")
def local_report(files):
    return analyze(files, OPTIONS)


def _run(client, **kw):
    return dask_runner(client, timeout_s=DEADLINE_S, **kw)


# -- same numbers ----------------------------------------------------------------------------------
def test_distributed_equals_local_bit_for_bit(client, files, local_report):
    report = analyze(files, OPTIONS, runner=_run(client))
    assert report.errors == [] and local_report.errors == []
    assert report.n_tasks == local_report.n_tasks == 3 * 4 * 4  # 3 files x (3 layers + 1 grad) x 4 subsets
    assert report.rows == local_report.rows  # exact: same floats, same order
    assert report.notes == local_report.notes
    assert json.loads(report.to_json())["rows"] == json.loads(local_report.to_json())["rows"]


def test_client_keyword_of_analyze_is_a_deprecated_alias(client, files, local_report):
    with pytest.warns(DeprecationWarning, match=r"runner=geomprobe.distributed.dask_runner\(client\)"):
        report = analyze(files[:1], OPTIONS, client=client)
    assert report.rows == [r for r in local_report.rows if r["file"] == files[0]]
    report = analyze(files[:1], OPTIONS, runner=dask_runner(client))
    assert report.rows == [r for r in local_report.rows if r["file"] == files[0]]


def test_analysis_does_not_import_the_distributed_runner():
    import ast
    import pathlib

    import geomprobe.analysis as ga

    tree = ast.parse(pathlib.Path(ga.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not any(m and m.endswith("distributed") for m in imported), imported
    code = "import sys, geomprobe.analysis; print('geomprobe.distributed' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "False", r.stderr


def test_relative_paths_are_opened_from_the_clients_directory(client, files, monkeypatch):
    monkeypatch.chdir(os.path.dirname(files[0]))
    rel = os.path.basename(files[0])
    local = analyze([rel], OPTIONS)
    report = analyze([rel], OPTIONS, runner=_run(client))
    assert report.rows == local.rows and report.rows[0]["file"] == rel


# -- failures --------------------------------------------------------------------------------------
def test_failing_task_is_reported_and_others_complete(client, files, local_report, tmp_path):
    attempts = tmp_path / "attempts"
    attempts.mkdir()

    def flaky(task, options):
        import uuid as _uuid

        from geomprobe import InputError as _InputError
        from geomprobe.analysis import run_task as _run_task

        if task.layer == "layer2" and task.subset in ("test", "permuted"):
            (attempts / f"{task.subset}-{_uuid.uuid4().hex}").write_text("")
            if task.subset == "test":
                raise ValueError("boom in layer2")  # unexpected: retried, then reported
            raise _InputError("bad input in layer2")  # user input: reported at once
        return _run_task(task, options)

    report = analyze(files[:1], OPTIONS, runner=_run(client, retries=1, task_fn=flaky))
    failed = dict(report.errors)
    k_test = Task(files[0], "act", "layer2", "test").key
    k_perm = Task(files[0], "act", "layer2", "permuted").key
    assert set(failed) == {k_test, k_perm}
    assert failed[k_test] == "ValueError: boom in layer2"
    assert failed[k_perm] == "InputError: bad input in layer2"
    names = sorted(p.name.split("-")[0] for p in attempts.iterdir())
    assert names.count("test") == 2 and names.count("permuted") == 1  # 1 retry; none for InputError
    expected = [r for r in local_report.rows if r["file"] == files[0]
                and not (r["layer"] == "layer2" and r["subset"] in ("test", "permuted"))]
    assert report.rows == expected


def test_same_error_report_as_serial_run(client, files):
    def bad(task, options):
        raise ValueError(f"no good: {task.layer}")

    tasks = plan_tasks(files[:1], OPTIONS)[:3]
    got_serial, got_dask = [], []
    serial_runner_errors = [f"ValueError: no good: {t.layer}" for t in tasks]
    _run(client, retries=0, task_fn=bad)(tasks, OPTIONS, got_dask.append)
    for t in tasks:  # what analysis.run_task_safe reports for the same exception
        try:
            bad(t, OPTIONS)
        except ValueError as exc:
            got_serial.append(f"{type(exc).__name__}: {exc}")
    assert got_serial == serial_runner_errors
    assert sorted(r.error for r in got_dask) == sorted(serial_runner_errors)


def test_timeout_reports_unfinished_tasks(client, files):
    def slow(task, options):
        import time as _time

        _time.sleep(2)  # the cancelled tasks end by themselves soon after: no restart needed

    got = []
    tasks = plan_tasks(files[:1], OPTIONS)[:2]
    dask_runner(client, timeout_s=0.5, task_fn=slow)(tasks, OPTIONS, got.append)
    assert sorted(r.task.key for r in got) == sorted(t.key for t in tasks)
    assert all(r.error.startswith("TimeoutError: no result within 0.5 s") for r in got)


# -- interruption and resume -----------------------------------------------------------------------
def test_interrupted_client_loses_nothing_and_resume_finishes(client, files, local_report, tmp_path):
    out = tmp_path / "out"
    seen = []

    def stop_after_5(r):
        seen.append(r.task.key)
        if len(seen) == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        analyze(files, OPTIONS, outdir=out, runner=_run(client), progress=stop_after_5)
    assert len(list((out / "tasks").glob("*.json"))) == 5  # written as they finished, atomically
    assert not list((out / "tasks").glob(".*.tmp"))
    rerun = []
    report = analyze(files, OPTIONS, outdir=out, resume=True, runner=_run(client), progress=lambda r: rerun.append(r))
    assert report.n_resumed == 5 and len(rerun) == report.n_tasks - 5
    assert not set(seen) & {r.task.key for r in rerun}  # finished work is not redone
    assert report.rows == local_report.rows
    ref = analyze(files, OPTIONS, outdir=tmp_path / "ref")
    assert json.loads((out / "metrics.json").read_text())["rows"] == json.loads(
        (tmp_path / "ref" / "metrics.json").read_text())["rows"] == ref.rows


# -- streaming ---------------------------------------------------------------------------------------
def test_iter_rows_same_batches_stored_and_compressed(tmp_path, rng):
    n = 257
    X = rng.standard_normal((n, 3, 5)).astype(np.float16)
    lab = rng.integers(0, 3, n)
    a = save_activations(tmp_path / "a.npz", lab, {"x": X})
    b = save_activations(tmp_path / "b.npz", lab, {"x": X}, compress=True)
    rows = rng.choice(n, 100)  # unsorted, with repeats
    with open_activations(a) as fa, open_activations(b) as fb:
        assert fa.is_stored("act/x") and not fb.is_stored("act/x")
        full = fa.layer("x")
        ba = list(fa.iter_rows("act/x", rows, batch_rows=16))
        bb = list(fb.iter_rows("act/x", rows, batch_rows=16))
        assert [len(p) for p, _ in ba] == [16] * 6 + [4]
        for (pa, xa), (pb, xb) in zip(ba, bb, strict=True):
            assert np.array_equal(pa, pb) and np.array_equal(xa, xb) and xa.dtype == np.float32
            assert np.array_equal(xa, full[rows[pa]])
        assert np.array_equal(np.concatenate([x for _, x in fb.iter_rows("act/x", batch_rows=100)]), full)
        assert fa.nbytes("act/x") == n * 15 * 2


def test_iter_rows_errors(tmp_path, rng):
    lab = rng.integers(0, 3, 20)
    p = save_activations(tmp_path / "f.npz", lab, {"x": np.asfortranarray(rng.standard_normal((20, 6)))}, compress=True)
    with open_activations(p) as f:
        with pytest.raises(InputError, match=r"'act/x' is compressed and stored in Fortran \(column\) order"):
            list(f.iter_rows("act/x"))
        with pytest.raises(InputError, match=r"'act/x' has 20 rows; row index 20 is out of range"):
            list(f.iter_rows("act/x", [0, 20]))
        with pytest.raises(InputError, match=r"batch_rows must be an integer >= 1, got 0"):
            list(f.iter_rows("act/x", batch_rows=0))
        with pytest.raises(InputError, match=r"rows must be a 1-D integer array, got dtype float64"):
            list(f.iter_rows("act/x", np.array([0.5])))
        with pytest.raises(InputError, match=r"no key 'act/y'"):
            list(f.iter_rows("act/y"))


def test_iter_rows_memory_is_bounded(tmp_path, rng):
    n, d = 20000, 256  # 20 MB float32 layer, read in 500-row (0.5 MB) batches
    path = save_activations(tmp_path / "big.npz", np.zeros(n, np.int64), {"x": np.ones((n, d), np.float32)})
    with open_activations(path) as f:
        tracemalloc.start()
        try:
            total = 0.0
            for _, block in f.iter_rows("act/x", batch_rows=500):
                total += float(block[:, 0].sum())
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert total == n
    assert peak < 4 * 500 * d * 4  # a few batches, far below the 20 MB layer


@pytest.mark.parametrize("mftma", [False, pytest.param(True, marks=pytest.mark.skipif(not HAS_MFTMA, reason="no mftma.rows"))])
def test_streamed_rows_match_run_task(files, mftma):
    opts = AnalyzeOptions(mftma=mftma, pairwise=True, probes=False, n_t=20, n_reps=2, per_class=8)
    for t in plan_tasks(files[1:2], opts, scan_values=False):
        whole = run_task(t, opts)
        one_batch = run_task_streamed(t, opts, batch_rows=10_000)
        assert one_batch.rows == whole.rows and one_batch.notes == whole.notes  # one batch: bit for bit
        small = run_task_streamed(t, opts, batch_rows=7)
        assert [(r["metric"], r["class"]) for r in small.rows] == [(r["metric"], r["class"]) for r in whole.rows]
        np.testing.assert_allclose([r["value"] for r in small.rows], [r["value"] for r in whole.rows],
                                   rtol=1e-12, atol=1e-14)


def test_streamed_nonfinite_rows_like_run_task(tmp_path, rng):
    X = rng.standard_normal((30, 4)).astype(np.float32)
    X[[3, 17]] = np.nan
    path = str(save_activations(tmp_path / "nan.npz", np.arange(30) % 3, {"x": X}))
    t = Task(path, "act", "x", "all")
    strict = AnalyzeOptions(mftma=False, probes=False)
    with pytest.raises(InputError, match=r"2 row\(s\) hold NaN or Inf; first at subset row 3"):
        run_task_streamed(t, strict, batch_rows=4)
    with pytest.raises(InputError, match=r"2 row\(s\) hold NaN or Inf; first at subset row 3"):
        run_task(t, strict)
    drop = AnalyzeOptions(mftma=False, probes=False, drop_nonfinite=True)
    a, b = run_task_streamed(t, drop, batch_rows=100), run_task(t, drop)
    assert a.rows == b.rows and a.notes == b.notes


def test_streamed_on_cluster_equals_streamed_locally(client, files):
    opts = AnalyzeOptions(mftma=False, probes=False)
    local = analyze(files[1:], opts, runner=streaming_runner(7))  # files[1] is compressed: sequential reads
    report = analyze(files[1:], opts, runner=_run(client, stream_batch_rows=7))
    assert report.errors == [] and report.rows == local.rows


# -- clusters, options, command line ---------------------------------------------------------------
def test_gpu_workers_see_one_device_each():
    distributed = pytest.importorskip("distributed")
    cluster = local_cluster(1, 1, gpus=["3"])  # no GPU needed: only the worker's view is checked
    try:
        with distributed.Client(cluster) as c:
            c.wait_for_workers(1, timeout=DEADLINE_S)
            seen = c.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"))
            assert list(seen.values()) == ["3"]
            info = c.scheduler_info()["workers"]
            assert all(w["resources"] == {"GPU": 1} for w in info.values())
            assert c.submit(lambda: os.environ["CUDA_VISIBLE_DEVICES"], resources={"GPU": 1}).result(
                timeout=DEADLINE_S) == "3"
    finally:
        cluster.close()


def test_option_errors():
    with pytest.raises(InputError, match=r"gpus lists 1 device\(s\) but workers is 2"):
        local_cluster(2, gpus=["0"])
    with pytest.raises(InputError, match=r"give either a scheduler address .* not both and not neither"):
        cluster_runner()
    with pytest.raises(InputError, match=r"workers must be an integer >= 1, got 0"):
        cluster_runner(workers=0)
    with pytest.raises(InputError, match=r"retries must be an integer >= 0, got -1"):
        dask_runner(None, retries=-1)
    with pytest.raises(InputError, match=r"timeout_s must be a number > 0, got 0"):
        dask_runner(None, timeout_s=0)


def test_missing_dask_says_how_to_install(monkeypatch, files, capsys):
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed -> ImportError
    with pytest.raises(InputError, match=r"needs dask.distributed, which is not installed .*pip install 'geomprobe\[dask\]'"):
        cluster_runner(workers=2)
    assert main(["analyze", files[0], "--workers", "2", "--quiet", "-o", "unused"]) == 2
    assert "pip install 'geomprobe[dask]'" in capsys.readouterr().err


def test_import_geomprobe_does_not_import_dask():
    code = ("import sys, geomprobe, geomprobe.analysis, geomprobe.distributed, geomprobe.cli.main\n"
            "geomprobe.cli.main.build_parser()\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('dask', 'distributed', 'torch'))\n"
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--scheduler", "tcp://127.0.0.1:1", "--workers", "2"], "give either --scheduler (tcp://127.0.0.1:1) or --workers (2), not both"),
        (["--threads-per-worker", "2"], "--threads-per-worker (2) applies to a local cluster: use it with --workers"),
        (["--workers", "0"], "--workers must be an integer >= 1, got 0"),
        (["--workers", "1", "--retries", "-1"], "--retries must be an integer >= 0, got -1"),
        (["--stream-batch-rows", "0"], "--stream-batch-rows must be an integer >= 1, got 0"),
        (["--workers", "1", "--threads-per-worker", "0"], "--threads-per-worker must be an integer >= 1, got 0"),
    ],
)
def test_runner_from_args_errors(argv, message):
    from geomprobe.cli.main import build_parser

    args = build_parser().parse_args(["analyze", "f.npz", *argv])
    with pytest.raises(InputError, match=re.escape(message)):
        runner_from_args(args)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--scheduler", "tcp://127.0.0.1:1", "--workers", "2"], "give either --scheduler (tcp://127.0.0.1:1) or --workers (2), not both"),
        (["--workers", "1", "--retries", "-1"], "--retries must be an integer >= 0, got -1"),
        (["--threads-per-worker", "2"], "--threads-per-worker (2) applies to a local cluster"),
        (["--workers", "0"], "--workers must be an integer >= 1, got 0"),
        (["--stream-batch-rows", "0"], "--stream-batch-rows must be an integer >= 1, got 0"),
    ],
)
def test_cli_option_errors(files, tmp_path, capsys, argv, message):
    assert main(["analyze", files[0], "-o", str(tmp_path / "o"), "--quiet", "--no-mftma", *argv]) == 2
    assert message in capsys.readouterr().err


def test_cli_scheduler_equals_local(client, files, tmp_path):
    common = ["--no-mftma", "--quiet", "--seed", "5"]
    assert main(["analyze", *files, "-o", str(tmp_path / "local"), *common]) == 0
    assert main(["analyze", *files, "-o", str(tmp_path / "dask"), *common, "--scheduler", client.scheduler.address]) == 0
    assert (tmp_path / "dask" / "metrics.csv").read_text() == (tmp_path / "local" / "metrics.csv").read_text()
    assert client.status == "running"  # the CLI closed its own Client, not the cluster


def test_cli_unreachable_scheduler(files, tmp_path, capsys, monkeypatch):
    import geomprobe.distributed as gd

    monkeypatch.setattr(gd, "_CONNECT_TIMEOUT_S", 2)
    code = main(["analyze", files[0], "-o", str(tmp_path / "o"), "--quiet", "--no-mftma",
                 "--scheduler", "tcp://127.0.0.1:9"])
    assert code == 2
    assert "could not connect to the Dask scheduler at tcp://127.0.0.1:9 within 2 s" in capsys.readouterr().err


def test_runner_from_args_without_cluster_options():
    class A:
        scheduler = None
        workers = None
        threads_per_worker = None
        retries = 2
        stream_batch_rows = None

    assert runner_from_args(A()) is None
    A.stream_batch_rows = 64
    assert runner_from_args(A()) is not None


def test_cli_workers_equals_local_failure_exit_1_and_resume_starts_nothing(files, tmp_path, capsys):
    bad = tmp_path / "bad.npz"  # layer 'x' has no finite row: its task fails at run time, 'y' is fine
    save_activations(bad, np.arange(12) % 2, {"x": np.full((12, 3), np.inf, np.float32),
                                               "y": np.ones((12, 3), np.float32)})
    inputs = [*files, str(bad)]
    common = ["--no-mftma", "--quiet", "--seed", "3", "--drop-nonfinite"]
    capsys.readouterr()
    assert main(["analyze", *inputs, "-o", str(tmp_path / "local"), *common]) == 1
    err_local = capsys.readouterr().err
    assert main(["analyze", *inputs, "-o", str(tmp_path / "dask"), *common, "--workers", "2"]) == 1
    err_dask = capsys.readouterr().err
    key = f"{bad}::act::x::all"
    assert f"task {key} failed: InputError: {bad}: layer 'x' subset all: no examples left" in err_dask
    assert err_dask == err_local
    local = json.loads((tmp_path / "local" / "metrics.json").read_text())
    dist = json.loads((tmp_path / "dask" / "metrics.json").read_text())
    assert dist["rows"] == local["rows"] and dist["errors"] == local["errors"] and len(dist["errors"]) == 1
    assert (tmp_path / "dask" / "metrics.csv").read_text() == (tmp_path / "local" / "metrics.csv").read_text()
    # every task of these files is done: --resume reuses them and starts no cluster (the address is
    # unreachable, so trying to connect would exit 2)
    assert main(["analyze", *files, "-o", str(tmp_path / "dask"), *common, "--resume",
                 "--scheduler", "tcp://127.0.0.1:9"]) == 0
    resumed = json.loads((tmp_path / "dask" / "metrics.json").read_text())
    assert resumed["rows"] == [r for r in local["rows"] if r["file"] != str(bad)]


# -- last: the worker restarted by this test would have to compile numba's kernels again -------------
def test_killed_worker_task_is_retried(client, files, local_report, tmp_path):
    marker = tmp_path / "killed-once"
    victim = Task(files[0], "act", "layer3", "restored")

    def kill_once(task, options):
        import os as _os

        from geomprobe.analysis import run_task as _run_task

        if task == victim:
            try:
                fd = _os.open(marker, _os.O_CREAT | _os.O_EXCL | _os.O_WRONLY)
            except FileExistsError:
                pass  # second run: the marker is there, compute normally
            else:
                _os.close(fd)
                _os._exit(1)  # the worker process dies mid-task
        return _run_task(task, options)

    report = analyze(files[:1], OPTIONS, runner=_run(client, task_fn=kill_once))
    assert marker.exists()
    assert report.errors == []
    assert report.rows == [r for r in local_report.rows if r["file"] == files[0]]
    client.wait_for_workers(2, timeout=DEADLINE_S)  # the nanny restarted it: later tests keep 2 workers
