"""``geomprobe train EXPERIMENT --sweep KEY=V1,V2,... [--scheduler A | --workers N] [--resume]``.

Thin: read the parsed ``geomprobe train`` arguments (the same ``--config`` reading as a single run,
:func:`geomprobe.cli.train.read_config`, and the same cluster checks, :mod:`geomprobe.cli.cluster`),
call :func:`geomprobe.trainers.sweep.run_sweep`, print one line per run and the failures.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from geomprobe.analysis import AnalyzeOptions

from .cluster import check_cluster_args
from .train import read_config

__all__ = ["run_sweep_command"]


def run_sweep_command(args, out: str | os.PathLike, *, train_fn=None) -> int:
    """The sweep for parsed arguments of ``geomprobe train`` (experiment, preset, config, sets, seed,
    device, force, quiet, sweep, resume and the cluster options). Returns the exit code (0, or 1 if
    any training or analysis failed)."""
    from geomprobe.trainers.sweep import parse_sweep, run_sweep

    key, values = parse_sweep(args.sweep)
    config = read_config(args.config) if getattr(args, "config", None) else None
    quiet = bool(getattr(args, "quiet", False))
    base = {"preset": getattr(args, "preset", "tiny"), "config": config, "sets": list(getattr(args, "sets", []) or []),
            "seed": getattr(args, "seed", None), "device": getattr(args, "device", None),
            "progress": "off" if quiet else None}
    cluster = check_cluster_args(args)

    def show(kind, obj):
        if kind == "train" and not quiet:
            state = "failed" if obj.error else ("reused" if obj.reused else "done")
            print(f"{key}={obj.value}: {state} ({len(obj.files)} activation file(s)) -> {obj.out}", file=sys.stderr)

    report = run_sweep(args.experiment, base, key, values, out=out, scheduler=cluster["scheduler"],
                       workers=cluster["workers"], threads_per_worker=cluster["threads_per_worker"] or 1,
                       retries=cluster["retries"], force=bool(getattr(args, "force", False)),
                       resume=bool(getattr(args, "resume", False)),
                       analyze_options=AnalyzeOptions(seed=getattr(args, "seed", None) or 0),
                       stream_batch_rows=cluster["stream_batch_rows"], train_fn=train_fn, progress=show)
    if not quiet and report.analysis is not None:
        print(f"analysis: {report.analysis.n_tasks} task(s), {len(report.analysis.rows)} rows -> "
              f"{Path(out) / 'analysis'}/metrics.json", file=sys.stderr)
    for k, err in report.errors:
        print(f"geomprobe train: {k} failed: {err}", file=sys.stderr)
    return 0 if report.ok else 1
