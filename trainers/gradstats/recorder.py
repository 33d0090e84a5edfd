"""``recorder``: per-example gradient statistics of a training step from that step's own forward and
backward (no second pass)::

    with recorder(model, labels=y) as rec:
        loss = F.cross_entropy(model(x), y)   # mean over the batch
        loss.backward()
    opt.step()
    stats = rec.stats()          # {tensor: {omega, stiffness, diversity, mean_norm, per_class, ...}}
    norms = rec.norms()          # {tensor: (n,) per-example gradient norms}
    by_layer = rec.layer_norms() # {module: (n,)} over all of the module's tensors

The hooks only read tensors: the loss and the parameter update are those of the plain step.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from geomprobe._validation import InputError

from .engine import (DEFAULT_BUDGET, METHODS, Capture, ClassLayout, block_class_sq, block_class_vectors,
                     block_materialise, block_numel, block_offset, block_sq, check_no_coupling, contributions,
                     example_gram, fused_factor_sums, gram_class_sq, prefer_gram, select_targets)
from .rules import Explicit, Factors
from .sums import TensorSums

__all__ = ["GradientRecorder", "recorder"]


def class_codes(labels: Any, n: int | None, device, num_classes: int | None) -> tuple[list[int], torch.Tensor]:
    """(class labels, codes 0..K-1 on ``device``). With ``num_classes`` and integer tensor labels no
    host round trip: codes are the labels, K = num_classes."""
    if num_classes is not None:
        if not isinstance(num_classes, int) or num_classes < 1:
            raise InputError(f"num_classes must be a positive int, got {num_classes!r}")
        lab = labels if torch.is_tensor(labels) else torch.as_tensor(np.asarray(labels))
        if lab.ndim != 1 or torch.is_floating_point(lab):
            raise InputError(f"labels must be 1-D integers, got dtype {lab.dtype} shape {tuple(lab.shape)}")
        if n is not None and lab.shape[0] != n:
            raise InputError(f"labels has {lab.shape[0]} entries but x has {n} rows")
        return list(range(num_classes)), lab.to(device=device, dtype=torch.long)
    lab = labels.detach().cpu().numpy() if torch.is_tensor(labels) else np.asarray(labels)
    if lab.ndim != 1:
        raise InputError(f"labels must be 1-D (n_samples,), got shape {lab.shape}")
    if n is not None and lab.shape[0] != n:
        raise InputError(f"labels has {lab.shape[0]} entries but x has {n} rows")
    if not (np.issubdtype(lab.dtype, np.integer) or lab.dtype == np.bool_):
        raise InputError(f"labels must be integers, got dtype {lab.dtype}")
    classes, codes = np.unique(lab, return_inverse=True)
    return [int(c) for c in classes], torch.as_tensor(codes.reshape(-1), dtype=torch.long, device=device)


class GradientRecorder:
    """Context manager recording one step; see :func:`recorder`."""

    def __init__(self, model: nn.Module, *, labels: Any = None, num_classes: int | None = None,
                 loss_scale: Any = "mean", modules: Iterable[Any] | None = None, include_bias: bool = True,
                 include_logits: bool = True, include_all: bool = False, skip_unsupported: bool = False,
                 dtype: torch.dtype | None = None, method: str = "auto", memory_budget: int = DEFAULT_BUDGET,
                 batch_dims: dict | None = None):
        if not isinstance(model, nn.Module):
            raise InputError(f"model must be an nn.Module, got {type(model).__name__}")
        if method not in METHODS:
            raise InputError(f"method must be one of {', '.join(map(repr, METHODS))}; got {method!r}")
        if not (loss_scale in ("mean", "sum") or (isinstance(loss_scale, (int, float)) and loss_scale > 0
                                                  and math.isfinite(loss_scale))):
            raise InputError(f"loss_scale must be 'mean', 'sum' or a positive number, got {loss_scale!r}")
        if not isinstance(memory_budget, int) or memory_budget < 1:
            raise InputError(f"memory_budget must be a positive int (elements), got {memory_budget!r}")
        self.model, self.labels, self.num_classes = model, labels, num_classes
        self.loss_scale, self.include_bias, self.include_logits = loss_scale, include_bias, include_logits
        self.include_all, self.dtype, self.method, self.budget = include_all, dtype, method, memory_budget
        self.targets, self.skipped = select_targets(model, modules, skip_unsupported, batch_dims)
        self._n = None if labels is None else len(labels)
        self.cap: Capture | None = None
        self._done = False
        self._cache: dict = {}
        self._one_shot = False  # set by the one-shot route (autograd.grad to the hooked outputs)

    # -- recording ------------------------------------------------------------------------------
    def __enter__(self) -> "GradientRecorder":
        check_no_coupling(self.model)
        self.cap = Capture(self.model, self.targets, self._n, self.include_logits,
                           clone_outputs=self._one_shot).__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.cap is not None:
            self.cap.close()
        self._done = True

    @property
    def n(self) -> int:
        if self.cap is None or self.cap.n is None:
            raise InputError("the recorder saw no forward pass: run the model inside `with recorder(...)`")
        return int(self.cap.n)

    def _scale(self) -> float:
        """s with per-example gradient = recorded gradient / s."""
        if self.loss_scale == "mean":
            return 1.0 / self.n
        return 1.0 if self.loss_scale == "sum" else float(self.loss_scale)

    def _prepare(self):
        if "blocks" in self._cache:
            return self._cache
        if not self._done:
            raise InputError("read the recorder's results after the `with` block (after backward)")
        n = self.n
        blocks = contributions(self.cap, n, self.include_bias, self.dtype)
        shapes = {k: tuple(p.shape) for k, p in self.model.named_parameters()}
        if self.include_logits and self.cap.logits is not None and self.cap.logits.grad is not None:
            g = self.cap.logits.grad.detach().reshape(n, -1)
            blocks["logits"] = [Explicit(g if self.dtype is None else g.to(self.dtype))]
            shapes["logits"] = self.cap.logits_shape
        if not blocks:
            raise InputError("the recorder saw no gradient: call loss.backward() inside `with recorder(...)`")
        device = _device(next(iter(blocks.values()))[0])
        labels = self.labels if self.labels is not None else np.zeros(n, np.int64)
        classes, codes = class_codes(labels, n, device, self.num_classes)
        lay = ClassLayout(codes, len(classes))
        sq, fused, grams = {}, {}, {}
        r = 3 if self.include_all else 2
        for k, bl in blocks.items():
            b0 = bl[0]
            single = len(bl) == 1 and isinstance(b0, Factors)
            if single and self.method != "explicit" and (
                    (self.method == "gram" and b0.D.shape[0] ** 2 <= self.budget)
                    or prefer_gram(b0, lay.K, r, self.budget)):
                Gm = example_gram(b0, self.budget)  # any T: <g_i, g_j> for every pair
                sq[k], grams[k] = torch.diagonal(Gm).double(), Gm
            elif single and b0.D.shape[2] > 1 and self.method != "gram":
                s_, cls, tot = fused_factor_sums(b0, lay, self.budget)
                sq[k], fused[k] = s_.double(), (cls.double(), tot.double())
            else:
                sq[k] = sum(block_sq(b, self.budget).double() for b in bl)
        self._cache.update(blocks=blocks, shapes=shapes, classes=classes, lay=lay, sq=sq, fused=fused,
                           grams=grams)
        return self._cache

    # -- results --------------------------------------------------------------------------------
    def norms(self) -> dict[str, torch.Tensor]:
        """Per-example gradient norms ||g_i|| per tensor (float64, on the model's device)."""
        c = self._prepare()
        s = self._scale()
        return {k: v.clamp_min(0).sqrt() / s for k, v in c["sq"].items()}

    def layer_norms(self) -> dict[str, torch.Tensor]:
        """Per-example gradient norms per module, over all of the module's recorded tensors."""
        c = self._prepare()
        s = self._scale()
        out: dict[str, torch.Tensor] = {}
        for k, v in c["sq"].items():
            if k == "logits":
                continue
            layer = k.rsplit(".", 1)[0] if "." in k else ""
            for t in self.targets:  # the module that owns the tensor (MHA: 'attn.out_proj.weight' -> 'attn')
                if k.startswith(t.name + ".") or t.name == "":
                    layer = t.name
                    break
            out[layer] = out[layer] + v if layer in out else v.clone()
        return {k: v.clamp_min(0).sqrt() / s for k, v in out.items()}

    def sums(self, keep_vectors: bool = False) -> dict[str, TensorSums]:
        """{tensor: TensorSums} (per-class sums; with ``keep_vectors`` the mergeable vectors)."""
        key = ("sums", keep_vectors)
        if key in self._cache:
            return self._cache[key]
        c = self._prepare()
        blocks, lay, sq, classes = c["blocks"], c["lay"], c["sq"], c["classes"]
        K, codes = lay.K, lay.codes
        s = self._scale()

        def inv(v):
            nz = v > 0
            return torch.where(nz, v.clamp_min(0).sqrt().reciprocal(), torch.zeros_like(v)), nz

        w_all = None
        keys = list(blocks)
        if self.include_all and not keep_vectors:
            tensors = [k for k in keys if k != "logits"]
            if tensors:
                sq_all = sum(sq[k] for k in tensors)
                w_all, nz_all = inv(sq_all)
        packs, metas = [], []
        vecs = {}
        for k in keys:
            w, nz = inv(sq[k])
            cols = [torch.ones_like(w), w] + ([w_all] if (w_all is not None and k != "logits") else [])
            W = torch.stack(cols, 1)
            per = [torch.zeros(K, dtype=torch.float64, device=w.device).index_add_(0, codes, v)
                   for v in (torch.ones_like(w), nz.double(), sq[k].clamp_min(0).sqrt(), sq[k])]
            if keep_vectors:
                numel = int(math.prod(c["shapes"][k]))
                V = torch.zeros(K, 2, numel, dtype=torch.float64, device=w.device)
                for b in blocks[k]:
                    off = block_offset(b, c["shapes"][k])
                    V[:, :, off:off + block_numel(b)] += block_class_vectors(b, lay, W[:, :2]).double()
                vecs[k] = V
                packs.append(torch.cat(per))
            else:
                cls = torch.zeros(K, W.shape[1], dtype=torch.float64, device=w.device)
                tot = torch.zeros(W.shape[1], dtype=torch.float64, device=w.device)
                done = 0
                if k in c["fused"]:  # columns ones and 1/||g_i|| came with the norms
                    cls[:, :2], tot[:2] = c["fused"][k]
                    done = 2
                if k in c["grams"]:
                    a, t = gram_class_sq(c["grams"][k], lay, W)
                    cls += a.double()
                    tot += t.double()
                    done = W.shape[1]
                if done < W.shape[1]:
                    for b in blocks[k]:
                        a, t = block_class_sq(b, lay, W[:, done:], self.method, self.budget)
                        cls[:, done:] += a.double()
                        tot[done:] += t.double()
                packs.append(torch.cat(per + [cls.reshape(-1), tot]))
            metas.append((k, W.shape[1]))
        if w_all is not None:
            packs.append(torch.cat([torch.zeros(K, dtype=torch.float64, device=w_all.device).index_add_(0, codes, v)
                                    for v in (nz_all.double(), sq_all.clamp_min(0).sqrt(), sq_all)]))
        host = torch.cat(packs).cpu().numpy()  # the one transfer of the step
        out: dict[str, TensorSums] = {}
        pos = 0
        s2 = s * s
        for k, r in metas:
            nK, nnz, snorm, ssq = (host[pos + i * K:pos + (i + 1) * K] for i in range(4))
            pos += 4 * K
            shape = c["shapes"][k]
            if keep_vectors:
                out[k] = TensorSums(classes, nK, nnz, snorm / s, ssq / s2, shape,
                                    sum_g=vecs[k][:, 0] / s, sum_unit=vecs[k][:, 1])
                continue
            cls = host[pos:pos + K * r].reshape(K, r)
            tot = host[pos + K * r:pos + K * r + r]
            pos += K * r + r
            out[k] = TensorSums(classes, nK, nnz, snorm / s, ssq / s2, shape, sq_g=cls[:, 0] / s2,
                                sq_unit=cls[:, 1], total_sq_g=float(tot[0]) / s2, total_sq_unit=float(tot[1]))
            if r == 3:
                out[k]._all = (cls[:, 2], float(tot[2]))
        if w_all is not None:
            nnz, snorm, ssq = (host[pos + i * K:pos + (i + 1) * K] for i in range(3))
            ts = [out[k] for k in keys if k != "logits"]
            out["all"] = TensorSums(
                classes, ts[0].n, nnz, snorm / s, ssq / s2, (int(sum(int(math.prod(t.shape)) for t in ts)),),
                sq_g=np.sum([t.sq_g for t in ts], axis=0), sq_unit=np.sum([t._all[0] for t in ts], axis=0),
                total_sq_g=float(sum(t.total_sq_g for t in ts)), total_sq_unit=float(sum(t._all[1] for t in ts)))
        self._cache[key] = out
        return out

    def stats(self, per_example_norms: bool = False) -> dict[str, dict]:
        """{tensor: stats dict} (see docs/trainers_gradstats.md). ``per_example_norms=True`` adds
        ``"norms"`` (list of n floats) to every entry; if modules were skipped
        (``skip_unsupported=True``) the result also has ``"skipped_modules"``."""
        res = {k: v.stats() for k, v in self.sums().items()}
        if per_example_norms:
            norms = self.norms()
            host = {k: v.cpu().tolist() for k, v in norms.items()}
            for k, v in res.items():
                if k in host:
                    v["norms"] = host[k]
        if self.skipped:
            res["skipped_modules"] = list(self.skipped)
        return res

    def per_example_gradients(self, tensors: Iterable[str] | None = None, *, chunk: int | None = None):
        """Yield ``(start, {tensor: (m, *shape) gradients of examples start..start+m})`` in chunks
        whose temporaries stay within ``memory_budget`` elements (materialises them: the writer's path)."""
        c = self._prepare()
        s = self._scale()
        keys = [k for k in c["blocks"] if k != "logits"] if tensors is None else list(tensors)
        for k in keys:
            if k not in c["blocks"]:
                raise InputError(f"tensor {k!r} was not recorded; recorded: {sorted(c['blocks'])}")
        biggest = max(int(math.prod(c["shapes"][k])) for k in keys) if keys else 1
        step = chunk or max(1, self.budget // max(1, biggest))
        n = self.n
        for a in range(0, n, step):
            b = min(n, a + step)
            out = {}
            for k in keys:
                shape = c["shapes"][k]
                numel = int(math.prod(shape))
                blks = c["blocks"][k]
                G = torch.zeros(b - a, numel, dtype=_dtype(blks[0]), device=_device(blks[0]))
                for blk in blks:
                    off = block_offset(blk, shape)
                    G[:, off:off + block_numel(blk)] += block_materialise(blk, a, b)
                out[k] = (G / s).reshape(b - a, *shape)
            yield a, out


def _dtype(blk):
    return blk.V.dtype if isinstance(blk, Explicit) else blk.D.dtype


def _device(blk):
    return blk.V.device if isinstance(blk, Explicit) else blk.D.device


def recorder(model: nn.Module, *, labels: Any = None, **options) -> GradientRecorder:
    """Record per-example gradient statistics of the step run inside the ``with`` block.

    ``labels`` (n,) group the examples into classes (default: one class). ``loss_scale``: how the
    backward's loss weights each example's loss: ``'mean'`` (default, ``loss = mean_i l_i``, so the
    recorded gradients are g_i / n and the norms are multiplied back by n), ``'sum'``, or a number s
    (loss = s * sum_i l_i, e.g. 1 / (n * T) for a mean over tokens, times a GradScaler's scale).
    Omega, stiffness and diversity do not depend on it. Other options: ``num_classes`` (labels are
    0..num_classes-1 on the device: no host round trip for the class codes), ``modules``,
    ``include_bias``, ``include_logits``, ``include_all``, ``skip_unsupported``, ``dtype``,
    ``method`` ('auto' | 'gram' | 'explicit'), ``memory_budget`` (elements per temporary),
    ``batch_dims`` ({module name: dim} where a module sees the examples elsewhere than dim 0).
    BatchNorm in train mode couples the examples: refused (put those modules in eval mode).
    """
    return GradientRecorder(model, labels=labels, **options)
