"""Shared pieces of the subcommands: the summary table, progress, and notes."""
from __future__ import annotations

import sys
import threading
import time
from pathlib import PurePath

# aggregate metrics shown in the printed table, in this order (all rows are in the CSV/JSON)
TABLE_METRICS = [
    ("n_examples", "n"),
    ("rep_omega", "omega"),
    ("rep_omega_in_class", "omega_in"),
    ("capacity", "capacity"),
    ("radius", "radius"),
    ("dimension", "dim"),
    ("center_correlation", "rho_c"),
    ("K", "K"),
    ("empirical_capacity", "cap_sim"),
    ("glue_capacity", "glue_cap"),
    ("glue_radius", "glue_R"),
    ("participation_ratio", "PR"),
    ("nc1", "nc1"),
    ("linear_probe_acc", "probe_acc"),
    ("grad_omega_in_class", "g_omega_in"),
    ("grad_diversity", "g_divers"),
    ("grad_cosine_stiffness_in_class", "g_cos_in"),
    ("grad_sign_stiffness", "g_sign"),
    ("grad_confusion_min_cosine", "g_mincos"),
]


def table_legend() -> str:
    """One line per column of the printed table: abbreviation = metric name: description (from
    geomprobe.registry, where each metric is declared)."""
    from geomprobe.registry import METRICS

    lines = ["columns of the printed table (every metric, per class too, is in metrics.csv / metrics.json;"
             " docs/metrics.md):"]
    for metric, head in TABLE_METRICS:
        info = METRICS.get(metric)
        desc = f": {info.description}" if info is not None else ""
        lines.append(f"  {head:<10} = {metric}{desc}")
    return "\n".join(lines)


def _fmt(v) -> str:
    if v is None:
        return "nan"
    if isinstance(v, str):
        return v
    if float(v).is_integer() and abs(v) < 1e9:
        return str(int(v))
    return f"{v:.4g}"


def short_paths(paths) -> dict[str, str]:
    """The shortest trailing part of each path that tells it apart from the others (the basename when
    basenames differ): runs/e2/acts.npz and runs/e3/acts.npz -> e2/acts.npz and e3/acts.npz."""
    paths = list(dict.fromkeys(paths))
    parts = {p: PurePath(p).parts or (p,) for p in paths}
    out: dict[str, str] = {}
    for p in paths:
        k = 1
        while True:
            tail = parts[p][-k:]
            clash = [q for q in paths if q != p and parts[q][-k:] == tail]
            if not clash or k >= len(parts[p]):
                out[p] = str(PurePath(*tail)) if not clash else p
                break
            k += 1
    return out


def summary_table(rows) -> str:
    """One line per (file, layer, subset) with the aggregate metrics present. Rows are keyed on the
    full file path; the file column shows the shortest part of the path that tells files apart."""
    keys: list[tuple[str, str, str]] = []
    cells: dict[tuple[str, str, str], dict[str, object]] = {}
    for r in rows:
        if r["class"] != "" or r["metric"].startswith("score_"):  # training scores: their own section
            continue
        k = (r["file"], r["layer"], r["subset"])
        if k not in cells:
            keys.append(k)
            cells[k] = {}
        cells[k][r["metric"]] = r["value"]
    present = [(m, h) for m, h in TABLE_METRICS if any(m in c for c in cells.values())]
    if not keys:
        return "(no aggregate metrics)"
    names = short_paths(k[0] for k in keys)
    multi_file = len(names) > 1
    head = (["file"] if multi_file else []) + ["layer", "subset"] + [h for _, h in present]
    body = [
        ([names[k[0]]] if multi_file else []) + [k[1], k[2]] + [_fmt(cells[k].get(m, "")) if m in cells[k] else "-"
                                                               for m, _ in present]
        for k in keys
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(str(x).rjust(w) if i >= len(head) - len(present) else str(x).ljust(w)
                       for i, (x, w) in enumerate(zip(line, widths))) for line in [head] + body]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def progress_bar(total: int, desc: str, quiet: bool = False):
    """A tqdm bar on stderr, shown only when stderr is a terminal (and not --quiet)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, disable=quiet or not sys.stderr.isatty(),
                unit="task", leave=False)


def _dur(s: float) -> str:
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    """Progress of a run of tasks on stderr: a tqdm bar in a terminal; otherwise (batch jobs, nohup,
    SLURM) a log line per finished task, at most one per ``min_interval_s`` (the last task always),
    and a heartbeat line every ``heartbeat_s`` while nothing finishes; each line gives the count,
    elapsed time and ETA. Nothing with ``quiet``. Use as a context manager; call ``start(total)``
    once the number of tasks to run is known and ``done(label)`` per finished task."""

    def __init__(self, desc: str, *, quiet: bool = False, stream=None, tty: bool | None = None,
                 heartbeat_s: float = 10.0, min_interval_s: float = 1.0):
        self.desc, self.quiet = desc, quiet
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.heartbeat_s, self.min_interval_s = heartbeat_s, min_interval_s
        self.total = self.n = 0
        self.t0 = self.last = time.monotonic()
        self.label = ""
        self._bar = None
        self._stop = threading.Event()
        self._thread = None
        self._lock = threading.Lock()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1)
        if self._bar is not None:
            self._bar.close()

    def start(self, total: int, reused: int = 0) -> None:
        self.total, self.t0 = total, time.monotonic()
        self.last = self.t0
        if self.quiet or total == 0:
            return
        if self.tty:
            self._bar = progress_bar(total, self.desc, False)
            return
        self._line(f"{total} task(s) to run" + (f" ({reused} reused)" if reused else ""))
        self._thread = threading.Thread(target=self._heartbeat, daemon=True)
        self._thread.start()

    def done(self, label: str = "") -> None:
        with self._lock:
            self.n += 1
            self.label = label
            if self.quiet:
                return
            if self._bar is not None:
                self._bar.set_postfix_str(label, refresh=False)
                self._bar.update(1)
                return
            if self.total and (self.n == self.total or time.monotonic() - self.last >= self.min_interval_s):
                self._status(f"last: {label}")

    def _status(self, what: str) -> None:
        el = time.monotonic() - self.t0
        eta = el / self.n * (self.total - self.n) if self.n else None
        pct = 100 * self.n // max(self.total, 1)
        self._line(f"{self.n}/{self.total} task(s) done ({pct}%), elapsed {_dur(el)}"
                   + (f", ETA {_dur(eta)}" if eta is not None and self.n < self.total else "")
                   + (f"; {what}" if what else ""))

    def _line(self, text: str) -> None:
        self.last = time.monotonic()
        print(f"{self.desc}: {text}", file=self.stream, flush=True)

    def _heartbeat(self) -> None:
        while not self._stop.wait(min(self.heartbeat_s, 1.0)):
            with self._lock:
                if self.n < self.total and time.monotonic() - self.last >= self.heartbeat_s:
                    self._status("running" + (f" (last finished: {self.label})" if self.label else ""))


def print_notes(notes, prog: str, *, quiet: bool = False, stream=None, max_where: int = 4) -> None:
    """Each distinct note once with its count and where it arose (not with --quiet)."""
    from geomprobe.analysis import aggregate_notes

    if quiet:
        return
    stream = stream or sys.stderr
    for e in aggregate_notes(notes):
        where = e["where"]
        if not where:
            at = f" (x{e['count']})" if e["count"] > 1 else ""
        elif len(where) == 1:
            at = f" [{where[0]}]"
        else:
            shown = ", ".join(where[:max_where]) + (", ..." if len(where) > max_where else "")
            at = f" (x{e['count']}: {shown})"
        print(f"{prog}: note: {e['text']}{at}", file=stream)
