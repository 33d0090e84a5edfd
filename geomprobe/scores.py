"""Per-example memorisation scores: formulas, the per-example table (scores.csv) and its summary.

The trainers record them during training (geomprobe.trainers.scores.ScoreRecorder) from the logits of
the training forward passes and call the formulas here; this module is torch-free.

* forgetting events (Toneva et al. 2019): over the successive presentations of an example, the number
  of transitions from correctly to incorrectly classified; an example never classified correctly is
  "never learned" (Toneva rank it above every forgotten one: +inf in rankings).
* EL2N (Paul et al. 2021): ||softmax(z) - onehot(y)||_2 at one early epoch (``el2n_epoch``).
* AUM (Pleiss et al. 2020): the mean over presentations of the margin z_y - max_{k != y} z_k (the
  assigned, i.e. training, label y); low or negative AUM = mislabelled / memorised.
* per-example gradient norm by layer: ||d loss_i / d W_layer||_F (weight and bias of each Linear /
  Conv2d) of the final model in eval mode (Maini et al. 2023 localise memorisation with them).

The table (``scores.csv``, one row per training example, and ``scores.json`` with its metadata) is
described in docs/companion.md. :func:`score_summary` summarises it per subset; with a label-noise run
it also gives, per score, the AUROC of "permuted ranks as more memorised than unpermuted".
"""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ._validation import InputError, check_labels, check_matrix
from .registry import MetricInfo, register

__all__ = ["forgetting_events", "ForgettingResult", "ForgettingState", "el2n", "aum_margin", "ScoreTable",
           "read_scores", "write_scores", "score_summary", "ScoreSummary", "scores_rows", "find_run_scores",
           "score_metric_rows", "SCORES_FILE",
           "SCORES_META", "SCORE_COLUMNS", "METRICS"]

SCORES_FILE = "scores.csv"
SCORES_META = "scores.json"
FORMAT_NAME = "geomprobe-scores"
FORMAT_VERSION = 1
# fixed columns, in order; per-layer gradient norms follow as grad_norm/<module name>
SCORE_COLUMNS = ("index", "subset", "label", "true_label", "forgetting", "never_learned", "first_learned",
                 "n_presented", "el2n", "aum")

METRICS = register({
    "score_forgetting_mean": MetricInfo("mean forgetting events per example (never learned excluded)",
                                        better="neither", scale_invariant=False),
    "score_never_learned_frac": MetricInfo("fraction of examples never classified correctly in training",
                                           better="neither", scale_invariant=False),
    "score_el2n_mean": MetricInfo("mean EL2N ||softmax - onehot|| at the EL2N epoch", better="neither",
                                  scale_invariant=False),
    "score_aum_mean": MetricInfo("mean area under the margin (training labels)", better="neither",
                                 scale_invariant=False),
    "score_grad_norm_mean": MetricInfo("mean per-example gradient norm of a layer (final model)",
                                       better="neither", scale_invariant=False),
    "score_auroc": MetricInfo("AUROC: a permuted example scores as more memorised than an unpermuted one "
                              "(class = score name)", better="neither", scale_invariant=False),
})


# -- formulas -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ForgettingResult:
    """Per example: ``counts`` (forgetting events), ``first_learned`` (first correct presentation, -1 if
    never), ``never_learned`` (bool)."""

    counts: np.ndarray
    first_learned: np.ndarray
    never_learned: np.ndarray


class ForgettingState:
    """Streaming forgetting counts: feed each presentation (example indices, correct?) in order."""

    def __init__(self, n: int):
        self.counts = np.zeros(n, np.int64)
        self.prev = np.zeros(n, bool)  # last presentation correct
        self.first = np.full(n, -1, np.int64)
        self.presented = np.zeros(n, np.int64)

    def update(self, idx: np.ndarray, correct: np.ndarray) -> None:
        """One step of presentations; an index may occur several times (taken in order)."""
        idx = np.asarray(idx, np.int64)
        correct = np.asarray(correct, bool)
        if np.unique(idx).size != idx.size:  # repeated example in one batch: sequential
            for i, c in zip(idx, correct):
                self.update(np.array([i]), np.array([c]))
            return
        self.counts[idx] += self.prev[idx] & ~correct
        newly = correct & (self.first[idx] < 0)
        self.first[idx[newly]] = self.presented[idx[newly]]
        self.prev[idx] = correct
        self.presented[idx] += 1

    def result(self) -> ForgettingResult:
        return ForgettingResult(self.counts.copy(), self.first.copy(), self.first < 0)


def forgetting_events(correct) -> ForgettingResult:
    """Forgetting events from a (T presentations, n examples) boolean matrix of correctness."""
    c = np.asarray(correct)
    if c.ndim != 2:
        raise InputError(f"correct must be 2-D (presentations, examples), got {c.ndim}-D")
    c = c.astype(bool)
    st = ForgettingState(c.shape[1])
    for row in c:
        st.update(np.arange(c.shape[1]), row)
    return st.result()


def _logits_labels(logits, labels):
    Z = check_matrix(logits, "logits").astype(np.float64)
    y = check_labels(labels, Z.shape[0], rows_name="logits")
    if y.size and (y.min() < 0 or y.max() >= Z.shape[1]):
        bad = int(y[(y < 0) | (y >= Z.shape[1])][0])
        raise InputError(f"labels must be column indices of logits (0..{Z.shape[1] - 1}), got {bad}")
    return Z, y


def el2n(logits, labels) -> np.ndarray:
    """||softmax(z_i) - onehot(y_i)||_2 per row (float64)."""
    Z, y = _logits_labels(logits, labels)
    P = np.exp(Z - Z.max(axis=1, keepdims=True))
    P /= P.sum(axis=1, keepdims=True)
    P[np.arange(y.size), y] -= 1.0
    return np.sqrt(np.einsum("ij,ij->i", P, P))


def aum_margin(logits, labels) -> np.ndarray:
    """z_{y_i} - max_{k != y_i} z_k per row (float64); AUM is its mean over presentations."""
    Z, y = _logits_labels(logits, labels)
    if Z.shape[1] < 2:
        raise InputError(f"logits must have at least 2 columns for a margin, got {Z.shape[1]}")
    r = np.arange(y.size)
    zy = Z[r, y].copy()
    Z[r, y] = -np.inf
    return zy - Z.max(axis=1)


# -- the table ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScoreTable:
    """scores.csv as columns (numpy arrays; ``subset`` str) plus scores.json's metadata."""

    columns: dict[str, np.ndarray] = field(repr=False)
    meta: dict
    path: Path | None = None

    @property
    def n(self) -> int:
        return int(self.columns["index"].size)

    @property
    def grad_layers(self) -> list[str]:
        return [k.split("/", 1)[1] for k in self.columns if k.startswith("grad_norm/")]


def write_scores(outdir, columns: dict[str, np.ndarray], meta: dict) -> Path:
    """Write OUTDIR/scores.csv and OUTDIR/scores.json atomically; returns the CSV's path."""
    from .io import atomic_write_text

    out = Path(outdir)
    missing = [c for c in SCORE_COLUMNS if c not in columns]
    if missing:
        raise InputError(f"score columns missing: {', '.join(missing)}")
    names = list(SCORE_COLUMNS) + sorted(k for k in columns if k.startswith("grad_norm/"))
    n = columns["index"].size
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(names)
    cols = [columns[k] for k in names]
    for i in range(n):
        w.writerow([_cell(c[i]) for c in cols])
    meta = dict(meta, format=FORMAT_NAME, format_version=FORMAT_VERSION, n=int(n), columns=names)
    atomic_write_text(out / SCORES_META, json.dumps(meta, indent=1))
    return atomic_write_text(out / SCORES_FILE, buf.getvalue())


def _cell(v) -> str:
    if isinstance(v, (float, np.floating)):
        return "nan" if math.isnan(v) else repr(float(v))
    if isinstance(v, (bool, np.bool_)):
        return str(int(v))
    return str(v.item() if hasattr(v, "item") else v)


_INT_COLS = ("index", "label", "true_label", "forgetting", "never_learned", "first_learned", "n_presented")


def _find(path: Path) -> Path:
    if path.is_file():
        return path
    for cand in (path / SCORES_FILE, path / "train" / SCORES_FILE):
        if cand.is_file():
            return cand
    found = sorted(path.glob(f"**/{SCORES_FILE}")) if path.is_dir() else []
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise InputError(f"{path}: several {SCORES_FILE} below it ({', '.join(map(str, found[:4]))}); name one")
    raise InputError(f"{path}: no {SCORES_FILE} (record scores with the trainers' ScoreRecorder)")


def read_scores(path) -> ScoreTable:
    """Read scores.csv (a file, or a run folder holding it or train/scores.csv) and its scores.json."""
    p = _find(Path(path))
    with open(p, newline="", encoding="utf-8") as fh:
        rd = csv.reader(fh)
        try:
            header = next(rd)
        except StopIteration:
            raise InputError(f"{p}: empty file, expected a header {','.join(SCORE_COLUMNS)}") from None
        missing = [c for c in SCORE_COLUMNS if c not in header]
        if missing:
            raise InputError(f"{p}: not a scores table: column(s) {', '.join(missing)} missing")
        data = list(rd)
    cols: dict[str, np.ndarray] = {}
    for j, name in enumerate(header):
        vals = [r[j] if j < len(r) else "" for r in data]
        try:
            if name == "subset":
                cols[name] = np.array(vals, dtype=str)
            elif name in _INT_COLS:
                cols[name] = np.array([int(v) for v in vals], dtype=np.int64)
            else:
                cols[name] = np.array([float(v) for v in vals], dtype=np.float64)
        except ValueError as exc:
            raise InputError(f"{p}: column {name!r} holds a value that is not a number ({exc})") from None
    meta_p = p.with_name(SCORES_META)
    meta = json.loads(meta_p.read_text()) if meta_p.is_file() else {}
    return ScoreTable(cols, meta, p)


# -- summary --------------------------------------------------------------------------------------
def _auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(pos > neg) + 0.5 P(tie) (Mann-Whitney); NaN when a side is empty."""
    pos, neg = pos[~np.isnan(pos)], neg[~np.isnan(neg)]
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    neg = np.sort(neg)
    below = np.searchsorted(neg, pos, side="left")
    ties = np.searchsorted(neg, pos, side="right") - below
    return float((below.sum() + 0.5 * ties.sum()) / (pos.size * neg.size))


# score name -> (column, sign): sign -1 when a low value means memorised
_RANKED = {"forgetting": ("forgetting", 1.0), "el2n": ("el2n", 1.0), "aum": ("aum", -1.0)}


@dataclass(frozen=True)
class ScoreSummary:
    """``per_subset[subset][stat]``; ``auroc[score]``: permuted vs unpermuted (NaN without both)."""

    per_subset: dict[str, dict[str, float]]
    auroc: dict[str, float]
    grad_layers: tuple[str, ...]


def _memorised_key(t: ScoreTable, score: str) -> np.ndarray:
    col, sign = _RANKED.get(score, (score, 1.0))
    v = sign * t.columns[col].astype(np.float64)
    if score == "forgetting":  # never learned ranks above every forgotten example (Toneva et al.)
        v = np.where(t.columns["never_learned"] > 0, np.inf, v)
    return v


def score_summary(table: ScoreTable) -> ScoreSummary:
    """Per subset: n, forgetting mean (learned examples), never-learned fraction, EL2N / AUM mean and
    median, per-layer gradient-norm means; AUROCs of permuted vs unpermuted for every score."""
    c = table.columns
    per: dict[str, dict[str, float]] = {}
    for s in dict.fromkeys(c["subset"].tolist()):
        m = c["subset"] == s
        learned = m & (c["never_learned"] == 0)
        d = {"n": float(m.sum()),
             "forgetting_mean": float(c["forgetting"][learned].mean()) if learned.any() else float("nan"),
             "never_learned_frac": float(np.mean(c["never_learned"][m] > 0)),
             "el2n_mean": float(np.nanmean(c["el2n"][m])) if np.any(~np.isnan(c["el2n"][m])) else float("nan"),
             "el2n_median": float(np.nanmedian(c["el2n"][m])) if np.any(~np.isnan(c["el2n"][m])) else float("nan"),
             "aum_mean": float(np.nanmean(c["aum"][m])) if np.any(~np.isnan(c["aum"][m])) else float("nan"),
             "aum_median": float(np.nanmedian(c["aum"][m])) if np.any(~np.isnan(c["aum"][m])) else float("nan")}
        for layer in table.grad_layers:
            d[f"grad_norm_mean/{layer}"] = float(np.nanmean(c[f"grad_norm/{layer}"][m]))
        per[s] = d
    auroc = {}
    pm, um = c["subset"] == "permuted", c["subset"] == "unpermuted"
    names = list(_RANKED) + [f"grad_norm/{x}" for x in table.grad_layers]
    for name in names:
        v = _memorised_key(table, name)
        auroc[name] = _auroc(v[pm], v[um]) if pm.any() and um.any() else float("nan")
    return ScoreSummary(per, auroc, tuple(table.grad_layers))


def scores_rows(table: ScoreTable) -> tuple[list[tuple[str, str, str, object, float]], list[str]]:
    """Rows (layer, subset, metric, class, value) like ``probe_rows``: layer 'scores' for the example
    scores, the module name for score_grad_norm_mean; score_auroc rows have subset 'permuted' and the
    score's name as class."""
    s = score_summary(table)
    rows = []
    for sub, d in s.per_subset.items():
        rows.append(("scores", sub, "n_examples", None, d["n"]))
        rows.append(("scores", sub, "score_forgetting_mean", None, d["forgetting_mean"]))
        rows.append(("scores", sub, "score_never_learned_frac", None, d["never_learned_frac"]))
        rows.append(("scores", sub, "score_el2n_mean", None, d["el2n_mean"]))
        rows.append(("scores", sub, "score_aum_mean", None, d["aum_mean"]))
        for layer in s.grad_layers:
            rows.append((layer, sub, "score_grad_norm_mean", None, d[f"grad_norm_mean/{layer}"]))
    for name, v in s.auroc.items():
        if not math.isnan(v):
            rows.append(("scores", "permuted", "score_auroc", name, v))
    notes = []
    if table.meta.get("el2n_epoch") is not None:
        notes.append(f"scores: EL2N at epoch {table.meta['el2n_epoch']}, AUM over {table.meta.get('epochs')} epoch(s)")
    return rows, notes


def find_run_scores(files) -> list[Path]:
    """The scores.csv of the runs the activation files come from (a run keeps its activation files in
    OUT/ and the table in OUT/train/scores.csv or OUT/scores.csv), each once, in file order."""
    found: list[Path] = []
    for f in [files] if isinstance(files, (str, Path)) else files:
        d = Path(f).parent
        for cand in (d / SCORES_FILE, d / "train" / SCORES_FILE):
            if cand.is_file() and cand not in found:
                found.append(cand)
                break
    return found


def score_metric_rows(files) -> tuple[list[dict], list[str]]:
    """Rows in ``geomprobe analyze``'s format (file, layer, subset, metric, class, value) summarising
    per subset the scores.csv of the runs that ``files`` come from (:func:`find_run_scores`); file is
    the scores.csv path, layer 'scores' (the module name for score_grad_norm_mean). Empty without
    tables."""
    rows, notes = [], []
    for p in find_run_scores(files):
        r, n = scores_rows(read_scores(p))
        rows += [{"file": str(p), "layer": layer, "subset": sub, "metric": metric,
                  "class": "" if cls is None else str(cls), "value": None if math.isnan(v) else float(v)}
                 for layer, sub, metric, cls, v in r]
        notes += [f"{p}: {x}" for x in n]
    return rows, notes
