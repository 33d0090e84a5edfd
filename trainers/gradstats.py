"""Training-time gradient statistics without per-example gradient tensors (spec alignment.md §3).

For a Linear or Conv2d layer with (unfolded) inputs ``A_i`` (T positions x d_in) and output
gradients ``D_i`` (T x d_out) of the per-example loss, the per-example weight gradient is
``g_i = D_i^T A_i``. Everything the alignment measures need comes from additive sums:

* ``sum_i g_i = Delta^T A``                                 (the ordinary sum-reduced gradient)
* ``||g_i||^2 = ||d_i||^2 ||a_i||^2`` (T = 1) or ``<D_i D_i^T, A_i A_i^T>_F``   (T > 1)
* ``sum_i g_i/||g_i|| = (Delta with row i scaled by 1/||g_i||)^T A``  (no extra backward)
* for T = 1 also the Gram ``<g_i, g_j> = <d_i, d_j><a_i, a_j>``, i.e. ``(Delta Delta^T) o (A A^T)``

so one forward and one backward give in-class alignment Omega, gradient diversity and the mean cosine
stiffness for every weight tensor, its bias and the logits. ``gradient_stats_oracle`` is the slow
reference that materialises every per-example gradient. See docs/trainers_gradstats.md.

Also here: the label-dependent / label-independent gradient split (Stephenson et al. 2021, Claim 1),
the normalised loss (Liao et al. 2018) and the relative weight distance from initialisation.

All statistics are taken with the model in eval mode by default (``eval_mode=True``): BatchNorm in
train mode couples the examples of a batch, so per-example gradients are not defined there.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from geomprobe._validation import InputError

__all__ = [
    "gradient_stats",
    "gradient_sums",
    "gradient_stats_oracle",
    "GradientSums",
    "TensorSums",
    "gradient_split",
    "gradient_split_norms",
    "normalized_loss",
    "relative_weight_distance",
    "per_example_cross_entropy",
]

_METHODS = ("auto", "gram", "explicit")
_DEFAULT_BUDGET = 2 ** 26  # elements of a temporary per chunk (256 MiB in float32)


def per_example_cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with ``reduction='none'``: the default per-example loss."""
    return F.cross_entropy(logits, y, reduction="none")


# --------------------------------------------------------------------------------------------------
# helpers: modes, module selection, labels
# --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _mode(model: nn.Module, eval_mode: bool):
    """Put every submodule in eval mode for the block and restore each one's own flag afterwards."""
    if not eval_mode:
        coupled = [
            name for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
        ]
        if coupled:
            raise InputError(
                f"eval_mode=False but BatchNorm module(s) {coupled} are in train mode; BatchNorm in "
                "train mode couples the examples of a batch, so per-example gradients are undefined "
                "(use eval_mode=True)"
            )
        yield
        return
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _prefix(name: str) -> str:
    return f"{name}." if name else ""


def _select_modules(model: nn.Module, modules: Iterable[Any] | None) -> list[tuple[str, nn.Module]]:
    named = list(model.named_modules())
    if modules is None:
        return [(n, m) for n, m in named if isinstance(m, (nn.Linear, nn.Conv2d))]
    by_name = dict(named)
    by_id = {id(m): n for n, m in named}
    out = []
    for item in modules:
        if isinstance(item, str):
            if item not in by_name:
                raise InputError(f"modules: model has no submodule named {item!r}")
            mod, name = by_name[item], item
        elif isinstance(item, nn.Module):
            if id(item) not in by_id:
                raise InputError(f"modules: {type(item).__name__} object is not a submodule of model")
            mod, name = item, by_id[id(item)]
        else:
            raise InputError(f"modules must hold submodule names or nn.Module objects, got {item!r}")
        if not isinstance(mod, (nn.Linear, nn.Conv2d)):
            raise InputError(
                f"modules: {name!r} is a {type(mod).__name__}; only nn.Linear and nn.Conv2d are supported"
            )
        out.append((name, mod))
    return out


def _check_conv(name: str, m: nn.Module) -> None:
    if isinstance(m, nn.Conv2d) and m.groups != 1:
        raise InputError(f"module {name!r}: Conv2d with groups={m.groups} is not supported (groups must be 1)")


def _class_codes(y: Any, labels: Any, n: int, device) -> tuple[list[int], torch.Tensor]:
    """Return (sorted class labels, codes 0..K-1 as a long tensor on device)."""
    if labels is None:
        if not (torch.is_tensor(y) and y.ndim == 1 and not torch.is_floating_point(y)):
            shape = tuple(y.shape) if hasattr(y, "shape") else type(y).__name__
            raise InputError(
                f"labels is required when y is not a 1-D integer tensor of class labels (y has shape {shape})"
            )
        labels = y
    lab = labels.detach().cpu().numpy() if torch.is_tensor(labels) else np.asarray(labels)
    if lab.ndim != 1:
        raise InputError(f"labels must be 1-D (n_samples,), got shape {lab.shape}")
    if lab.shape[0] != n:
        raise InputError(f"labels has {lab.shape[0]} entries but x has {n} rows")
    if not (np.issubdtype(lab.dtype, np.integer) or lab.dtype == np.bool_):
        raise InputError(f"labels must be integers, got dtype {lab.dtype}")
    classes, codes = np.unique(lab, return_inverse=True)
    return [int(c) for c in classes], torch.as_tensor(codes.reshape(-1), dtype=torch.long, device=device)


def _check_batch(x: Any, name: str = "x") -> int:
    if not torch.is_tensor(x) or x.ndim < 1:
        raise InputError(f"{name} must be a torch tensor with a leading batch dimension, got {type(x).__name__}")
    if x.shape[0] < 1:
        raise InputError(f"{name} must have at least 1 row, got shape {tuple(x.shape)}")
    return int(x.shape[0])


# --------------------------------------------------------------------------------------------------
# capture: one forward with hooks, one backward to the layer outputs
# --------------------------------------------------------------------------------------------------
def _forward_backward(model, x, y, loss_fn, targets):
    """Return (captures, logits, dlogits): captures[name] = list of (input, output-gradient) per call."""
    store: dict[str, list] = {name: [] for name, _ in targets}
    hooks = []

    def make_hook(name):
        def hook(mod, inputs, output):
            out = output if output.requires_grad else output.detach().requires_grad_(True)
            store[name].append((inputs[0].detach(), out))
            # hand a copy downstream: an in-place op after the layer (ReLU(inplace=True)) must not
            # overwrite the tensor we differentiate with respect to
            return out.clone()
        return hook

    try:
        for name, m in targets:
            hooks.append(m.register_forward_hook(make_hook(name)))
        with torch.enable_grad():
            logits = model(x)
            if not torch.is_tensor(logits):
                raise InputError(f"model output must be a tensor, got {type(logits).__name__}")
            if not logits.requires_grad:
                logits = logits.detach().requires_grad_(True)
            losses = loss_fn(logits, y)
            n = x.shape[0]
            if not torch.is_tensor(losses) or tuple(losses.shape) != (n,):
                shape = tuple(losses.shape) if torch.is_tensor(losses) else type(losses).__name__
                raise InputError(
                    f"loss_fn must return per-example losses of shape ({n},) (reduction='none'), got {shape}"
                )
            outs = [o for name, _ in targets for _, o in store[name]]
            grads = torch.autograd.grad(losses.sum(), [logits] + outs, allow_unused=True)
    finally:
        for h in hooks:
            h.remove()
    dlogits = grads[0] if grads[0] is not None else torch.zeros_like(logits)
    it = iter(grads[1:])
    captures = {}
    for name, _ in targets:
        lst = []
        for a, o in store[name]:
            g = next(it)
            lst.append((a, torch.zeros_like(o) if g is None else g.detach()))
        captures[name] = lst
    return captures, logits.detach(), dlogits.detach()


def _factors(name: str, m: nn.Module, calls, n: int):
    """(D, A) of shape (n, T, d_out), (n, T, d_in) with the calls of a shared module stacked on T."""
    Ds, As = [], []
    for a, d in calls:
        if a.shape[0] != n or d.shape[0] != n:
            raise InputError(
                f"module {name!r} received input with leading dimension {a.shape[0]} but x has {n} rows; "
                "per-example statistics need the batch as the first dimension"
            )
        if isinstance(m, nn.Linear):
            As.append(a.reshape(n, -1, a.shape[-1]))
            Ds.append(d.reshape(n, -1, d.shape[-1]))
        else:  # Conv2d, groups == 1
            if a.ndim != 4:
                raise InputError(f"module {name!r}: Conv2d input must be 4-D (n, C, H, W), got shape {tuple(a.shape)}")
            pad = tuple(m._reversed_padding_repeated_twice)
            if any(pad):
                mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
                a = F.pad(a, pad, mode=mode)
            cols = F.unfold(a, m.kernel_size, dilation=m.dilation, padding=0, stride=m.stride)  # n, q, T
            As.append(cols.transpose(1, 2))
            Ds.append(d.reshape(n, d.shape[1], -1).transpose(1, 2))
    return torch.cat(Ds, dim=1), torch.cat(As, dim=1)


# --------------------------------------------------------------------------------------------------
# per-tensor sums
# --------------------------------------------------------------------------------------------------
def _sq_norms(D: torch.Tensor, A: torch.Tensor, budget: int) -> torch.Tensor:
    """||g_i||^2 for g_i = D_i^T A_i, by the cheaper of the Gram and the explicit form, in chunks."""
    n, T, p = D.shape
    q = A.shape[2]
    if T == 1:
        return D[:, 0].pow(2).sum(-1) * A[:, 0].pow(2).sum(-1)
    out = torch.empty(n, dtype=D.dtype, device=D.device)
    if T * T * (p + q) <= T * p * q:  # Gram form: <D_i D_i^T, A_i A_i^T>_F
        step = max(1, budget // (2 * T * T))
        for s in range(0, n, step):
            Dc, Ac = D[s:s + step], A[s:s + step]
            out[s:s + step] = (torch.bmm(Dc, Dc.transpose(1, 2)) * torch.bmm(Ac, Ac.transpose(1, 2))).sum((1, 2))
    else:  # explicit D_i^T A_i, a chunk of examples at a time
        step = max(1, budget // (p * q))
        for s in range(0, n, step):
            out[s:s + step] = torch.bmm(D[s:s + step].transpose(1, 2), A[s:s + step]).pow(2).sum((1, 2))
    return out


def _sqnorm(t: torch.Tensor) -> float:
    """||t||^2 accumulated in float64 (without a float64 copy of t)."""
    return float(torch.linalg.vector_norm(t, dtype=torch.float64)) ** 2


@dataclass
class TensorSums:
    """Additive sums of one tensor's per-example gradients, per class (float64).

    ``n``, ``n_nonzero`` (examples with ||g_i|| > 0), ``sum_norm`` (sum ||g_i||), ``sum_sq``
    (sum ||g_i||^2) are arrays of length K over ``classes``. Either the vectors ``sum_g`` / ``sum_unit``
    (K x d: sum g_i and sum g_i/||g_i|| per class; mergeable across batches) are kept, or only the
    scalars needed for one batch's statistics: ``sq_g`` / ``sq_unit`` (K: ||sum_{i in c} g_i||^2 and
    ||sum_{i in c} u_i||^2) and ``total_sq_g`` / ``total_sq_unit`` (the same over all examples).
    """

    classes: list[int]
    n: np.ndarray
    n_nonzero: np.ndarray
    sum_norm: np.ndarray
    sum_sq: np.ndarray
    shape: tuple[int, ...]
    sum_g: torch.Tensor | None = None
    sum_unit: torch.Tensor | None = None
    sq_g: np.ndarray | None = None
    sq_unit: np.ndarray | None = None
    total_sq_g: float | None = None
    total_sq_unit: float | None = None

    @property
    def mergeable(self) -> bool:
        return self.sum_g is not None

    def merge(self, other: "TensorSums") -> "TensorSums":
        if not (self.mergeable and other.mergeable):
            raise InputError("only sums made with gradient_sums(...) (vectors kept) can be merged")
        if tuple(self.shape) != tuple(other.shape):
            raise InputError(f"cannot merge sums of shape {self.shape} with sums of shape {other.shape}")
        classes = sorted(set(self.classes) | set(other.classes))
        pos = {c: k for k, c in enumerate(classes)}
        K = len(classes)
        dev = self.sum_g.device
        d = self.sum_g.shape[1]
        out = {k: np.zeros(K) for k in ("n", "n_nonzero", "sum_norm", "sum_sq")}
        sg = torch.zeros(K, d, dtype=torch.float64, device=dev)
        su = torch.zeros(K, d, dtype=torch.float64, device=dev)
        for src in (self, other):
            idx = [pos[c] for c in src.classes]
            for k in out:
                np.add.at(out[k], idx, getattr(src, k))
            ii = torch.as_tensor(idx, device=dev, dtype=torch.long)
            sg.index_add_(0, ii, src.sum_g.to(dev))
            su.index_add_(0, ii, src.sum_unit.to(dev))
        return TensorSums(classes, out["n"], out["n_nonzero"], out["sum_norm"], out["sum_sq"],
                          tuple(self.shape), sum_g=sg, sum_unit=su)

    def to_accumulator(self):
        """The same sums as a torch-free ``geomprobe.alignment.AlignmentAccumulator`` (numpy float64).

        Its ``compute()`` adds what the scalars here do not give, e.g. the between-class cosine
        stiffness matrix. Needs sums made by :func:`gradient_sums` (vectors kept).
        """
        if not self.mergeable:
            raise InputError("to_accumulator needs sums made with gradient_sums(...) (vectors kept)")
        from geomprobe.alignment import AlignmentAccumulator

        acc = AlignmentAccumulator()
        classes = np.asarray(self.classes, np.int64)
        idx = acc._ensure(classes, int(self.sum_g.shape[1]))
        acc.counts[idx] = np.rint(self.n).astype(np.int64)
        acc.nonzero[idx] = np.rint(self.n_nonzero).astype(np.int64)
        acc.norm_sum[idx] = self.sum_norm
        acc.sq_sum[idx] = self.sum_sq
        acc.S[idx] = self.sum_g.cpu().numpy()
        acc.U[idx] = self.sum_unit.cpu().numpy()
        return acc

    def scalars(self):
        """(sq_g, sq_unit, total_sq_g, total_sq_unit) from whichever form is stored."""
        if not self.mergeable:
            return self.sq_g, self.sq_unit, self.total_sq_g, self.total_sq_unit
        sq_g = self.sum_g.pow(2).sum(1).cpu().numpy()
        sq_u = self.sum_unit.pow(2).sum(1).cpu().numpy()
        return sq_g, sq_u, float(self.sum_g.sum(0).pow(2).sum()), float(self.sum_unit.sum(0).pow(2).sum())

    def stats(self) -> dict:
        sq_g, sq_u, tot_g, tot_u = self.scalars()
        return _summarise(self.classes, self.n, self.n_nonzero, self.sum_norm, self.sum_sq, sq_g, sq_u,
                          tot_g, tot_u, self.shape)


def _tensor_sums(D, A, codes, classes, *, method, budget, keep_vectors, shape, sq=None, w_extra=None):
    """TensorSums of g_i = D_i^T A_i; with ``w_extra`` (per-example weights, e.g. 1/||g_i|| over all
    tensors together) also (per class ||sum_{i in c} w_i g_i||^2, the same over all examples)."""
    n, T, p = D.shape
    q = A.shape[2]
    K = len(classes)
    if sq is None:
        sq = _sq_norms(D, A, budget)
    norm = sq.clamp_min(0).sqrt()
    nz = norm > 0
    w = torch.where(nz, 1.0 / torch.where(nz, norm, torch.ones_like(norm)), torch.zeros_like(norm))

    def per_class(v):
        return torch.zeros(K, dtype=torch.float64, device=D.device).index_add_(0, codes, v.double()).cpu().numpy()

    base = dict(classes=classes, n=per_class(torch.ones_like(norm)), n_nonzero=per_class(nz.to(norm.dtype)),
                sum_norm=per_class(norm), sum_sq=per_class(sq), shape=tuple(shape))

    if keep_vectors:
        sg = torch.zeros(K, p * q, dtype=torch.float64, device=D.device)
        su = torch.zeros(K, p * q, dtype=torch.float64, device=D.device)
        for k in range(K):
            idx = (codes == k).nonzero().squeeze(1)
            Dk, Ak = D[idx].reshape(-1, p), A[idx].reshape(-1, q)
            Wk = (D[idx] * w[idx, None, None]).reshape(-1, p)
            sg[k] = (Dk.T @ Ak).reshape(-1).double()
            su[k] = (Wk.T @ Ak).reshape(-1).double()
        return TensorSums(**base, sum_g=sg, sum_unit=su), None

    extra = None
    use_gram = method == "gram" or (
        method == "auto" and T == 1 and n * (p + q) < 2 * p * q and n * n <= budget
    )
    if use_gram and T != 1:
        use_gram = False  # the (nT)^2 Gram of positions is never the cheaper route
    if use_gram:
        G = (D[:, 0] @ D[:, 0].T) * (A[:, 0] @ A[:, 0].T)
        P = F.one_hot(codes, K).to(G.dtype)
        Pw = P * w[:, None]
        sq_g = torch.diagonal(P.T @ G @ P).double().cpu().numpy()
        sq_u = torch.diagonal(Pw.T @ G @ Pw).double().cpu().numpy()
        tot_g = float(G.double().sum())
        tot_u = float((w.double() @ G.double() @ w.double()))
        if w_extra is not None:
            Pe = P * w_extra[:, None].to(G.dtype)
            we = w_extra.double()
            extra = (torch.diagonal(Pe.T @ G @ Pe).double().cpu().numpy(), float(we @ G.double() @ we))
    else:
        Sg = torch.zeros(p, q, dtype=D.dtype, device=D.device)
        Su = torch.zeros(p, q, dtype=D.dtype, device=D.device)
        Se = None if w_extra is None else torch.zeros(p, q, dtype=D.dtype, device=D.device)
        sq_g, sq_u, sq_e = np.zeros(K), np.zeros(K), np.zeros(K)
        for k in range(K):
            idx = (codes == k).nonzero().squeeze(1)
            Ak = A[idx].reshape(-1, q)
            gk = D[idx].reshape(-1, p).T @ Ak
            uk = (D[idx] * w[idx, None, None]).reshape(-1, p).T @ Ak
            sq_g[k] = _sqnorm(gk)
            sq_u[k] = _sqnorm(uk)
            Sg += gk
            Su += uk
            if Se is not None:
                ek = (D[idx] * w_extra[idx, None, None].to(D.dtype)).reshape(-1, p).T @ Ak
                sq_e[k] = _sqnorm(ek)
                Se += ek
        tot_g = _sqnorm(Sg)
        tot_u = _sqnorm(Su)
        if Se is not None:
            extra = (sq_e, _sqnorm(Se))
    return TensorSums(**base, sq_g=sq_g, sq_unit=sq_u, total_sq_g=tot_g, total_sq_unit=tot_u), extra


# --------------------------------------------------------------------------------------------------
# formulas (shared by the fast route and the oracle's formatting)
# --------------------------------------------------------------------------------------------------
def _omega(n, sq_sum, sum_sq, sum_norm):
    """n (||sum g||^2 - sum||g||^2) / ((n-1) (sum||g||)^2); mean norm 0 -> divide by 1 (official code)."""
    if n < 2:
        return None
    pair_mean = (sq_sum - sum_sq) / (n * (n - 1))
    denom = (sum_norm / n) ** 2
    return float(pair_mean / (denom if denom > 0 else 1.0))


def _stiffness(n_nonzero, sq_unit):
    """Mean pairwise cosine over the m non-zero gradients: (||sum u||^2 - m) / (m (m-1)).

    A zero gradient has no direction: it is left out of the cosine mean (as in
    geomprobe.alignment) and counted in ``n_zero``; m < 2 -> None.
    """
    m = int(round(n_nonzero))
    if m < 2:
        return None
    return float((sq_unit - m) / (m * (m - 1)))


def _diversity(sum_sq, sq_sum):
    return float(sum_sq / sq_sum) if sq_sum > 0 else None


def _mean(values):
    vals = [v for v in values if v is not None]
    return float(sum(vals) / len(vals)) if vals else None


def _entry(classes, n_c, per_class_vals, overall, shape):
    """Format one tensor's result (plain JSON-able types; undefined values are None)."""
    per_class = {str(c): v for c, v in zip(classes, per_class_vals)}
    skipped = [int(c) for c, m in zip(classes, n_c) if m < 2]
    return {
        "shape": [int(s) for s in shape],
        **overall,
        "omega_in_class": _mean(v["omega"] for v in per_class_vals),
        "stiffness_in_class": _mean(v["stiffness"] for v in per_class_vals),
        "n_classes": len(classes),
        "classes_skipped": skipped,
        "per_class": per_class,
    }


def _summarise(classes, n, n_nonzero, sum_norm, sum_sq, sq_g, sq_u, tot_g, tot_u, shape):
    per = []
    for k in range(len(classes)):
        nk = int(round(n[k]))
        per.append({
            "n": nk,
            "omega": _omega(nk, sq_g[k], sum_sq[k], sum_norm[k]),
            "stiffness": _stiffness(n_nonzero[k], sq_u[k]),
            "n_zero": nk - int(round(n_nonzero[k])),
            "diversity": _diversity(sum_sq[k], sq_g[k]),
            "mean_norm": float(sum_norm[k] / nk),
        })
    N = int(round(n.sum()))
    overall = {
        "n": N,
        "mean_norm": float(sum_norm.sum() / N),
        "omega": _omega(N, tot_g, sum_sq.sum(), sum_norm.sum()),
        "stiffness": _stiffness(n_nonzero.sum(), tot_u),
        "n_zero": N - int(round(n_nonzero.sum())),
        "diversity": _diversity(sum_sq.sum(), tot_g),
    }
    return _entry(classes, [p["n"] for p in per], per, overall, shape)


# --------------------------------------------------------------------------------------------------
# public: fast route
# --------------------------------------------------------------------------------------------------
@dataclass
class GradientSums:
    """Mergeable per-tensor sums (``tensors[name] -> TensorSums`` with vectors kept).

    ``a.merge(b)`` (or ``a + b``) adds the sums of two batches / workers; ``stats()`` gives the same
    dict as :func:`gradient_stats` but for all merged examples together (a whole-dataset statistic,
    which differs from the mean of per-batch statistics).
    """

    tensors: dict[str, TensorSums] = field(default_factory=dict)

    def merge(self, other: "GradientSums") -> "GradientSums":
        if not self.tensors:
            return GradientSums(dict(other.tensors))
        if not other.tensors:
            return GradientSums(dict(self.tensors))
        if set(self.tensors) != set(other.tensors):
            raise InputError(
                f"cannot merge gradient sums over different tensors: {sorted(self.tensors)} vs {sorted(other.tensors)}"
            )
        return GradientSums({k: v.merge(other.tensors[k]) for k, v in self.tensors.items()})

    __add__ = merge

    def stats(self) -> dict[str, dict]:
        return {k: v.stats() for k, v in self.tensors.items()}


def _run(model, x, y, loss_fn, labels, modules, include_bias, include_logits, eval_mode, dtype, method,
         budget, keep_vectors, include_all=False) -> dict[str, TensorSums]:
    if method not in _METHODS:
        raise InputError(f"method must be one of {', '.join(map(repr, _METHODS))}; got {method!r}")
    n = _check_batch(x)
    if torch.is_tensor(y) and y.shape[0] != n:
        raise InputError(f"y has {y.shape[0]} rows but x has {n} rows")
    loss_fn = per_example_cross_entropy if loss_fn is None else loss_fn
    targets = _select_modules(model, modules)
    for name, m in targets:
        _check_conv(name, m)
    classes, codes = _class_codes(y, labels, n, x.device)
    with _mode(model, eval_mode):
        captures, logits, dlogits = _forward_backward(model, x, y, loss_fn, targets)
    out: dict[str, TensorSums] = {}
    kw = dict(method=method, budget=budget, keep_vectors=keep_vectors)

    def cast(t):
        return t if dtype is None else t.to(dtype)

    def tensors():
        """(key, D, A, shape) of every weight / bias tensor; unfolds again on each call (memory)."""
        for name, m in targets:
            if not captures[name]:
                continue  # module not called in this forward
            D, A = _factors(name, m, captures[name], n)
            D, A = cast(D), cast(A)
            yield _prefix(name) + "weight", D, A, m.weight.shape
            if include_bias and m.bias is not None:
                yield _prefix(name) + "bias", D.sum(1, keepdim=True), torch.ones(n, 1, 1, dtype=D.dtype,
                                                                                 device=D.device), m.bias.shape

    w_all = sq_all = None
    if include_all and not keep_vectors:
        sq_all = None
        for _, D, A, _ in tensors():
            sq = _sq_norms(D, A, budget).double()
            sq_all = sq if sq_all is None else sq_all + sq
    extras = []
    if sq_all is not None:
        norm_all = sq_all.sqrt()
        nz = norm_all > 0
        w_all = torch.where(nz, 1.0 / torch.where(nz, norm_all, torch.ones_like(norm_all)), torch.zeros_like(norm_all))
    for key, D, A, shape in tensors():
        out[key], extra = _tensor_sums(D, A, codes, classes, shape=shape, w_extra=w_all, **kw)
        extras.append(extra)
    if sq_all is not None and extras:
        K = len(classes)
        ts = list(out.values())

        def per_class(v):
            return torch.zeros(K, dtype=torch.float64, device=v.device).index_add_(0, codes, v).cpu().numpy()

        out["all"] = TensorSums(
            classes=classes, n=ts[0].n, n_nonzero=per_class(nz.double()), sum_norm=per_class(norm_all),
            sum_sq=per_class(sq_all), shape=(int(sum(int(np.prod(t.shape)) for t in ts)),),
            sq_g=np.sum([t.sq_g for t in ts], axis=0), sq_unit=np.sum([e[0] for e in extras], axis=0),
            total_sq_g=float(sum(t.total_sq_g for t in ts)), total_sq_unit=float(sum(e[1] for e in extras)),
        )
    if include_logits:
        Dz = cast(dlogits.reshape(n, 1, -1))
        ones = torch.ones(n, 1, 1, dtype=Dz.dtype, device=Dz.device)
        out["logits"], _ = _tensor_sums(Dz, ones, codes, classes, shape=logits.shape[1:], **kw)
    return out


def gradient_stats(
    model: nn.Module,
    x: torch.Tensor,
    y: Any,
    loss_fn: Callable[[torch.Tensor, Any], torch.Tensor] | None = None,
    *,
    labels: Any = None,
    modules: Iterable[Any] | None = None,
    include_bias: bool = True,
    include_logits: bool = True,
    include_all: bool = False,
    eval_mode: bool = True,
    dtype: torch.dtype | None = None,
    method: str = "auto",
    memory_budget: int = _DEFAULT_BUDGET,
) -> dict[str, dict]:
    """Per-tensor alignment statistics of one batch from one forward and one backward pass.

    ``loss_fn(output, y)`` must return per-example losses of shape (n,) (default: cross-entropy with
    ``reduction='none'``); ``labels`` groups examples into classes (default: ``y`` when it is a 1-D
    integer tensor). Tensors: the weight (and bias) of every nn.Linear / nn.Conv2d of ``modules``
    (default all) plus ``"logits"`` (the gradient w.r.t. the model output). For each tensor the result
    holds ``omega``, ``diversity``, ``stiffness`` and ``mean_norm`` over the whole batch,
    ``omega_in_class`` / ``stiffness_in_class`` (means over classes with >= 2 examples; None if none),
    ``classes_skipped`` (classes with < 2 examples, never counted as 0) and ``per_class``. Values that
    are undefined are None. Everything is a plain int / float / list / dict (JSON-able).
    ``include_all=True`` adds ``"all"``: the same statistics for the gradient of all selected weight
    and bias tensors concatenated (logits excluded).

    ``eval_mode=True`` (default) runs the pass with every submodule in eval mode and restores each
    one's flag afterwards; ``dtype`` (e.g. torch.float64) is the dtype the sums are formed in
    (default: that of the activations); ``method`` picks the batch-sum route ('auto', 'gram' for
    Linear layers, 'explicit'); ``memory_budget`` bounds the elements of per-chunk temporaries.
    """
    sums = _run(model, x, y, loss_fn, labels, modules, include_bias, include_logits, eval_mode, dtype,
                method, memory_budget, keep_vectors=False, include_all=include_all)
    return {k: v.stats() for k, v in sums.items()}


def gradient_sums(
    model: nn.Module,
    x: torch.Tensor,
    y: Any,
    loss_fn: Callable[[torch.Tensor, Any], torch.Tensor] | None = None,
    *,
    labels: Any = None,
    modules: Iterable[Any] | None = None,
    include_bias: bool = True,
    include_logits: bool = True,
    eval_mode: bool = True,
    dtype: torch.dtype | None = None,
    memory_budget: int = _DEFAULT_BUDGET,
) -> GradientSums:
    """Like :func:`gradient_stats` but returns mergeable sums (per-class sum g and sum g/||g||).

    Memory: two float64 vectors of the tensor's size per class present in the batch.
    """
    return GradientSums(_run(model, x, y, loss_fn, labels, modules, include_bias, include_logits,
                             eval_mode, dtype, "explicit", memory_budget, keep_vectors=True))


# --------------------------------------------------------------------------------------------------
# public: oracle (materialises per-example gradients)
# --------------------------------------------------------------------------------------------------
def _oracle_entry(V: torch.Tensor, codes: torch.Tensor, classes: list[int], shape) -> dict:
    """Statistics of explicit per-example vectors V (n, d) by their definitions (pairwise Gram)."""
    V = V.double()
    G = V @ V.T
    norms = torch.diagonal(G).clamp_min(0).sqrt()
    nz = norms > 0
    inv = torch.where(nz, 1.0 / torch.where(nz, norms, torch.ones_like(norms)), torch.zeros_like(norms))
    C = G * inv[:, None] * inv[None, :]

    def stats(idx):
        m = len(idx)
        Gs, Cs, ns = G[idx][:, idx], C[idx][:, idx], norms[idx]
        total = V[idx].sum(0)
        res = {"n": m, "mean_norm": float(ns.mean()), "n_zero": int((ns == 0).sum())}
        off = ~torch.eye(m, dtype=torch.bool, device=V.device)
        if m < 2:
            res["omega"] = None
        else:
            mean_norm = float(ns.mean())
            denom = mean_norm ** 2 if mean_norm > 0 else 1.0
            res["omega"] = float(Gs[off].mean()) / denom
        both = off & (ns > 0)[:, None] & (ns > 0)[None, :]  # pairs of non-zero gradients
        res["stiffness"] = float(Cs[both].mean()) if int(both.sum()) else None
        tot = float(total.pow(2).sum())
        res["diversity"] = float(ns.pow(2).sum()) / tot if tot > 0 else None
        return res

    per = [stats((codes == k).nonzero().squeeze(1)) for k in range(len(classes))]
    allst = stats(torch.arange(V.shape[0], device=V.device))
    overall = {k: allst[k] for k in ("n", "mean_norm", "omega", "stiffness", "n_zero", "diversity")}
    per = [{k: p[k] for k in ("n", "omega", "stiffness", "n_zero", "diversity", "mean_norm")} for p in per]
    return _entry(classes, [p["n"] for p in per], per, overall, shape)


def gradient_stats_oracle(
    model: nn.Module,
    x: torch.Tensor,
    y: Any,
    loss_fn: Callable[[torch.Tensor, Any], torch.Tensor] | None = None,
    *,
    labels: Any = None,
    modules: Iterable[Any] | None = None,
    include_bias: bool = True,
    include_logits: bool = True,
    include_all: bool = False,
    eval_mode: bool = True,
    how: str = "loop",
) -> dict[str, dict]:
    """Slow reference for :func:`gradient_stats`: materialises every per-example gradient.

    ``how='loop'`` runs one forward/backward per example; ``how='vmap'`` uses
    ``torch.func.vmap(torch.func.grad(...))`` (loss_fn must be vmappable). The statistics are then
    computed from their definitions (means over pairs i != j of the Gram / cosine matrix).
    Memory: n x (number of parameters) -- tests and benchmarks only.
    """
    if how not in ("loop", "vmap"):
        raise InputError(f"how must be one of 'loop', 'vmap'; got {how!r}")
    n = _check_batch(x)
    loss_fn = per_example_cross_entropy if loss_fn is None else loss_fn
    targets = _select_modules(model, modules)
    classes, codes = _class_codes(y, labels, n, x.device)
    names, params, shapes = [], [], []
    for name, m in targets:
        for pname in ("weight", "bias") if include_bias else ("weight",):
            p = getattr(m, pname)
            if p is not None:
                names.append(_prefix(name) + pname)
                params.append(p)
                shapes.append(tuple(p.shape))
    with _mode(model, eval_mode), torch.enable_grad():
        if how == "loop":
            per = [[] for _ in params]
            dz = []
            for i in range(n):
                out = model(x[i:i + 1])
                if not out.requires_grad:
                    out = out.detach().requires_grad_(True)
                li = loss_fn(out, y[i:i + 1]).sum()
                gs = torch.autograd.grad(li, params + [out], allow_unused=True)
                for j, p in enumerate(params):
                    per[j].append(torch.zeros_like(p).reshape(-1) if gs[j] is None else gs[j].reshape(-1))
                dz.append(gs[-1].reshape(-1))
            vecs = [torch.stack(v) for v in per]
            dlogits = torch.stack(dz)
        else:
            from torch.func import functional_call, grad, vmap

            pdict = {nm: p.detach() for nm, p in zip(names, params)}

            def f(pd, xi, yi):
                out = functional_call(model, pd, (xi[None],), strict=False)
                return loss_fn(out, yi[None]).sum()

            g = vmap(grad(f), in_dims=(None, 0, 0))(pdict, x, y)
            vecs = [g[nm].reshape(n, -1) for nm in names]
            z = model(x).detach()
            dlogits = vmap(grad(lambda zi, yi: loss_fn(zi[None], yi[None]).sum()))(z, y).reshape(n, -1)
            logits_shape = tuple(z.shape[1:])
    result = {nm: _oracle_entry(V, codes, classes, s) for nm, V, s in zip(names, vecs, shapes)}
    if include_all and vecs:
        Vall = torch.cat(vecs, dim=1)
        result["all"] = _oracle_entry(Vall, codes, classes, (Vall.shape[1],))
    if include_logits:
        shape = logits_shape if how == "vmap" else None
        if shape is None:
            with _mode(model, eval_mode), torch.no_grad():
                shape = tuple(model(x[:1]).shape[1:])
        result["logits"] = _oracle_entry(dlogits, codes, classes, shape)
    return result


# --------------------------------------------------------------------------------------------------
# label-dependent / label-independent gradient split (Stephenson et al. 2021, Claim 1)
# --------------------------------------------------------------------------------------------------
def _named_params(model: nn.Module, parameters: Iterable[str] | None) -> list[tuple[str, torch.Tensor]]:
    allp = dict(model.named_parameters())
    if parameters is None:
        return [(k, p) for k, p in allp.items() if p.requires_grad]
    out = []
    for k in parameters:
        if k not in allp:
            raise InputError(f"parameters: model has no parameter named {k!r}")
        out.append((k, allp[k]))
    return out


def _label_distribution(y: Any, n: int, C: int, like: torch.Tensor) -> torch.Tensor:
    if not torch.is_tensor(y):
        y = torch.as_tensor(np.asarray(y))
    if y.ndim == 1 and not torch.is_floating_point(y):
        if y.shape[0] != n:
            raise InputError(f"y has {y.shape[0]} entries but x has {n} rows")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= C):
            raise InputError(f"y must hold class indices in [0, {C}), got values in [{int(y.min())}, {int(y.max())}]")
        return F.one_hot(y.to(like.device).long(), C).to(like.dtype)
    if y.ndim == 2:
        if tuple(y.shape) != (n, C):
            raise InputError(f"y (one-hot / label distribution) must have shape ({n}, {C}), got {tuple(y.shape)}")
        P = y.to(device=like.device, dtype=like.dtype)
        rows = P.sum(1)
        bad = (rows - 1).abs() > 1e-6 * C
        if bool(bad.any()) or bool((P < 0).any()):
            i = int(bad.nonzero()[0]) if bool(bad.any()) else int((P < 0).any(1).nonzero()[0])
            raise InputError(
                f"y rows must be probability distributions (>= 0, summing to 1); row {i} sums to {float(rows[i])}"
            )
        return P
    raise InputError(f"y must be 1-D integer labels or a 2-D (n, C) label distribution, got shape {tuple(y.shape)}")


def _split_from_logits(logits, params, P_L, weights):
    p = torch.softmax(logits.detach(), dim=1)
    w = weights[:, None]
    dep = torch.autograd.grad(logits, params, grad_outputs=-P_L * w, retain_graph=True, allow_unused=True)
    ind = torch.autograd.grad(logits, params, grad_outputs=p * w, retain_graph=True, allow_unused=True)
    fix = lambda gs: [torch.zeros_like(q) if g is None else g for g, q in zip(gs, params)]  # noqa: E731
    return fix(dep), fix(ind)


def gradient_split(
    model: nn.Module,
    x: torch.Tensor,
    y: Any,
    *,
    parameters: Iterable[str] | None = None,
    eval_mode: bool = True,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split the mean cross-entropy gradient into label-dependent and label-independent parts.

    grad L = -<sum_c P_L(c|x) grad N_c(x)> + <sum_c P_M(c|x) grad N_c(x)>  (Claim 1): two backward
    passes from the logits with cotangents -P_L/n and softmax(logits)/n (detached). ``y`` is integer
    labels or an (n, C) label distribution (rows summing to 1). Returns (label_dependent,
    label_independent), each ``{parameter name: tensor}``; their sum is the gradient of
    ``F.cross_entropy(model(x), y)`` (mean reduction).
    """
    n = _check_batch(x)
    named = _named_params(model, parameters)
    params = [p for _, p in named]
    with _mode(model, eval_mode), torch.enable_grad():
        logits = model(x)
        if logits.ndim != 2:
            raise InputError(f"model output must be (n, C) logits, got shape {tuple(logits.shape)}")
        P_L = _label_distribution(y, n, logits.shape[1], logits)
        weights = torch.full((n,), 1.0 / n, dtype=logits.dtype, device=logits.device)
        dep, ind = _split_from_logits(logits, params, P_L, weights)
    names = [k for k, _ in named]
    return dict(zip(names, dep)), dict(zip(names, ind))


def gradient_split_norms(
    model: nn.Module,
    x: torch.Tensor,
    y: Any,
    subsets: Mapping[str, Any],
    *,
    parameters: Iterable[str] | None = None,
    normalize: str = "total",
    eval_mode: bool = True,
) -> dict[str, dict]:
    """Norms of each subset's label-dependent, label-independent and full gradient contribution.

    ``subsets`` maps a name to a boolean mask or index array over the rows of x (e.g.
    ``{"unpermuted": ~perm, "permuted": perm}``). ``normalize='total'`` weights every example by
    1/n (the subsets' contributions of a partition add up to the full mean gradient);
    ``'subset'`` weights by 1/|S| (each subset's own mean gradient). Returns
    ``{subset: {"n", "dependent": {param: norm}, "independent": {...}, "full": {...},
    "dependent_total", "independent_total", "full_total"}}`` (totals over all parameters together).
    """
    if normalize not in ("total", "subset"):
        raise InputError(f"normalize must be one of 'total', 'subset'; got {normalize!r}")
    n = _check_batch(x)
    named = _named_params(model, parameters)
    params = [p for _, p in named]
    names = [k for k, _ in named]
    out = {}
    with _mode(model, eval_mode), torch.enable_grad():
        logits = model(x)
        if logits.ndim != 2:
            raise InputError(f"model output must be (n, C) logits, got shape {tuple(logits.shape)}")
        P_L = _label_distribution(y, n, logits.shape[1], logits)
        for sname, sel in subsets.items():
            sel_t = torch.as_tensor(np.asarray(sel.cpu() if torch.is_tensor(sel) else sel))
            if sel_t.dtype == torch.bool:
                if sel_t.shape != (n,):
                    raise InputError(f"subset {sname!r}: boolean mask has shape {tuple(sel_t.shape)}, need ({n},)")
                mask = sel_t
            else:
                if sel_t.numel() and (int(sel_t.min()) < -n or int(sel_t.max()) >= n):
                    raise InputError(f"subset {sname!r}: index out of range for {n} rows")
                mask = torch.zeros(n, dtype=torch.bool)
                mask[sel_t.long()] = True
            m = int(mask.sum())
            mask = mask.to(logits.device)
            scale = 1.0 / n if normalize == "total" else (1.0 / m if m else 0.0)
            weights = mask.to(logits.dtype) * scale
            dep, ind = _split_from_logits(logits, params, P_L, weights)
            full = [a + b for a, b in zip(dep, ind)]
            entry: dict[str, Any] = {"n": m}
            for part, gs in (("dependent", dep), ("independent", ind), ("full", full)):
                sq = [float(g.double().pow(2).sum()) for g in gs]
                entry[part] = {k: math.sqrt(s) for k, s in zip(names, sq)}
                entry[part + "_total"] = math.sqrt(sum(sq))
            out[str(sname)] = entry
    return out


# --------------------------------------------------------------------------------------------------
# normalised loss (Liao et al. 2018) and relative weight distance
# --------------------------------------------------------------------------------------------------
def normalized_loss(
    model: nn.Module,
    x: torch.Tensor,
    y: Any,
    layers: Iterable[Any] | None = None,
    *,
    eval_mode: bool = True,
) -> dict[str, Any]:
    """Cross-entropy of f(x) / prod_k ||W_k||_F over the weight tensors of ``layers``.

    ``layers`` are nn.Linear / nn.Conv2d submodules (names or objects; default all of them). Only for
    bias-free, positively homogeneous nets (ReLU / linear, no normalisation layers) is the result
    invariant to rescaling layers, i.e. equal to the loss of the net with every W_k / ||W_k||_F.
    ``has_bias`` in the result flags selected layers that carry a bias (then it is not invariant).
    Returns plain floats: loss, normalized_loss, norm_product, log_norm_product, accuracy,
    layer_norms {name: ||W||_F}, has_bias. normalized_loss / norm_product / log_norm_product are None
    when a selected weight is all zeros (norm_product also when it overflows float64).
    """
    n = _check_batch(x)
    targets = _select_modules(model, layers)
    if not targets:
        raise InputError("normalized_loss: the model has no nn.Linear / nn.Conv2d layer to normalise by")
    with _mode(model, eval_mode), torch.no_grad():
        out = model(x)
        if out.ndim != 2:
            raise InputError(f"model output must be (n, C) logits, got shape {tuple(out.shape)}")
        if not torch.is_tensor(y):
            y = torch.as_tensor(np.asarray(y))
        if y.ndim != 1 or y.shape[0] != n or torch.is_floating_point(y):
            raise InputError(f"y must be 1-D integer labels with {n} entries, got shape {tuple(y.shape)}")
        y = y.to(out.device).long()
        norms = {_prefix(name) + "weight": float(m.weight.detach().double().norm()) for name, m in targets}
        log_rho = sum(math.log(v) if v > 0 else -math.inf for v in norms.values())
        out64 = out.double()
        loss = float(F.cross_entropy(out64, y))
        nloss = float(F.cross_entropy(out64 * math.exp(-log_rho), y)) if math.isfinite(log_rho) else None
        acc = float((out.argmax(1) == y).double().mean())
    return {
        "loss": loss,
        "normalized_loss": nloss,
        # None where not a finite float (a zero weight tensor, or a product beyond float64)
        "norm_product": math.exp(log_rho) if math.isfinite(log_rho) and log_rho < 709 else None,
        "log_norm_product": log_rho if math.isfinite(log_rho) else None,
        "accuracy": acc,
        "layer_norms": norms,
        "has_bias": any(m.bias is not None for _, m in targets),
    }


def _as_tensors(obj: Any, name: str, parameters_only: bool) -> dict[str, torch.Tensor]:
    if isinstance(obj, nn.Module):
        items = obj.named_parameters() if parameters_only else obj.state_dict().items()
    elif isinstance(obj, Mapping):
        items = obj.items()
    else:
        raise InputError(f"{name} must be an nn.Module or a mapping name -> tensor, got {type(obj).__name__}")
    out = {}
    for k, v in items:
        t = v if torch.is_tensor(v) else torch.as_tensor(np.asarray(v))
        if torch.is_floating_point(t):
            out[k] = t.detach()
    return out


def relative_weight_distance(
    model_or_state: Any,
    init_state: Any,
    *,
    parameters_only: bool = True,
) -> dict[str, float | None]:
    """||W_t - W_0||_F / ||W_0||_F per floating-point tensor (Identity Crisis, appendix D).

    ``model_or_state``: an nn.Module (its parameters; with ``parameters_only=False`` its whole
    state_dict) or a mapping name -> tensor/array; ``init_state``: the same at initialisation (a
    state_dict or a module). Every tensor of the first must be in the second with the same shape.
    A tensor whose initial norm is 0 (e.g. a zero-initialised bias) gets None, not a number.
    """
    cur = _as_tensors(model_or_state, "model_or_state", parameters_only)
    init = _as_tensors(init_state, "init_state", False)
    out: dict[str, float | None] = {}
    for k, w in cur.items():
        if k not in init:
            raise InputError(f"init_state has no tensor named {k!r} (it has {len(init)} tensors)")
        w0 = init[k]
        if tuple(w0.shape) != tuple(w.shape):
            raise InputError(f"tensor {k!r} has shape {tuple(w.shape)} but init_state has {tuple(w0.shape)}")
        w0 = w0.to(device=w.device, dtype=torch.float64)
        base = float(w0.norm())
        out[k] = float((w.double() - w0).norm()) / base if base > 0 else None
    return out
