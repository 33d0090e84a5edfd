"""Figures and a one-page report for any ``geomprobe analyze`` output folder (metrics.csv).

Torch-free; matplotlib is imported only when figures are drawn (``pip install 'geomprobe[report]'``).
Everything is driven by the rows present: a figure per family of metrics, one panel per metric and
subset, layers on the x axis in analysis order, one line per input file (epoch; colours follow the
order the files were given in). Legends sit outside the axes. The radius is drawn as the median over
classes with the interquartile band (the per-class rows of metrics.csv) because the mean radius can be
dominated by one class whose center is close to the origin (docs/metrics.md); ``radius="mean"`` draws
the mean row instead.
"""
from __future__ import annotations

import csv
import json
import math
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ._validation import InputError

__all__ = ["MetricsTable", "load_metrics", "series", "build_figures", "plot_analysis", "PlotResult",
           "file_labels"]

# Figure families, in order: (figure name, title, metric predicate). A metric goes to the first family
# that claims it; aggregate rows only (class == ""), except the radius band (per-class rows).
_MFTMA = ("capacity", "radius", "dimension", "center_correlation")
_SKIP = {"n_examples", "n_dropped_nonfinite", "K", "empirical_Nc"}
_FAMILIES = (
    ("mftma", "Manifold geometry (MFTMA)", lambda m: m in _MFTMA or m == "empirical_capacity"),
    ("alignment", "Alignment", lambda m: m.startswith(("rep_", "grad_"))),
    ("glue", "GLUE", lambda m: m.startswith("glue_")),
    ("other", "Other measures", lambda m: True),
)


@dataclass
class MetricsTable:
    """The long-format rows of an analysis (metrics.csv), with the files in the order analysed."""

    outdir: Path
    rows: list[dict[str, Any]]
    files: list[str]
    options: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def metrics(self) -> list[str]:
        """Aggregate metrics present (class == ""), in row order."""
        return list(OrderedDict.fromkeys(r["metric"] for r in self.rows if r["class"] == ""))

    def subsets(self) -> list[str]:
        return list(OrderedDict.fromkeys(r["subset"] for r in self.rows))

    def cell(self, file: str, layer: str, subset: str, metric: str) -> list[dict[str, Any]]:
        """The rows of one (file, layer, subset, metric), aggregate and per class."""
        if not hasattr(self, "_index"):
            index: dict[tuple[str, str, str, str], list[dict[str, Any]]] = {}
            for r in self.rows:
                index.setdefault((r["file"], r["layer"], r["subset"], r["metric"]), []).append(r)
            self._index = index
        return self._index.get((file, layer, subset, metric), [])


def _value(text: str) -> float:
    if text in ("", "nan", "None"):
        return math.nan
    try:
        return float(text)
    except ValueError:
        return math.nan


def load_metrics(outdir: str | os.PathLike) -> MetricsTable:
    """Read OUTDIR/metrics.csv (and the file order and options of OUTDIR/metrics.json when present)."""
    out = Path(outdir)
    if not out.is_dir():
        raise InputError(f"{out}: not a directory (expected the output folder of `geomprobe analyze`)")
    path = out / "metrics.csv"
    if not path.is_file():
        inner = [p.parent for p in sorted(out.glob("*/metrics.csv"))]
        hint = f"; did you mean {', '.join(map(str, inner[:3]))}?" if inner else ""
        raise InputError(f"{out}: no metrics.csv (not an output folder of `geomprobe analyze`){hint}")
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        need = {"file", "layer", "subset", "metric", "class", "value"}
        missing = need - set(reader.fieldnames or ())
        if missing:
            raise InputError(f"{path}: missing column(s) {', '.join(sorted(missing))}; columns: "
                             f"{', '.join(reader.fieldnames or ())}")
        rows = [dict(r, value=_value(r["value"])) for r in reader]
    if not rows:
        raise InputError(f"{path}: no rows to plot")
    files = list(OrderedDict.fromkeys(r["file"] for r in rows))
    options, notes = {}, []
    meta = out / "metrics.json"
    if meta.is_file():
        try:
            d = json.loads(meta.read_text())
            options = dict(d.get("options") or {})
            notes = list(d.get("notes") or [])
            order = [f for f in d.get("files") or [] if f in files]
            files = order + [f for f in files if f not in order]
        except (ValueError, TypeError, AttributeError):
            pass  # metrics.csv alone is enough
    return MetricsTable(out, rows, files, options, notes)


def file_labels(files: Iterable[str]) -> dict[str, str]:
    """Shortest distinct path suffixes: 'acts_final.npz', or 'e2/acts_final.npz' and 'e2tty/acts_final.npz'
    when two files share a basename."""
    files = list(files)
    parts = {f: Path(f).parts or (f,) for f in files}
    depth = {f: 1 for f in files}
    for _ in range(max((len(p) for p in parts.values()), default=1)):
        labels = {f: "/".join(parts[f][-depth[f]:]) for f in files}
        clash = [f for f in files if list(labels.values()).count(labels[f]) > 1 and depth[f] < len(parts[f])]
        if not clash:
            break
        for f in clash:
            depth[f] += 1
    return {f: "/".join(parts[f][-depth[f]:]) for f in files}


def series(table: MetricsTable, metric: str, subset: str, *, radius: str = "median"):
    """Per file: (layers, y, lo, hi) of one metric in one subset; lo/hi are the per-class quartiles for
    the radius drawn as a median (else None). Layers are in analysis order; missing values are NaN."""
    layers = list(OrderedDict.fromkeys(r["layer"] for r in table.rows
                                       if r["metric"] == metric and r["subset"] == subset))
    out = OrderedDict()
    band = metric == "radius" and radius == "median"
    for f in table.files:
        y = np.full(len(layers), np.nan)
        lo = np.full(len(layers), np.nan) if band else None
        hi = np.full(len(layers), np.nan) if band else None
        seen = False
        for i, layer in enumerate(layers):
            sel = table.cell(f, layer, subset, metric)
            if band:
                per_class = np.array([r["value"] for r in sel if r["class"] != ""], float)
                per_class = per_class[np.isfinite(per_class)]
                if per_class.size:
                    y[i] = np.median(per_class)
                    lo[i], hi[i] = np.percentile(per_class, [25, 75])
                    seen = True
                    continue
            agg = [r["value"] for r in sel if r["class"] == ""]
            if agg:
                y[i] = agg[0] if math.isfinite(agg[0]) else np.nan  # +-inf is not drawn (a gap, like NaN)
                seen = True
        if seen:
            out[f] = (layers, y, lo, hi)
    return out


def _family_metrics(table: MetricsTable) -> "OrderedDict[str, list[str]]":
    fams: OrderedDict[str, list[str]] = OrderedDict((name, []) for name, _, _ in _FAMILIES)
    for m in table.metrics():
        if m in _SKIP or m.endswith("_n_classes_skipped") or m.startswith("score_"):
            continue  # score_* rows summarise a scores.csv (no layer axis): drawn by _scores_figures
        vals = [r["value"] for r in table.rows if r["metric"] == m and r["class"] == ""]
        if not any(math.isfinite(v) for v in vals):
            continue
        for name, _, claims in _FAMILIES:
            if claims(m):
                fams[name].append(m)
                break
    if "mftma" in fams:  # fixed reading order for the four MFTMA measures
        fams["mftma"].sort(key=lambda m: (_MFTMA + ("empirical_capacity",)).index(m))
    return OrderedDict((k, v) for k, v in fams.items() if v)


def _ylabel(metric: str, radius: str) -> str:
    if metric == "radius":
        return "radius (median over classes, IQR band)" if radius == "median" else "radius (mean over classes)"
    return metric


def build_figures(table: MetricsTable, *, radius: str = "median"):
    """{figure name: (matplotlib Figure, caption)} for every family of metrics present."""
    if radius not in ("median", "mean"):
        raise InputError(f"radius must be 'median' or 'mean', got {radius!r}")
    try:
        from matplotlib import colormaps
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] == "matplotlib":
            raise InputError("plots need matplotlib: pip install 'geomprobe[report]' (or pip install matplotlib)"
                             ) from None
        raise
    labels = file_labels(table.files)
    cmap = colormaps["viridis"]
    n_files = len(table.files)
    colour = {f: cmap(0.0 if n_files == 1 else 0.9 * i / (n_files - 1)) for i, f in enumerate(table.files)}
    titles = {name: title for name, title, _ in _FAMILIES}
    figs = OrderedDict()
    for fam, metrics in _family_metrics(table).items():
        subsets = [s for s in table.subsets()
                   if any(r["subset"] == s and r["metric"] in metrics for r in table.rows)]
        n_layers = max(len({r["layer"] for r in table.rows if r["metric"] == m}) for m in metrics)
        w = max(2.8, 0.28 * n_layers + 1.4)
        fig = Figure(figsize=(w * len(subsets) + 2.2, 2.3 * len(metrics) + 0.8), layout="constrained")
        FigureCanvasAgg(fig)  # no pyplot, no global backend state
        axes = fig.subplots(len(metrics), len(subsets), squeeze=False)
        handles = {}
        grid = [[series(table, m, s, radius=radius) for s in subsets] for m in metrics]
        layer_grid = [[next(iter(d.values()))[0] if d else None for d in row] for row in grid]
        for i, m in enumerate(metrics):
            for j, s in enumerate(subsets):
                ax = axes[i][j]
                data = grid[i][j]
                for f, (layers, y, lo, hi) in data.items():
                    x = np.arange(len(layers))
                    (line,) = ax.plot(x, y, "o-", color=colour[f], lw=1.4, ms=3.5)
                    handles.setdefault(f, line)
                    if lo is not None and np.isfinite(lo).any():
                        ax.fill_between(x, lo, hi, color=colour[f], alpha=0.18, lw=0)
                layers = layer_grid[i][j]
                if layers is not None:
                    # tick labels under the last panel of a column, or where the panel below has other layers
                    below = layer_grid[i + 1][j] if i + 1 < len(metrics) else None
                    ax.set_xticks(np.arange(len(layers)))
                    ax.set_xticklabels(layers if below != layers else [], rotation=90, fontsize=7)
                    ax.set_xlim(-0.5, len(layers) - 0.5)
                else:
                    ax.text(0.5, 0.5, "no rows", ha="center", va="center", transform=ax.transAxes, color="0.5")
                    ax.set_xticks([])
                    ax.set_yticks([])
                ax.tick_params(axis="y", labelsize=7)
                ax.grid(True, alpha=0.3)
                if i == 0:
                    ax.set_title(s, fontsize=9)
                if j == 0:
                    ax.set_ylabel(_ylabel(m, radius), fontsize=8)
        fig.suptitle(titles[fam], fontsize=10)
        order = [f for f in table.files if f in handles]
        fig.legend([handles[f] for f in order], [labels[f] for f in order], loc="outside right upper",
                   fontsize=7, title="file (epoch)", title_fontsize=7, frameon=False,
                   ncols=max(1, math.ceil(len(order) / 30)))
        caption = f"{titles[fam]}: {', '.join(metrics)} per layer (x) and subset (column), one line per file."
        if "radius" in metrics:
            caption += (" Radius: median over classes with the interquartile band (the mean can be dominated by "
                        "one class, docs/metrics.md)." if radius == "median" else " Radius: mean over classes.")
        figs[fam] = (fig, caption)
    figs.update(_similarity_figures(table, Figure, FigureCanvasAgg))
    figs.update(_scores_figures(table, Figure, FigureCanvasAgg))
    if not figs:
        raise InputError(f"{table.outdir}: metrics.csv holds no aggregate metric that can be plotted")
    return figs


def _similarity_figures(table: MetricsTable, Figure, Canvas) -> dict:
    """Layer x layer heatmaps of OUTDIR/similarity.csv (``analyze --compare``): one panel per metric,
    rows and columns the (file, layer) items in the order written; the diagonal is CKA 1 / angle 0."""
    path = table.outdir / "similarity.csv"
    if not path.is_file():
        return {}
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        return {}
    labels = file_labels(list(OrderedDict.fromkeys([r["file_a"] for r in rows] + [r["file_b"] for r in rows])))
    items = list(OrderedDict.fromkeys(
        [(r["file_a"], r["layer_a"]) for r in rows] + [(r["file_b"], r["layer_b"]) for r in rows]))
    pos = {it: i for i, it in enumerate(items)}
    one_file = len({f for f, _ in items}) == 1
    names = [f"{x}" if one_file else f"{labels[f]}:{x}" for f, x in items]
    metrics = [m for m in ("cka", "cka_unbiased", "procrustes_angle") if any(r["metric"] == m for r in rows)]
    k = len(items)
    side = max(3.2, 0.32 * k + 1.6)
    fig = Figure(figsize=(side * len(metrics) + 0.6, side + 0.6), layout="constrained")
    Canvas(fig)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, m in zip(axes, metrics):
        A = np.full((k, k), np.nan)
        np.fill_diagonal(A, 0.0 if m == "procrustes_angle" else 1.0)
        for r in rows:
            if r["metric"] == m:
                i, j = pos[(r["file_a"], r["layer_a"])], pos[(r["file_b"], r["layer_b"])]
                A[i, j] = A[j, i] = _value(r["value"])
        lim = (0.0, math.pi / 2) if m == "procrustes_angle" else (0.0, 1.0)
        im = ax.imshow(A, vmin=lim[0], vmax=lim[1], cmap="viridis_r" if m == "procrustes_angle" else "viridis")
        ax.set_xticks(np.arange(k))
        ax.set_yticks(np.arange(k))
        ax.set_xticklabels(names, rotation=90, fontsize=7)
        ax.set_yticklabels(names, fontsize=7)
        ax.set_title(m + (" (radians)" if m == "procrustes_angle" else ""), fontsize=9)
        fig.colorbar(im, ax=ax, shrink=0.8)
    caption = ("Layer x layer similarity (similarity.csv): " + ", ".join(metrics)
               + "; rows and columns are the compared (file, layer) pairs, the diagonal is identity.")
    return {"similarity": (fig, caption)}


def _scores_figures(table: MetricsTable, Figure, Canvas) -> dict:
    """Histograms per subset of forgetting events, EL2N and AUM of the scores.csv of the runs the
    analysed files come from (geomprobe.scores.find_run_scores); one row of panels per table."""
    from .scores import find_run_scores, read_scores

    paths = find_run_scores(table.files)
    if not paths:
        return {}
    fig = Figure(figsize=(13, 3.4 * len(paths) + 0.4), layout="constrained")
    Canvas(fig)
    axes = fig.subplots(len(paths), 3, squeeze=False)
    for row, p in zip(axes, paths):
        t = read_scores(p)
        c = t.columns
        subsets = list(OrderedDict.fromkeys(c["subset"].tolist()))
        panels = [("forgetting", "forgetting events (learned examples)"),
                  ("el2n", f"EL2N at epoch {t.meta.get('el2n_epoch')}"), ("aum", "AUM (training-label margin)")]
        for ax, (col, label) in zip(row, panels):
            v = c[col].astype(float)
            ok = ~np.isnan(v) & ((c["never_learned"] == 0) if col == "forgetting" else True)
            if not ok.any():
                ax.set_title(f"{col}: not recorded", fontsize=9)
                continue
            bins = np.histogram_bin_edges(v[ok], bins=30)
            for sub in subsets:
                m = ok & (c["subset"] == sub)
                ax.hist(v[m], bins=bins, alpha=0.5, density=True, label=f"{sub} (n={int(m.sum())})")
            ax.set_xlabel(label, fontsize=8)
            ax.set_ylabel("density per subset", fontsize=8)
            ax.set_title(f"{col}: {file_labels([str(p)])[str(p)] if len(paths) == 1 else p}", fontsize=8)
            ax.legend(fontsize=7)
    caption = ("Per-example memorisation scores per subset (" + ", ".join(map(str, paths))
               + "; docs/companion.md): a memorised (e.g. permuted-label) subset has more forgetting events, "
               "higher EL2N and lower AUM.")
    return {"scores": (fig, caption)}


@dataclass(frozen=True)
class PlotResult:
    figures: list[Path]
    report: Path


def _summary_lines(table: MetricsTable, labels: dict[str, str]) -> list[str]:
    """Best-capacity layer of each file and subset (aggregate capacity rows)."""
    cap = [r for r in table.rows if r["metric"] == "capacity" and r["class"] == "" and math.isfinite(r["value"])]
    if not cap:
        return []
    subsets = list(OrderedDict.fromkeys(r["subset"] for r in cap))
    lines = ["| file | " + " | ".join(f"{s}: best layer (capacity)" for s in subsets) + " |",
             "|---|" + "---|" * len(subsets)]
    for f in table.files:
        cells = []
        for s in subsets:
            sel = [r for r in cap if r["file"] == f and r["subset"] == s]
            best = max(sel, key=lambda r: r["value"]) if sel else None
            cells.append(f"{best['layer']} ({best['value']:.3g})" if best else "-")
        lines.append(f"| {labels[f]} | " + " | ".join(cells) + " |")
    return lines


def plot_analysis(outdir: str | os.PathLike, *, plotdir: str | os.PathLike | None = None, radius: str = "median",
                  force: bool = False, dpi: int = 110) -> PlotResult:
    """Draw every figure of an analysis folder into ``plotdir`` (default OUTDIR/plots) as PNGs and write
    a one-page ``report.md`` next to them. Refuses a non-empty ``plotdir`` unless ``force``."""
    from .io import atomic_write_bytes, atomic_write_text

    table = load_metrics(outdir)
    pdir = Path(plotdir) if plotdir is not None else table.outdir / "plots"
    if pdir.exists() and not pdir.is_dir():
        raise InputError(f"{pdir}: exists and is not a directory")
    if pdir.is_dir() and any(pdir.iterdir()) and not force:
        raise InputError(f"{pdir}: already exists and is not empty; pass --force to overwrite the plots")
    figs = build_figures(table, radius=radius)  # also checks matplotlib before anything is written
    pdir.mkdir(parents=True, exist_ok=True)
    import io

    paths = []
    for name, (fig, _) in figs.items():
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi)
        paths.append(atomic_write_bytes(pdir / f"{name}.png", buf.getvalue()))
    labels = file_labels(table.files)
    lines = [f"# geomprobe analysis: {table.outdir}", ""]
    lines.append("Files (one line each in the figures, in this order): "
                 + ", ".join(f"`{labels[f]}`" for f in table.files) + ".")
    opts = table.options
    if opts:
        keys = [k for k in ("seed", "n_t", "n_reps", "per_class", "max_classes", "kappa", "seed_mode") if k in opts]
        lines.append("Analysis options: " + ", ".join(f"{k}={opts[k]}" for k in keys) + ".")
    if table.notes:
        lines.append(f"{len(table.notes)} note(s) in metrics.json.")
    lines.append("")
    for (name, (_, caption)), p in zip(figs.items(), paths):
        lines += [f"![{name}]({p.name})", "", caption, ""]
    summary = _summary_lines(table, labels)
    if summary:
        lines += ["Best layer by manifold capacity:", ""] + summary + [""]
    report = atomic_write_text(pdir / "report.md", "\n".join(lines))
    return PlotResult(paths, report)
