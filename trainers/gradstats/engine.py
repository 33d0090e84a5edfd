"""The recorder: hooks a step's forward and backward and forms, from the layer inputs and output
gradients it sees, the per-example gradient norms and the per-class sums behind Omega, diversity and
stiffness, without a per-example gradient tensor (see docs/trainers_gradstats.md).

Reduction of one tensor, whose per-example gradient g_i is a sum of rule contributions (module calls)
and a concatenation of blocks (disjoint slices):

1. ``sq_i = ||g_i||^2`` per block (Gram ``<D_i D_i^T, A_i A_i^T>`` or explicit ``||D_i^T A_i||^2``,
   the cheaper, chunked by ``memory_budget``), summed over blocks;
2. weights ``W`` (n, r): ones, ``1/||g_i||`` (0 for a zero gradient) and, with ``include_all``,
   ``1/||g_i^all||`` over all tensors;
3. per class c and weight column r: ``||sum_{i in c} W_ir g_i||^2`` and over all examples, by the
   example Gram ``(D D^T) o (A A^T)`` with a one-hot matmul (T = 1) or by explicit per-class products
   ``(D_c W_c)^T A_c`` over class-sorted examples, whichever costs fewer flops.

Everything stays on the model's device in the activations' dtype (per-class and per-example sums in
float64: small vectors only); the host sees one transfer per step.
"""
from __future__ import annotations

import bisect
import contextlib
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from geomprobe._validation import InputError

from .rules import ConvFactors, Explicit, Factors, Scatter, coupling_batchnorms, rule_for

DEFAULT_BUDGET = 2 ** 26  # elements of a temporary (256 MiB in float32)
METHODS = ("auto", "gram", "explicit")
_SEQ_FIRST = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.TransformerEncoder,
              nn.TransformerDecoder, nn.Transformer)


def _prefix(name: str) -> str:
    return f"{name}." if name else ""


# --------------------------------------------------------------------------------------------------
# module selection
# --------------------------------------------------------------------------------------------------
@dataclass
class Target:
    name: str
    module: nn.Module
    rule: Any  # callable or "mha"
    batch_dim: int


def _own_trainable(m: nn.Module) -> list[str]:
    return [k for k, p in m.named_parameters(recurse=False) if p.requires_grad]


def select_targets(model: nn.Module, modules: Iterable[Any] | None, skip_unsupported: bool,
                   batch_dims: dict | None = None) -> tuple[list[Target], list[str]]:
    """Covered modules (a rule claims its whole subtree) and the skipped ones' names.

    Default: every module with trainable parameters; one that no rule covers raises unless
    ``skip_unsupported`` (then it is listed). ``modules=``: only these (names or objects).
    """
    named = list(model.named_modules())
    seq_first: set[int] = set()
    for _, m in named:
        if isinstance(m, _SEQ_FIRST) and not getattr(m, "batch_first", True) or \
                isinstance(m, _SEQ_FIRST) and _has_seq_first_layer(m):
            seq_first.update(id(s) for s in m.modules())
    batch_dims = dict(batch_dims or {})

    def bdim(name, m):
        if name in batch_dims:
            return int(batch_dims[name])
        return 1 if id(m) in seq_first else 0

    def rule(m):
        if isinstance(m, nn.MultiheadAttention):
            return "mha"
        return rule_for(m)

    if modules is not None:
        out = []
        for name, mod in resolve_modules(named, modules):
            r = rule(mod)
            if r is None:
                raise InputError(f"modules: {name!r} is a {type(mod).__name__}, which no gradient rule covers "
                                 "(register one with geomprobe.trainers.gradstats.register_rule)")
            out.append(Target(name, mod, r, bdim(name, mod)))
        return out, []
    out, skipped, claimed = [], [], set()
    for name, m in named:
        if id(m) in claimed:
            continue
        r = rule(m)
        if r is not None and any(p.requires_grad for p in m.parameters()):
            out.append(Target(name, m, r, bdim(name, m)))
            claimed.update(id(s) for s in m.modules())
        elif _own_trainable(m):
            if not skip_unsupported:
                raise InputError(
                    f"module {name or '(root)'!r} ({type(m).__name__}) has trainable parameters "
                    f"{_own_trainable(m)} that no gradient rule covers; register a rule with "
                    "geomprobe.trainers.gradstats.register_rule, select modules with modules=..., or pass "
                    "skip_unsupported=True to leave it out (it is then listed under 'skipped')")
            skipped.append(name or "(root)")
    return out, skipped


def _has_seq_first_layer(m: nn.Module) -> bool:
    if isinstance(m, (nn.TransformerEncoder, nn.TransformerDecoder)):
        return any(isinstance(s, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer))
                   and not s.self_attn.batch_first for s in m.modules())
    return False


# --------------------------------------------------------------------------------------------------
# capture
# --------------------------------------------------------------------------------------------------
class _Call:
    __slots__ = ("target", "inputs", "output", "grad", "extra")

    def __init__(self, target, inputs, output, extra=None):
        self.target, self.inputs, self.output, self.grad, self.extra = target, inputs, output, None, extra

    def set_grad(self, g):
        self.grad = g if self.grad is None else self.grad + g


def _detach(v):
    return v.detach() if torch.is_tensor(v) else v


class Capture:
    """Forward/backward hooks on the targets (and the model output for ``logits``)."""

    def __init__(self, model: nn.Module, targets: list[Target], n: int | None, want_logits: bool,
                 clone_outputs: bool = False):
        self.clone_outputs = clone_outputs
        self.model, self.targets, self.n = model, targets, n
        self.calls: list[_Call] = []
        self.watched: list[torch.Tensor] = []  # hooked outputs (the one-shot route differentiates to them)
        self.logits: _Call | None = None
        self.handles: list = []
        self.want_logits = want_logits
        self._linear_orig = None

    def __enter__(self):
        try:
            for t in self.targets:
                if t.rule == "mha":
                    self.handles.append(t.module.register_forward_pre_hook(self._mha_pre(t)))
                    self.handles.append(t.module.register_forward_hook(self._mha_post))
                else:
                    self.handles.append(t.module.register_forward_hook(self._hook(t)))
            self.handles.append(self.model.register_forward_pre_hook(self._root_pre))
            if self.want_logits:
                self.handles.append(self.model.register_forward_hook(self._root_hook))
        except BaseException:
            self.close()
            raise
        return self

    def close(self):
        for h in self.handles:
            h.remove()
        self.handles = []
        self._restore_linear()

    def __exit__(self, *exc):
        self.close()

    def _root_pre(self, mod, args):
        if self.n is None and args and torch.is_tensor(args[0]) and args[0].ndim >= 1:
            self.n = int(args[0].shape[0])

    def _root_hook(self, mod, args, output):
        if torch.is_tensor(output) and output.requires_grad:
            call = _Call(None, (), None)
            output.register_hook(call.set_grad)
            self.watched.append(output)
            self.logits = call
            self.logits_shape = tuple(output.shape[1:])

    def _hook(self, t: Target):
        def hook(mod, args, output):
            if not torch.is_tensor(output) or not output.requires_grad:
                return None
            call = _Call(t, tuple(_detach(a) for a in args), output.detach())
            output.register_hook(call.set_grad)
            self.watched.append(output)
            self.calls.append(call)
            # the one-shot route differentiates to the watched tensors themselves: an in-place op
            # downstream (ReLU(inplace=True)) must then act on a copy
            return output.clone() if self.clone_outputs else None
        return hook

    # nn.MultiheadAttention computes its projections with F.linear on its own weights inside
    # F.multi_head_attention_forward: during the module's forward F.linear is wrapped so that the
    # calls on those weights (or on row slices of in_proj_weight) are recorded as Linear calls.
    def _mha_pre(self, t: Target):
        m = t.module

        def pre(mod, args):
            q = args[0] if args else None
            if not torch.is_tensor(q) or q.ndim != 3:
                raise InputError(f"module {t.name!r} (MultiheadAttention): per-example gradients need batched "
                                 f"3-D inputs, got {None if q is None else tuple(q.shape)}")
            if m.bias_k is not None:
                raise InputError(f"module {t.name!r} (MultiheadAttention): add_bias_kv=True has no built-in rule")
            bsz = q.shape[0] if m.batch_first else q.shape[1]
            E = m.embed_dim
            tracked = {}  # id(weight) -> (name, bias name, rows of the bias)
            if m.in_proj_weight is not None:
                tracked[id(m.in_proj_weight)] = ("in_proj_weight", "in_proj_bias", None)
            for k, pname in enumerate(("q_proj_weight", "k_proj_weight", "v_proj_weight")):
                p = getattr(m, pname, None)
                if p is not None:
                    tracked[id(p)] = (pname, "in_proj_bias", (k * E, (k + 1) * E))
            tracked[id(m.out_proj.weight)] = ("out_proj.weight", "out_proj.bias", None)
            orig = F.linear
            self._linear_orig = orig
            capture = self

            def linear(inp, weight, bias=None):
                out = orig(inp, weight, bias)
                key = tracked.get(id(weight))
                rows = None
                if key is None and weight._base is not None and id(weight._base) in tracked:
                    key = tracked[id(weight._base)]
                    base = weight._base
                    start = (weight.storage_offset() - base.storage_offset()) // base.stride(0)
                    rows = (start, start + weight.shape[0])
                    key = (key[0], key[1], rows)
                if key is not None and out.requires_grad:
                    call = _Call(t, (inp.detach(),), None, extra=(key, rows, bsz, bias is not None))
                    out.register_hook(call.set_grad)
                    capture.watched.append(out)
                    capture.calls.append(call)
                    if capture.clone_outputs:
                        return out.clone()
                return out

            F.linear = linear
        return pre

    def _mha_post(self, mod, args, output):
        self._restore_linear()

    def _restore_linear(self):
        if self._linear_orig is not None:
            F.linear = self._linear_orig
            self._linear_orig = None


def _mha_contribs(call: _Call) -> dict:
    (pname, bias_name, bias_rows), rows, bsz, has_bias = call.extra
    inp, d = call.inputs[0], call.grad.detach()
    A = inp.reshape(-1, bsz, inp.shape[-1]).transpose(0, 1)  # rows are (position, example)
    D = d.reshape(-1, bsz, d.shape[-1]).transpose(0, 1)
    out = {pname: Factors(D, A, rows=rows)}
    if has_bias:
        out[bias_name] = Explicit(D.sum(1), rows=bias_rows)
    return out


def contributions(cap: Capture, n: int, include_bias: bool, dtype) -> dict[str, list]:
    """{tensor name: [block, ...]} with the calls of a shared module merged per block position."""
    merged: dict[str, dict] = {}
    for call in cap.calls:
        t = call.target
        if call.grad is None:
            continue  # not on the loss's path: its gradient is zero
        if call.extra is not None:
            parts = _mha_contribs(call)
        else:
            for v in call.inputs[:1]:
                if torch.is_tensor(v) and (v.ndim <= t.batch_dim or v.shape[t.batch_dim] != n):
                    raise InputError(
                        f"module {t.name!r} received input of shape {tuple(v.shape)} whose dimension {t.batch_dim} "
                        f"is not the batch of {n} examples; per-example gradients need the examples there "
                        "(pass batch_dims={name: dim} for sequence-first layouts)")
            parts = t.rule(t.module, call.inputs, call.output, call.grad.detach(), t.batch_dim)
        for pname, blk in parts.items():
            if not include_bias and "bias" in pname.rsplit(".", 1)[-1]:
                continue
            param = _param(t.module, pname)
            if param is not None and not param.requires_grad:
                continue  # frozen: not part of the gradient
            key = _prefix(t.name) + pname
            pos = getattr(blk, "rows", None)
            slot = merged.setdefault(key, {})
            if dtype is not None:
                blk = _cast(blk, dtype)
            slot[pos] = blk if pos not in slot else _merge(slot[pos], blk, key)
    return {k: list(v.values()) for k, v in merged.items()}


def _param(module: nn.Module, name: str):
    try:
        return module.get_parameter(name)
    except AttributeError:
        return None


def _cast(blk, dtype):
    if isinstance(blk, ConvFactors):
        return blk.to(dtype)
    if isinstance(blk, Factors):
        return Factors(blk.D.to(dtype), blk.A.to(dtype), blk.rows)
    if isinstance(blk, Explicit):
        return Explicit(blk.V.to(dtype), blk.rows)
    return Scatter(blk.idx, blk.D.to(dtype), blk.num)


def _merge(a, b, key):
    if type(a) is not type(b):
        raise InputError(f"tensor {key!r}: rules returned different kinds of blocks for one slice")
    if isinstance(a, Factors):
        return Factors(torch.cat([a.D, b.D], 2), torch.cat([a.A, b.A], 2), a.rows)
    if isinstance(a, Explicit):
        return Explicit(a.V + b.V, a.rows)
    return Scatter(torch.cat([a.idx, b.idx], 1), torch.cat([a.D, b.D], 1), a.num)


# --------------------------------------------------------------------------------------------------
# block reductions
# --------------------------------------------------------------------------------------------------
def _sqsum(t: torch.Tensor, dims) -> torch.Tensor:
    """Sum of squares over ``dims`` without a squared temporary (``vector_norm`` reads ``t`` once:
    measured 6x faster than ``t.pow(2).sum(dims)`` for a (256, 102400) float32 tensor on one CPU thread)."""
    return torch.linalg.vector_norm(t, dim=dims).square()


def block_sq(blk, budget: int) -> torch.Tensor:
    """||g_i||^2 of one block, (n,) in the block's dtype."""
    if isinstance(blk, Explicit):
        V = blk.V.reshape(blk.V.shape[0], -1)
        return _sqsum(V, 1)
    if isinstance(blk, Scatter):
        n, T = blk.idx.shape
        ex = torch.arange(n, device=blk.idx.device).repeat_interleave(T)
        seg = _segment_sum(ex * blk.num + blk.idx.reshape(-1), blk.D.reshape(n * T, -1))
        return torch.zeros(n, dtype=blk.D.dtype, device=blk.D.device).index_add_(
            0, seg[0] // blk.num, _sqsum(seg[1], 1))
    D, A = blk.D, blk.A
    n, G, T, p = D.shape
    q = A.shape[3]
    if T == 1:
        return (_sqsum(D[:, :, 0], 2) * _sqsum(A[:, :, 0], 2)).sum(1)
    Df, Af = D.reshape(n * G, T, p), A.reshape(n * G, T, q)
    out = torch.empty(n * G, dtype=D.dtype, device=D.device)
    if T * T * (p + q) <= T * p * q:  # Gram form <D_i D_i^T, A_i A_i^T>_F
        step = max(1, budget // (2 * T * T))
        for s in range(0, n * G, step):
            Dc, Ac = Df[s:s + step], Af[s:s + step]
            out[s:s + step] = (torch.bmm(Dc, Dc.transpose(1, 2)) * torch.bmm(Ac, Ac.transpose(1, 2))).sum((1, 2))
    else:
        step = max(1, budget // (p * q))
        for s in range(0, n * G, step):
            out[s:s + step] = _sqsum(torch.bmm(Df[s:s + step].transpose(1, 2), Af[s:s + step]), (1, 2))
    return out.view(n, G).sum(1)


def _segment_sum(keys: torch.Tensor, values: torch.Tensor):
    """(unique keys, summed values) of rows with equal keys."""
    uniq, inv = torch.unique(keys, return_inverse=True)
    return uniq, torch.zeros(uniq.shape[0], values.shape[1], dtype=values.dtype,
                             device=values.device).index_add_(0, inv, values)


class ClassLayout:
    """Class codes of a step and, lazily, the class-sorted order and segment bounds (one host sync)."""

    def __init__(self, codes: torch.Tensor, K: int):
        self.codes, self.K = codes, K
        self._order = None
        self._onehot = {}

    def segments(self):
        if self._order is None:
            self._order = torch.argsort(self.codes, stable=True)
            counts = torch.bincount(self.codes, minlength=self.K).cpu().tolist()
            bounds = np.concatenate([[0], np.cumsum(counts)]).astype(int).tolist()
            self._bounds = [(bounds[k], bounds[k + 1]) for k in range(self.K)]
        return self._order, self._bounds

    def present(self):
        """(codes renumbered over the classes present in the batch, list of those classes)."""
        if not hasattr(self, "_present"):
            _, bounds = self.segments()
            present = [k for k, (a, b) in enumerate(bounds) if b > a]
            remap = torch.zeros(self.K, dtype=torch.long, device=self.codes.device)
            dev = self.codes.device
            remap[torch.as_tensor(present, device=dev)] = torch.arange(len(present), device=dev)
            self._present = (remap[self.codes], present)
        return self._present

    def present_starts(self) -> list[int]:
        """Host list: where each class present in the batch begins in the class-sorted order."""
        _, bounds = self.segments()
        return [a for a, b in bounds if b > a]

    def padded(self):
        """((K, m_max) example indices per class, padded with n; m_max)."""
        if not hasattr(self, "_padded"):
            order, bounds = self.segments()
            n = self.codes.shape[0]
            m_max = max(1, max(b - a for a, b in bounds))
            starts = torch.tensor([a for a, _ in bounds], device=self.codes.device)
            sc = self.codes[order]
            pos = torch.arange(n, device=self.codes.device) - starts[sc]
            idx = torch.full((self.K, m_max), n, dtype=torch.long, device=self.codes.device)
            idx[sc, pos] = order
            self._padded = (idx, m_max)
        return self._padded

    def onehot(self, dtype):
        if dtype not in self._onehot:
            self._onehot[dtype] = F.one_hot(self.codes, self.K).to(dtype)
        return self._onehot[dtype]


def choose_form(blk: Factors, K: int, r: int, method: str, budget: int) -> str:
    n, G, T, p = blk.D.shape
    if method == "explicit" or T != 1:
        return "explicit"
    q = blk.A.shape[3]
    if method == "gram":
        return "gram"
    gram = n * n * G * (p + q) + n * n * K * r
    explicit = r * n * G * p * q
    return "gram" if gram < explicit else "explicit"


def block_class_sq(blk, lay: ClassLayout, W: torch.Tensor, method: str, budget: int):
    """(K, r) per-class ||sum_{i in c} W_ir g_i||^2 and (r,) the same over all examples (block dtype)."""
    K, r = lay.K, W.shape[1]
    codes = lay.codes
    if isinstance(blk, Explicit):
        V = blk.V.reshape(blk.V.shape[0], -1)
        n, d = V.shape
        Wv = W.to(V.dtype)
        cls = torch.zeros(K, r, dtype=V.dtype, device=V.device)
        tot = torch.zeros(r, dtype=V.dtype, device=V.device)
        step = max(1, budget // max(1, n * r))
        for s in range(0, d, step):
            Vc = V[:, s:s + step]
            S = torch.zeros(K, r, Vc.shape[1], dtype=V.dtype, device=V.device).index_add_(
                0, codes, Wv[:, :, None] * Vc[:, None, :])
            cls += _sqsum(S, 2)
            tot += _sqsum(S.sum(0), 1)
        return cls, tot
    if isinstance(blk, Scatter):
        n, T = blk.idx.shape
        dim = blk.D.shape[2]
        Wv = W.to(blk.D.dtype)
        vals = (blk.D[:, :, None, :] * Wv[:, None, :, None]).reshape(n * T, r * dim)
        idx = blk.idx.reshape(-1)
        ccode = codes.repeat_interleave(T)
        uk, S = _segment_sum(ccode * blk.num + idx, vals)
        cls = torch.zeros(K, r, dtype=S.dtype, device=S.device).index_add_(
            0, uk // blk.num, _sqsum(S.view(-1, r, dim), 2))
        _, S2 = _segment_sum(idx, vals)
        return cls, _sqsum(S2.view(-1, r, dim), (0, 2))
    D, A = blk.D, blk.A
    n, G, T, p = D.shape
    q = A.shape[3]
    Wd = W.to(D.dtype)
    if choose_form(blk, K, r, method, budget) == "gram":
        P = lay.onehot(D.dtype)
        PW = (P[:, :, None] * Wd[:, None, :]).reshape(n, K * r)
        D0, A0 = D[:, :, 0].transpose(0, 1), A[:, :, 0].transpose(0, 1)  # G, n, p / q
        cls = torch.zeros(K * r, dtype=D.dtype, device=D.device)
        tot = torch.zeros(r, dtype=D.dtype, device=D.device)
        step = max(1, budget // max(1, n * (G + 1)))
        for s in range(0, n, step):
            Gm = (torch.bmm(D0[:, s:s + step], D0.transpose(1, 2))
                  * torch.bmm(A0[:, s:s + step], A0.transpose(1, 2))).sum(0)  # rows s.., all n
            cls += (PW[s:s + step] * (Gm @ PW)).sum(0)
            tot += (Wd[s:s + step] * (Gm @ Wd)).sum(0)
        return cls.view(K, r), tot
    # classes side by side: examples gathered into (K, m_max) slots (padding -> a zero row), one
    # batched product per chunk of classes instead of one per class
    idx, m_max = lay.padded()
    Dp = torch.cat([D, D.new_zeros(1, G, T, p)])
    Ap = torch.cat([A, A.new_zeros(1, G, T, q)])
    Wp = torch.cat([Wd, Wd.new_zeros(1, r)])
    cls = torch.zeros(K, r, dtype=D.dtype, device=D.device)
    total = torch.zeros(G, r * p, q, dtype=D.dtype, device=D.device)
    per_class = G * r * p * q + m_max * G * T * (r * p + q)
    step = max(1, budget // max(1, per_class))
    for k0 in range(0, K, step):
        ii = idx[k0:k0 + step]
        kc = ii.shape[0]
        Dk = Dp[ii][:, :, :, :, None, :] * Wp[ii][:, :, None, None, :, None]  # kc, m, G, T, r, p
        Dk = Dk.permute(0, 2, 4, 5, 1, 3).reshape(kc, G, r * p, m_max * T)
        Ak = Ap[ii].permute(0, 2, 1, 3, 4).reshape(kc, G, m_max * T, q)
        S = torch.matmul(Dk, Ak)  # kc, G, r*p, q
        cls[k0:k0 + kc] = _sqsum(S.view(kc, G, r, p, q), (1, 3, 4))
        total += S.sum(0)
    return cls, _sqsum(total.view(G, r, p, q), (0, 2, 3))


def example_gram(blk: Factors, budget: int) -> torch.Tensor:
    """(n, n) Gram <g_i, g_j> of one Factors block, any T: the position Grams (D D^T) o (A A^T) of each
    group summed over the T x T blocks of every pair of examples, in row chunks within ``budget``."""
    D, A = blk.D, blk.A
    n, G, T, p = D.shape
    q = A.shape[3]
    Df = D.transpose(0, 1).reshape(G, n * T, p)
    Af = A.transpose(0, 1).reshape(G, n * T, q)
    out = torch.empty(n, n, dtype=D.dtype, device=D.device)
    step = max(1, budget // max(1, 2 * G * T * T * n))
    for s in range(0, n, step):
        e = min(n, s + step)
        rows = slice(s * T, e * T)
        B = torch.bmm(Df[:, rows], Df.transpose(1, 2)) * torch.bmm(Af[:, rows], Af.transpose(1, 2))
        out[s:e] = B.sum(0).view(e - s, T, n, T).sum((1, 3))
    return out


def gram_class_sq(Gm: torch.Tensor, lay: ClassLayout, W: torch.Tensor):
    """From the example Gram: (K, r) per-class ||sum_{i in c} W_ir g_i||^2 and (r,) overall."""
    n, K, r = Gm.shape[0], lay.K, W.shape[1]
    Wd = W.to(Gm.dtype)
    PW = (lay.onehot(Gm.dtype)[:, :, None] * Wd[:, None, :]).reshape(n, K * r)
    cls = (PW * (Gm @ PW)).sum(0).view(K, r)
    return cls, (Wd * (Gm @ Wd)).sum(0)


def prefer_gram(blk: Factors, K: int, r: int, budget: int) -> bool:
    """The example Gram (any T) is cheaper than forming every per-example gradient once.

    Costs in multiply-adds: the Gram's products are dense GEMMs; the per-example pass adds, per
    element of the n x d per-example gradients and of the (2 K, d) per-class buffers, memory-bound
    passes (norms, scaling, ``index_add_``, zero fill, squares) counted as ``_MEM_PASS`` multiply-adds
    each (alexnet x0.25 at 2 x 2 positions, 100 classes, CPU: the pass took 20x the step, the Gram
    a fraction of it)."""
    n, G, T, p = blk.D.shape
    d = G * p * (blk._m.weight[0].numel() if isinstance(blk, ConvFactors) else blk.A.shape[3])
    gram = G * (n * T) ** 2 * (p + d // (G * p)) + n * n * K * r
    fused = n * T * d + _MEM_PASS * (4 * n * d + 4 * min(K, n) * d)
    return gram < fused and n * n <= budget


_MEM_PASS = 8


def fused_factor_sums(blk: Factors, lay: ClassLayout, budget: int):
    """One pass for a tensor made of one ``Factors`` block with T > 1 (convolutions, sequences):
    over class-sorted chunks of examples form G_i = D_i^T A_i (one batched product, the cost of the
    backward's weight gradient), and from it ||g_i||^2 and, per class and overall,
    ||sum g_i||^2 and ||sum g_i/||g_i|| ||^2. Returns (sq (n,), cls (K, 2), tot (2,)) in the block's
    dtype. Replaces a per-example norm pass plus two per-class products (three times the cost)."""
    D = blk.D
    n, G, T, p = D.shape
    q = blk._m.weight[0].numel() if isinstance(blk, ConvFactors) else blk.A.shape[3]
    A = None if isinstance(blk, ConvFactors) else blk.A
    d = G * p * q
    sq = torch.empty(n, dtype=D.dtype, device=D.device)

    def grads(idx):  # idx: example indices, or a slice of consecutive examples (views, no gather copy)
        if isinstance(blk, ConvFactors):  # the convolution's weight-gradient kernel, examples as groups
            Gc = blk.per_example(idx, any_order=True)
        else:
            Dc, Ac = D[idx], A[idx]
            m = Dc.shape[0]
            Gc = torch.bmm(Dc.reshape(m * G, T, p).transpose(1, 2), Ac.reshape(m * G, T, q)).view(m, d)
        sqc = torch.linalg.vector_norm(Gc, dim=1).square()
        sq[idx] = sqc
        w = torch.where(sqc > 0, sqc.clamp_min(torch.finfo(sqc.dtype).tiny).rsqrt(), torch.zeros_like(sqc))
        return Gc, w

    compact, present = lay.present()
    Kp = len(present)
    if 2 * Kp * d <= budget // 2:
        # the two sums of every class present fit: chunks of consecutive examples; both sums of a
        # chunk by one product [onehot, onehot * w]^T G (one read of G; no zero fill, scaling pass or
        # scatter: on the CPU those passes cost more than the product while 2 Kp is small)
        acc = None
        step = max(1, (budget // 2) // max(1, d))
        for s in range(0, n, step):
            idx = slice(s, min(n, s + step))
            Gc, w = grads(idx)
            P = F.one_hot(compact[idx], Kp).to(Gc.dtype)
            PW = torch.cat([P, P * w[:, None]], 1).T  # (2 Kp, m)
            acc = PW @ Gc if acc is None else acc.addmm_(PW, Gc)
        acc = acc.view(2, Kp, d).transpose(0, 1)
        cls = torch.zeros(lay.K, 2, dtype=D.dtype, device=D.device)
        cls[torch.as_tensor(present, device=D.device)] = _sqsum(acc, 2)
        return sq, cls, _sqsum(acc.sum(0), 1)
    # the per-class sums of all classes do not fit: class-sorted chunks of examples (n / step grouped
    # products in all, not one per class); a class cut by a chunk boundary carries its partial sums over
    order, _ = lay.segments()
    starts = lay.present_starts()  # host list: sorted position where each present class begins
    sorted_compact = compact[order]
    cls_p = torch.zeros(Kp, 2, dtype=D.dtype, device=D.device)
    total = torch.zeros(2, d, dtype=D.dtype, device=D.device)
    carry = None
    step = max(1, budget // max(1, 3 * d))
    for s in range(0, n, step):
        e = min(n, s + step)
        Gc, w = grads(order[s:e])
        k0, k1 = bisect.bisect_right(starts, s) - 1, bisect.bisect_right(starts, e - 1) - 1
        kc = k1 - k0 + 1
        loc = sorted_compact[s:e] - k0
        acc = torch.zeros(2, kc, d, dtype=D.dtype, device=D.device)
        acc[0].index_add_(0, loc, Gc)
        acc[1].index_add_(0, loc, Gc.mul_(w[:, None]))
        total += acc.sum(1)
        if carry is not None:
            acc[:, 0] += carry
        done = kc if e == (starts[k1 + 1] if k1 + 1 < Kp else n) else kc - 1
        cls_p[k0:k0 + done] = _sqsum(acc[:, :done], 2).T
        carry = acc[:, kc - 1].clone() if done < kc else None
    cls = torch.zeros(lay.K, 2, dtype=D.dtype, device=D.device)
    cls[torch.as_tensor(present, device=D.device)] = cls_p
    return sq, cls, _sqsum(total, 1)


def block_class_vectors(blk, lay: ClassLayout, W: torch.Tensor) -> torch.Tensor:
    """(K, r, block numel): per class sum_{i in c} W_ir g_i (block dtype)."""
    K, r = lay.K, W.shape[1]
    if isinstance(blk, Explicit):
        V = blk.V.reshape(blk.V.shape[0], -1)
        return torch.zeros(K, r, V.shape[1], dtype=V.dtype, device=V.device).index_add_(
            0, lay.codes, W.to(V.dtype)[:, :, None] * V[:, None, :])
    if isinstance(blk, Scatter):
        n, T = blk.idx.shape
        dim = blk.D.shape[2]
        vals = (blk.D[:, :, None, :] * W.to(blk.D.dtype)[:, None, :, None]).reshape(n * T, r * dim)
        keys = lay.codes.repeat_interleave(T) * blk.num + blk.idx.reshape(-1)
        out = torch.zeros(K * blk.num, r * dim, dtype=vals.dtype, device=vals.device).index_add_(0, keys, vals)
        return out.view(K, blk.num, r, dim).transpose(1, 2).reshape(K, r, blk.num * dim)
    D, A = blk.D, blk.A
    n, G, T, p = D.shape
    q = A.shape[3]
    Wd = W.to(D.dtype)
    out = torch.zeros(K, G, r * p, q, dtype=D.dtype, device=D.device)
    order, bounds = lay.segments()
    Ds, As, Ws = D[order], A[order], Wd[order]
    for k, (a, b) in enumerate(bounds):
        if b > a:
            Dk = (Ds[a:b, :, :, None, :] * Ws[a:b, None, None, :, None]).reshape(b - a, G, T, r * p)
            out[k] = torch.matmul(Dk.transpose(0, 1).reshape(G, -1, r * p).transpose(1, 2),
                                  As[a:b].transpose(0, 1).reshape(G, -1, q))
    return out.view(K, G, r, p, q).transpose(1, 2).reshape(K, r, G * p * q)


def block_materialise(blk, s: int, e: int) -> torch.Tensor:
    """Per-example gradients of examples s..e-1 of one block, (e - s, block numel)."""
    if isinstance(blk, Explicit):
        return blk.V[s:e].reshape(e - s, -1)
    if isinstance(blk, Scatter):
        idx, D = blk.idx[s:e], blk.D[s:e]
        m, T = idx.shape
        keys = torch.arange(m, device=idx.device).repeat_interleave(T) * blk.num + idx.reshape(-1)
        out = torch.zeros(m * blk.num, D.shape[2], dtype=D.dtype, device=D.device)
        return out.index_add_(0, keys, D.reshape(m * T, -1)).view(m, -1)
    if isinstance(blk, ConvFactors):
        return blk.per_example(slice(s, e))
    D, A = blk.D[s:e], blk.A[s:e]
    return torch.einsum("ngtp,ngtq->ngpq", D, A).reshape(e - s, -1)


def block_numel(blk) -> int:
    if isinstance(blk, ConvFactors):
        return int(blk._m.weight.numel())
    if isinstance(blk, Explicit):
        return int(math.prod(blk.V.shape[1:]))
    if isinstance(blk, Scatter):
        return blk.num * int(blk.D.shape[2])
    return int(blk.D.shape[1] * blk.D.shape[3] * blk.A.shape[3])


def block_offset(blk, shape) -> int:
    rows = getattr(blk, "rows", None)
    if rows is None:
        return 0
    return rows[0] * int(math.prod(shape[1:]))


@contextlib.contextmanager
def eval_mode_ctx(model: nn.Module, eval_mode: bool, per_example: bool = True):
    """Every submodule in eval mode for the block (each one's own flag restored afterwards);
    with eval_mode=False, refuse BatchNorm that normalises with batch statistics (``per_example``:
    also in eval mode, a BatchNorm without running statistics)."""
    if not eval_mode:
        check_no_coupling(model)
        yield
        return
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        if per_example:
            check_no_coupling(model)
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def check_no_coupling(model: nn.Module) -> None:
    coupled = coupling_batchnorms(model)
    if coupled:
        raise InputError(
            f"BatchNorm module(s) {coupled} are in train mode (or keep no running statistics); BatchNorm in "
            "train mode couples the examples of a batch, so per-example gradients are undefined "
            "(put the model, or those modules, in eval mode; gradient_stats does it with eval_mode=True)")


def resolve_modules(named: list[tuple[str, nn.Module]], modules: Iterable[Any]) -> list[tuple[str, nn.Module]]:
    """The user's ``modules`` (submodule names or nn.Module objects) as (name, module) pairs of the
    model's ``named_modules()``; anything else is an InputError naming the item."""
    by_name = dict(named)
    by_id = {id(m): n for n, m in named}
    out = []
    for item in modules:
        if isinstance(item, str):
            if item not in by_name:
                raise InputError(f"modules: model has no submodule named {item!r}")
            out.append((item, by_name[item]))
        elif isinstance(item, nn.Module):
            if id(item) not in by_id:
                raise InputError(f"modules: {type(item).__name__} object is not a submodule of model")
            out.append((by_id[id(item)], item))
        else:
            raise InputError(f"modules must hold submodule names or nn.Module objects, got {item!r}")
    return out
