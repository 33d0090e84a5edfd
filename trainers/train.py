"""One readable training loop for every experiment (CPU and CUDA in one code path).

    cfg = TrainConfig(epochs=20, optimizer="sgd", lr=0.01, batch_size=256, seed=0)
    result = train(model, x_train, y_train, x_test, y_test, cfg=cfg, out="runs/a")

What it does, in order, per epoch: shuffle with a torch.Generator seeded by (seed, epoch); step through
mini-batches (optional autocast); every ``align_every`` steps log gradient statistics; evaluate on the
train set, the test set and any extra named sets; append one JSON line to ``out/metrics.jsonl``; write
``out/checkpoints/last.pt`` (and ``epoch_NNNN.pt`` every ``keep_every`` epochs, ``best.pt`` at the best
test accuracy) atomically. The initial weights are ``epoch_0000.pt``.

Resuming: when ``out/checkpoints/last.pt`` exists for an unfinished run with the same config, training
continues from it (model, optimizer, RNG states, log truncated to that epoch) and ends with the same
weights as an uninterrupted run on the CPU. A finished run is refused unless ``force=True``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from geomprobe._validation import AnalysisError, InputError, check_choice
from geomprobe.io import atomic_write_text

from .checkpoint import (OWN_CHECKPOINT, RESUME_KEYS, checkpoint_path, load_checkpoint, load_model_state,
                         relative_weight_distance, save_checkpoint)

__all__ = ["TrainConfig", "TrainResult", "TrainingDiverged", "train", "make_loss", "evaluate", "resolve_device", "LOSSES"]

LOSSES = ("ce", "hinge", "squared", "mse")


@dataclass
class TrainConfig:
    """Plain training configuration (stored in every checkpoint)."""

    epochs: int = 10
    max_steps: int = 0  # stop after this many optimizer steps (0: no limit)
    batch_size: int = 256
    optimizer: str = "sgd"  # sgd | adam
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    lr_milestones: list = field(default_factory=list)  # epochs after which lr *= lr_gamma
    lr_gamma: float = 0.1
    loss: str = "ce"  # ce | hinge (multi-class) | squared (to one-hot) | mse (regression targets)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    amp: bool = False  # autocast (bfloat16) on CUDA
    channels_last: bool = False
    stop_train_acc: float = 0.0  # stop once train accuracy >= this (paper 000: 1.0); 0 = off
    stop_train_loss: float = 0.0  # stop once train loss <= this; 0 = off
    align_every: int = 0  # gradient statistics every k steps (0 = off)
    keep_every: int = 1  # keep epoch_NNNN.pt every k epochs (0: only init, last, best)
    eval_batch_size: int = 1024
    repeat: int = 1  # passes over the training data per epoch (one-example runs: steps per epoch)
    deterministic: bool = True
    progress: str = "auto"  # auto (tqdm when stderr is a TTY) | on | off

    def __post_init__(self) -> None:
        check_choice(self.optimizer, "optimizer", ("sgd", "adam"))
        check_choice(self.loss, "loss", LOSSES)
        check_choice(self.device, "device", ("auto", "cpu", "cuda"))
        check_choice(self.progress, "progress", ("auto", "on", "off"))
        for k in ("epochs", "batch_size", "eval_batch_size", "repeat"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"{k} must be an integer >= 1, got {v!r}")
        for k in ("max_steps", "align_every", "keep_every", "seed"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise InputError(f"{k} must be an integer >= 0, got {v!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise InputError(f"lr must be a number > 0, got {self.lr!r}")


class TrainingDiverged(AnalysisError):
    """The loss became NaN or Inf (CLI exit code 1); lower the learning rate."""


@dataclass
class TrainResult:
    history: list  # one dict per epoch (epoch 0 = init)
    best_epoch: int
    final_epoch: int
    steps: int
    out: Path | None
    resumed_from: int | None = None

    @property
    def final(self) -> dict:
        return self.history[-1]


def resolve_device(name: str = "auto") -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' requested but torch.cuda.is_available() is False")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def make_loss(name: str, n_classes: int | None = None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Loss with mean reduction over the batch: ce, hinge (multi-class), squared (to one-hot), mse."""
    check_choice(name, "loss", LOSSES)
    if name == "ce":
        return lambda z, y: F.cross_entropy(z, y)
    if name == "hinge":
        return lambda z, y: F.multi_margin_loss(z, y)
    if name == "squared":
        return lambda z, y: 0.5 * ((z - F.one_hot(y, z.shape[1]).to(z.dtype)) ** 2).sum(1).mean()
    return lambda z, y: 0.5 * ((z - y) ** 2).flatten(1).sum(1).mean()


def _per_example_loss(name: str):
    if name == "ce":
        return lambda z, y: F.cross_entropy(z, y, reduction="none")
    if name == "hinge":
        return lambda z, y: F.multi_margin_loss(z, y, reduction="none")
    if name == "squared":
        return lambda z, y: 0.5 * ((z - F.one_hot(y, z.shape[1]).to(z.dtype)) ** 2).sum(1)
    return lambda z, y: 0.5 * ((z - y) ** 2).flatten(1).sum(1)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str, *, batch_size: int = 1024,
             device: torch.device | None = None, amp: bool = False, channels_last: bool = False) -> dict[str, float]:
    """Mean loss (and accuracy for classification) of ``model`` on (x, y) in eval mode."""
    was = model.training
    model.eval()
    device = device or x.device
    per_ex = _per_example_loss(loss)
    total, correct, n = 0.0, 0, int(x.shape[0])
    try:
        for i in range(0, n, batch_size):
            xb = x[i:i + batch_size].to(device, non_blocking=True)
            yb = y[i:i + batch_size].to(device, non_blocking=True)
            if channels_last and xb.ndim == 4:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with _autocast(device, amp):
                z = model(xb)
            z = z.float()
            total += float(per_ex(z, yb).sum())
            if loss != "mse":
                correct += int((z.argmax(1) == yb).sum())
    finally:
        model.train(was)
    out = {"loss": total / max(n, 1)}
    if loss != "mse":
        out["acc"] = correct / max(n, 1)
    return out


def _autocast(device: torch.device, amp: bool):
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0] % (2**63 - 1))


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _progress(cfg: TrainConfig, total: int, desc: str):
    show = cfg.progress == "on" or (cfg.progress == "auto" and sys.stderr.isatty())
    if not show:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=False, file=sys.stderr)


def _gradstats():
    try:
        from . import gradstats  # written in parallel; optional until it lands
    except ImportError:
        return None
    return gradstats if hasattr(gradstats, "gradient_stats") else None


def _grad_ratios(model: nn.Module) -> dict[str, float]:
    """||grad W|| / ||W|| per weight tensor from the current .grad (paper 000 figure 2b)."""
    out = {}
    for name, p in model.named_parameters():
        if p.grad is not None and p.ndim >= 2:
            w = float(torch.linalg.vector_norm(p.detach().float()))
            out[name] = float(torch.linalg.vector_norm(p.grad.detach().float())) / w if w > 0 else float("nan")
    return out


def _to_tensor(a: Any, dtype=None) -> torch.Tensor:
    t = a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))
    return t.to(dtype) if dtype is not None else t


def train(
    model: nn.Module,
    x_train: Any,
    y_train: Any,
    x_test: Any = None,
    y_test: Any = None,
    *,
    cfg: TrainConfig,
    out: str | os.PathLike | None = None,
    eval_sets: Mapping[str, tuple[Any, Any]] | None = None,
    force: bool = False,
    on_step: Callable[[int, nn.Module], None] | None = None,
    on_epoch: Callable[[int, nn.Module, dict], None] | None = None,
    run_info: Mapping[str, Any] | None = None,
    if_done: str = "raise",
    scores: Any = None,
) -> TrainResult:
    """Train ``model`` in place; see the module docstring. ``y`` are class indices (or targets for 'mse').

    ``eval_sets`` adds named sets evaluated every epoch (e.g. the permuted / restored examples);
    ``on_step(step, model)`` runs after every optimizer step, ``on_epoch(epoch, model, record)`` after
    every evaluated epoch (including epoch 0 = init). ``run_info`` is stored with the config.
    ``if_done='return'`` returns the stored result of a finished run in ``out`` (same config) instead of
    refusing; the model is loaded with its final weights. ``scores``: a
    :class:`geomprobe.trainers.scores.ScoreRecorder` (per-example forgetting, EL2N, AUM, gradient norms;
    written to ``out/scores.csv`` when training ends; classification losses only).
    """
    check_choice(if_done, "if_done", ("raise", "return"))
    device = resolve_device(cfg.device)
    regression = cfg.loss == "mse"
    xdtype = torch.float32
    X = _to_tensor(x_train, xdtype)
    Y = _to_tensor(y_train, xdtype if regression else torch.int64)
    if X.shape[0] != Y.shape[0] or X.shape[0] == 0:
        raise InputError(f"y_train has {Y.shape[0]} entries but x_train has {X.shape[0]} rows")
    sets: dict[str, tuple[torch.Tensor, torch.Tensor]] = {"train": (X, Y)}
    if x_test is not None and len(x_test):
        sets["test"] = (_to_tensor(x_test, xdtype), _to_tensor(y_test, xdtype if regression else torch.int64))
    for k, (xs, ys) in (eval_sets or {}).items():
        if len(xs):
            sets[k] = (_to_tensor(xs, xdtype), _to_tensor(ys, xdtype if regression else torch.int64))
    # small datasets live on the accelerator; larger ones are moved batch by batch from pinned memory
    nbytes = sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in sets.values())
    if device.type == "cuda":
        if nbytes < 2**31:
            sets = {k: (a.to(device), b.to(device)) for k, (a, b) in sets.items()}
        else:
            sets = {k: (a.pin_memory(), b.pin_memory()) for k, (a, b) in sets.items()}
    X, Y = sets["train"]
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = make_loss(cfg.loss)
    per_ex_loss = _per_example_loss(cfg.loss)
    gs = _gradstats() if cfg.align_every else None
    config = {"train": asdict(cfg), "run": _jsonable(dict(run_info or {}))}

    out_path = Path(out) if out is not None else None
    log_path = out_path / "metrics.jsonl" if out_path else None
    history: list[dict] = []
    start_epoch, step, best_epoch, best_acc, resumed = 1, 0, 0, -math.inf, None
    init_state = {k: v.detach().clone().cpu() for k, v in model.state_dict().items()}
    resume_rng = None
    last = checkpoint_path(out_path, "last") if out_path else None
    if out_path:
        out_path.mkdir(parents=True, exist_ok=True)
        if last.exists() and not force:
            ck = load_checkpoint(last, keys=RESUME_KEYS)
            if ck.get("done") and if_done == "return" and _comparable(ck.get("config", {})) == _comparable(config):
                load_model_state(model, ck["model"], last)
                return TrainResult(list(ck["history"]), int(ck["best_epoch"]), int(ck["epoch"]), int(ck["step"]),
                                   out_path, int(ck["epoch"]))
            if ck.get("done"):
                raise InputError(f"{out_path}: holds a finished run (checkpoints/last.pt, done); pass force=True "
                                 "(CLI: --force) to train again")
            if _comparable(ck.get("config", {})) != _comparable(config):
                raise InputError(f"{out_path}: holds an unfinished run with a different configuration; pass "
                                 "force=True (CLI: --force) to start over or use another --out")
            load_model_state(model, ck["model"], last)
            try:
                opt.load_state_dict(ck["optimizer"])
            except (ValueError, KeyError, TypeError, RuntimeError) as exc:
                raise InputError(f"{last}: its optimizer state does not fit this run's model "
                                 f"({type(exc).__name__}: {exc}); pass force=True (CLI: --force) to start over") from None
            resume_rng = (ck["rng_cpu"], ck.get("rng_cuda"))
            init_state = load_checkpoint(checkpoint_path(out_path, 0), keys=("model",))["model"]
            history = list(ck["history"])
            start_epoch, step = int(ck["epoch"]) + 1, int(ck["step"])
            best_epoch, best_acc = int(ck["best_epoch"]), float(ck["best_acc"])
            resumed = int(ck["epoch"])
            if scores is not None:
                scores.resume(out_path, resumed)
            _truncate_log(log_path, resumed)
        else:
            if log_path.exists():
                log_path.unlink()
            for stale in (out_path / "checkpoints").glob("*.pt") if (out_path / "checkpoints").is_dir() else []:
                if OWN_CHECKPOINT.match(stale.name):  # only the names train() writes: never a user's file
                    stale.unlink()

    prev_det = torch.are_deterministic_algorithms_enabled()
    if cfg.deterministic and device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    cuda_devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    rng_guard = torch.random.fork_rng(devices=cuda_devices)
    stopped = None
    try:
        with rng_guard:
            if resume_rng is None:
                torch.manual_seed(cfg.seed)
            else:
                torch.set_rng_state(resume_rng[0])
                if device.type == "cuda" and resume_rng[1] is not None:
                    torch.cuda.set_rng_state(resume_rng[1])
            state = {"done": False}

            def log_epoch(epoch: int, extra: dict) -> dict:
                nonlocal best_epoch, best_acc
                rec = {"kind": "epoch", "epoch": epoch, "step": step, "lr": opt.param_groups[0]["lr"]}
                for name, (xs, ys) in sets.items():
                    for k, v in evaluate(model, xs, ys, cfg.loss, batch_size=cfg.eval_batch_size, device=device,
                                         amp=cfg.amp, channels_last=cfg.channels_last).items():
                        rec[f"{name}_{k}"] = v
                rec["weight_distance"] = relative_weight_distance(init_state, model)
                rec.update(extra)
                rec = _jsonable(rec)
                history.append(rec)
                score = rec.get("test_acc", rec.get("train_acc"))
                if score is not None and score > best_acc:
                    best_acc, best_epoch = score, epoch
                    if out_path:
                        save_checkpoint(checkpoint_path(out_path, "best"), _state(epoch, True))
                _append(log_path, rec)
                if on_epoch:
                    on_epoch(epoch, model, rec)
                return rec

            def _state(epoch: int, _unused: bool = False) -> dict:
                return {
                    "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                    "optimizer": opt.state_dict(), "config": config, "epoch": epoch, "step": step,
                    "rng_cpu": torch.get_rng_state(),
                    "rng_cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None,
                    "history": history, "best_epoch": best_epoch, "best_acc": best_acc, "done": state["done"],
                }

            if resumed is None:
                if out_path:
                    save_checkpoint(checkpoint_path(out_path, 0), _state(0))
                log_epoch(0, {"time": 0.0})
                if out_path:
                    save_checkpoint(last, _state(0))
            n = X.shape[0]
            steps_per_epoch = math.ceil(n * cfg.repeat / cfg.batch_size)
            milestones = sorted(int(m) for m in cfg.lr_milestones)
            for epoch in range(start_epoch, cfg.epochs + 1):
                if _should_stop(cfg, history, step):
                    stopped = _should_stop(cfg, history, step)
                    break
                lr = cfg.lr * cfg.lr_gamma ** sum(1 for m in milestones if epoch > m)
                for g in opt.param_groups:
                    g["lr"] = lr
                t0 = time.perf_counter()
                model.train()
                gen = torch.Generator().manual_seed(_epoch_seed(cfg.seed, epoch))
                order = torch.cat([torch.randperm(n, generator=gen) for _ in range(cfg.repeat)]).to(X.device)
                bar = _progress(cfg, steps_per_epoch, f"epoch {epoch}/{cfg.epochs}")
                run_loss, seen, aligns = 0.0, 0, []
                for i in range(0, order.numel(), cfg.batch_size):
                    if cfg.max_steps and step >= cfg.max_steps:
                        break
                    idx = order[i:i + cfg.batch_size]
                    xb = X[idx].to(device, non_blocking=True)
                    yb = Y[idx].to(device, non_blocking=True)
                    if cfg.channels_last and xb.ndim == 4:
                        xb = xb.contiguous(memory_format=torch.channels_last)
                    if gs is not None and not regression and step % cfg.align_every == 0:
                        aligns.append(_align_record(gs, model, xb, yb, per_ex_loss, step, epoch))
                    with _autocast(device, cfg.amp):
                        z = model(xb)
                    loss = loss_fn(z.float(), yb)
                    if not torch.isfinite(loss):
                        raise TrainingDiverged(f"training diverged: loss is {float(loss.detach())} at step {step} (epoch {epoch}); "
                                         f"lower lr (now {lr})")
                    if scores is not None and not regression:
                        scores.on_batch(epoch, idx, z, yb)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if cfg.align_every and step % cfg.align_every == 0:
                        ratio = {"kind": "grad_ratio", "epoch": epoch, "step": step, "grad_over_weight": _grad_ratios(model)}
                        if not regression:
                            ratio["rep_omega_in_class"] = _rep_alignment(model, xb, yb)
                        aligns.append(_jsonable(ratio))
                    opt.step()
                    step += 1
                    run_loss += float(loss.detach()) * idx.numel()
                    seen += idx.numel()
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{run_loss / seen:.4f}")
                    if on_step:
                        on_step(step, model)
                if bar is not None:
                    bar.close()
                for rec in aligns:
                    _append(log_path, rec)
                log_epoch(epoch, {"time": time.perf_counter() - t0, "batch_loss": run_loss / max(seen, 1)})
                if scores is not None:
                    scores.end_epoch(epoch, out_path)
                done_now = bool(_should_stop(cfg, history, step)) or epoch == cfg.epochs
                state["done"] = done_now
                if out_path:
                    if cfg.keep_every and epoch % cfg.keep_every == 0:
                        save_checkpoint(checkpoint_path(out_path, epoch), _state(epoch))
                    save_checkpoint(last, _state(epoch))
                if done_now:
                    stopped = _should_stop(cfg, history, step) or "epochs"
                    break
            if out_path and not state["done"]:  # loop ended without a final mark (stopped early at resume)
                state["done"] = True
                save_checkpoint(last, _state(history[-1]["epoch"]))
            if scores is not None and not regression:
                scores.finish(model, X, Y, out_path, loss=cfg.loss, device=device)
    finally:
        torch.use_deterministic_algorithms(prev_det)
    final_epoch = history[-1]["epoch"]
    if out_path:
        summary = {"best_epoch": best_epoch, "final_epoch": final_epoch, "steps": step, "stopped": stopped,
                   "config": config, "final": history[-1], "best": history[best_epoch] if best_epoch < len(history) else None}
        atomic_write_text(out_path / "train_summary.json", json.dumps(_jsonable(summary), indent=1))
    return TrainResult(history, best_epoch, final_epoch, step, out_path, resumed)


def _align_record(gs, model, xb, yb, loss_fn, step, epoch) -> dict:
    # gradient_stats runs in eval mode (BatchNorm in train mode couples examples) and restores the mode
    stats = gs.gradient_stats(model, xb.float(), yb, loss_fn, labels=yb)
    return _jsonable({"kind": "align", "epoch": epoch, "step": step, "stats": stats})


def _rep_alignment(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> dict[str, float]:
    """In-class Omega of each captured layer's representations of the batch (eval mode, no grad)."""
    from geomprobe.alignment import alignment

    from .capture import capture

    was = model.training
    model.eval()
    try:
        with capture(model) as cap, torch.no_grad():
            model(xb)
        acts = cap.activations
    finally:
        model.train(was)
    labels = yb.detach().cpu().numpy()
    return {name: float(alignment(a.reshape(a.shape[0], -1), labels).omega_in_class) for name, a in acts.items()}


def _should_stop(cfg: TrainConfig, history: list, step: int) -> str | None:
    if cfg.max_steps and step >= cfg.max_steps:
        return "max_steps"
    last = history[-1] if history else {}
    if cfg.stop_train_acc and last.get("train_acc") is not None and last["train_acc"] >= cfg.stop_train_acc:
        return "train_acc"
    if cfg.stop_train_loss and last.get("train_loss") is not None and last["train_loss"] <= cfg.stop_train_loss:
        return "train_loss"
    return None


def _comparable(config: dict) -> str:
    c = json.loads(json.dumps(config, default=str))
    c.get("train", {}).pop("progress", None)
    c.get("train", {}).pop("device", None)
    return json.dumps(c, sort_keys=True)


def _append(path: Path | None, rec: dict) -> None:
    if path is None:
        return
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(rec) + "\n")


def _truncate_log(path: Path, epoch: int) -> None:
    """Keep the log lines up to and including ``epoch`` (the resumed checkpoint); drop the rest."""
    if not path.exists():
        return
    keep, bad = [], []
    for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            rec = None
        if not isinstance(rec, dict):  # a half-written line of a killed run, or a damaged one: skipped alone
            if line.strip():
                bad.append(i)
            continue
        if _num_epoch(rec) <= epoch:
            keep.append(line)
    if bad:
        print(f"note: {path}: skipped {len(bad)} unreadable line(s) ({', '.join(map(str, bad[:5]))}"
              f"{', ...' if len(bad) > 5 else ''}); the valid lines around them are kept", file=sys.stderr)
    atomic_write_text(path, "".join(k + "\n" for k in keep))


def _num_epoch(rec: dict) -> float:
    e = rec.get("epoch", 0)
    return e if isinstance(e, (int, float)) and not isinstance(e, bool) else math.inf
