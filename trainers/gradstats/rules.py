"""Per-example gradient rules: how a module's per-example parameter gradients follow from what the
step computes anyway (its inputs and the gradient of the loss with respect to its output).

A rule returns, per parameter, one of three exact factorisations of the per-example gradient g_i:

* :class:`Factors` ``(D, A)``: ``g_i = D_i^T A_i`` with ``D`` (n, T, p) and ``A`` (n, T, q) (or
  (n, G, T, p) / (n, G, T, q) for G independent groups, the gradient being the G blocks stacked):
  Linear (T = sequence positions), ConvNd (T = output positions, A = unfolded input), attention
  projections;
* :class:`Explicit` ``V``: the per-example gradients themselves, (n, ...) (cheap for small tensors:
  biases, normalisation layers);
* :class:`Scatter` ``(idx, D, num)``: ``g_i`` has row ``idx[i, t]`` += ``D[i, t]`` (Embedding).

A user adds a module type with :func:`register_rule`. The functions here only reshape; the
statistics are formed in :mod:`.engine`.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from geomprobe._validation import InputError

__all__ = ["Factors", "Explicit", "Scatter", "register_rule", "rule_for", "RULES", "batch_first"]


@dataclass
class Factors:
    """g_i = D_i^T A_i (summed over the T positions); D (n, [G,] T, p), A (n, [G,] T, q).
    The tensor (or its slice ``rows``) has shape (G * p, q) in row-major order."""

    D: torch.Tensor
    A: torch.Tensor
    rows: tuple[int, int] | None = None  # a slice of the parameter's first dimension

    def __post_init__(self):
        if self.D.ndim == 3:
            self.D, self.A = self.D[:, None], self.A[:, None]


class ConvFactors(Factors):
    """Factors of a ConvNd weight whose A (the unfolded input) is formed only if a route asks for it;
    per-example gradients come from the convolution's own weight-gradient kernel with the examples
    as groups (:meth:`per_example`), without unfolding."""

    def __init__(self, D: torch.Tensor, x: torch.Tensor, d: torch.Tensor, module: nn.Module):
        self.D, self.rows = D, None
        self._x, self._d, self._m, self._A = x, d, module, None

    @property
    def A(self) -> torch.Tensor:
        if self._A is None:
            self._A = unfold_conv_input(self._m, self._x)
        return self._A

    def to(self, dtype):
        return ConvFactors(self.D.to(dtype), self._x.to(dtype), self._d.to(dtype), self._m)

    def per_example(self, idx: torch.Tensor | slice, any_order: bool = False) -> torch.Tensor:
        """(k, numel) per-example weight gradients of the examples ``idx`` (indices, or a slice: no copy).
        ``any_order=True``: each row's entries in the kernel's memory order (norms and sums of rows do not
        depend on it; saves a transposing copy when the kernel returns channels-last weights)."""
        m = self._m
        nd = len(m.kernel_size)
        x, d = self._x[idx], self._d[idx]
        k = x.shape[0]
        pad = tuple(m._reversed_padding_repeated_twice)
        sym = all(pad[2 * i] == pad[2 * i + 1] for i in range(nd))
        if m.padding_mode == "zeros" and sym:  # the kernel pads (no padded copy of the input)
            conv_pad = list(pad[0::2][::-1])
        else:
            conv_pad = [0] * nd
            if any(pad):
                x = F.pad(x, pad, mode="constant" if m.padding_mode == "zeros" else m.padding_mode)
        w = m.weight
        # only the weight's shape matters for the weight gradient (no input gradient is asked for): an
        # uninitialised stand-in, not k copies of the weight (the kernel makes its weight contiguous)
        wk = d.new_empty((k * w.shape[0], *w.shape[1:]))
        gw = torch.ops.aten.convolution_backward(
            d.reshape(1, k * d.shape[1], *d.shape[2:]), x.reshape(1, k * x.shape[1], *x.shape[2:]), wk, None,
            list(m.stride), conv_pad, list(m.dilation), False, [0] * nd, k * m.groups, [False, True, False])[1]
        if any_order and not gw.is_contiguous():
            order = sorted(range(gw.ndim), key=lambda i: -gw.stride(i))  # dimensions by memory order
            if order[0] == 0:
                gw = gw.permute(order)  # a contiguous view when the strides are dense
        return gw.reshape(k, -1)


@dataclass
class Explicit:
    """The per-example gradients themselves, (n, ...) with the parameter's (or slice's) shape."""

    V: torch.Tensor
    rows: tuple[int, int] | None = None


@dataclass
class Scatter:
    """g_i[idx[i, t]] += D[i, t]: idx (n, T) integer rows of a (num, dim) parameter, D (n, T, dim)."""

    idx: torch.Tensor
    D: torch.Tensor
    num: int


Rule = Callable[..., dict]
RULES: dict[type, Rule] = {}


def register_rule(module_type: type, fn: Rule | None = None):
    """Register ``fn(module, inputs, output, grad_output, batch_dim)`` for ``module_type`` (and
    subclasses). ``inputs`` is the tuple of the forward's positional inputs, ``output`` its output and
    ``grad_output`` the gradient of the recorded loss with respect to it (all detached);
    ``batch_dim`` is where the examples are in these tensors (0, or 1 inside a sequence-first
    transformer). ``fn`` returns ``{parameter name: Factors | Explicit | Scatter}`` with the batch as
    the first dimension (use :func:`batch_first`). Usable as a decorator. Returns ``fn``.
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise InputError(f"register_rule needs an nn.Module subclass, got {module_type!r}")

    def deco(f):
        if not callable(f):
            raise InputError(f"register_rule: rule for {module_type.__name__} must be callable, got {f!r}")
        RULES[module_type] = f
        return f

    return deco if fn is None else deco(fn)


def rule_for(module: nn.Module) -> Rule | None:
    """The rule of the nearest registered class in the module's MRO (None if none)."""
    for cls in type(module).__mro__:
        if cls in RULES:
            return RULES[cls]
    return None


def batch_first(t: torch.Tensor, batch_dim: int) -> torch.Tensor:
    return t if batch_dim == 0 else t.movedim(batch_dim, 0)


def _rows3(t: torch.Tensor) -> torch.Tensor:
    """(n, ..., f) -> (n, T, f)."""
    return t.reshape(t.shape[0], -1, t.shape[-1])


# --------------------------------------------------------------------------------------------------
# Linear
# --------------------------------------------------------------------------------------------------
@register_rule(nn.Linear)
def linear_rule(m, inputs, output, grad, batch_dim):
    A = _rows3(batch_first(inputs[0], batch_dim))
    D = _rows3(batch_first(grad, batch_dim))
    out = {"weight": Factors(D, A)}
    if m.bias is not None:
        out["bias"] = Explicit(D.sum(1))
    return out


# --------------------------------------------------------------------------------------------------
# ConvNd: any stride, padding (mode), dilation, groups
# --------------------------------------------------------------------------------------------------
def unfold_conv_input(m: nn.modules.conv._ConvNd, x: torch.Tensor) -> torch.Tensor:
    """(n, C, *S) -> (n, G, T, C/G * prod(k)): the input patches every output position sees, in the
    order of the weight's (C/G, *k) dimensions."""
    nd = x.ndim - 2
    pad = tuple(m._reversed_padding_repeated_twice)
    if any(pad):
        x = F.pad(x, pad, mode="constant" if m.padding_mode == "zeros" else m.padding_mode)
    n, C = x.shape[:2]
    G = m.groups
    # strided views and one copy (F.unfold / im2col measured 7.5x slower on CPU for a 5x5 kernel)
    for d in range(nd):
        k, s, dil = m.kernel_size[d], m.stride[d], m.dilation[d]
        x = x.unfold(2 + d, (k - 1) * dil + 1, s)
        if dil > 1:
            x = x[..., ::dil]
    out_sizes = x.shape[2:2 + nd]
    T = math.prod(out_sizes)
    # (n, C, O..., k...) -> (n, O..., C, k...) -> (n, T, G, C/G * K)
    perm = (0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd))
    cols = x.permute(perm).reshape(n, T, G, -1)
    return cols.transpose(1, 2)


@register_rule(nn.modules.conv._ConvNd)
def conv_rule(m, inputs, output, grad, batch_dim):
    if m.transposed:
        raise InputError(f"{type(m).__name__}: transposed convolutions have no built-in rule; "
                         "register one with register_rule")
    x = batch_first(inputs[0], batch_dim)
    d = batch_first(grad, batch_dim)
    if x.ndim != len(m.kernel_size) + 2:
        raise InputError(f"{type(m).__name__} input must be batched, shape (n, C, ...{len(m.kernel_size)} dims), "
                         f"got shape {tuple(x.shape)}")
    n, G = x.shape[0], m.groups
    D = d.reshape(n, G, d.shape[1] // G, -1).transpose(2, 3)  # n, G, T, Cout/G
    out = {"weight": ConvFactors(D, x, d, m)}
    if m.bias is not None:
        out["bias"] = Explicit(d.reshape(n, d.shape[1], -1).sum(2))
    return out


# --------------------------------------------------------------------------------------------------
# Embedding
# --------------------------------------------------------------------------------------------------
@register_rule(nn.Embedding)
def embedding_rule(m, inputs, output, grad, batch_dim):
    if m.scale_grad_by_freq:
        raise InputError("Embedding with scale_grad_by_freq=True scales each row's gradient by its count in "
                         "the whole batch, which couples the examples: per-example gradients are undefined")
    idx = batch_first(inputs[0], batch_dim)
    d = batch_first(grad, batch_dim)
    n = idx.shape[0]
    idx = idx.reshape(n, -1)
    D = d.reshape(n, idx.shape[1], -1)
    if m.padding_idx is not None:
        D = D * (idx != m.padding_idx).unsqueeze(-1).to(D.dtype)
    return {"weight": Scatter(idx, D, m.num_embeddings)}


# --------------------------------------------------------------------------------------------------
# normalisation layers (per-example gradients are small: explicit)
# --------------------------------------------------------------------------------------------------
def _affine(m, xhat, d, reduce_dims, weight_name="weight", bias_name="bias"):
    out = {}
    if getattr(m, weight_name, None) is not None:
        out[weight_name] = Explicit((d * xhat).sum(reduce_dims) if reduce_dims else d * xhat)
    if getattr(m, bias_name, None) is not None:
        out[bias_name] = Explicit(d.sum(reduce_dims) if reduce_dims else d)
    return out


@register_rule(nn.LayerNorm)
def layernorm_rule(m, inputs, output, grad, batch_dim):
    x = batch_first(inputs[0], batch_dim)
    d = batch_first(grad, batch_dim)
    k = len(m.normalized_shape)
    dims = tuple(range(x.ndim - k, x.ndim))
    var, mean = torch.var_mean(x, dims, unbiased=False, keepdim=True)
    xhat = (x - mean) * torch.rsqrt(var + m.eps)
    lead = tuple(range(1, x.ndim - k))
    return _affine(m, xhat, d, lead)


if hasattr(nn, "RMSNorm"):
    @register_rule(nn.RMSNorm)
    def rmsnorm_rule(m, inputs, output, grad, batch_dim):
        x = batch_first(inputs[0], batch_dim)
        d = batch_first(grad, batch_dim)
        k = len(m.normalized_shape)
        dims = tuple(range(x.ndim - k, x.ndim))
        eps = torch.finfo(x.dtype).eps if m.eps is None else m.eps
        xhat = x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + eps)
        return _affine(m, xhat, d, tuple(range(1, x.ndim - k)))


@register_rule(nn.GroupNorm)
def groupnorm_rule(m, inputs, output, grad, batch_dim):
    x = batch_first(inputs[0], batch_dim)
    d = batch_first(grad, batch_dim)
    n, C = x.shape[:2]
    xg = x.reshape(n, m.num_groups, -1)
    var, mean = torch.var_mean(xg, 2, unbiased=False, keepdim=True)
    xhat = ((xg - mean) * torch.rsqrt(var + m.eps)).reshape(x.shape)
    return _affine(m, xhat, d, tuple(range(2, x.ndim)))


@register_rule(nn.modules.batchnorm._BatchNorm)
def batchnorm_rule(m, inputs, output, grad, batch_dim):
    x = batch_first(inputs[0], batch_dim)
    d = batch_first(grad, batch_dim)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    xhat = (x - m.running_mean.view(shape)) * torch.rsqrt(m.running_var.view(shape) + m.eps)
    return _affine(m, xhat, d, tuple(range(2, x.ndim)))


def coupling_batchnorms(model: nn.Module) -> list[str]:
    """BatchNorm modules that normalise with batch statistics (train mode, or no running stats)."""
    return [name or type(m).__name__ for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and (m.training or m.running_mean is None)]
