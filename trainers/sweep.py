"""Sweeps: one training per value of an option, as Dask tasks or one after the other, then the analyses.

``geomprobe train EXPERIMENT --sweep KEY=V1,V2,...`` trains the experiment once per value into
``OUT/KEY=VALUE/`` and then analyses every activation file the runs wrote into ``OUT/analysis/`` (the
analysis tasks run on the same cluster). On a cluster each training is one task; when the workers
have GPUs (Dask resource ``GPU``) each training task asks for one, so a worker trains one network at a
time on its own device. A training that fails is reported with its value while the others go on; a
worker that dies mid-training has its task rerun, and the experiment resumes from its last
checkpoint (``run_experiment`` resumes unfinished runs). With ``resume`` a finished value is reused.

This module imports neither torch nor Dask at import time: the default training function imports
``geomprobe.trainers.experiments`` (torch) where it runs, i.e. on the worker.
"""
from __future__ import annotations

import json
import os
import re
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from geomprobe._validation import InputError, check_positive_int
from geomprobe.analysis import AnalysisReport, AnalyzeOptions, analyze
from geomprobe.io import atomic_write_text

__all__ = ["SweepRun", "SweepReport", "parse_sweep", "run_sweep", "train_experiment",
           "value_dir"]

_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


def parse_sweep(text: str) -> tuple[str, list[str]]:
    """``'sigma=0.01,0.1,1'`` -> ``('sigma', ['0.01', '0.1', '1'])``. Values stay text: the experiment's
    option parser converts them (``--set KEY=VALUE``). A JSON list (``'widths=[[64,64],[128]]'``) gives
    one value per element, for options that are themselves lists."""
    if not isinstance(text, str) or "=" not in text:
        raise InputError(f"--sweep expects KEY=V1,V2,..., got {text!r}")
    key, rhs = (s.strip() for s in text.split("=", 1))
    key = key.replace("-", "_")
    if not _KEY_RE.match(key):
        raise InputError(f"--sweep: option name must be a plain identifier, got {key!r}")
    if rhs.startswith("["):
        try:
            items = json.loads(rhs)
        except json.JSONDecodeError as exc:
            raise InputError(f"--sweep {key}: values {rhs!r} are not a valid JSON list ({exc})") from None
        if not isinstance(items, list):
            raise InputError(f"--sweep {key}: expected a JSON list of values, got {rhs!r}")
        values = [v if isinstance(v, str) else json.dumps(v, separators=(",", ":")) for v in items]
    else:
        values = [v.strip() for v in rhs.split(",")]
    return key, _check_values(key, values)


def _check_values(key: str, values) -> list[str]:
    values = [str(v) for v in values]
    if not values or any(v == "" for v in values):
        raise InputError(f"--sweep {key}: needs one or more non-empty values, got {values!r}")
    bad = [v for v in values if "/" in v or "\\" in v or v in (".", "..") or "\0" in v]
    if bad:
        raise InputError(f"--sweep {key}: a value names a folder {key}=VALUE and may not hold '/' or be '.'/'..'; "
                         f"got {bad[0]!r}")
    dup = sorted({v for v in values if values.count(v) > 1})
    if dup:
        raise InputError(f"--sweep {key}: value(s) given twice: {', '.join(dup)}")
    return values


def value_dir(out: str | os.PathLike, key: str, value: str) -> Path:
    """Where the run for one value goes: ``OUT/KEY=VALUE``."""
    return Path(out) / f"{key}={value}"


# -- training one value --------------------------------------------------------------------------
def _run_args(base_args: dict[str, Any], key: str, value: str) -> dict[str, Any]:
    args = dict(base_args)
    args["sets"] = [*list(base_args.get("sets") or []), f"{key}={value}"]
    return args


def _options(experiment: str, args: dict[str, Any]):
    from geomprobe.trainers.options import options_for  # torch-free

    known = {"preset", "config", "sets", "seed", "device", "progress"}
    unknown = sorted(set(args) - known)
    if unknown:
        raise InputError(f"sweep base_args: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return options_for(experiment, args.get("preset", "tiny"), args.get("config"), args.get("sets"),
                       seed=args.get("seed"), device=args.get("device"), progress=args.get("progress"))


def _finished(out_dir: Path) -> bool:
    try:
        return json.loads((out_dir / "experiment.json").read_text()).get("status") == "done"
    except (OSError, ValueError):
        return False


def _activation_files(out_dir: Path) -> list[str]:
    return sorted(str(p) for p in out_dir.rglob("acts_*.npz"))


def train_experiment(experiment: str, args: dict[str, Any], out_dir: str | os.PathLike, force: bool = False) -> list[str]:
    """The default training function of a sweep: ``geomprobe train EXPERIMENT`` with ``args``
    (preset, config, sets, seed, device, progress) into ``out_dir``; returns its activation files.
    Imports torch (on the worker, when run as a Dask task)."""
    from geomprobe.trainers.experiments import run_experiment

    out_dir = Path(out_dir)
    opts = _options(experiment, args)
    run_experiment(experiment, opts, out_dir, force=force, preset=args.get("preset", "tiny"))
    return _activation_files(out_dir)


def _train_task(train_fn, experiment: str, args: dict, out_dir: str, force: bool, resume: bool) -> dict:
    """One training, as run on a worker (or here). With ``resume`` a run whose experiment.json says
    it finished is reused. Wrong options (InputError) come back as the error; other exceptions
    propagate so that Dask reruns the task (the experiment then resumes from its checkpoint)."""
    from geomprobe._validation import AnalysisError

    d = Path(out_dir)
    if resume and not force and _finished(d):
        return {"files": _activation_files(d), "reused": True}
    try:
        files = (train_fn or train_experiment)(experiment, args, d, force)
    except (InputError, AnalysisError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {"files": [str(f) for f in files], "reused": False}


def _previous_runs(out: Path, experiment: str, key: str) -> dict[str, dict]:
    """Successful runs recorded in OUT/sweep.json by an earlier sweep of the same experiment and key."""
    try:
        prev = json.loads((out / "sweep.json").read_text())
    except (OSError, ValueError):
        return {}
    if prev.get("experiment") != experiment or prev.get("key") != key:
        raise InputError(f"{out}: holds a sweep of {prev.get('experiment')!r} over {prev.get('key')!r}, not "
                         f"{experiment!r} over {key!r}; use another output folder or --force")
    return {r["value"]: r for r in prev.get("runs", [])
            if not r.get("error") and r.get("files") and all(os.path.exists(f) for f in r["files"])}


# -- the sweep -----------------------------------------------------------------------------------
@dataclass
class SweepRun:
    value: str
    out: str
    files: list[str] = field(default_factory=list)
    error: str | None = None
    reused: bool = False


@dataclass
class SweepReport:
    """Runs (one per value, in the given order) and the analysis of their activation files."""

    experiment: str
    key: str
    runs: list[SweepRun]
    analysis: AnalysisReport | None = None

    @property
    def errors(self) -> list[tuple[str, str]]:
        errs = [(f"{self.key}={r.value}", r.error) for r in self.runs if r.error]
        if self.analysis is not None:
            errs.extend(self.analysis.errors)
        return errs

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_json(self) -> str:
        return json.dumps({
            "experiment": self.experiment, "key": self.key, "runs": [asdict(r) for r in self.runs],
            "analysis": None if self.analysis is None else {
                "n_tasks": self.analysis.n_tasks, "n_rows": len(self.analysis.rows),
                "errors": [{"task": k, "error": e} for k, e in self.analysis.errors]},
        }, indent=1)


def run_sweep(
    experiment: str,
    base_args: dict[str, Any] | None,
    key: str,
    values,
    client=None,
    *,
    out: str | os.PathLike,
    scheduler: str | None = None,
    workers: int | None = None,
    threads_per_worker: int = 1,
    retries: int = 2,
    gpus: list[str] | None = None,
    force: bool = False,
    resume: bool = False,
    analyze_options: AnalyzeOptions | None = None,
    run_analysis: bool = True,
    stream_batch_rows: int | None = None,
    train_fn: Callable[[str, dict, Path, bool], list[str]] | None = None,
    progress: Callable[[str, Any], None] | None = None,
) -> SweepReport:
    """Train ``experiment`` once per value of option ``key`` into ``OUT/KEY=VALUE/``, then analyse
    all activation files into ``OUT/analysis/`` (metrics.json, metrics.csv); ``OUT/sweep.json``
    records every run (written as each finishes).

    ``base_args``: the options every run shares: ``preset``, ``config`` (dict), ``sets``
    (["k=v", ...]), ``seed``, ``device``, ``progress``; each run adds ``--set KEY=VALUE``. Every
    value's options are checked before anything runs. Where: ``client`` (a dask.distributed Client),
    or ``scheduler`` (address) / ``workers`` (a local cluster started here; ``gpus``: one device id per
    worker, default: every visible CUDA device when there are at least ``workers``), or else here,
    one after the other. On a cluster whose workers offer the resource ``GPU``, each training asks
    for ``GPU=1``. ``train_fn(experiment, args, out_dir, force) -> files`` replaces the default
    :func:`train_experiment` (must be picklable for a cluster). ``progress(kind, obj)`` is called
    with ("train", SweepRun) and ("analyze", TaskResult) as they finish. ``stream_batch_rows``: the
    analyses compute alignment from row batches (geomprobe.distributed.run_task_streamed).
    """
    if not isinstance(key, str) or not _KEY_RE.match(key.replace("-", "_")):
        raise InputError(f"sweep key must be an option name, got {key!r}")
    key = key.replace("-", "_")
    values = _check_values(key, values if not isinstance(values, str) else [values])
    base_args = dict(base_args or {})
    retries = check_positive_int(retries, "retries", minimum=0)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"sweep output {out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not (force or resume):
        raise InputError(f"sweep output {out} already exists and is not empty; pass --force to train again or "
                         "--resume to reuse finished runs")
    if train_fn is None:  # check every value's options now, before any training (torch-free)
        for v in values:
            _options(experiment, _run_args(base_args, key, v))
    if client is None and (scheduler is not None or workers is not None):
        from geomprobe.distributed import connect

        if workers is not None and gpus is None:
            gpus = _visible_gpus(workers)
        with connect(scheduler=scheduler, workers=workers, threads_per_worker=threads_per_worker,
                     retries=retries, gpus=gpus) as c:
            return _sweep(experiment, base_args, key, values, c, out, retries, force, resume, analyze_options,
                          run_analysis, stream_batch_rows, train_fn, progress)
    return _sweep(experiment, base_args, key, values, client, out, retries, force, resume, analyze_options,
                  run_analysis, stream_batch_rows, train_fn, progress)


def _visible_gpus(workers: int) -> list[str] | None:
    """One CUDA device per local worker when there are enough, else None (CPU workers)."""
    try:
        import torch
    except ImportError:
        return None
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [str(i) for i in range(workers)] if n >= workers else None


def _sweep(experiment, base_args, key, values, client, out, retries, force, resume, analyze_options,
           run_analysis, stream_batch_rows, train_fn, progress) -> SweepReport:
    out.mkdir(parents=True, exist_ok=True)
    runs = {v: SweepRun(v, str(value_dir(out, key, v))) for v in values}
    report = SweepReport(experiment, key, [runs[v] for v in values])

    def done(value: str, result: dict | None, error: str | None) -> None:
        r = runs[value]
        if error is None and result.get("error"):
            error = result["error"]
        if error is None:
            r.files, r.reused = list(result["files"]), bool(result["reused"])
            if not r.files:
                r.error = "the run wrote no activation files (acts_*.npz)"
        else:
            r.error = error
        atomic_write_text(out / "sweep.json", report.to_json())
        if progress is not None:
            progress("train", r)

    prev = _previous_runs(out, experiment, key) if resume and not force else {}
    for v in values:
        if v in prev:
            done(v, {"files": prev[v]["files"], "reused": True}, None)
    jobs = [(v, _run_args(base_args, key, v), runs[v].out) for v in values if v not in prev]
    if client is None:
        for v, args, d in jobs:
            try:
                res = _train_task(train_fn, experiment, args, d, force, resume)
            except Exception as exc:  # noqa: BLE001 - reported per value, the other values go on
                done(v, None, f"{type(exc).__name__}: {exc}")
            else:
                done(v, res, None)
    else:
        _train_on_cluster(client, jobs, experiment, train_fn, force, resume, retries, done)
    files = [f for r in report.runs if not r.error for f in r.files]
    if run_analysis and files:
        runner = None
        if client is not None:
            from geomprobe.distributed import dask_runner

            runner = dask_runner(client, retries, stream_batch_rows=stream_batch_rows)
        elif stream_batch_rows is not None:
            from geomprobe.distributed import streaming_runner

            runner = streaming_runner(stream_batch_rows)
        report.analysis = analyze(files, analyze_options or AnalyzeOptions(), outdir=out / "analysis",
                                  force=force, resume=resume, runner=runner,
                                  progress=(lambda r: progress("analyze", r)) if progress else None)
    atomic_write_text(out / "sweep.json", report.to_json())
    return report


def _train_on_cluster(client, jobs, experiment, train_fn, force, resume, retries, done) -> None:
    from distributed import as_completed

    info = client.scheduler_info().get("workers", {})
    gpu = any((w.get("resources") or {}).get("GPU", 0) >= 1 for w in info.values())
    run_id = uuid.uuid4().hex[:8]
    futures = {}
    try:
        for v, args, d in jobs:
            fut = client.submit(_train_task, train_fn, experiment, args, d, force, resume,
                                key=f"geomprobe_train-{_safe(v)}-{run_id}", retries=retries, pure=False,
                                resources={"GPU": 1} if gpu else None)
            futures[fut.key] = (fut, v)
        for fut in as_completed([f for f, _ in futures.values()]):
            _, v = futures.pop(fut.key)
            try:
                res = fut.result()
            except Exception as exc:  # noqa: BLE001 - this value failed: report it, the others go on
                done(v, None, f"{type(exc).__name__}: {exc}")
            else:
                done(v, res, None)
            fut.release()
    finally:
        if futures:
            try:
                client.cancel([f for f, _ in futures.values()])
            except Exception:  # noqa: BLE001 - best effort while stopping
                pass


def _safe(value: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=]", "_", value)[:40]
