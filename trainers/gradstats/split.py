"""Label-dependent / label-independent gradient split (Stephenson et al. 2021, Claim 1), and the torch
side of the normalised loss (Liao et al. 2018) and of the relative weight distance: these compute
tensors (logits, norms) and call the formulas of :mod:`geomprobe.weights`."""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from geomprobe._validation import InputError

from .engine import eval_mode_ctx, resolve_modules
from .oneshot import _check_batch

__all__ = ["gradient_split", "gradient_split_norms", "normalized_loss", "relative_weight_distance"]


def _mode(model, eval_mode):
    return eval_mode_ctx(model, eval_mode, per_example=False)


def _prefix(name: str) -> str:
    return f"{name}." if name else ""


def _select_modules(model: nn.Module, modules: Iterable[Any] | None) -> list[tuple[str, nn.Module]]:
    named = list(model.named_modules())
    if modules is None:
        return [(n, m) for n, m in named if isinstance(m, (nn.Linear, nn.Conv2d))]
    out = []
    for name, mod in resolve_modules(named, modules):
        if not isinstance(mod, (nn.Linear, nn.Conv2d)):
            raise InputError(
                f"modules: {name!r} is a {type(mod).__name__}; only nn.Linear and nn.Conv2d are supported"
            )
        out.append((name, mod))
    return out


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

    The torch side of :func:`geomprobe.weights.normalized_loss` (one home of the formula): this runs
    the model and takes the Frobenius norms, then hands the float64 logits and the norms to the core.
    ``layers`` are nn.Linear / nn.Conv2d submodules (names or objects; default all of them). Only for
    bias-free, positively homogeneous nets (ReLU / linear, no normalisation layers) is the result
    invariant to rescaling layers, i.e. equal to the loss of the net with every W_k / ||W_k||_F.
    ``has_bias`` in the result flags selected layers that carry a bias (then it is not invariant).
    Returns plain floats: loss, normalized_loss, norm_product, log_norm_product, accuracy,
    layer_norms {name: ||W||_F}, has_bias. A selected weight that is all zeros, or a norm product
    beyond float64, is an InputError (the normalised loss is undefined there), never None.
    """
    from geomprobe.weights import log_norm_product
    from geomprobe.weights import normalized_loss as core_normalized_loss

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
        acc = float((out.argmax(1) == y).double().mean())
        logits = out.double().cpu().numpy()
    log_rho = log_norm_product(norms)
    res = core_normalized_loss(logits, y.cpu().numpy(), norms=list(norms.values()))
    return {
        "loss": res.unnormalized_loss,
        "normalized_loss": res.loss,
        "norm_product": res.norm_product,
        "log_norm_product": log_rho,
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
    """Deprecated: use :func:`geomprobe.trainers.checkpoint.relative_weight_distance` (initial state
    first, like :func:`geomprobe.weights.weight_distance`).

    ||W_t - W_0||_F / ||W_0||_F per floating-point tensor (Identity Crisis, appendix D) through the
    core's :func:`geomprobe.weights.relative_distance` (one formula, one zero-norm rule: None where
    ||W_0||_F = 0). ``model_or_state``: an nn.Module (its parameters; with ``parameters_only=False``
    its whole state_dict) or a mapping name -> tensor/array; ``init_state``: the same at
    initialisation. Every tensor of the first must be in the second with the same shape.
    """
    import warnings

    from geomprobe.weights import relative_distance

    warnings.warn("gradstats.relative_weight_distance(current, init) is deprecated; use "
                  "geomprobe.trainers.checkpoint.relative_weight_distance(initial, current)",
                  DeprecationWarning, stacklevel=2)
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
        out[k] = relative_distance(float((w.double() - w0).norm()), float(w0.norm()))
    return out
