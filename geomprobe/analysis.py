"""Analysis of activation files as independent (file, layer, subset) tasks -> long-format rows.

The command line (``geomprobe analyze``) and the distributed runner both use this module. A task
reads only its own layer from its file; the file itself is opened and validated once per process and
shared by that file's tasks (:func:`shared_file`). A task's random seed is derived from the user's
seed and the task's (layer, subset) key, never from execution order, so any scheduler gives the same
numbers. Using the same key for every file (epoch) gives common random numbers across epochs.

A task's rows come from the *row families* of its kind (:data:`ROW_FAMILIES`): functions that take a
:class:`TaskData` and append rows and notes. A new analysis adds a family there.

With an output directory, every finished task is saved with its *resume key* (:func:`resume_key`: the
input file's size, mtime and zip CRCs of the arrays it reads, every option that changes its rows and
the geomprobe version); ``resume`` reuses a saved task only when its key is the same. One run writes
an output directory at a time (a lock file, :func:`geomprobe.io.lock_directory`). See
docs/reliability.md.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import threading
from collections import Counter, OrderedDict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ._validation import InputError, check_nonneg_float, check_positive_int
from .alignment import AlignmentAccumulator, pairwise_stats
from .io import LOCK_NAME, SUBSET_NAMES, ActivationFile, atomic_write_text, lock_directory, lock_holder

__all__ = [
    "AnalyzeOptions",
    "Task",
    "TaskResult",
    "TaskData",
    "Note",
    "ROW_FAMILIES",
    "plan_tasks",
    "run_task",
    "task_seed",
    "resume_key",
    "shared_file",
    "clear_file_cache",
    "aggregate_notes",
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
    glue: bool = False
    glue_dichotomies: str = "random"
    companion: bool = False
    compare: bool = False

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
        if self.glue_dichotomies not in ("random", "one_vs_rest"):
            raise InputError(f"glue_dichotomies must be 'random' or 'one_vs_rest'; got {self.glue_dichotomies!r}")
        if self.seed_mode not in ("spawn", "reference"):
            raise InputError(f"seed_mode must be 'spawn' or 'reference'; got {self.seed_mode!r}")
        if self.subsets is not None:
            bad = [s for s in self.subsets if s not in SUBSET_NAMES]
            if bad:
                raise InputError(f"subsets must be among {', '.join(SUBSET_NAMES)}; got {', '.join(bad)}")


#: options that do NOT change the rows of a task of each kind (everything else is in its resume key;
#: an option added later is therefore in every key until it is listed here)
_MFTMA_OPTIONS = {"seed", "mftma", "kappa", "n_t", "n_reps", "per_class", "max_classes", "empirical_capacity",
                  "seed_mode", "glue", "glue_dichotomies", "companion"}
OPTIONS_NOT_IN_KEY: dict[str, set[str]] = {
    "act": {"layers", "subsets", "pairwise", "pairwise_max_n", "probes", "compare"},
    "grad": {"layers", "subsets", "probes", "compare"} | _MFTMA_OPTIONS,
    "probe": {"layers", "subsets", "alignment", "pairwise", "pairwise_max_n", "drop_nonfinite",
              "compare"} | _MFTMA_OPTIONS,
}


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

    @property
    def where(self) -> str:
        return f"{self.layer} [{self.subset}]"

    def arrays_read(self, f: ActivationFile) -> list[str]:
        """The keys of the file whose contents determine this task's rows."""
        base = [k for k in ("labels", "train_labels", "permuted", "split") if k in f.keys()]
        if self.kind == "act":
            return base + [f"act/{self.layer}"]
        if self.kind == "grad":
            return base + [f"grad/{self.layer}"]
        return f.keys()


@dataclass(frozen=True)
class Note:
    """Something the user should know about a result: a stable ``code`` (what kind of note, for
    programs: e.g. ``nonfinite_dropped``, ``class_skipped``, ``degenerate_layer``, ``mftma``,
    ``mftma_undefined``, ``mftma_skipped``, ``pairwise_skipped``, ``probe``), where it arose
    (``"layer [subset]"``, may be empty) and its text. ``str(note)`` is ``"where: text"``."""

    code: str
    text: str
    where: str = ""

    def __str__(self) -> str:
        return f"{self.where}: {self.text}" if self.where else self.text

    def __contains__(self, item: str) -> bool:  # "text" in note, as when notes were plain strings
        return item in str(self)

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "where": self.where, "text": self.text}

    @classmethod
    def from_obj(cls, obj: Any) -> Note:
        if isinstance(obj, str):  # a task file written before notes had codes
            return cls("text", obj)
        return cls(str(obj["code"]), str(obj["text"]), str(obj.get("where", "")))


@dataclass
class TaskResult:
    task: Task
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[Note] = field(default_factory=list)
    error: str | None = None
    key: dict[str, Any] | None = None  # the resume key it was computed under (set by analyze)

    def note(self, code: str, text: str) -> None:
        """Add a note about this task (where = its layer and subset)."""
        self.notes.append(Note(code, text, self.task.where))

    def to_json(self) -> str:
        return json.dumps(
            {"task": asdict(self.task), "key": self.task.key, "resume_key": self.key, "rows": self.rows,
             "notes": [n.to_dict() for n in self.notes], "error": self.error},
            allow_nan=True,
        )

    @classmethod
    def from_json(cls, text: str) -> TaskResult:
        d = json.loads(text)
        return cls(Task(**d["task"]), d["rows"], [Note.from_obj(n) for n in d["notes"]], d["error"],
                   d.get("resume_key"))


def task_seed(seed: int, task: Task) -> np.random.SeedSequence:
    """Seed of a task: from the user's seed and the task's (kind, layer, subset), not the file name,
    so that the same layer of several epochs' files is analysed with the same random numbers."""
    h = hashlib.sha256(f"{task.kind}::{task.layer}::{task.subset}".encode()).digest()
    words = [int.from_bytes(h[i:i + 4], "little") for i in range(0, 16, 4)]
    return np.random.SeedSequence(entropy=int(seed), spawn_key=tuple(words))


# -- one open file per process ---------------------------------------------------------------------
_CACHE_SIZE = 8
_FILE_CACHE: OrderedDict[str, tuple[tuple[int, int, int], ActivationFile, bool]] = OrderedDict()
_CACHE_LOCK = threading.RLock()


def _stat_id(path: str) -> tuple[int, int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return (-1, -1, -1)
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def shared_file(path: str | os.PathLike, *, scan_values: bool = False, refresh: bool = False) -> ActivationFile:
    """The validated :class:`ActivationFile` of ``path``, opened once per process and shared by every
    task of that file (a file replaced on disk, by inode, size or mtime, is opened again; ``refresh``
    always reopens it, as :func:`plan_tasks` does once per analysis). With ``scan_values`` its values
    are scanned (once) too. Do not close it: :func:`clear_file_cache` does."""
    key = os.path.abspath(os.fspath(path))
    sid = _stat_id(key)
    with _CACHE_LOCK:
        hit = _FILE_CACHE.get(key)
        if hit is not None and hit[0] == sid and not refresh:
            _FILE_CACHE.move_to_end(key)
            f, scanned = hit[1], hit[2]
        else:
            if hit is not None:
                del _FILE_CACHE[key]
                hit[1].close()
            f, scanned = ActivationFile(path), False
            f.path = Path(path)
            _FILE_CACHE[key] = (sid, f, False)
            while len(_FILE_CACHE) > _CACHE_SIZE:
                _, (_, old, _) = _FILE_CACHE.popitem(last=False)
                old.close()
        if scan_values and not scanned:
            f.scan_values()
            _FILE_CACHE[key] = (sid, f, True)
        return f


def clear_file_cache() -> None:
    """Close every file opened by :func:`shared_file`."""
    with _CACHE_LOCK:
        while _FILE_CACHE:
            _, (_, f, _) = _FILE_CACHE.popitem()
            f.close()


def resume_key(task: Task, options: AnalyzeOptions, f: ActivationFile | None = None) -> dict[str, Any]:
    """What determines a task's rows: the geomprobe version, the input file's identity (size, mtime
    and a hash of the zip CRC-32s of the arrays the task reads) and the options that change its rows
    (all but :data:`OPTIONS_NOT_IN_KEY`). Two runs with equal keys compute equal rows."""
    from . import __version__

    f = f if f is not None else shared_file(task.file)
    skip = OPTIONS_NOT_IN_KEY.get(task.kind, {"layers", "subsets"})
    if task.kind == "act":  # an option that only a family which is off reads changes nothing
        if not options.mftma:
            skip = skip | {"n_reps", "empirical_capacity", "seed_mode"}
        if not options.glue:
            skip = skip | {"glue_dichotomies"}
            if not options.mftma:
                skip = skip | {"kappa", "n_t", "per_class", "max_classes"}
        if not (options.mftma or options.glue or options.companion):
            skip = skip | {"seed"}
    opts = {k: v for k, v in asdict(options).items() if k not in skip}
    return {"geomprobe_version": __version__, "file": f.identity(task.arrays_read(f)),
            "options": json.loads(json.dumps(opts))}


def _why_not_reused(old: dict[str, Any] | None, new: dict[str, Any]) -> str:
    if not old:
        return "saved without a resume key (older geomprobe)"
    if old.get("geomprobe_version") != new["geomprobe_version"]:
        return f"geomprobe version changed ({old.get('geomprobe_version')} -> {new['geomprobe_version']})"
    if old.get("file") != new["file"]:
        of = old.get("file") or {}
        if of.get("content") != new["file"]["content"]:
            return "input file contents changed"
        return "input file changed (size or modification time)"
    oo, no = old.get("options") or {}, new["options"]
    both = [k for k in no if k in oo] or sorted(set(oo) | set(no))  # a switched-off option hides its own
    diff = [f"{k} {oo.get(k)!r} -> {no.get(k)!r}" for k in both if oo.get(k) != no.get(k)]
    return "options changed (" + ", ".join(diff) + ")"


def plan_tasks(files: list[str], options: AnalyzeOptions, *, scan_values: bool = True) -> list[Task]:
    """Validate every file (structure, and values unless told not to) and list the tasks in a fixed
    order: file, then layers in file order, then subsets. Raises InputError before any work. Each
    file is opened once (:func:`shared_file`) and stays open for the tasks."""
    tasks: list[Task] = []
    if not files:
        raise InputError("no activation files given")
    seen = set()
    for path in files:
        if path in seen:
            raise InputError(f"{path}: given twice")
        seen.add(path)
        f = shared_file(path, scan_values=scan_values and not options.drop_nonfinite, refresh=True)
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


# -- row families ----------------------------------------------------------------------------------
@dataclass
class TaskData:
    """What a row family works on: the task's (finite) rows ``X`` (n, features), their class ``labels``,
    the options, the open file, and the result to append rows and notes to (``res.rows.append(
    row(metric, cls, value))``, ``res.note(code, text)``)."""

    task: Task
    options: AnalyzeOptions
    X: np.ndarray
    labels: np.ndarray
    file: ActivationFile
    res: TaskResult

    def row(self, metric: str, cls: Any, value: float) -> dict[str, Any]:
        return _row(self.task, metric, cls, value)

    @property
    def prefix(self) -> str:
        return "rep_" if self.task.kind == "act" else "grad_"


def _family_alignment(d: TaskData) -> None:
    if d.options.alignment:
        alignment_rows_from_stats(AlignmentAccumulator().update(d.X, d.labels).compute(), d.task, d.prefix, d.res)


def _family_pairwise(d: TaskData) -> None:
    if not d.options.pairwise:
        return
    n = d.X.shape[0]
    if n > d.options.pairwise_max_n:
        d.res.note("pairwise_skipped", f"pairwise measures skipped: {n} examples > pairwise_max_n = "
                                       f"{d.options.pairwise_max_n}")
    elif n >= 2:
        p = pairwise_stats(d.X, d.labels)
        d.res.rows.append(d.row("grad_sign_stiffness", None, p.sign_stiffness))
        d.res.rows.append(d.row("grad_sign_stiffness_in_class", None, p.sign_in_class))
        d.res.rows.append(d.row("grad_confusion_min_inner", None, p.min_inner))
        d.res.rows.append(d.row("grad_confusion_min_cosine", None, p.min_cosine))


def _family_mftma(d: TaskData) -> None:
    if not d.options.mftma:
        return
    n_classes = np.unique(d.labels).size
    if n_classes < 2:
        d.res.note("mftma_skipped", f"MFTMA skipped: {n_classes} class(es), needs >= 2")
        return
    if _is_constant(d.X):
        d.res.note("degenerate_layer", "every example has the same activations (a constant or all-zero layer): "
                                       "MFTMA is undefined (no class centers differ); alignment rows kept")
        return
    if _equal_centers(d.X, d.labels):
        d.res.note("mftma_undefined", "MFTMA undefined for this layer: every class has the same center (class "
                                      "centers must differ); alignment rows kept")
        return
    from .mftma.rows import mftma_rows

    o = d.options
    rng = np.random.default_rng(task_seed(o.seed, d.task))
    try:
        rows, notes = mftma_rows(
            d.X, d.labels, rng, kappa=o.kappa, n_t=o.n_t, n_reps=o.n_reps, per_class=o.per_class,
            max_classes=o.max_classes, empirical=o.empirical_capacity, seed_mode=o.seed_mode,
        )
    except InputError as exc:  # valid options and data, degenerate geometry (e.g. equal class centers)
        d.res.note("mftma_undefined", f"MFTMA undefined for this layer: {exc}; alignment rows kept")
        return
    d.res.rows.extend(d.row(m, c, v) for m, c, v in rows)
    for text in notes:
        d.res.note("mftma", text)


def _family_rng(d: TaskData, stream: int) -> np.random.Generator:
    """A generator of its own for a row family (stream 1, 2, ...): the task's seed sequence with one more
    spawn-key word, so adding a family never changes the numbers of another (MFTMA uses the task's own)."""
    ss = task_seed(d.options.seed, d.task)
    return np.random.default_rng(np.random.SeedSequence(ss.entropy, spawn_key=ss.spawn_key + (stream,)))


def _family_glue(d: TaskData) -> None:
    """GLUE / GCMC (docs/glue.md): capacity of a dichotomy ensemble and its effective geometry."""
    if not d.options.glue:
        return
    n_classes = np.unique(d.labels).size
    if n_classes < 2 or _is_constant(d.X):
        d.res.note("glue_skipped", f"GLUE skipped: {n_classes} class(es) or a constant layer; needs >= 2 classes "
                                   "and activations that differ")
        return
    from .glue import glue_rows

    o = d.options
    try:
        rows, notes = glue_rows(d.X, d.labels, _family_rng(d, 1), dichotomies=o.glue_dichotomies, n_t=o.n_t,
                                kappa=o.kappa, per_class=o.per_class, max_classes=o.max_classes)
    except InputError as exc:  # valid options, degenerate geometry
        d.res.note("glue_undefined", f"GLUE undefined for this layer: {exc}")
        return
    d.res.rows.extend(d.row(m, c, v) for m, c, v in rows)
    for text in notes:
        d.res.note("glue", text)


def _family_companion(d: TaskData) -> None:
    """Participation ratio, effective rank, neural collapse, linear probes (docs/companion.md)."""
    if not d.options.companion:
        return
    from .companion import companion_rows

    train_labels = None
    rows_idx = d.file.subsets()[d.task.subset].rows
    if d.file.train_labels is not None and rows_idx.size == d.X.shape[0]:
        train_labels = d.file.train_labels[rows_idx]
    rows, notes = companion_rows(d.X, d.labels, _family_rng(d, 2), train_labels=train_labels)
    d.res.rows.extend(d.row(m, c, v) for m, c, v in rows)
    for text in notes:
        d.res.note("companion", text)


def _is_constant(X: np.ndarray) -> bool:
    return X.shape[0] < 2 or bool(np.all(X == X[0]))


def _equal_centers(X: np.ndarray, labels: np.ndarray) -> bool:
    """True when all class centers coincide (to float64 rounding): MFTMA's center model is undefined."""
    classes, codes = np.unique(labels, return_inverse=True)
    sums = np.zeros((classes.size, X.shape[1]))
    np.add.at(sums, codes.reshape(-1), X.astype(np.float64))
    centers = sums / np.bincount(codes.reshape(-1))[:, None]
    spread = np.abs(centers - centers[0]).max()
    return bool(spread <= 1e-12 * max(np.abs(centers).max(), np.finfo(float).tiny))


#: the row families of each task kind, in row order; each is ``fn(TaskData) -> None``
ROW_FAMILIES: dict[str, list[Callable[[TaskData], None]]] = {
    "act": [_family_alignment, _family_mftma, _family_glue, _family_companion],
    "grad": [_family_alignment, _family_pairwise],
}


def run_task(task: Task, options: AnalyzeOptions, f: ActivationFile | None = None) -> TaskResult:
    """Run one task. User-input problems raise InputError; the caller decides how to report.
    ``f``: the task's open file (default: :func:`shared_file`)."""
    res = TaskResult(task)
    f = f if f is not None else shared_file(task.file)
    if task.kind == "probe":
        from .probes import probe_rows

        rows, notes = probe_rows(f)
        for layer, subset, metric, cls, value in rows:
            res.rows.append(_row(replace(task, layer=layer, subset=subset), metric, cls, value))
        res.notes.extend(Note("probe", n) for n in notes)
        return res
    subsets = f.subsets()
    if task.subset not in subsets:
        raise InputError(f"{task.file}: subset {task.subset!r} is not present; subsets: {', '.join(subsets)}")
    sub = subsets[task.subset]
    if task.kind == "act":
        X = f.layer(task.layer)
    elif task.kind == "grad":
        layer, tensor = task.layer.split("/", 1)
        X = f.grad(layer, tensor)
    else:
        raise InputError(f"unknown task kind {task.kind!r}; kinds: act, grad, probe")
    X = X[sub.rows]
    X, labels = _finite_rows(X, sub.labels, task, options, res)
    res.rows.append(_row(task, "n_examples", None, X.shape[0]))
    data = TaskData(task, options, X, labels, f, res)
    for family in ROW_FAMILIES.get(task.kind, []):
        family(data)
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
        res.note("nonfinite_dropped", f"dropped {n_bad} row(s) holding NaN or Inf")
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
        res.notes.append(Note("class_skipped", f"class {c} has {why}: skipped", task.where))
    res.rows.append(_row(task, prefix + "n_classes_skipped", None, len(st.skipped)))
    if task.kind == "grad":
        res.rows.append(_row(task, "grad_diversity", None, st.diversity))
        res.rows.append(_row(task, "grad_cosine_stiffness", None, st.cosine_stiffness))
        res.rows.append(_row(task, "grad_cosine_stiffness_in_class", None, st.cosine_in_class))
        for c, v in zip(st.classes, st.cosine_within):
            if not np.isnan(v):
                res.rows.append(_row(task, "grad_cosine_stiffness", int(c), v))


def aggregate_notes(notes) -> list[dict[str, Any]]:
    """Each distinct (code, text) once, in first-seen order, with its count and where it arose."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for n in notes:
        n = n if isinstance(n, Note) else Note.from_obj(n)
        e = out.setdefault((n.code, n.text), {"code": n.code, "text": n.text, "count": 0, "where": []})
        e["count"] += 1
        if n.where:
            e["where"].append(n.where)
    return list(out.values())


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
    """The outcome of :func:`analyze`: rows in task order, notes (:class:`Note`), failed tasks
    (key, error), and for a resumed run how many tasks were reused and why the others were not
    (``resume_reasons``: reason -> count)."""

    rows: list[dict[str, Any]]
    notes: list[Note]
    errors: list[tuple[str, str]]
    options: AnalyzeOptions
    files: list[str]
    n_tasks: int
    n_resumed: int = 0
    resume_reasons: dict[str, int] = field(default_factory=dict)
    label_names: dict[str, list[str]] = field(default_factory=dict)
    #: with ``options.compare``: similarity rows (file_a, layer_a, file_b, layer_b, metric, value)
    similarity: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_json(self) -> str:
        from . import __version__

        d = {"format": "geomprobe-metrics", "format_version": 1, "geomprobe_version": __version__,
             "files": self.files, "options": asdict(self.options), "n_tasks": self.n_tasks,
             "n_resumed": self.n_resumed, "rows": self.rows,
             "notes": [str(n) for n in self.notes],
             "note_summary": aggregate_notes(self.notes),
             "errors": [{"task": k, "error": e} for k, e in self.errors]}
        if self.resume_reasons:
            d["resume_recomputed"] = self.resume_reasons
        if self.label_names:
            d["label_names"] = self.label_names  # file -> class names; class code i is label_names[i]
        return json.dumps(d, indent=1)

    def to_csv(self) -> str:
        import csv
        import io

        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=ROW_FIELDS, lineterminator="\n")
        w.writeheader()
        for r in self.rows:
            w.writerow({k: ("" if r[k] is None else r[k]) for k in ROW_FIELDS})
        return buf.getvalue()


#: what analyze writes into OUTDIR (besides the lock file)
OUTPUT_NAMES = ("metrics.json", "metrics.csv", "tasks")


def prepare_outdir(outdir: str | Path, *, force: bool = False, resume: bool = False) -> Path:
    """Check that OUTDIR may be used, before any work: every existing part of the path is a directory,
    it can be written (tried with a temporary directory, removed at once), its outputs are of the right
    kind, no other run holds its lock, and it is empty unless ``force`` or ``resume``. Creates nothing."""
    out = Path(outdir)
    if str(outdir) == "":
        raise InputError("output directory must not be empty")
    probe = out
    while not os.path.lexists(probe):
        parent = probe.parent
        if parent == probe:
            break
        probe = parent
    if probe != out and os.path.lexists(probe) and not probe.is_dir():
        raise InputError(f"output directory {out}: {probe} is a file, not a directory")
    if out.exists() and not out.is_dir():
        raise InputError(f"output directory {out} exists and is not a directory")
    if not probe.is_dir():
        raise InputError(f"output directory {out}: {probe} does not exist")
    try:
        tempfile.TemporaryDirectory(prefix=".geomprobe-write-test-", dir=probe).cleanup()
    except OSError as exc:
        raise InputError(
            f"output directory {out}: cannot write in {probe} ({exc.strerror or exc}); choose another -o"
        ) from None
    if out.is_dir():
        holder = lock_holder(out)
        if holder is not None:
            raise InputError(
                f"output directory {out} is in use by another geomprobe run ({holder}); wait for it to "
                f"finish or choose another -o (a lock left by a process that is gone is taken over)"
            )
        for name, want_dir in (("metrics.json", False), ("metrics.csv", False), ("tasks", True)):
            p = out / name
            if os.path.lexists(p) and (p.is_dir() != want_dir or p.is_symlink()):
                kind = "a directory" if want_dir else "a regular file"
                raise InputError(f"output directory {out}: {p} must be {kind} geomprobe writes; move it away")
        present = [p.name for p in out.iterdir() if p.name != LOCK_NAME]
        if present and not (force or resume):
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
    on_plan=None,
) -> AnalysisReport:
    """Analyse activation files: every (file, layer, subset) task, in a fixed order.

    With ``outdir``, the directory is checked and locked (one writer at a time; a second run fails at
    once with InputError), each task's result is written atomically to OUTDIR/tasks/ with its resume
    key as soon as it finishes (so an interrupted run loses nothing done), then OUTDIR/metrics.json
    and OUTDIR/metrics.csv are written atomically. ``resume=True`` reuses a saved task only when its
    resume key (input file identity, options, version: :func:`resume_key`) is unchanged; the report
    says how many were reused and why the others were not. ``runner(tasks, options, on_done)`` runs
    the tasks (default: serially here; for Dask pass ``runner=geomprobe.distributed.dask_runner(client)``:
    this module never imports the distributed one). ``progress`` is called with each finished
    TaskResult; ``on_plan(n_tasks, n_reused)`` once the tasks are known. ``client`` (deprecated) is
    the same as ``runner=geomprobe.distributed.dask_runner(client)``.
    """
    options = options or AnalyzeOptions()
    files = [str(f) for f in ([files] if isinstance(files, (str, Path)) else files)]
    out = prepare_outdir(outdir, force=force, resume=resume) if outdir is not None else None
    if client is not None and runner is not None:
        raise InputError("give either runner or client, not both")
    if client is not None:  # deprecated alias: the runner is passed in (this module imports no runner module)
        import importlib
        import warnings

        warnings.warn("analyze(client=...) is deprecated; pass runner=geomprobe.distributed.dask_runner(client)",
                      DeprecationWarning, stacklevel=2)
        runner = importlib.import_module("geomprobe.distributed").dask_runner(client)
    tasks = plan_tasks(files, options)
    if options.compare:
        _check_comparable(files)
    label_names = {p: shared_file(p).label_names for p in files if shared_file(p).label_names is not None}
    keys = {t.key: resume_key(t, options) for t in tasks} if out is not None else {}
    if out is None:
        return _run(tasks, options, files, None, False, keys, runner, progress, on_plan, label_names)
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"output directory {out} could not be created ({exc.strerror or exc})") from None
    try:
        with lock_directory(out):
            return _run(tasks, options, files, out, resume, keys, runner, progress, on_plan, label_names)
    except InputError:
        if created:  # nothing of ours to keep: leave no empty directory behind
            _remove_if_empty(out)
        raise


def _remove_if_empty(out: Path) -> None:
    try:
        tdir = out / "tasks"
        if tdir.is_dir() and not any(tdir.iterdir()):
            tdir.rmdir()
        if not any(out.iterdir()):
            out.rmdir()
    except OSError:
        pass


def _run(tasks, options, files, out, resume, keys, runner, progress, on_plan, label_names):
    done: dict[str, TaskResult] = {}
    reasons: Counter[str] = Counter()
    tdir = None
    if out is not None:
        tdir = out / "tasks"
        try:
            tdir.mkdir(exist_ok=True)
        except OSError as exc:
            raise InputError(f"{tdir} could not be created ({exc.strerror or exc})") from None
        if resume:
            for t in tasks:
                why = _reuse(t, tdir / f"{t.digest}.json", keys[t.key], done)
                if why:
                    reasons[why] += 1
    n_resumed = len(done)
    if on_plan is not None:
        on_plan(len(tasks), n_resumed)

    def on_done(r: TaskResult) -> None:
        done[r.task.key] = r
        if tdir is not None and r.error is None:
            r.key = keys[r.task.key]
            atomic_write_text(tdir / f"{r.task.digest}.json", r.to_json())
        if progress is not None:
            progress(r)

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
    if options.companion:
        # per-example training scores of the runs the files come from (train/scores.csv), per subset;
        # read each time (a small table), not a task
        from .scores import score_metric_rows

        srows, snotes = score_metric_rows(files)
        rows.extend(srows)
        notes.extend(Note("scores", x) for x in snotes)
    report = AnalysisReport(rows, notes, errors, options, files, len(tasks), n_resumed, dict(reasons),
                            label_names)
    if options.compare:
        _compare(report)
    if out is not None:
        atomic_write_text(out / "metrics.json", report.to_json())
        atomic_write_text(out / "metrics.csv", report.to_csv())
        if options.compare:
            from .similarity import similarity_csv

            atomic_write_text(out / "similarity.csv", similarity_csv(report.similarity))
    return report


def _compare_layers(files: list[str], options: AnalyzeOptions) -> list[str] | None:
    if options.layers is None:
        return None
    return [x for x in options.layers if x in shared_file(files[0]).layers]


def _check_comparable(files: list[str]) -> None:
    """--compare needs the same examples in every file (checked before any work)."""
    ref = shared_file(files[0])
    for p in files[1:]:
        f = shared_file(p)
        if f.labels.shape != ref.labels.shape or not np.array_equal(f.labels, ref.labels):
            raise InputError(f"--compare: {p} holds other examples than {files[0]} ({f.labels.size} vs "
                             f"{ref.labels.size} rows or different labels); layer similarity needs the same "
                             "examples in the same order in every file")


def _compare(report: AnalysisReport) -> None:
    """Linear CKA and the Procrustes angle between every pair of layers of every file (similarity.csv)."""
    from .similarity import similarity_rows

    rows, notes = similarity_rows(report.files, layers=_compare_layers(report.files, report.options))
    report.similarity = rows
    report.notes.extend(Note("similarity", n) for n in notes)


def _reuse(t: Task, path: Path, key: dict[str, Any], done: dict[str, TaskResult]) -> str | None:
    """Put the saved result of ``t`` into ``done`` when its resume key matches; else say why not."""
    if not path.exists():
        return "no saved result"
    try:
        r = TaskResult.from_json(path.read_text())
    except (ValueError, KeyError, TypeError, OSError):
        return "saved result unreadable (it is recomputed)"
    if r.task != t:
        return "saved result belongs to another task"
    if r.error is not None:
        return "failed before"
    if r.key != key:
        return _why_not_reused(r.key, key)
    done[t.key] = r
    return None
