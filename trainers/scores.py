"""Record per-example memorisation scores during training and show them in the report.

    rec = ScoreRecorder(len(y_train), subsets=np.where(permuted, "permuted", "unpermuted"),
                        true_labels=y_true, el2n_epoch=2)
    train(model, x_train, y_train, ..., out="runs/a", scores=rec)   # writes runs/a/scores.csv + .json

What is recorded (formulas: geomprobe.scores, which this module calls): from the logits of every
training forward pass (train mode, the training labels) forgetting events and AUM margins of every
presented example, and EL2N during ``el2n_epoch`` (the mean over that epoch's presentations: one with
the default ``repeat=1``); after the last epoch, with ``grad_norms=True``, the per-example gradient norm
of each Linear / Conv2d layer (weight and bias together) of the final model in eval mode.

The per-batch work is three copies into this epoch's log of presentations (logits, training labels,
example indices) on their devices, without a host synchronisation. Once per epoch (``end_epoch``) the
log is copied to the host and scored in presentation order with geomprobe.scores' formulas
(ForgettingState, aum_margin, el2n); the per-example state is saved with every checkpoint
(``scores_state.npz``) so a resumed run continues the counts; the table is written when training ends.

Per-example gradient norms: trainers/gradstats.py has no public per-example per-layer norm API yet, so
they are computed here directly: forward hooks keep each layer's input a_i and output, one backward of
the summed per-example losses gives the output gradients d_i, and for a Linear layer
||g_i||^2 = ||d_i||^2 (||a_i||^2 + 1) (the +1 is the bias); for a Conv2d layer g_i = D_i^T A_i from the
unfolded input, ||g_i||^2 = ||D_i^T A_i||_F^2 + ||sum_t D_i,t||^2, in chunks of examples.
"""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from geomprobe._validation import InputError, check_positive_int
from geomprobe.io import atomic_write_bytes
from geomprobe.scores import ForgettingState, aum_margin, el2n, read_scores, score_summary, write_scores

__all__ = ["ScoreRecorder", "per_example_layer_grad_norms", "scores_section", "scores_figure", "STATE_FILE"]

STATE_FILE = "scores_state.npz"


class ScoreRecorder:
    """Accumulates forgetting events, AUM and EL2N from training logits; see the module docstring.

    ``subsets``: per-example subset names (default 'all'); ``true_labels``: the clean labels of a
    label-noise run (stored in the table; scores always use the training labels); ``el2n_epoch``: the
    (early) epoch whose presentations give EL2N; ``grad_norms``: per-layer gradient norms at the end.

    ``on_batch`` only logs the batch on its device (no host synchronisation); ``end_epoch`` copies the
    epoch's log to the host once and updates the per-example state ``forget``, ``margin_sum``, ``el2n``.
    """

    def __init__(self, n: int, *, subsets: Any = None, true_labels: Any = None, el2n_epoch: int = 1,
                 grad_norms: bool = True, grad_batch: int = 256):
        self.n = check_positive_int(n, "n")
        self.el2n_epoch = check_positive_int(el2n_epoch, "el2n_epoch")
        self.grad_batch = check_positive_int(grad_batch, "grad_batch")
        self.subsets = np.full(n, "all") if subsets is None else np.asarray(subsets, dtype=str)
        if self.subsets.shape != (n,):
            raise InputError(f"subsets has shape {self.subsets.shape} but there are {n} training examples")
        self.true_labels = None if true_labels is None else np.asarray(true_labels, np.int64)
        if self.true_labels is not None and self.true_labels.shape != (n,):
            raise InputError(f"true_labels has shape {self.true_labels.shape} but there are {n} training examples")
        self.grad_norms = bool(grad_norms)
        # per-example state (host), updated once per epoch from the log
        self.forget = ForgettingState(n)
        self.margin_sum = np.zeros(n)
        self.el2n = np.full(n, np.nan)
        self.epochs = 0
        self.notes: list[str] = []
        self.grads: dict[str, np.ndarray] = {}
        # this epoch's presentations, in order, on the device: logits, training labels, example indices
        self._log: dict[str, torch.Tensor] | None = None
        self._pos = 0
        self._log_epoch: int | None = None

    # -- called by train() ---------------------------------------------------------------------
    @torch.no_grad()
    def on_batch(self, epoch: int, idx: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        """One training batch: example indices, its logits and training labels. Only copies them into
        this epoch's log on their devices (no host synchronisation); the scores are computed from the
        log once per epoch (``end_epoch``)."""
        if self._log_epoch is not None and epoch != self._log_epoch:
            self._flush()  # a new epoch without end_epoch (a caller driving the recorder by hand)
        self._log_epoch = epoch
        z = logits.detach()
        m = int(z.shape[0])
        log = self._log
        if log is None or log["z"].shape[1] != z.shape[1] or log["z"].device != z.device \
                or log["i"].device != idx.device or self._pos + m > log["z"].shape[0]:
            log = self._grow(max(self.n, 2 * (self._pos + m)), z, idx)
        log["z"][self._pos:self._pos + m].copy_(z, non_blocking=True)
        log["y"][self._pos:self._pos + m].copy_(y.detach(), non_blocking=True)
        log["i"][self._pos:self._pos + m].copy_(idx.detach(), non_blocking=True)
        self._pos += m

    def _grow(self, rows: int, z: torch.Tensor, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """A log of ``rows`` presentations (logits float32 and labels on the logits' device, indices on
        the indices' device), holding what was logged so far."""
        new = {"z": torch.empty((rows, z.shape[1]), dtype=torch.float32, device=z.device),
               "y": torch.empty(rows, dtype=torch.int64, device=z.device),
               "i": torch.empty(rows, dtype=torch.int64, device=idx.device)}
        if self._log is not None and self._pos:
            for k in new:
                new[k][:self._pos].copy_(self._log[k][:self._pos])
        self._log = new
        return new

    def _flush(self) -> None:
        """Scores of the logged presentations (one copy to the host), in presentation order, with the
        core's formulas: forgetting (ForgettingState), AUM margins, EL2N in the EL2N epoch."""
        if self._log is None or self._pos == 0:
            return
        k = self._pos
        z = self._log["z"][:k].cpu().numpy().astype(np.float64)
        yy = self._log["y"][:k].cpu().numpy()
        ii = self._log["i"][:k].cpu().numpy()
        epoch, self._pos, self._log_epoch = self._log_epoch, 0, None
        if ii.min() < 0 or ii.max() >= self.n:
            raise InputError(f"example index {int(ii.max() if ii.max() >= self.n else ii.min())} outside "
                             f"0..{self.n - 1}: the recorder was built for {self.n} training examples")
        correct = z.argmax(axis=1) == yy
        if np.unique(ii).size == k:  # every example at most once (repeat=1): one step
            self.forget.update(ii, correct)
        else:  # in order: steps without a repeated example
            seen = np.zeros(self.n, bool)
            a = 0
            for b in range(k):
                if seen[ii[b]]:
                    self.forget.update(ii[a:b], correct[a:b])
                    seen[ii[a:b]] = False
                    a = b
                seen[ii[b]] = True
            self.forget.update(ii[a:], correct[a:])
        np.add.at(self.margin_sum, ii, aum_margin(z, yy))
        if epoch == self.el2n_epoch:  # mean over the epoch's presentations (one each with repeat=1)
            tot, cnt = np.zeros(self.n), np.zeros(self.n)
            np.add.at(tot, ii, el2n(z, yy))
            np.add.at(cnt, ii, 1.0)
            self.el2n = np.where(cnt > 0, tot / np.maximum(cnt, 1.0), self.el2n)

    def end_epoch(self, epoch: int, out: Path | None) -> None:
        """Score the epoch's presentations (the epoch's one synchronisation) and save the state in ``out``."""
        self._flush()
        self.epochs = epoch
        if out is not None:
            buf = io.BytesIO()
            np.savez(buf, epoch=epoch, counts=self.forget.counts, prev=self.forget.prev, first=self.forget.first,
                     presented=self.forget.presented, margin_sum=self.margin_sum, el2n=self.el2n)
            atomic_write_bytes(Path(out) / STATE_FILE, buf.getvalue())

    def resume(self, out: Path | None, epoch: int) -> None:
        """Load the state saved at ``epoch`` (the checkpoint training resumes from)."""
        p = None if out is None else Path(out) / STATE_FILE
        if p is None or not p.is_file():
            self.notes.append(f"resumed at epoch {epoch} without saved score state: scores count from there")
            return
        with np.load(p) as z:
            if int(z["epoch"]) != epoch or z["counts"].shape != (self.n,):
                self.notes.append(f"saved score state is for epoch {int(z['epoch'])}, run resumed at {epoch}: "
                                  "scores count from the resume")
                return
            self.forget.counts[:] = z["counts"]
            self.forget.prev[:] = z["prev"]
            self.forget.first[:] = z["first"]
            self.forget.presented[:] = z["presented"]
            self.margin_sum[:] = z["margin_sum"]
            self.el2n[:] = z["el2n"]
        self._pos, self._log_epoch = 0, None
        self.epochs = epoch

    def finish(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, out: Path | None, *,
               loss: str = "ce", device: torch.device | None = None) -> Path | None:
        """After training: per-layer gradient norms (if enabled) and the table in ``out``."""
        self._flush()
        if self.grad_norms and loss != "mse":
            self.grads = per_example_layer_grad_norms(model, x, y, batch_size=self.grad_batch, device=device)
        if out is None:
            return None
        return write_scores(out, self.columns(y), self.meta())

    def columns(self, y) -> dict[str, np.ndarray]:
        self._flush()
        fr = self.forget.result()
        yy = y.detach().cpu().numpy() if torch.is_tensor(y) else np.asarray(y)
        aum = self.margin_sum / np.maximum(self.forget.presented, 1)
        aum[self.forget.presented == 0] = np.nan
        cols = {"index": np.arange(self.n), "subset": self.subsets, "label": yy.astype(np.int64),
                "true_label": (yy if self.true_labels is None else self.true_labels).astype(np.int64),
                "forgetting": fr.counts, "never_learned": fr.never_learned.astype(np.int64),
                "first_learned": fr.first_learned, "n_presented": self.forget.presented.copy(),
                "el2n": self.el2n, "aum": aum}
        cols.update({f"grad_norm/{k}": v for k, v in self.grads.items()})
        return cols

    def meta(self) -> dict:
        return {"epochs": self.epochs, "el2n_epoch": self.el2n_epoch, "grad_norm_layers": list(self.grads),
                "grad_norm_model": "final model, eval mode, training labels" if self.grads else None,
                "notes": self.notes}


# -- per-example gradient norms --------------------------------------------------------------------
def per_example_layer_grad_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 256,
                                 device: torch.device | None = None) -> dict[str, np.ndarray]:
    """{module name: ||d CE_i / d (W, b)|| per example} for every Linear / Conv2d (groups=1) module, in eval
    mode (no parameter gradients are touched)."""
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)]
    p0 = next(model.parameters())
    device, dtype = device or p0.device, p0.dtype
    n = int(x.shape[0])
    out = {name: np.empty(n) for name, _ in targets}
    was = model.training
    model.eval()
    try:
        for s in range(0, n, batch_size):
            xb = x[s:s + batch_size].to(device, dtype=dtype)
            yb = y[s:s + batch_size].to(device)
            store: dict[str, tuple] = {}
            hooks = []

            def hook(name):
                def f(mod, inputs, output):
                    o = output if output.requires_grad else output.detach().requires_grad_(True)
                    store[name] = (inputs[0].detach(), o)
                    return o.clone()
                return f

            try:
                for name, m in targets:
                    hooks.append(m.register_forward_hook(hook(name)))
                with torch.enable_grad():
                    z = model(xb)
                    z = z if z.dtype in (torch.float32, torch.float64) else z.float()
                    losses = F.cross_entropy(z, yb, reduction="none")
                    names = [k for k, _ in targets if k in store]
                    grads = torch.autograd.grad(losses.sum(), [store[k][1] for k in names], allow_unused=True)
            finally:
                for h in hooks:
                    h.remove()
            mods = dict(targets)
            for k, g in zip(names, grads):
                a, o = store[k]
                g = torch.zeros_like(o) if g is None else g
                out[k][s:s + xb.shape[0]] = _layer_norms(mods[k], a, g).cpu().numpy()
    finally:
        model.train(was)
    return out


def _layer_norms(m: nn.Module, a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    nb = a.shape[0]
    bias = m.bias is not None
    if isinstance(m, nn.Linear):
        A = a.reshape(nb, -1, a.shape[-1]).double()
        D = d.reshape(nb, -1, d.shape[-1]).double()
    else:
        pad = tuple(m._reversed_padding_repeated_twice)
        if any(pad):
            a = F.pad(a, pad, mode="constant" if m.padding_mode == "zeros" else m.padding_mode)
        A = F.unfold(a, m.kernel_size, dilation=m.dilation, padding=0, stride=m.stride).transpose(1, 2).double()
        D = d.reshape(nb, d.shape[1], -1).transpose(1, 2).double()
    if A.shape[1] == 1:
        sq = D[:, 0].pow(2).sum(-1) * (A[:, 0].pow(2).sum(-1) + (1.0 if bias else 0.0))
        return sq.sqrt()
    sq = torch.bmm(D.transpose(1, 2), A).pow(2).sum((1, 2))
    if bias:
        sq = sq + D.sum(1).pow(2).sum(-1)
    return sq.sqrt()


# -- report ---------------------------------------------------------------------------------------
def _fmt(v: float) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3g}"


def scores_section(outdir) -> str:
    """Markdown for the report: per-subset means of the scores and the permuted-vs-unpermuted AUROCs
    (empty string when the run recorded no scores)."""
    try:
        t = read_scores(outdir)
    except InputError:
        return ""
    s = score_summary(t)
    lines = ["## Per-example memorisation scores", "",
             f"From `{t.path.name}` ({t.n} training examples; EL2N at epoch {t.meta.get('el2n_epoch')}, AUM and "
             f"forgetting over {t.meta.get('epochs')} epochs; formulas: docs/companion.md).", "",
             "| subset | n | forgetting (mean, learned) | never learned | EL2N mean | AUM mean |",
             "|---|---|---|---|---|---|"]
    for sub, d in s.per_subset.items():
        lines.append(f"| {sub} | {int(d['n'])} | {_fmt(d['forgetting_mean'])} | {_fmt(d['never_learned_frac'])} | "
                     f"{_fmt(d['el2n_mean'])} | {_fmt(d['aum_mean'])} |")
    if s.grad_layers:
        lines += ["", "Mean per-example gradient norm by layer (final model):", "",
                  "| layer | " + " | ".join(s.per_subset) + " |", "|---|" + "---|" * len(s.per_subset)]
        for layer in s.grad_layers:
            lines.append(f"| {layer} | " + " | ".join(_fmt(d[f'grad_norm_mean/{layer}']) for d in s.per_subset.values())
                         + " |")
    au = {k: v for k, v in s.auroc.items() if not math.isnan(v)}
    if au:
        lines += ["", "AUROC of 'a permuted example scores as more memorised than an unpermuted one' "
                  "(1 = perfect separation, 0.5 = none; AUM: lower = memorised):", "",
                  "| score | AUROC |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in au.items()]
    return "\n".join(lines) + "\n"


def scores_figure(outdir):
    """Histograms of forgetting events, EL2N and AUM per subset (matplotlib Figure, Agg canvas)."""
    from .figures import SUBSET_STYLE, _figure

    t = read_scores(outdir)
    c = t.columns
    fig = _figure(13, 3.8)
    axes = fig.subplots(1, 3)
    subsets = list(dict.fromkeys(c["subset"].tolist()))
    panels = [("forgetting", "forgetting events (count)"), ("el2n", f"EL2N at epoch {t.meta.get('el2n_epoch')}"),
              ("aum", "AUM (logit margin)")]
    for ax, (col, label) in zip(axes, panels):
        v = c[col].astype(float)
        ok = ~np.isnan(v)
        if col == "forgetting":
            ok &= c["never_learned"] == 0
        if not ok.any():
            ax.set(title=f"{col}: not recorded")
            continue
        bins = np.histogram_bin_edges(v[ok], bins=30)
        for s in subsets:
            m = ok & (c["subset"] == s)
            color = SUBSET_STYLE.get(s, ("tab:gray", "o"))[0]
            ax.hist(v[m], bins=bins, alpha=0.5, density=True, color=color, label=f"{s} (n={int(m.sum())})")
        ax.set(xlabel=label, ylabel="density (per subset)", title=f"{col} per subset")
        ax.legend(fontsize=8)
    return fig
