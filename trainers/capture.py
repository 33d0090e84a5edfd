"""Record named layers' outputs of any ``nn.Module`` and write geomprobe activation files.

Any torch model writes an activations file in a few lines::

    from geomprobe.trainers.capture import capture
    from geomprobe.io import save_activations

    with capture(model, ["layer1.relu", "fc"]) as cap:
        model.eval()
        with torch.no_grad():
            model(x)
    save_activations("acts.npz", labels, cap.activations)

or in one call: ``write_activations("acts.npz", model, x, labels)``. Hooks are removed when the
``with`` block ends, also when it ends with an exception.

Sampling for paper 003: :func:`sample_subsets` picks P classes x M examples of each subset
(unpermuted, permuted by training label, test) with a seed; the restored subset is the permuted rows
with their true labels, exactly as geomprobe's format defines it.
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from geomprobe._validation import InputError, check_labels, check_positive_int, check_seed

__all__ = ["capture", "Capture", "default_layers", "record_activations", "write_activations", "sample_subsets",
           "SubsetSample"]

_ACTIVATIONS = (nn.ReLU, nn.Sigmoid, nn.Tanh, nn.GELU, nn.ELU, nn.LeakyReLU, nn.SiLU, nn.Softplus)


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


class Capture:
    """Forward hooks on named submodules; outputs accumulate across forward calls (detached, on CPU)."""

    def __init__(self, model: nn.Module, layers: Sequence[str] | None = None, *, flatten: bool = False,
                 dtype: Any = np.float32):
        self.model = model
        self.layers = list(default_layers(model) if layers is None else layers)
        if not self.layers:
            raise InputError("layers must name at least one module to capture, got an empty list")
        modules = dict(model.named_modules())
        missing = [n for n in self.layers if n not in modules]
        if missing:
            known = ", ".join(n for n in modules if n)
            raise InputError(f"layer(s) {', '.join(map(repr, missing))} not found in {type(model).__name__}; "
                             f"modules: {known}")
        if len(set(self.layers)) != len(self.layers):
            raise InputError(f"layers must be distinct, got {self.layers}")
        self._modules = [modules[n] for n in self.layers]
        self.flatten = flatten
        self.dtype = np.dtype(dtype)
        self._chunks: dict[str, list[torch.Tensor]] = {n: [] for n in self.layers}
        self._handles: list[Any] = []

    def _hook(self, name: str):
        def fn(module, inputs, output):
            if isinstance(output, (tuple, list)):
                output = output[0]
            out = output.detach()
            if self.flatten:
                out = out.reshape(out.shape[0], -1)
            self._chunks[name].append(out.to("cpu", copy=True).float())
        return fn

    def __enter__(self) -> "Capture":
        try:
            for name, mod in zip(self.layers, self._modules):
                self._handles.append(mod.register_forward_hook(self._hook(name)))
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
        for v in self._chunks.values():
            v.clear()

    @property
    def activations(self) -> "OrderedDict[str, np.ndarray]":
        """layer name -> (n, ...) numpy array of every output recorded so far, in layer order."""
        out: OrderedDict[str, np.ndarray] = OrderedDict()
        for n in self.layers:
            chunks = self._chunks[n]
            if not chunks:
                raise InputError(f"layer {n!r} recorded no output: it was not called in the forward pass")
            out[n] = torch.cat(chunks).numpy().astype(self.dtype, copy=False)
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


def record_activations(model: nn.Module, x: Any, layers: Sequence[str] | None = None, *, batch_size: int = 512,
                       device: Any = None, include_input: bool = False) -> "OrderedDict[str, np.ndarray]":
    """Run ``x`` through the model in eval mode (no grad, in batches) and return layer -> activations.

    ``include_input`` adds the raw input as a first layer named 'input' (the pixel-space baseline).
    """
    batch_size = check_positive_int(batch_size, "batch_size")
    xt = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    dtype = next((p.dtype for p in model.parameters()), torch.float32)
    with capture(model, layers) as cap, _eval_mode(model), torch.no_grad():
        for i in range(0, xt.shape[0], batch_size):
            model(xt[i:i + batch_size].to(device=device, dtype=dtype))
        acts = cap.activations
    if include_input:
        acts = OrderedDict([("input", xt.detach().cpu().float().numpy())] + list(acts.items()))
    return acts


def write_activations(path: Any, model: nn.Module, x: Any, labels: Any, layers: Sequence[str] | None = None, *,
                      train_labels: Any = None, permuted: Any = None, split: Any = None,
                      extra: Mapping[str, Any] | None = None, meta: Mapping[str, Any] | None = None,
                      force: bool = False, batch_size: int = 512, include_input: bool = False,
                      device: Any = None) -> Any:
    """Record activations of ``x`` and write them with :func:`geomprobe.io.save_activations`."""
    from geomprobe.io import save_activations

    lab = check_labels(labels, int(np.shape(x)[0]), rows_name="x")
    acts = record_activations(model, x, layers, batch_size=batch_size, device=device, include_input=include_input)
    return save_activations(path, lab, acts, train_labels=train_labels, permuted=permuted, split=split,
                            extra=extra, meta=meta, force=force)


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
