"""Figures of the four experiments, drawn from a run's ``summary.json`` (and its saved activation files).

Every function returns a ``matplotlib.figure.Figure`` built without pyplot (Agg canvas; no global backend
change, no display needed); :func:`save` writes it as PNG. Each axis has a title, axis labels with units
(dimensionless quantities say so) and a legend or a colour bar. matplotlib is imported only here, umap-learn
only inside :func:`e2_umap`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["FIGURES", "save", "e1_vs_sigma", "e1_training", "e2_mftma", "e2_rewind", "e2_training", "e2_umap",
           "e3_heatmaps", "e3_predictions", "e4_losses"]

SUBSET_STYLE = {"unpermuted": ("tab:blue", "o"), "permuted": ("tab:red", "s"), "restored": ("tab:green", "^"),
                "test": ("tab:purple", "D"), "train": ("tab:gray", "v")}
MFTMA_PANELS = [("capacity", "capacity α (dimensionless)"), ("radius", "radius R (÷ center norm; log scale)"),
                ("dimension", "dimension D (directions)"), ("center_correlation", "center correlation ρ_c (cosine)")]


def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def _num(v):
    return np.nan if v is None else float(v)


# -- E1 ------------------------------------------------------------------------------------------


def e1_vs_sigma(summary: dict):
    d = summary["data"]
    runs = sorted([r for r in d["runs"] if r["labels"] == "true"], key=lambda r: r["sigma"])
    sig = [r["sigma"] for r in runs]
    fig = _figure(11, 4.2)
    ax1, ax2 = fig.subplots(1, 2)
    for key, lab, st in (("final_train_acc", "train (final epoch)", "o-"), ("final_test_acc", "test (final epoch)", "s-"),
                         ("best_test_acc", "test (best epoch)", "^--")):
        ax1.plot(sig, [100 * _num(r[key]) for r in runs], st, label=lab)
    ax1.axhline(100 * d["chance"], color="k", ls=":", label=f"chance ({100 * d['chance']:.0f} %)")
    ax1.set(xscale="log", xlabel="init scale σ of W1 (log)", ylabel="accuracy (%)", title="Accuracy vs init scale",
            ylim=(0, 102))
    ax1.legend(fontsize=8)
    ax2.plot(sig, [_num(r["grad_alignment"]) for r in runs], "o-", label="gradient Ω in-class (W1)")
    ax2.plot(sig, [_num(r["rep_alignment"]) for r in runs], "s-", label="representation Ω in-class (hidden)")
    for s in d.get("shuffled_vs_true_rep_alignment", []):
        ax2.plot([s["sigma"]], [_num(s["shuffled"])], "kx", label="representation Ω, shuffled labels")
    ax2.set(xscale="log", xlabel="init scale σ of W1 (log)", ylabel="alignment Ω (dimensionless, mean over training)",
            title="In-class alignment vs init scale")
    ax2.legend(fontsize=8)
    fig.suptitle(f"E1 extreme memorization (preset {summary.get('preset')}, seed {summary.get('seed')})")
    return fig


def e1_training(summary: dict):
    d = summary["data"]
    runs = sorted(d["runs"], key=lambda r: (r["labels"], r["sigma"]))
    fig = _figure(11, 4.2)
    ax1, ax2 = fig.subplots(1, 2)
    cmap = _cmap("viridis")
    for i, r in enumerate(runs):
        col = cmap(i / max(len(runs) - 1, 1))
        lab = f"σ = {r['sigma']:g}" + (" (shuffled)" if r["labels"] == "shuffled" else "")
        ep = r.get("history") or []
        ax1.plot([e["epoch"] for e in ep], [100 * _num(e.get("test_acc")) for e in ep], "-", color=col, label=lab + " test")
        ax1.plot([e["epoch"] for e in ep], [100 * _num(e.get("train_acc")) for e in ep], ":", color=col)
        g = r.get("grad_alignment_curve") or []
        ax2.plot([p[0] for p in g], [_num(p[2]) for p in g], "-", color=col, label=lab)
    ax1.set(xlabel="epoch", ylabel="accuracy (%) (solid test, dotted train)", title="Accuracy over training")
    ax1.legend(fontsize=7)
    ax2.set(xlabel="optimizer step", ylabel="gradient Ω in-class of W1 (dimensionless)",
            title="Gradient alignment over training")
    ax2.legend(fontsize=7)
    fig.suptitle("E1: training curves per init scale")
    return fig


def _cmap(name: str):
    import matplotlib

    return matplotlib.colormaps[name]


# -- E2 ------------------------------------------------------------------------------------------


def e2_mftma(summary: dict):
    d = summary["data"]
    layers = d["layers"]
    tags = [t for t in sorted(d["files"], key=lambda t: (d["files"][t]["epoch"], t != "init"))
            if t in d.get("metrics", {})]
    fig = _figure(4.2 * max(len(tags), 1), 12)
    axes = np.atleast_2d(fig.subplots(len(MFTMA_PANELS), max(len(tags), 1), squeeze=False))
    x = np.arange(len(layers))
    for j, tag in enumerate(tags):
        for i, (metric, ylab) in enumerate(MFTMA_PANELS):
            ax = axes[i, j]
            for subset, vals in d["metrics"][tag].items():
                if metric not in vals:
                    continue
                col, mk = SUBSET_STYLE.get(subset, ("k", "."))
                ax.plot(x, [_num(vals[metric].get(layer)) for layer in layers], "-", marker=mk, color=col, label=subset)
            if metric == "capacity":
                ax.axhline(d["capacity_lower_bound"], color="k", ls="--", label=f"2/M = {d['capacity_lower_bound']:.3g}")
            ax.set_xticks(x, layers, rotation=45, fontsize=8)
            if metric == "radius":  # a mean over classes: one class whose center is nearly projected out by the
                ax.set_yscale("log")  # center-correlation step has R >> 1 and would flatten a linear axis
            ax.set(xlabel="layer", ylabel=ylab, title=f"{metric} at {tag} (epoch {d['files'][tag]['epoch']})")
            if ax.get_legend_handles_labels()[0]:  # --no-mftma: no capacity rows, nothing to label
                ax.legend(fontsize=7)
    fig.suptitle(f"E2 MFTMA geometry per subset (mean over the classes, as the reference; M = {d['M']} examples "
                 "per class)")
    return fig


def e2_rewind(summary: dict):
    rw = summary["data"].get("rewind")
    fig = _figure(max(7.0, 2.5 + 0.6 * len(rw["epochs"])) if rw else 7, max(3.5, 1.5 + 0.5 * len(rw["layers"])) if rw else 3)
    ax = fig.subplots()
    fig.suptitle("E2 rewinding one layer to an earlier epoch")
    if not rw:
        ax.set(title="Rewinding: no rewind.json", xlabel="rewind epoch", ylabel="layer")
        return fig
    grid = 100 * np.array([[_num(v) for v in row] for row in rw["test_acc"]])
    im = ax.imshow(grid, aspect="auto", cmap="magma")
    ax.set_xticks(range(len(rw["epochs"])), [str(e) for e in rw["epochs"]])
    ax.set_yticks(range(len(rw["layers"])), rw["layers"])
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            if np.isfinite(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.0f}", ha="center", va="center", fontsize=7,
                        color="w" if grid[i, j] < np.nanmean(grid) else "k")
    eff = next((e for e in summary["effects"] if e["name"].startswith("rewinding")), None)
    fin = eff["measured"].get("final_test_acc") if eff else None
    ax.set(xlabel="epoch the layer is rewound to", ylabel="layer rewound (others keep final weights)",
           title="Test accuracy after rewinding one layer" + (f" (final: {100 * fin:.0f} %)" if fin is not None else ""))
    fig.colorbar(im, ax=ax, label="test accuracy (%)")
    return fig


def e2_training(summary: dict):
    d = summary["data"]
    fig = _figure(11, 4.2)
    ax1, ax2 = fig.subplots(1, 2)
    cur = d.get("curves", [])
    ep = [c["epoch"] for c in cur]
    for key, lab in (("test_acc", "test"), ("unpermuted_acc", "unpermuted (true labels)"),
                     ("permuted_acc", "permuted (training labels)"), ("restored_acc", "restored (true labels)")):
        col, mk = SUBSET_STYLE.get(lab.split()[0], ("k", "."))
        ax1.plot(ep, [100 * _num(c.get(key)) for c in cur], "-", color=col, label=lab)
    if d.get("best_epoch") is not None:
        ax1.axvline(d["best_epoch"], color="k", ls=":", label=f"best epoch ({d['best_epoch']})")
    ax1.set(xlabel="epoch", ylabel="accuracy (%)", title="Accuracy per subset over training")
    ax1.legend(fontsize=7)
    gs = d.get("gradient_split", [])
    e2 = [g["epoch"] for g in gs]
    for key, lab, col, ls in (("unpermuted_dependent", "unpermuted, label-dependent", "tab:blue", "-"),
                              ("permuted_dependent", "permuted, label-dependent", "tab:red", "-"),
                              ("unpermuted_independent", "unpermuted, label-independent", "tab:blue", ":"),
                              ("permuted_independent", "permuted, label-independent", "tab:red", ":")):
        ax2.plot(e2, [_num(g[key]) for g in gs], ls, color=col, label=lab)
    ax2.set(xlabel="epoch", ylabel="gradient norm per example (all parameters; norm / n)", title="Gradient split",
            yscale="log" if gs else "linear")
    ax2.legend(fontsize=7)
    fig.suptitle("E2: label noise over training")
    return fig


def e2_umap(outdir: str | Path, summary: dict, layer: str | None = None, *, seed: int = 0,
            tags: tuple[str, ...] = ("init", "best", "final")):
    """UMAP of one layer (default: the last) at init / best / final; colour = class, marker = subset."""
    import umap  # noqa: PLC0415 (optional dependency: only this figure needs it)

    from geomprobe.io import open_activations

    d = summary["data"]
    layer = layer or d["layers"][-1]
    tags = [t for t in tags if t in d["files"]]
    fig = _figure(5 * len(tags), 4.8)
    axes = np.atleast_1d(fig.subplots(1, len(tags)))
    cmap = _cmap("tab20")
    for ax, tag in zip(axes, tags):
        with open_activations(Path(outdir) / d["files"][tag]["file"]) as f:
            X = f.layer(layer).astype(np.float64)
            subs = f.subsets()
        emb = umap.UMAP(n_neighbors=15, min_dist=0.1, random_state=seed, n_jobs=1).fit_transform(X)
        for s, sub in subs.items():
            col, mk = SUBSET_STYLE.get(s, ("k", "."))
            ax.scatter(emb[sub.rows, 0], emb[sub.rows, 1], c=[cmap(int(c) % 20) for c in sub.labels], marker=mk,
                       s=8, alpha=0.7, linewidths=0)
            ax.scatter([], [], c="gray", marker=mk, s=20, label=s)
        ax.set(xlabel="UMAP 1 (arbitrary units)", ylabel="UMAP 2 (arbitrary units)",
               title=f"layer {layer} at {tag} (epoch {d['files'][tag]['epoch']})")
        ax.legend(fontsize=7, title="subset (colour = true class)", title_fontsize=7)
    fig.suptitle("E2: UMAP of the last layer")
    return fig


# -- E3 ------------------------------------------------------------------------------------------


def _e3_families(summary: dict) -> dict[str, list]:
    fam: dict[str, list] = {}
    for m in summary["data"]["models"]:
        if "family" in m:
            fam.setdefault(m["family"], []).append(m)
    return {k: sorted(v, key=lambda m: m["depth"]) for k, v in sorted(fam.items())}


def e3_heatmaps(summary: dict):
    fam = _e3_families(summary)
    fig = _figure(10, 2.2 + 2.0 * len(fam))
    axes = np.atleast_2d(fig.subplots(max(len(fam), 1), 2, squeeze=False))
    for i, (name, ms) in enumerate(fam.items()):
        rho = ms[0]["rho"]
        for j, key in enumerate(("identity", "constant")):
            ax = axes[i, j]
            grid = np.array([[_num(v) for v in m[key]] for m in ms])
            im = ax.imshow(grid, aspect="auto", cmap="RdBu_r", vmin=-1, vmax=1, origin="lower")
            ax.set_xticks(range(len(rho)), [f"{r:.2g}" for r in rho], fontsize=7)
            ax.set_yticks(range(len(ms)), [str(m["depth"]) for m in ms])
            ax.set(xlabel="ρ: cosine of the test input with the training image",
                   ylabel="hidden layers" if name.startswith("fcn") else "conv layers",
                   title=f"{name}: correlation with {key} target")
            fig.colorbar(im, ax=ax, label="cosine correlation")
    fig.suptitle("E3 identity crisis: identity vs constant (depth x ρ)")
    return fig


def _img(v: np.ndarray, shape) -> np.ndarray:
    a = np.asarray(v, float).reshape(shape)
    return a[0] if a.ndim == 3 and a.shape[0] == 1 else (a.transpose(1, 2, 0) if a.ndim == 3 else a)


def e3_predictions(outdir: str | Path, summary: dict, max_models: int = 8):
    """Image grid: the probe inputs (top row), then each model's prediction, one column per rho."""
    from geomprobe.io import open_activations

    ms = [m for ms in _e3_families(summary).values() for m in ms][:max_models]
    if not ms:
        fig = _figure(4, 2)
        fig.subplots().set(title="no models", xlabel="ρ", ylabel="model")
        return fig
    with open_activations(Path(outdir) / ms[0]["activation_file"]) as f:
        inputs = f.array("probe/inputs")
        rho = f.array("probe/rho")
        x_hat = f.array("probe/x_hat")
    grid = np.unique(rho)
    cols = [int(np.flatnonzero(rho == r)[0]) for r in grid]
    shape = x_hat.shape
    preds = []
    for m in ms:
        with open_activations(Path(outdir) / m["activation_file"]) as f:
            preds.append(f.array(f"probe/pred/{m['run']}"))
    fig = _figure(1.3 * len(cols) + 1.5, 1.3 * (len(ms) + 1) + 0.8)
    axes = np.atleast_2d(fig.subplots(len(ms) + 1, len(cols), squeeze=False))
    rows = [("input", inputs)] + [(m["run"], p) for m, p in zip(ms, preds)]
    for i, (lab, arr) in enumerate(rows):
        for j, c in enumerate(cols):
            ax = axes[i, j]
            ax.imshow(_img(arr[c], shape), cmap="gray")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(f"ρ = {grid[j]:.2g}", fontsize=8)
            if j == 0:
                ax.set_ylabel(lab, fontsize=7)
            if i == len(rows) - 1:
                ax.set_xlabel("pixels", fontsize=6)
    fig.suptitle("E3: predictions\n(rows: models, top: inputs;\ncolumns: correlation ρ with the training image)",
                 fontsize=9)
    return fig


# -- E4 ------------------------------------------------------------------------------------------


def e4_losses(summary: dict):
    d = summary["data"]
    nets = d["nets"]
    true = [n for n in nets if not n.get("random_labels")]
    rand = [n for n in nets if n.get("random_labels")]
    fig = _figure(15, 4.5)
    axes = fig.subplots(1, 3)
    for ax, (tr, te, fk, title) in zip(axes[:2], (
            ("train_normalized_loss", "test_normalized_loss", "fit_normalized", "Normalised cross-entropy"),
            ("train_loss", "test_loss", "fit_unnormalized", "Unnormalised cross-entropy"))):
        sc = ax.scatter([n[tr] for n in true], [n[te] for n in true], c=[np.log10(n["init_std"]) for n in true],
                        cmap="viridis", label="true labels (colour: log10 init std)")
        if rand:
            ax.scatter([n[tr] for n in rand], [n[te] for n in rand], marker="x", s=60, c="tab:red",
                       label="random labels")
        f = d.get(fk, {})
        if f.get("slope") is not None:
            xs = np.linspace(min(n[tr] for n in nets), max(n[tr] for n in nets), 50)
            ax.plot(xs, f["slope"] * xs + f["intercept"], "k--",
                    label=f"fit: slope {f['slope']:.3g}, intercept {f['intercept']:.3g}, R² {f['r2']:.3f}")
        ax.set(xlabel=f"train {title.lower()} (nats)", ylabel=f"test {title.lower()} (nats)", title=title + ": test vs train")
        ax.legend(fontsize=7)
        fig.colorbar(sc, ax=ax, label="log10 init std")
    ax = axes[2]
    ax.plot([n["norm_product"] for n in true], [100 * (1 - n["test_acc"]) for n in true], "o", label="true labels")
    if rand:
        ax.plot([n["norm_product"] for n in rand], [100 * (1 - n["test_acc"]) for n in rand], "x", color="tab:red",
                label="random labels")
    ax.set(xscale="log", xlabel="product of the layers' Frobenius norms (log)", ylabel="test error (%)",
           title="Test error vs product of norms")
    ax.legend(fontsize=7)
    fig.suptitle(f"E4 normalised loss (preset {summary.get('preset')}, seed {summary.get('seed')})")
    return fig


# experiment -> [(file stem, function, needs outdir, optional dependency)]
FIGURES: dict[str, list[tuple[str, Any, bool, str | None]]] = {
    "extreme-memorization": [("e1_vs_sigma", e1_vs_sigma, False, None), ("e1_training", e1_training, False, None)],
    "label-noise-geometry": [("e2_mftma", e2_mftma, False, None), ("e2_rewind", e2_rewind, False, None),
                             ("e2_training", e2_training, False, None), ("e2_umap", e2_umap, True, "umap")],
    "identity-crisis": [("e3_heatmaps", e3_heatmaps, False, None), ("e3_predictions", e3_predictions, True, None)],
    "normalized-loss": [("e4_losses", e4_losses, False, None)],
}
