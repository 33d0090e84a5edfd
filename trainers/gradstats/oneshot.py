"""One-shot conveniences over the recorder (one forward, one backward to the layer outputs, parameter
``.grad`` untouched), the per-example oracle, and the per-example gradient writer."""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from geomprobe._validation import InputError

from .engine import DEFAULT_BUDGET, eval_mode_ctx, select_targets
from .recorder import GradientRecorder, class_codes
from .sums import GradientSums, entry

__all__ = ["gradient_stats", "gradient_sums", "gradient_stats_oracle", "per_example_norms",
           "write_gradients", "per_example_cross_entropy"]


def per_example_cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with ``reduction='none'``: the default per-example loss."""
    return F.cross_entropy(logits, y, reduction="none")


def _check_batch(x: Any, name: str = "x") -> int:
    if not torch.is_tensor(x) or x.ndim < 1:
        raise InputError(f"{name} must be a torch tensor with a leading batch dimension, got {type(x).__name__}")
    if x.shape[0] < 1:
        raise InputError(f"{name} must have at least 1 row, got shape {tuple(x.shape)}")
    return int(x.shape[0])


def _default_labels(y: Any, labels: Any):
    if labels is not None:
        return labels
    if not (torch.is_tensor(y) and y.ndim == 1 and not torch.is_floating_point(y)):
        shape = tuple(y.shape) if hasattr(y, "shape") else type(y).__name__
        raise InputError(f"labels is required when y is not a 1-D integer tensor of class labels (y has shape {shape})")
    return y


def _record(model, x, y, loss_fn, *, labels, eval_mode, **opts) -> GradientRecorder:
    """Run one forward and one backward of sum_i loss_fn(out, y)_i under a recorder."""
    n = _check_batch(x)
    if torch.is_tensor(y) and y.ndim >= 1 and y.shape[0] != n:
        raise InputError(f"y has {y.shape[0]} rows but x has {n} rows")
    loss_fn = per_example_cross_entropy if loss_fn is None else loss_fn
    labels = _default_labels(y, labels)
    class_codes(labels, n, "cpu", opts.get("num_classes"))  # validate before any work
    with eval_mode_ctx(model, eval_mode):
        rec = GradientRecorder(model, labels=labels, loss_scale="sum", **opts)
        rec._one_shot = True
        with rec, torch.enable_grad():
            out = model(x)
            if not torch.is_tensor(out):
                raise InputError(f"model output must be a tensor, got {type(out).__name__}")
            losses = loss_fn(out, y)
            if not torch.is_tensor(losses) or tuple(losses.shape) != (n,):
                shape = tuple(losses.shape) if torch.is_tensor(losses) else type(losses).__name__
                raise InputError(
                    f"loss_fn must return per-example losses of shape ({n},) (reduction='none'), got {shape}")
            watched = [t for t in rec.cap.watched if t.requires_grad]
            if watched:
                torch.autograd.grad(losses.sum(), watched, allow_unused=True)
    return rec


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
    memory_budget: int = DEFAULT_BUDGET,
    per_example_norms: bool = False,
    skip_unsupported: bool = False,
    num_classes: int | None = None,
    batch_dims: dict | None = None,
) -> dict[str, dict]:
    """Per-tensor alignment statistics of one batch from one forward and one backward pass.

    ``loss_fn(output, y)`` must return per-example losses of shape (n,) (default: cross-entropy with
    ``reduction='none'``); ``labels`` groups examples into classes (default: ``y`` when it is a 1-D
    integer tensor). Tensors: every trainable parameter of the modules a rule covers (Linear,
    Conv1d/2d/3d, Embedding, LayerNorm, GroupNorm, RMSNorm, BatchNorm in eval mode,
    MultiheadAttention; :func:`register_rule` adds more) plus ``"logits"``. A module with trainable
    parameters and no rule raises, unless ``skip_unsupported=True`` (then ``"skipped_modules"``
    lists it). Per tensor: ``omega``, ``diversity``, ``stiffness``, ``mean_norm``, ``n_zero``,
    ``omega_in_class`` / ``stiffness_in_class``, ``classes_skipped``, ``per_class``; with
    ``per_example_norms=True`` also ``norms`` (n floats). Undefined values are None (JSON-able).
    ``include_all=True`` adds ``"all"`` (all selected tensors concatenated, logits excluded).
    This is :func:`recorder` around ``sum_i loss_i`` in eval mode (``eval_mode=True``: each
    submodule's flag restored afterwards); parameter ``.grad`` is not touched.
    """
    rec = _record(model, x, y, loss_fn, labels=labels, eval_mode=eval_mode, modules=modules,
                  include_bias=include_bias, include_logits=include_logits, include_all=include_all,
                  dtype=dtype, method=method, memory_budget=memory_budget, skip_unsupported=skip_unsupported,
                  num_classes=num_classes, batch_dims=batch_dims)
    return rec.stats(per_example_norms=per_example_norms)


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
    memory_budget: int = DEFAULT_BUDGET,
    skip_unsupported: bool = False,
) -> GradientSums:
    """Like :func:`gradient_stats` but returns mergeable sums (per-class sum g and sum g/||g||).

    Memory: two float64 vectors of the tensor's size per class present in the batch.
    """
    rec = _record(model, x, y, loss_fn, labels=labels, eval_mode=eval_mode, modules=modules,
                  include_bias=include_bias, include_logits=include_logits, dtype=dtype,
                  memory_budget=memory_budget, skip_unsupported=skip_unsupported)
    return GradientSums(rec.sums(keep_vectors=True))


def per_example_norms(
    model: nn.Module,
    x: torch.Tensor,
    y: Any,
    loss_fn: Callable[[torch.Tensor, Any], torch.Tensor] | None = None,
    *,
    by: str = "tensor",
    modules: Iterable[Any] | None = None,
    include_bias: bool = True,
    eval_mode: bool = True,
    dtype: torch.dtype | None = None,
    skip_unsupported: bool = False,
) -> dict[str, torch.Tensor]:
    """Per-example gradient norms ||g_i|| (float64 (n,) tensors on the model's device) of the
    per-example losses, ``by='tensor'`` (``{parameter name: norms}``, plus ``"logits"``) or
    ``by='layer'`` (``{module name: norms over all its tensors}``), without per-example gradients."""
    if by not in ("tensor", "layer"):
        raise InputError(f"by must be one of 'tensor', 'layer'; got {by!r}")
    n = _check_batch(x)
    rec = _record(model, x, y, loss_fn, labels=np.zeros(n, np.int64), eval_mode=eval_mode, modules=modules,
                  include_bias=include_bias, include_logits=by == "tensor", dtype=dtype,
                  skip_unsupported=skip_unsupported)
    return rec.norms() if by == "tensor" else rec.layer_norms()


# --------------------------------------------------------------------------------------------------
# writer: per-example gradients (or norms) of a user's model into grad/<layer>/<tensor>
# --------------------------------------------------------------------------------------------------
def _batches(data):
    for i, b in enumerate(data):
        if isinstance(b, dict):
            x, y, lab = b.get("x", b.get("input")), b.get("y", b.get("label")), b.get("labels")
        elif isinstance(b, (tuple, list)) and len(b) in (2, 3):
            x, y, lab = b[0], b[1], (b[2] if len(b) == 3 else None)
        else:
            raise InputError(f"batch {i}: expected (x, y), (x, y, labels) or a dict with 'x' and 'y', "
                             f"got {type(b).__name__}")
        yield i, x, y, lab


def write_gradients(
    path: str | os.PathLike,
    model: nn.Module,
    data: Iterable,
    loss_fn: Callable[[torch.Tensor, Any], torch.Tensor] | None = None,
    *,
    what: str = "gradients",
    modules: Iterable[Any] | None = None,
    include_bias: bool = True,
    eval_mode: bool = True,
    device: Any = None,
    out_dtype: Any = np.float32,
    meta: dict | None = None,
    force: bool = False,
    skip_unsupported: bool = False,
    memory_budget: int = DEFAULT_BUDGET,
) -> os.PathLike:
    """Stream per-example gradients of ``model`` over ``data`` into an activations file.

    ``data``: batches ``(x, y)``, ``(x, y, labels)`` or dicts (a DataLoader works); ``labels``
    (default ``y``) are the file's class labels. Each tensor of each covered module becomes
    ``grad/<module>/<parameter>`` (e.g. ``grad/fc1/weight``, (n, 256, 784));
    ``what='norms'`` stores ``grad/<module>/<parameter>.norm`` (n, 1) instead (the per-example norms,
    no gradient is materialised). Per-example loss: ``loss_fn(out, y)`` of shape (n,) (default
    cross-entropy, sum reduction: g_i is the gradient of example i's loss). Batches are appended to a
    :class:`geomprobe.writer.ActivationWriter` as they come (peak memory: one batch's gradients,
    materialised in chunks of ``memory_budget`` elements) and the file is finalised atomically.
    """
    from geomprobe.writer import ActivationWriter

    if what not in ("gradients", "norms"):
        raise InputError(f"what must be one of 'gradients', 'norms'; got {what!r}")
    out_dtype = np.dtype(out_dtype)
    if out_dtype not in (np.float16, np.float32, np.float64):
        raise InputError(f"out_dtype must be float16, float32 or float64, got {out_dtype}")
    targets, _ = select_targets(model, modules, skip_unsupported)
    owner = sorted(((t.name, t) for t in targets), key=lambda kv: -len(kv[0]))

    def split(key):
        for name, _ in owner:
            if name and key.startswith(name + "."):
                return name, key[len(name) + 1:]
        return "root", key

    if device is not None:
        model = model.to(device)
    with ActivationWriter(path, meta={"gradients": what, **(meta or {})}, force=force) as w:
        for i, x, y, lab in _batches(data):
            if device is not None:
                x = x.to(device)
                y = y.to(device) if torch.is_tensor(y) else y
            labels = _default_labels(y, lab)
            lab_np = labels.detach().cpu().numpy() if torch.is_tensor(labels) else np.asarray(labels)
            rec = _record(model, x, y, loss_fn, labels=lab_np, eval_mode=eval_mode, modules=modules,
                          include_bias=include_bias, include_logits=False, memory_budget=memory_budget,
                          skip_unsupported=skip_unsupported)
            if what == "norms":
                grads: dict[str, dict] = {}
                for k, v in rec.norms().items():
                    layer, t = split(k)
                    grads.setdefault(layer, {})[t + ".norm"] = v.cpu().numpy().astype(out_dtype)[:, None]
                w.append(lab_np, {}, grads=grads)
                continue
            for a, chunk in rec.per_example_gradients():
                grads = {}
                for k, g in chunk.items():
                    layer, t = split(k)
                    grads.setdefault(layer, {})[t] = g.detach().cpu().numpy().astype(out_dtype, copy=False)
                m = next(iter(chunk.values())).shape[0]
                w.append(lab_np[a:a + m], {}, grads=grads)
    return w.path


# --------------------------------------------------------------------------------------------------
# oracle (materialises per-example gradients)
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

    keys = ("n", "omega", "stiffness", "n_zero", "diversity", "mean_norm")
    per = [{k: v for k, v in stats((codes == c).nonzero().squeeze(1)).items() if k in keys}
           for c in range(len(classes))]
    allst = stats(torch.arange(V.shape[0], device=V.device))
    overall = {k: allst[k] for k in ("n", "mean_norm", "omega", "stiffness", "n_zero", "diversity")}
    return entry(classes, [{k: p[k] for k in keys} for p in per], overall, shape)


def oracle_gradients(model, x, y, loss_fn=None, *, modules=None, include_bias=True, eval_mode=True,
                     how="loop", skip_unsupported=False):
    """(names, [per-example gradients (n, *shape)], per-example logits gradients (n, ...)) by
    materialising every g_i: one backward per example (``how='loop'``) or torch.func.vmap(grad)."""
    if how not in ("loop", "vmap"):
        raise InputError(f"how must be one of 'loop', 'vmap'; got {how!r}")
    n = _check_batch(x)
    loss_fn = per_example_cross_entropy if loss_fn is None else loss_fn
    targets, _ = select_targets(model, modules, skip_unsupported)
    names, params = [], []
    for t in targets:
        for pn, p in t.module.named_parameters():
            if p.requires_grad and (include_bias or "bias" not in pn.rsplit(".", 1)[-1]):
                names.append((f"{t.name}." if t.name else "") + pn)
                params.append(p)
    with eval_mode_ctx(model, eval_mode), torch.enable_grad():
        if how == "loop":
            per = [[] for _ in params]
            dz = []
            for i in range(n):
                out = model(x[i:i + 1])
                li = loss_fn(out, y[i:i + 1]).sum()
                gs = torch.autograd.grad(li, params + [out], allow_unused=True)
                for j, p in enumerate(params):
                    per[j].append(torch.zeros_like(p) if gs[j] is None else gs[j])
                dz.append(gs[-1][0])
            return names, [torch.stack(v) for v in per], torch.stack(dz)
        from torch.func import functional_call, grad, vmap

        pdict = {nm: p.detach() for nm, p in zip(names, params)}

        def f(pd, xi, yi):
            out = functional_call(model, pd, (xi[None],), strict=False)
            return loss_fn(out, yi[None]).sum()

        g = vmap(grad(f), in_dims=(None, 0, 0))(pdict, x, y)
        z = model(x).detach()
        dz = vmap(grad(lambda zi, yi: loss_fn(zi[None], yi[None]).sum()))(z, y)
        return names, [g[nm] for nm in names], dz


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
    skip_unsupported: bool = False,
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
    classes, codes = class_codes(_default_labels(y, labels), n, x.device, None)
    names, grads, dz = oracle_gradients(model, x, y, loss_fn, modules=modules, include_bias=include_bias,
                                        eval_mode=eval_mode, how=how, skip_unsupported=skip_unsupported)
    vecs = [g.reshape(n, -1) for g in grads]
    result = {nm: _oracle_entry(V, codes, classes, tuple(g.shape[1:])) for nm, V, g in zip(names, vecs, grads)}
    if include_all and vecs:
        Vall = torch.cat(vecs, dim=1)
        result["all"] = _oracle_entry(Vall, codes, classes, (Vall.shape[1],))
    if include_logits:
        result["logits"] = _oracle_entry(dz.reshape(n, -1), codes, classes, tuple(dz.shape[1:]))
    return result
