"""Analysis of activation files as independent (file, layer, subset) tasks -> long-format rows.

The command line (``geomprobe analyze``) and the distributed runner both use this module: a task
opens its file itself and loads only its own layer, and its random seed is derived from the user's
seed and the task's (layer, subset) key, never from execution order, so any scheduler gives the same
numbers. Using the same key for every file (epoch) gives common random numbers across epochs.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ._validation import InputError, check_nonneg_float, check_positive_int
from .alignment import AlignmentAccumulator, pairwise_stats
from .io import SUBSET_NAMES, open_activations

__all__ = [
    "AnalyzeOptions",
    "Task",
    "TaskResult",
    "plan_tasks",
    "run_task",
    "task_seed",
    "ROW_FIELDS",
    "AnalysisReport",
    "analyze",
    "prepare_outdir",
    "run_task_safe",
    "serial_runner",
]

ROW_FIELDS = ("file", "layer", "subset", "metric", "class", "value")


@dataclass(frozen=True)
class AnalyzeOptions:
    """What to compute. Defaults follow the papers (MFTMA: n_t = 200, 50 examples per class)."""

    layers: tuple[str, ...] | None = None
    subsets: tuple[str, ...] | None = None
    seed: int = 0
    alignment: bool = True
    pairwise: bool = True
    pairwise_max_n: int = 20000
    mftma: bool = True
    kappa: float = 0.0
    n_t: int = 200
    n_reps: int = 10
    per_class: int | None = 50
    max_classes: int | None = None
    empirical_capacity: bool = False
    seed_mode: str = "spawn"
    drop_nonfinite: bool = False
    probes: bool = True

    def __post_init__(self) -> None:
        check_positive_int(self.seed, "seed", minimum=0)
        check_positive_int(self.n_t, "n_t")
        check_positive_int(self.n_reps, "n_reps")
        check_positive_int(self.pairwise_max_n, "pairwise_max_n", minimum=2)
        check_nonneg_float(self.kappa, "kappa")
        if self.per_class is not None:
            check_positive_int(self.per_class, "per_class")
        if self.max_classes is not None:
            check_positive_int(self.max_classes, "max_classes", minimum=2)
        if self.seed_mode not in ("spawn", "reference"):
            raise InputError(f"seed_mode must be 'spawn' or 'reference'; got {self.seed_mode!r}")
        if self.subsets is not None:
            bad = [s for s in self.subsets if s not in SUBSET_NAMES]
            if bad:
                raise InputError(f"subsets must be among {', '.join(SUBSET_NAMES)}; got {', '.join(bad)}")


@dataclass(frozen=True)
class Task:
    """One unit of work. kind: 'act' (a layer's activations), 'grad' (one gradient tensor, layer =
    '<layer>/<tensor>') or 'probe' (the file's probe keys)."""

    file: str
    kind: str
    layer: str
    subset: str

    @property
    def key(self) -> str:
        return f"{self.file}::{self.kind}::{self.layer}::{self.subset}"

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.key.encode()).hexdigest()[:20]


@dataclass
class TaskResult:
    task: Task
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    def to_json(self) -> str:
        return json.dumps(
            {"task": asdict(self.task), "key": self.task.key, "rows": self.rows, "notes": self.notes,
             "error": self.error},
            allow_nan=True,
        )

    @classmethod
    def from_json(cls, text: str) -> TaskResult:
        d = json.loads(text)
        return cls(Task(**d["task"]), d["rows"], d["notes"], d["error"])


def task_seed(seed: int, task: Task) -> np.random.SeedSequence:
    """Seed of a task: from the user's seed and the task's (kind, layer, subset), not the file name,
    so that the same layer of several epochs' files is analysed with the same random numbers."""
    h = hashlib.sha256(f"{task.kind}::{task.layer}::{task.subset}".encode()).digest()
    words = [int.from_bytes(h[i:i + 4], "little") for i in range(0, 16, 4)]
    return np.random.SeedSequence(entropy=int(seed), spawn_key=tuple(words))


def plan_tasks(files: list[str], options: AnalyzeOptions, *, scan_values: bool = True) -> list[Task]:
    """Validate every file (structure, and values unless told not to) and list the tasks in a fixed
    order: file, then layers in file order, then subsets. Raises InputError before any work."""
    tasks: list[Task] = []
    if not files:
        raise InputError("no activation files given")
    seen = set()
    for path in files:
        if path in seen:
            raise InputError(f"{path}: given twice")
        seen.add(path)
        with open_activations(path) as f:
            if scan_values and not options.drop_nonfinite:
                f.scan_values()
            grad_layers = [f"{layer}/{t}" for layer, ts in f.grad_tensors.items() for t in ts]
            if options.layers is not None:
                known = set(f.layers) | set(f.grad_tensors) | set(grad_layers)
                missing = [layer for layer in options.layers if layer not in known]
                if missing:
                    raise InputError(
                        f"{path}: no layer {', '.join(map(repr, missing))}; layers: {', '.join(f.layers)}"
                        + (f"; gradient tensors: {', '.join(grad_layers)}" if grad_layers else "")
                    )
            subsets = list(f.subsets())
            if options.subsets is not None:
                unknown = [s for s in options.subsets if s not in subsets]
                if unknown:
                    raise InputError(
                        f"{path}: subset(s) {', '.join(map(repr, unknown))} not present (empty or not "
                        f"defined by this file); subsets: {', '.join(subsets)}"
                    )
                subsets = [s for s in subsets if s in options.subsets]
            for layer in f.layers:
                if options.layers is None or layer in options.layers:
                    tasks.extend(Task(str(path), "act", layer, s) for s in subsets)
            for layer, tensors in f.grad_tensors.items():
                for t in tensors:
                    name = f"{layer}/{t}"
                    if options.layers is None or layer in options.layers or name in options.layers:
                        tasks.extend(Task(str(path), "grad", name, s) for s in subsets)
            if options.probes and any(k.startswith("probe/") for k in f.keys()):
                tasks.append(Task(str(path), "probe", "probe", "probe"))
    return tasks


def _row(task: Task, metric: str, cls: Any, value: float) -> dict[str, Any]:
    v = float(value)
    if not math.isfinite(v):  # JSON-safe: NaN -> null, +-inf -> "inf" / "-inf"
        v = None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return {
        "file": task.file, "layer": task.layer, "subset": task.subset, "metric": metric,
        "class": "" if cls is None else str(cls), "value": v,
    }


def run_task(task: Task, options: AnalyzeOptions) -> TaskResult:
    """Run one task. User-input problems raise InputError; the caller decides how to report."""
    res = TaskResult(task)
    with open_activations(task.file) as f:
        if task.kind == "probe":
            from .probes import probe_rows

            rows, notes = probe_rows(f)
            for layer, subset, metric, cls, value in rows:
                res.rows.append(_row(replace(task, layer=layer, subset=subset), metric, cls, value))
            res.notes.extend(notes)
            return res
        sub = f.subsets()[task.subset]
        if task.kind == "act":
            X = f.layer(task.layer)
        else:
            layer, tensor = task.layer.split("/", 1)
            X = f.grad(layer, tensor)
        X = X[sub.rows]
        labels = sub.labels
    X, labels = _finite_rows(X, labels, task, options, res)
    prefix = "rep_" if task.kind == "act" else "grad_"
    res.rows.append(_row(task, "n_examples", None, X.shape[0]))
    if options.alignment:
        _alignment_rows(X, labels, task, prefix, res)
    if task.kind == "grad" and options.pairwise:
        if X.shape[0] > options.pairwise_max_n:
            res.notes.append(
                f"{task.layer} [{task.subset}]: pairwise measures skipped: {X.shape[0]} examples > "
                f"pairwise_max_n = {options.pairwise_max_n}"
            )
        elif X.shape[0] >= 2:
            p = pairwise_stats(X, labels)
            res.rows.append(_row(task, "grad_sign_stiffness", None, p.sign_stiffness))
            res.rows.append(_row(task, "grad_sign_stiffness_in_class", None, p.sign_in_class))
            res.rows.append(_row(task, "grad_confusion_min_inner", None, p.min_inner))
            res.rows.append(_row(task, "grad_confusion_min_cosine", None, p.min_cosine))
    if task.kind == "act" and options.mftma:
        n_classes = np.unique(labels).size
        if n_classes < 2:
            res.notes.append(f"{task.layer} [{task.subset}]: MFTMA skipped: {n_classes} class(es), needs >= 2")
        else:
            from .mftma.rows import mftma_rows

            rng = np.random.default_rng(task_seed(options.seed, task))
            rows, notes = mftma_rows(
                X, labels, rng, kappa=options.kappa, n_t=options.n_t, n_reps=options.n_reps,
                per_class=options.per_class, max_classes=options.max_classes,
                empirical=options.empirical_capacity, seed_mode=options.seed_mode,
            )
            res.rows.extend(_row(task, m, c, v) for m, c, v in rows)
            res.notes.extend(f"{task.layer} [{task.subset}]: {n}" for n in notes)
    return res


def _finite_rows(X, labels, task, options, res):
    finite = np.isfinite(X).all(axis=1) if X.dtype.kind == "f" else np.ones(X.shape[0], bool)
    n_bad = int((~finite).sum())
    if n_bad:
        if not options.drop_nonfinite:
            i = int(np.flatnonzero(~finite)[0])
            raise InputError(
                f"{task.file}: layer '{task.layer}' subset {task.subset}: {n_bad} row(s) hold NaN or Inf; "
                f"first at subset row {i} (use --drop-nonfinite to exclude them)"
            )
        X, labels = X[finite], labels[finite]
        res.notes.append(f"{task.layer} [{task.subset}]: dropped {n_bad} row(s) holding NaN or Inf")
        res.rows.append(_row(task, "n_dropped_nonfinite", None, n_bad))
    if X.shape[0] == 0:
        raise InputError(f"{task.file}: layer '{task.layer}' subset {task.subset}: no examples left")
    return X, labels


def _alignment_rows(X, labels, task, prefix, res) -> None:
    alignment_rows_from_stats(AlignmentAccumulator().update(X, labels).compute(), task, prefix, res)


def alignment_rows_from_stats(st, task: Task, prefix: str, res: TaskResult) -> None:
    """Rows and notes of the additive alignment statistics (AlignmentStats) of one task."""
    res.rows.append(_row(task, prefix + "omega", None, st.omega))
    res.rows.append(_row(task, prefix + "omega_in_class", None, st.omega_in_class))
    for c, v in zip(st.classes, st.omega_per_class):
        if not np.isnan(v):
            res.rows.append(_row(task, prefix + "omega", int(c), v))
    for c, why in st.skipped:
        res.notes.append(f"{task.layer} [{task.subset}]: class {c} has {why}: skipped")
    res.rows.append(_row(task, prefix + "n_classes_skipped", None, len(st.skipped)))
    if task.kind == "grad":
        res.rows.append(_row(task, "grad_diversity", None, st.diversity))
        res.rows.append(_row(task, "grad_cosine_stiffness", None, st.cosine_stiffness))
        res.rows.append(_row(task, "grad_cosine_stiffness_in_class", None, st.cosine_in_class))
        for c, v in zip(st.classes, st.cosine_within):
            if not np.isnan(v):
                res.rows.append(_row(task, "grad_cosine_stiffness", int(c), v))


# -- running many tasks --------------------------------------------------------------------------
def run_task_safe(task: Task, options: AnalyzeOptions) -> TaskResult:
    """run_task, with any failure recorded in the result (key + error) instead of raised."""
    try:
        return run_task(task, options)
    except Exception as exc:  # noqa: BLE001 - reported per task, the other tasks go on
        return TaskResult(task, error=f"{type(exc).__name__}: {exc}")


def serial_runner(tasks, options, on_done) -> None:
    """Run tasks one after the other in this process, reporting each result as it finishes."""
    for t in tasks:
        on_done(run_task_safe(t, options))


@dataclass
class AnalysisReport:
    """The outcome of :func:`analyze`: rows in task order, notes, and failed tasks (key, error)."""

    rows: list[dict[str, Any]]
    notes: list[str]
    errors: list[tuple[str, str]]
    options: AnalyzeOptions
    files: list[str]
    n_tasks: int
    n_resumed: int = 0

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_json(self) -> str:
        from . import __version__

        return json.dumps(
            {"format": "geomprobe-metrics", "format_version": 1, "geomprobe_version": __version__,
             "files": self.files, "options": asdict(self.options), "n_tasks": self.n_tasks,
             "rows": self.rows, "notes": self.notes,
             "errors": [{"task": k, "error": e} for k, e in self.errors]},
            indent=1,
        )

    def to_csv(self) -> str:
        import csv
        import io

        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=ROW_FIELDS, lineterminator="\n")
        w.writeheader()
        for r in self.rows:
            w.writerow({k: ("" if r[k] is None else r[k]) for k in ROW_FIELDS})
        return buf.getvalue()


def prepare_outdir(outdir: str | Path, *, force: bool = False, resume: bool = False) -> Path:
    """Check OUTDIR may be used (no overwrite without force or resume). Creates nothing."""
    out = Path(outdir)
    if out.exists() and not out.is_dir():
        raise InputError(f"output directory {out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not (force or resume):
        raise InputError(
            f"output directory {out} already exists and is not empty; pass --force to overwrite its "
            "results or --resume to skip finished tasks"
        )
    return out


def analyze(
    files,
    options: AnalyzeOptions | None = None,
    *,
    outdir: str | Path | None = None,
    force: bool = False,
    resume: bool = False,
    runner=None,
    client=None,
    progress=None,
) -> AnalysisReport:
    """Analyse activation files: every (file, layer, subset) task, in a fixed order.

    With ``outdir``, each task's result is written atomically to OUTDIR/tasks/ as soon as it
    finishes (so an interrupted run loses nothing done; ``resume=True`` skips those tasks), then
    OUTDIR/metrics.json and OUTDIR/metrics.csv are written. ``runner(tasks, options, on_done)``
    runs the tasks (default: serially here; see geomprobe.distributed for Dask). ``progress`` is
    called with each finished TaskResult. ``client``: a dask.distributed Client; the tasks then run
    on its cluster (same numbers as the local run).
    """
    from .io import atomic_write_text

    options = options or AnalyzeOptions()
    files = [str(f) for f in ([files] if isinstance(files, (str, Path)) else files)]
    out = prepare_outdir(outdir, force=force, resume=resume) if outdir is not None else None
    tasks = plan_tasks(files, options)
    done: dict[str, TaskResult] = {}
    n_resumed = 0
    tdir = None
    if out is not None:
        tdir = out / "tasks"
        tdir.mkdir(parents=True, exist_ok=True)
        if resume:
            for t in tasks:
                p = tdir / f"{t.digest}.json"
                if p.exists():
                    try:
                        r = TaskResult.from_json(p.read_text())
                    except (ValueError, KeyError, TypeError):
                        continue  # unreadable partial result: run the task again
                    if r.task == t and r.error is None:
                        done[t.key] = r
            n_resumed = len(done)

    def on_done(r: TaskResult) -> None:
        done[r.task.key] = r
        if tdir is not None and r.error is None:
            atomic_write_text(tdir / f"{r.task.digest}.json", r.to_json())
        if progress is not None:
            progress(r)

    if client is not None:
        if runner is not None:
            raise InputError("give either runner or client, not both")
        from .distributed import dask_runner

        runner = dask_runner(client)
    todo = [t for t in tasks if t.key not in done]
    (runner or serial_runner)(todo, options, on_done)
    rows, notes, errors = [], [], []
    for t in tasks:
        r = done.get(t.key)
        if r is None:
            errors.append((t.key, "task did not report a result"))
            continue
        rows.extend(r.rows)
        notes.extend(r.notes)
        if r.error:
            errors.append((t.key, r.error))
    report = AnalysisReport(rows, notes, errors, options, files, len(tasks), n_resumed)
    if out is not None:
        atomic_write_text(out / "metrics.json", report.to_json())
        atomic_write_text(out / "metrics.csv", report.to_csv())
    return report
