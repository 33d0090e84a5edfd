"""Record named layers' outputs of any ``nn.Module`` and write geomprobe activation files.

Any torch model writes an activations file in one call, streamed to disk batch by batch::

    from geomprobe.trainers.capture import write_activations

    write_activations("acts.npz", model, loader)           # loader yields (x, y), tuples or dicts

or in memory with the context manager (hooks are removed when the ``with`` block ends, also when it
ends with an exception)::

    with capture(model, ["layer1.0.relu", "fc"]) as cap, torch.no_grad():
        model.eval()
        model(x)
    save_activations("acts.npz", labels, cap.activations)

A module called several times in one forward pass (torchvision's ResNet blocks call their ``relu``
twice) gives one layer per call, ``layer1.0.relu:0`` and ``layer1.0.relu:1``; ``calls="first"``
keeps the first call only, and ``"layer1.0.relu:1"`` names one call. Functional activations
(``F.relu(x)`` inside ``forward``) are not modules and cannot be hooked: record the module that
consumes them with ``inputs=[...]`` (its input, named ``<module>:in``) or use an ``nn.ReLU``
attribute. Large maps can be reduced while they are captured: ``reduce="flatten"`` (default, every
feature), :class:`AvgPool` (adaptive average pooling; ``"avgpool"`` = global) or
:class:`RandomProjection` (a seeded Gaussian projection to ``dim`` features, applied as the MFTMA
reference code does to layers with more than ``dim`` = 5000 features).

Sampling for paper 003: :func:`sample_subsets` picks P classes x M examples of each subset
(unpermuted, permuted by training label, test) with a seed; the restored subset is the permuted rows
with their true labels, exactly as geomprobe's format defines it.
"""
from __future__ import annotations

import contextlib
import difflib
import hashlib
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from geomprobe._validation import InputError, check_labels, check_positive_int, check_seed

__all__ = ["capture", "Capture", "AvgPool", "RandomProjection", "default_layers", "iter_batches",
           "record_activations", "write_activations", "sample_subsets", "SubsetSample"]

_ACTIVATIONS = (nn.ReLU, nn.Sigmoid, nn.Tanh, nn.GELU, nn.ELU, nn.LeakyReLU, nn.SiLU, nn.Softplus)
_LABEL_KEYS = ("labels", "label", "y", "target", "targets")


def default_layers(model: nn.Module) -> list[str]:
    """The post-nonlinearity layers of a model: its ``capture_layers`` if it declares them, else every
    activation module (ReLU, Sigmoid, Tanh, GELU, ...) followed by the last module with parameters."""
    declared = getattr(model, "capture_layers", None)
    if declared:
        return list(declared)
    names = [n for n, m in model.named_modules() if n and isinstance(m, _ACTIVATIONS)]
    with_params = [n for n, m in model.named_modules() if n and any(True for _ in m.parameters(recurse=False))]
    if with_params and (not names or with_params[-1] not in names):
        names.append(with_params[-1])
    if not names:
        raise InputError(f"{type(model).__name__} has no activation modules or parameters; name the layers to capture")
    return names


# -- reductions --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AvgPool:
    """Adaptive average pooling of a feature map to ``size`` (per spatial axis) before it is stored.

    ``channel_axis=1`` for (n, C, *spatial) maps (convolutions; 1 to 3 spatial axes): C x size^k
    features. ``channel_axis=-1`` for (n, tokens..., d) sequences (transformers with batch_first):
    the tokens are averaged, d x size features. A (n, features) output is stored as it is.
    """

    size: int = 1
    channel_axis: int = 1

    def __post_init__(self) -> None:
        check_positive_int(self.size, "AvgPool size")
        if self.channel_axis not in (1, -1):
            raise InputError(f"AvgPool channel_axis must be 1 (n, C, ...) or -1 (n, ..., d), got {self.channel_axis}")

    def describe(self) -> str:
        return f"avgpool(size={self.size}, channel_axis={self.channel_axis})"

    def __call__(self, name: str, out: torch.Tensor) -> torch.Tensor:
        if out.dim() <= 2:
            return out.reshape(out.shape[0], -1)
        if self.channel_axis == -1:
            out = out.movedim(-1, 1)
        spatial = out.dim() - 2
        if spatial > 3:
            raise InputError(f"layer '{name}': AvgPool handles 1 to 3 spatial axes, the output has shape "
                             f"{tuple(out.shape)}")
        pool = (nn.functional.adaptive_avg_pool1d, nn.functional.adaptive_avg_pool2d,
                nn.functional.adaptive_avg_pool3d)[spatial - 1]
        return pool(out.float(), self.size).reshape(out.shape[0], -1)


@dataclass(frozen=True)
class RandomProjection:
    """Seeded Gaussian random projection of a layer's flattened features to ``dim`` features.

    As in the MFTMA reference code (for N > 5000): a (dim, N) matrix of standard normals with rows
    scaled to unit norm, applied only to layers with more than ``dim`` features (others are stored as
    they are). The matrix depends on ``seed`` and the layer name only, so every file (epoch) of a
    layer is projected the same way. It is held on the model's device: ``dim`` x N x 4 bytes, refused
    above ``max_bytes`` (pool first: ``reduce=[AvgPool(4), RandomProjection(5000)]``).
    """

    dim: int = 5000
    seed: int = 0
    max_bytes: int = 2 << 30

    def __post_init__(self) -> None:
        check_positive_int(self.dim, "RandomProjection dim")
        check_positive_int(self.seed, "RandomProjection seed", minimum=0)
        check_positive_int(self.max_bytes, "RandomProjection max_bytes")

    def describe(self) -> str:
        return f"random_projection(dim={self.dim}, seed={self.seed}, only layers with > {self.dim} features)"

    def matrix(self, name: str, n_features: int) -> np.ndarray:
        """The (dim, n_features) float32 matrix used for layer ``name`` (unit-norm rows)."""
        need = self.dim * n_features * 4
        if need > self.max_bytes:
            raise InputError(
                f"layer '{name}': a random projection of {n_features} features to {self.dim} needs a "
                f"{need / 2**30:.2f} GiB matrix, above max_bytes = {self.max_bytes / 2**30:.2f} GiB; pool the map "
                f"first (reduce=[AvgPool(4), RandomProjection({self.dim})]) or lower dim"
            )
        key = hashlib.sha256(name.encode()).digest()
        words = tuple(int.from_bytes(key[i:i + 4], "little") for i in range(0, 16, 4))
        rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=words))
        m = rng.standard_normal((self.dim, n_features), dtype=np.float32)
        m /= np.sqrt(np.einsum("ij,ij->i", m, m, dtype=np.float64)).astype(np.float32)[:, None]
        return m


class _Project:
    """A RandomProjection bound to one layer: the matrix is drawn once, at the layer's first output."""

    def __init__(self, spec: RandomProjection):
        self.spec = spec
        self._m: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, out: torch.Tensor) -> torch.Tensor:
        flat = out.reshape(out.shape[0], -1)
        n_feat = flat.shape[1]
        if n_feat <= self.spec.dim:
            return flat
        m = self._m.get(name)
        if m is None or m.device != flat.device:
            m = self._m[name] = torch.from_numpy(self.spec.matrix(name, n_feat)).to(flat.device)
        return flat.float() @ m.T


def _flatten(name: str, out: torch.Tensor) -> torch.Tensor:
    return out.reshape(out.shape[0], -1)


def _one_spec(spec: Any):
    if isinstance(spec, str):
        named = {"flatten": "flatten", "avgpool": AvgPool(), "project": RandomProjection()}
        if spec not in named:
            raise InputError(f"reduce must be 'flatten', 'avgpool', 'project', an AvgPool or a RandomProjection "
                             f"(or a list of them), got {spec!r}")
        spec = named[spec]
    if spec == "flatten":
        return _flatten, "flatten"
    if isinstance(spec, AvgPool):
        return spec, spec.describe()
    if isinstance(spec, RandomProjection):
        return _Project(spec), spec.describe()
    raise InputError(f"reduce must be 'flatten', 'avgpool', 'project', an AvgPool or a RandomProjection "
                     f"(or a list of them), got {spec!r}")


def _chain(spec: Any):
    """A reduction spec (one, or a list applied in order) -> (function(name, tensor), description)."""
    specs = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    if not specs:
        return _flatten, "flatten"
    fns = [_one_spec(s) for s in specs]
    if len(fns) == 1:
        return fns[0]

    def run(name: str, out: torch.Tensor) -> torch.Tensor:
        for f, _ in fns:
            out = f(name, out)
        return out.reshape(out.shape[0], -1)
    return run, " -> ".join(d for _, d in fns)


# -- hooks -------------------------------------------------------------------------------------------
_CALL = re.compile(r"^(.*?):(in:)?(\d+)$|^(.*):in$")


class Capture:
    """Forward hooks on named submodules; outputs accumulate across forward calls (detached, on CPU).

    ``layers``: module names (default :func:`default_layers`, or none when ``inputs`` are given);
    ``"name:k"`` records only the k-th
    call (from 0) of a module in each forward. ``inputs``: module names whose first input is recorded
    instead (layer ``"name:in"``; ``"name:in:k"`` for one call) - the way to capture a functional
    activation. ``calls``: ``"all"`` (default: a module called c > 1 times per forward gives layers
    ``name:0`` ... ``name:c-1``, in call order) or ``"first"``. ``reduce``: how each output is stored
    (see the module doc); a dict maps layer names to specs (others: flatten). ``dtype``: numpy dtype
    of the returned arrays. Call counts are learned in the first forward pass and must not change.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str] | None = None, *, inputs: Sequence[str] = (),
                 calls: str = "all", reduce: Any = "flatten", dtype: Any = np.float32):
        self.model = model
        if calls not in ("all", "first"):
            raise InputError(f"calls must be 'all' or 'first', got {calls!r}")
        self.calls = calls
        if isinstance(layers, str) or isinstance(inputs, str):
            raise InputError("layers and inputs must be lists of names, got a single string "
                             f"{layers if isinstance(layers, str) else inputs!r}")
        requested = list(default_layers(model) if layers is None and not inputs else (layers or ()))
        modules = dict(model.named_modules())
        # (request, module name, 'out'/'in', call index or None)
        self._requests: list[tuple[str, str, str, int | None]] = []
        for req in requested:
            self._requests.append(self._parse(req, modules, "out"))
        for req in inputs:
            name = req if req.endswith(":in") or ":in:" in req else None
            self._requests.append(self._parse(name or req, modules, "in"))
        if not self._requests:
            raise InputError("layers must name at least one module to capture, got an empty list")
        labels = [self._label(r) for r in self._requests]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise InputError(f"layers must be distinct, got {', '.join(dup)} more than once")
        whole = {(m, kind) for _, m, kind, idx in self._requests if idx is None}
        overlap = [self._label(r) for r in self._requests if r[3] is not None and (r[1], r[2]) in whole]
        if overlap:
            raise InputError(f"layer(s) {', '.join(overlap)} name one call of a module that is also captured whole; "
                             "give either the module or its calls")
        self.dtype = np.dtype(dtype)
        self._reduce_spec = reduce
        self._check_reduce(reduce, labels)
        self._reducers: dict[tuple[str, int | None], tuple[Any, str]] = {}
        self._mods = {(m, kind): modules[m] for _, m, kind, _ in self._requests}
        self._count: dict[tuple[str, str], int] = {k: 0 for k in self._mods}
        self._calls_seen: dict[tuple[str, str], int] | None = None  # per-forward call counts (first forward)
        self._chunks: dict[tuple[str, str, int], list[torch.Tensor]] = {}
        self._handles: list[Any] = []
        self._shapes: dict[tuple[str, str, int], tuple[int, ...]] = {}  # last raw output shape, for messages

    def _check_reduce(self, reduce: Any, labels: list[str]) -> None:
        """Every reduction spec is valid, and a dict names only captured layers (a typo would silently
        store the full layer): checked before any forward pass."""
        if not isinstance(reduce, Mapping):
            _chain(reduce)
            return
        bases = set(labels) | {"input"}
        for key, spec in reduce.items():
            m = _CALL.match(key) if isinstance(key, str) else None
            base = m.group(1) if m and m.group(1) else key  # 'relu:1' -> 'relu'
            if key not in bases and base not in bases:
                raise InputError(f"reduce names layer {key!r}, which is not captured; captured: {', '.join(labels)}")
            _chain(spec)

    @staticmethod
    def _label(req: tuple[str, str, str, int | None]) -> str:
        _, mod, kind, idx = req
        base = mod + (":in" if kind == "in" else "")
        return base if idx is None else f"{base}:{idx}"

    def _parse(self, req: str, modules: Mapping[str, nn.Module], kind: str) -> tuple[str, str, str, int | None]:
        if not isinstance(req, str):
            raise InputError(f"layer names must be strings, got {req!r}")
        if kind == "out" and req in modules and req:
            return req, req, "out", None
        if kind == "in" and req in modules and req:
            return req, req, "in", None
        m = _CALL.match(req)
        if m:
            if m.group(4) is not None:
                mod, k, idx = m.group(4), "in", None
            else:
                mod, k, idx = m.group(1), ("in" if m.group(2) else kind), int(m.group(3))
            if mod in modules and mod:
                return req, mod, k, idx
        known = [n for n in modules if n]
        close = difflib.get_close_matches(req.split(":")[0], known, n=3)
        hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
        shown = ", ".join(known[:40]) + (f", ... ({len(known)} modules)" if len(known) > 40 else "")
        raise InputError(f"layer(s) {req!r} not found in {type(self.model).__name__}{hint}; modules: {shown}")

    # -- hook functions ----------------------------------------------------------------------------
    def _spec(self, base: str, idx: int | None) -> Any:
        spec = self._reduce_spec
        if not isinstance(spec, Mapping):
            return spec
        return spec.get(f"{base}:{idx}", spec.get(base, "flatten")) if idx is not None else spec.get(base, "flatten")

    def _reducer(self, base: str, idx: int | None):
        """The reduction of one call of a module (a random projection is seeded by the module's name, so
        every call and every file gets the same matrix)."""
        r = self._reducers.get((base, idx))
        if r is None:
            r = self._reducers[(base, idx)] = _chain(self._spec(base, idx))
        return r

    def _store(self, mod: str, kind: str, out: Any) -> None:
        key = (mod, kind)
        idx = self._count[key]
        self._count[key] = idx + 1
        if isinstance(out, (tuple, list)):
            out = out[0]
        if not isinstance(out, torch.Tensor):
            return
        wanted = [r for r in self._requests if r[1] == mod and r[2] == kind]
        if not any(r[3] == idx or (r[3] is None and (self.calls == "all" or idx == 0)) for r in wanted):
            return
        with torch.no_grad():
            out = out.detach()
            if out.dim() == 0:
                out = out.reshape(1, 1)
            base = mod + (":in" if kind == "in" else "")
            fn, _ = self._reducer(base, idx)
            self._shapes[(mod, kind, idx)] = tuple(out.shape)
            red = fn(base, out)
            self._chunks.setdefault((mod, kind, idx), []).append(red.to("cpu", copy=True).float())

    def _name(self, mod: str, kind: str, idx: int) -> str:
        """Layer name of a module's idx-th call recorded for a request without an explicit call."""
        base = mod + (":in" if kind == "in" else "")
        if self.calls == "first" or self._calls_seen is None or self._calls_seen.get((mod, kind), 1) <= 1:
            return base
        return f"{base}:{idx}"

    def _pre_root(self, module, args) -> None:
        self._end_forward()

    def _end_forward(self) -> None:
        """Close the call counts of the forward pass that just ran (at the next forward or read)."""
        counts = dict(self._count)
        if not any(counts.values()):
            return
        for k in self._count:
            self._count[k] = 0
        if self._calls_seen is None:
            self._calls_seen = counts
            return
        if self.calls == "all":
            for k, c in counts.items():
                first = self._calls_seen[k]
                explicit_only = all(r[3] is not None for r in self._requests if (r[1], r[2]) == k)
                if c != first and not explicit_only and (c > 1 or first > 1):
                    raise InputError(
                        f"module '{k[0]}' was called {c} time(s) in this forward pass but {first} in the first, "
                        f"so its calls cannot be lined up as layers; name one call ('{k[0]}:0') or pass "
                        "calls='first'")

    def __enter__(self) -> "Capture":
        try:
            self._handles.append(self.model.register_forward_pre_hook(self._pre_root))
            for (mod, kind), m in self._mods.items():
                if kind == "out":
                    self._handles.append(m.register_forward_hook(
                        lambda module, i, o, _n=mod: self._store(_n, "out", o)))
                else:
                    self._handles.append(m.register_forward_pre_hook(
                        lambda module, i, _n=mod: self._store(_n, "in", i[0] if i else None)))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every hook this object registered (idempotent)."""
        while self._handles:
            self._handles.pop().remove()

    def clear(self) -> None:
        """Forget the outputs recorded so far (the call counts learned in the first pass are kept)."""
        self._chunks.clear()

    @property
    def layers(self) -> list[str]:
        """Layer names in order (a module called several times per forward expands in place once the
        first forward pass has run)."""
        return [name for name, _ in self._keys()]

    def _keys(self) -> list[tuple[str, tuple[str, str, int]]]:
        self._end_forward()
        out = []
        for req in self._requests:
            _, mod, kind, idx = req
            if idx is not None:
                out.append((self._label(req), (mod, kind, idx)))
                continue
            n_calls = 1
            if self.calls == "all" and self._calls_seen is not None:
                n_calls = max(1, self._calls_seen.get((mod, kind), 1))
            for i in range(n_calls):
                out.append((self._name(mod, kind, i), (mod, kind, i)))
        return out

    def describe(self) -> dict[str, Any]:
        """Provenance of every layer (module, call, input/output, reduction), stored in the file's meta."""
        d = {}
        for name, (mod, kind, idx) in self._keys():
            base = mod + (":in" if kind == "in" else "")
            d[name] = {"module": mod, "call": idx, "tensor": "input" if kind == "in" else "output",
                       "reduce": _chain(self._spec(base, idx))[1]}
        return d

    def take(self, n_rows: int | None = None) -> "OrderedDict[str, np.ndarray]":
        """Layer -> array of everything recorded since the last take, then forget it (streaming).
        ``n_rows``: the number of examples run; a layer with another number of rows is an InputError."""
        out: OrderedDict[str, np.ndarray] = OrderedDict()
        for name, key in self._keys():
            chunks = self._chunks.get(key)
            if not chunks:
                raise InputError(f"layer {name!r} recorded no output: it was not called in the forward pass")
            arr = torch.cat(chunks).numpy().astype(self.dtype, copy=False)
            if n_rows is not None and arr.shape[0] != n_rows:
                raise InputError(
                    f"layer {name!r} gave {arr.shape[0]} rows for {n_rows} examples (output shape "
                    f"{self._shapes.get(key)}); "
                    "its first axis is not the batch (e.g. nn.Transformer* without batch_first=True) - "
                    "capture another module or use batch_first=True")
            out[name] = arr
        self._chunks.clear()
        return out

    @property
    def activations(self) -> "OrderedDict[str, np.ndarray]":
        """layer name -> (n, features) numpy array of every output recorded so far, in layer order."""
        out: OrderedDict[str, np.ndarray] = OrderedDict()
        for name, key in self._keys():
            chunks = self._chunks.get(key)
            if not chunks:
                raise InputError(f"layer {name!r} recorded no output: it was not called in the forward pass")
            out[name] = torch.cat(chunks).numpy().astype(self.dtype, copy=False)
        return out


def capture(model: nn.Module, layers: Sequence[str] | None = None, **kwargs: Any) -> Capture:
    """Context manager recording the outputs of ``layers`` (default: :func:`default_layers`)."""
    return Capture(model, layers, **kwargs)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


# -- input batches -----------------------------------------------------------------------------------
def _rows_of(x: Any) -> int:
    if isinstance(x, torch.Tensor) or isinstance(x, np.ndarray):
        return int(x.shape[0])
    if isinstance(x, Mapping):
        for v in x.values():
            if isinstance(v, (torch.Tensor, np.ndarray)) and np.ndim(v) >= 1:
                return int(v.shape[0])
    if isinstance(x, (tuple, list)) and x:
        return _rows_of(x[0])
    raise InputError(f"cannot tell the batch size of a {type(x).__name__}: give tensors, arrays, tuples or dicts")


def iter_batches(data: Any, batch_size: int = 512, label_key: str | None = None
                 ) -> Iterator[tuple[Any, np.ndarray | None]]:
    """Yield ``(inputs, labels or None)`` from an array / tensor (sliced into batches) or an iterable of
    batches (a DataLoader): a tensor; a tuple/list ``(x, y, ...)`` (x may itself be a tuple of inputs);
    a dict (its label key - ``label_key`` or the first of labels, label, y, target, targets - is the
    labels; the other entries are passed as keyword arguments)."""
    if isinstance(data, (np.ndarray, torch.Tensor)):
        bs = check_positive_int(batch_size, "batch_size")
        for i in range(0, data.shape[0], bs):
            yield data[i:i + bs], None
        return
    if isinstance(data, (Mapping, str, bytes)) or not hasattr(data, "__iter__"):
        raise InputError(f"data must be an array, a tensor or an iterable of batches (a DataLoader), "
                         f"got {type(data).__name__}")
    for batch in data:
        if isinstance(batch, (torch.Tensor, np.ndarray)):
            yield batch, None
        elif isinstance(batch, (tuple, list)):
            if not batch:
                raise InputError("data yielded an empty batch tuple")
            yield batch[0], (None if len(batch) < 2 else _label_array(batch[1]))
        elif isinstance(batch, Mapping):
            keys = [label_key] if label_key else [k for k in _LABEL_KEYS if k in batch]
            if label_key and label_key not in batch:
                raise InputError(f"a batch has no label key {label_key!r}; keys: {', '.join(map(str, batch))}")
            lab = _label_array(batch[keys[0]]) if keys else None
            yield {k: v for k, v in batch.items() if not keys or k != keys[0]}, lab
        else:
            raise InputError(f"data yielded a {type(batch).__name__}; batches must be tensors, arrays, (x, y) "
                             "tuples or dicts")


def _label_array(y: Any) -> np.ndarray:
    if isinstance(y, torch.Tensor):
        y = y.detach().cpu().numpy()
    return np.asarray(y)


def _to(x: Any, device: Any, dtype: torch.dtype) -> Any:
    if isinstance(x, np.ndarray):
        x = torch.as_tensor(x)
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device=device)
    if isinstance(x, Mapping):
        return {k: _to(v, device, dtype) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_to(v, device, dtype) for v in x)
    return x


def _call(model: nn.Module, x: Any) -> Any:
    if isinstance(x, Mapping):
        return model(**x)
    if isinstance(x, (tuple, list)):
        return model(*x)
    return model(x)


def _model_device(model: nn.Module, device: Any) -> tuple[Any, torch.dtype]:
    p = next(model.parameters(), None)
    if device is None:
        device = p.device if p is not None else torch.device("cpu")
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    return device, dtype


def _run(model, data, cap: Capture, *, batch_size, device, include_input, labels, label_key, on_batch):
    """Forward every batch under eval/no_grad; call on_batch(acts, labels_batch) after each."""
    device, dtype = _model_device(model, device)
    lab_all = None if labels is None else np.asarray(labels)
    offset = 0
    with cap, _eval_mode(model), torch.no_grad():
        for x, y in iter_batches(data, batch_size, label_key):
            nb = _rows_of(x)
            if lab_all is not None:
                y = lab_all[offset:offset + nb]
                if y.shape[0] != nb:
                    raise InputError(f"labels has {lab_all.shape[0]} entries but the data has more rows "
                                     f"(at least {offset + nb})")
            _call(model, _to(x, device, dtype))
            acts = cap.take(nb)
            if include_input:
                if not isinstance(x, (torch.Tensor, np.ndarray)):
                    raise InputError("include_input needs tensor or array inputs, got a "
                                     f"{type(x).__name__}")
                xin = torch.as_tensor(x).detach()
                fn, _ = cap._reducer("input", None)  # noqa: SLF001 - same reduction rules as the layers
                xin = fn("input", xin.reshape(nb, *xin.shape[1:])).cpu().float().numpy().astype(cap.dtype)
                acts = OrderedDict([("input", xin)] + list(acts.items()))
            on_batch(acts, y, offset)
            offset += nb
    if lab_all is not None and offset != lab_all.shape[0]:
        raise InputError(f"labels has {lab_all.shape[0]} entries but the data gave {offset} examples")
    return offset


def record_activations(model: nn.Module, x: Any, layers: Sequence[str] | None = None, *, batch_size: int = 512,
                       device: Any = None, include_input: bool = False, inputs: Sequence[str] = (),
                       calls: str = "all", reduce: Any = "flatten", labels: Any = None,
                       label_key: str | None = None, return_labels: bool = False):
    """Run ``x`` (array, tensor or DataLoader; see :func:`iter_batches`) through the model in eval mode
    (no grad, in batches, on the model's device) and return layer -> (n, features) activations in memory
    (:func:`write_activations` streams to disk instead). ``include_input`` adds the raw input as a first
    layer named 'input' (the pixel-space baseline). ``return_labels``: also return the labels (from
    ``labels`` or the batches), as ``(activations, labels)``.
    """
    batch_size = check_positive_int(batch_size, "batch_size")
    cap = Capture(model, layers, inputs=inputs, calls=calls, reduce=reduce)
    parts: dict[str, list[np.ndarray]] = OrderedDict()
    labs: list[np.ndarray] = []

    def keep(acts, y, offset):
        for k, v in acts.items():
            parts.setdefault(k, []).append(v)
        labs.append(y)

    _run(model, x, cap, batch_size=batch_size, device=device, include_input=include_input, labels=labels,
         label_key=label_key, on_batch=keep)
    acts = OrderedDict((k, np.concatenate(v)) for k, v in parts.items())
    if not return_labels:
        return acts
    if any(y is None for y in labs):
        raise InputError("return_labels: the batches carry no labels; pass labels=...")
    return acts, np.concatenate(labs) if labs else np.zeros(0, np.int64)


def write_activations(path: Any, model: nn.Module, x: Any, labels: Any = None, layers: Sequence[str] | None = None,
                      *, train_labels: Any = None, permuted: Any = None, split: Any = None,
                      extra: Mapping[str, Any] | None = None, meta: Mapping[str, Any] | None = None,
                      force: bool = False, batch_size: int = 512, include_input: bool = False, device: Any = None,
                      inputs: Sequence[str] = (), calls: str = "all", reduce: Any = "flatten",
                      label_key: str | None = None, compress: bool = False, dtype: Any = np.float32) -> Path:
    """Record activations of ``x`` and stream them to an activations file, batch by batch.

    ``x``: an array / tensor (run in batches of ``batch_size``) or an iterable of batches (a DataLoader
    yielding tensors, ``(x, y)`` tuples or dicts; see :func:`iter_batches`). ``labels``: the true labels
    (default: those of the batches). ``train_labels``, ``permuted``, ``split``: whole-data arrays (n,),
    written alongside. Memory: one batch plus bounded buffers (:class:`geomprobe.writer.ActivationWriter`);
    the file appears atomically at the end, and nothing is left behind on an error. The file's meta
    records each layer's module, call and reduction under ``capture``. Errors name ``path``.
    """
    from geomprobe.writer import ActivationWriter

    path = Path(path)
    try:
        batch_size = check_positive_int(batch_size, "batch_size")
        n_known = int(x.shape[0]) if isinstance(x, (np.ndarray, torch.Tensor)) else None
        lab = None
        if labels is not None:
            lab = check_labels(labels, n_known, rows_name="x") if n_known is not None else check_labels(labels)
        whole = {}
        for k, v in (("train_labels", train_labels), ("permuted", permuted), ("split", split)):
            if v is not None:
                whole[k] = np.asarray(v)
                if whole[k].ndim != 1:
                    raise InputError(f"{k} must be 1-D (n,), got shape {whole[k].shape}")
                if n_known is not None and whole[k].shape[0] != n_known:
                    raise InputError(f"{k} has {whole[k].shape[0]} entries but x has {n_known} rows")
        cap = Capture(model, layers, inputs=inputs, calls=calls, reduce=reduce, dtype=dtype)
        writer = ActivationWriter(path, force=force, compress=compress)
    except InputError as exc:
        raise InputError(_prefixed(path, exc)) from None
    try:
        def append(acts, y, offset):
            if y is None:
                raise InputError("no labels: pass labels=... or give batches (x, y) / dicts with a label key")
            y = _label_array(y)
            if y.ndim != 1 or (y.size and y.dtype.kind not in "iub"):
                raise InputError(f"labels of a batch must be 1-D integers, got dtype {y.dtype} shape {y.shape}")
            nb = y.shape[0]
            parts = {}
            for k, v in whole.items():
                part = v[offset:offset + nb]
                if part.shape[0] != nb:
                    raise InputError(f"{k} has {v.shape[0]} entries but the data has more rows (at least "
                                     f"{offset + nb})")
                parts[k] = part
            writer.append(y, acts, **parts)

        n = _run(model, x, cap, batch_size=batch_size, device=device, include_input=include_input, labels=lab,
                 label_key=label_key, on_batch=append)
        for k, v in whole.items():
            if v.shape[0] != n:
                raise InputError(f"{k} has {v.shape[0]} entries but the data gave {n} examples")
        info = dict(meta or {})
        info.setdefault("capture", {"model": type(model).__name__, "calls": calls, "layers": cap.describe()})
        return writer.close(meta=info, extra=extra)
    except InputError as exc:
        writer.abort()
        raise InputError(_prefixed(path, exc)) from None
    except BaseException:
        writer.abort()
        raise


def _prefixed(path: Path, exc: InputError) -> str:
    msg = str(exc)
    return msg if msg.startswith(str(path)) else f"{path}: {msg}"


# -- sampling P classes x M examples per subset (paper 003: 100 x 50) ---------------------------
class SubsetSample:
    """Rows chosen for an activations file, with the arrays that define the format's subsets."""

    def __init__(self, source: np.ndarray, index: np.ndarray, labels, train_labels, permuted, split, classes):
        self.source = source  # 'train' / 'test' for each row
        self.index = index  # index into the train or test arrays
        self.labels = labels  # true labels
        self.train_labels = train_labels
        self.permuted = permuted
        self.split = split
        self.classes = classes

    def __len__(self) -> int:
        return int(self.index.size)

    def gather(self, x_train: np.ndarray, x_test: np.ndarray) -> np.ndarray:
        out = np.empty((len(self),) + x_train.shape[1:], dtype=x_train.dtype)
        tr = self.source == "train"
        out[tr] = x_train[self.index[tr]]
        out[~tr] = x_test[self.index[~tr]]
        return out


def sample_subsets(y_true: Any, y_train: Any, permuted: Any, y_test: Any, *, n_classes: int = 100,
                   n_per_class: int = 50, seed: int = 0) -> SubsetSample:
    """Seeded P classes x M examples of each subset: unpermuted (by true label), permuted (by training
    label; the restored subset is the same rows with their true labels) and test (by true label).

    The same P classes (drawn with the seed) are used for every subset; a class with fewer than M
    examples in a subset contributes all it has.
    """
    y_true = check_labels(y_true, name="y_true")
    y_train = check_labels(y_train, y_true.size, name="y_train", rows_name="y_true")
    perm = np.asarray(permuted, dtype=bool)
    if perm.shape != y_true.shape:
        raise InputError(f"permuted has shape {perm.shape} but y_true has {y_true.size} entries")
    y_test = check_labels(y_test, name="y_test")
    P = check_positive_int(n_classes, "n_classes")
    M = check_positive_int(n_per_class, "n_per_class")
    rng = check_seed(seed)
    classes = np.unique(np.concatenate([y_true, y_test]))
    if P < classes.size:
        classes = np.sort(rng.choice(classes, size=P, replace=False))

    def pick(pool: np.ndarray, lab: np.ndarray) -> np.ndarray:
        rows = []
        for c in classes:
            cand = pool[lab[pool] == c]
            rows.append(rng.permutation(cand)[:M] if cand.size > M else cand)
        return np.sort(np.concatenate(rows)) if rows else np.zeros(0, np.int64)

    unp = pick(np.flatnonzero(~perm), y_true)
    per = pick(np.flatnonzero(perm), y_train)
    tr_idx = np.union1d(unp, per).astype(np.int64)
    te_idx = pick(np.arange(y_test.size), y_test).astype(np.int64)
    n_tr = tr_idx.size
    source = np.array(["train"] * n_tr + ["test"] * te_idx.size, dtype="<U5")
    index = np.concatenate([tr_idx, te_idx])
    labels = np.concatenate([y_true[tr_idx], y_test[te_idx]])
    train_labels = np.concatenate([y_train[tr_idx], y_test[te_idx]])
    permuted_out = np.concatenate([perm[tr_idx], np.zeros(te_idx.size, bool)])
    return SubsetSample(source, index, labels, train_labels, permuted_out, source.copy(), classes)
