"""Checkpoints (atomic), relative weight distance from init, and layer rewinding (paper 003 section 4)."""
from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from geomprobe._validation import InputError
from geomprobe.io import atomic_write_bytes
from geomprobe.weights import relative_distance

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "epoch_checkpoints",
    "checkpoint_path",
    "relative_weight_distance",
    "rewind_layer",
    "rewind_table",
    "layer_param_names",
]

_EPOCH_RE = re.compile(r"^epoch_(\d+)\.pt$")


def checkpoint_path(out: str | Path, epoch: int | str) -> Path:
    """``out/checkpoints/epoch_0007.pt`` for an int, ``out/checkpoints/<name>.pt`` for 'last' / 'best'."""
    name = f"epoch_{epoch:04d}" if isinstance(epoch, int) else str(epoch)
    return Path(out) / "checkpoints" / f"{name}.pt"


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """torch.save into memory, then write atomically (temporary file + rename): never a half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(state, buf)
    return atomic_write_bytes(path, buf.getvalue(), force=True)


def load_checkpoint(path: str | Path, map_location: Any = "cpu", *, keys: Sequence[str] = ("model",)) \
        -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (``weights_only``: no arbitrary code runs).

    The file must hold a dict with every key in ``keys`` (``model`` a dict of tensors); anything else (a
    bare tensor, a foreign file) is an InputError naming the file and what it holds."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such checkpoint")
    try:
        ck = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt / foreign files
        raise InputError(f"{path}: not a readable geomprobe checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(ck, dict):
        raise InputError(f"{path}: a geomprobe checkpoint holds a dict with keys {', '.join(keys)}; this file "
                         f"holds a {type(ck).__name__}")
    missing = [k for k in keys if k not in ck]
    if missing:
        raise InputError(f"{path}: not a geomprobe checkpoint: missing key(s) {', '.join(missing)} "
                         f"(keys present: {', '.join(sorted(map(str, ck))[:12])})")
    if "model" in keys and not (isinstance(ck["model"], dict)
                                and all(isinstance(v, torch.Tensor) for v in ck["model"].values())):
        raise InputError(f"{path}: 'model' must be a state dict (name -> tensor), got {type(ck['model']).__name__}")
    return ck


# what train() keeps to resume a run (checked when it resumes)
RESUME_KEYS = ("model", "optimizer", "config", "epoch", "step", "rng_cpu", "history", "best_epoch", "best_acc")
# the checkpoint names train() writes: the only files in checkpoints/ it ever deletes
OWN_CHECKPOINT = re.compile(r"^(?:epoch_\d+|last|best)\.pt$")


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> None:
    """``model.load_state_dict(state)``, a mismatch (other layers or shapes) being an InputError that names
    the checkpoint file and the first differences."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} (model {tuple(own[k].shape)})" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or extra or shapes:
        parts = ([f"missing {', '.join(missing[:4])}"] if missing else []) + \
                ([f"unexpected {', '.join(extra[:4])}"] if extra else []) + \
                ([f"shapes differ: {', '.join(shapes[:4])}"] if shapes else [])
        raise InputError(f"{path}: its weights do not fit the model ({'; '.join(parts)}); the checkpoint is from "
                         "another model or options: use another --out or --force to start over")
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise InputError(f"{path}: its weights do not load into the model ({exc})") from None


def epoch_checkpoints(out: str | Path) -> dict[int, Path]:
    """epoch -> path of every ``epoch_NNNN.pt`` under ``out/checkpoints``, sorted by epoch."""
    folder = Path(out) / "checkpoints"
    found = {}
    if folder.is_dir():
        for p in folder.iterdir():
            m = _EPOCH_RE.match(p.name)
            if m:
                found[int(m.group(1))] = p
    return dict(sorted(found.items()))


def relative_weight_distance(initial: dict[str, torch.Tensor], current: dict[str, torch.Tensor] | nn.Module) \
        -> dict[str, float]:
    """||W_t - W_0|| / ||W_0|| (Frobenius) for every floating-point tensor (paper 002 appendix D).

    The torch side of the core's formula: the two norms are reduced here (float64, on the CPU), the
    ratio and its zero-norm rule are :func:`geomprobe.weights.relative_distance` (initial state
    first, like :func:`geomprobe.weights.weight_distance`). Where the relative distance is undefined
    (initial norm 0, e.g. a zero-initialised bias) the training log shows the absolute distance
    ||W_t|| under the name with suffix ' (abs)', so the change is never hidden.
    """
    cur = current.state_dict() if isinstance(current, nn.Module) else current
    out: dict[str, float] = {}
    for name, w0 in initial.items():
        if name not in cur or not torch.is_floating_point(w0) or "running_" in name:
            continue
        w0d = w0.detach().double().cpu()
        diff = float(torch.linalg.vector_norm(cur[name].detach().double().cpu() - w0d))
        rel = relative_distance(diff, float(torch.linalg.vector_norm(w0d)))
        if rel is None:
            out[name + " (abs)"] = diff
        else:
            out[name] = rel
    return out


def layer_param_names(model: nn.Module) -> dict[str, list[str]]:
    """Weight layer name -> its state-dict keys (parameters and buffers such as BatchNorm statistics).

    A layer is every module with parameters of its own, except that a BatchNorm module which directly
    follows a conv / linear module in the same container belongs to that layer: paper 003's tables count
    "Conv + BatchNorm + ReLU" as one layer, and rewinding a conv without its BatchNorm would normalise
    the old weights' outputs with the final running statistics.
    """
    owner: dict[str, str] = {}  # BatchNorm module name -> the conv / linear it follows
    for mname, mod in model.named_modules():
        prev: str | None = None
        for cname, child in mod.named_children():
            full = f"{mname}.{cname}" if mname else cname
            if isinstance(child, nn.modules.batchnorm._BatchNorm) and prev is not None:
                owner[full] = prev
                prev = None
            elif isinstance(child, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
                prev = full
            elif not isinstance(child, (nn.Identity, nn.ReLU)):  # pooling, dropout, containers end the pairing
                prev = None
    out: dict[str, list[str]] = {}
    for mname, mod in model.named_modules():
        if not any(True for _ in mod.parameters(recurse=False)):
            continue
        own = [n for n, _ in mod.named_parameters(recurse=False)] + [n for n, _ in mod.named_buffers(recurse=False)]
        keys = [f"{mname}.{n}" if mname else n for n in own]
        out.setdefault(owner.get(mname, mname), []).extend(keys)
    return out


def rewind_layer(model: nn.Module, layer: str, state: dict[str, torch.Tensor],
                 names: dict[str, list[str]] | None = None) -> None:
    """Replace one layer's parameters (and buffers) in ``model`` by their values in ``state``.

    ``names``: ``layer_param_names(model)`` when the caller has it already (rewind_table)."""
    names = layer_param_names(model) if names is None else names
    if layer not in names:
        raise InputError(f"layer {layer!r} has no parameters in {type(model).__name__}; layers: {', '.join(names)}")
    with torch.no_grad():
        sd = model.state_dict()
        for key in names[layer]:
            if key not in state:
                raise InputError(f"checkpoint has no tensor {key!r} for layer {layer!r}")
            sd[key].copy_(state[key].to(sd[key].device))


def rewind_table(model: nn.Module, final_state: dict[str, torch.Tensor], checkpoints: dict[int, Any],
                 evaluate: Callable[[nn.Module], dict[str, float]], layers: Sequence[str] | None = None) \
        -> list[dict[str, Any]]:
    """For every (layer, epoch): load the final weights, rewind that layer to ``epoch`` and evaluate.

    ``checkpoints`` maps epoch -> path or model state dict; ``evaluate(model)`` returns metrics (e.g.
    train/test accuracy). Returns rows {layer, epoch, **metrics}. The model ends with the final weights.
    """
    names = layer_param_names(model)
    layers = list(layers) if layers is not None else list(names)
    rows = []
    for epoch, ck in checkpoints.items():
        state = ck if isinstance(ck, dict) and "model" not in ck else None
        if state is None:
            loaded = load_checkpoint(ck) if not isinstance(ck, dict) else ck
            state = loaded["model"]
        for layer in layers:
            model.load_state_dict(final_state)
            rewind_layer(model, layer, state, names)
            rows.append({"layer": layer, "epoch": int(epoch), **evaluate(model)})
    model.load_state_dict(final_state)
    return rows
