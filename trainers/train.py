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

__all__ = ["TrainConfig", "TrainResult", "TrainingDiverged", "train", "make_loss", "evaluate", "resolve_device", "LOSSES",
           "ALIGN_ROUTES"]

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
    n = int(x.shape[0])
    # sums stay on the device (float64, added batch by batch as a host loop would) and are read once
    total = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    try:
        for i in range(0, n, batch_size):
            xb = x[i:i + batch_size].to(device, non_blocking=True)
            yb = y[i:i + batch_size].to(device, non_blocking=True)
            if channels_last and xb.ndim == 4:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with _autocast(device, amp):
                z = model(xb)
            z = z.float()
            total += per_ex(z, yb).sum().double()
            if loss != "mse":
                correct += (z.argmax(1) == yb).sum()
    finally:
        model.train(was)
    out = {"loss": float(total) / max(n, 1)}
    if loss != "mse":
        out["acc"] = int(correct) / max(n, 1)
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
    """||grad W|| / ||W|| per weight tensor from the current .grad (paper 000 figure 2b); the norms are
    formed on the device and cross to the host in one transfer."""
    names, norms = [], []
    for name, p in model.named_parameters():
        if p.grad is not None and p.ndim >= 2:
            names.append(name)
            norms += [torch.linalg.vector_norm(p.detach().float()), torch.linalg.vector_norm(p.grad.detach().float())]
    if not names:
        return {}
    host = torch.stack(norms).cpu().tolist()
    return {k: host[2 * i + 1] / host[2 * i] if host[2 * i] > 0 else float("nan") for i, k in enumerate(names)}


def _to_tensor(a: Any, dtype=None) -> torch.Tensor:
    t = a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))
    return t.to(dtype) if dtype is not None else t


# --------------------------------------------------------------------------------------------------
# the loop: train() reads top to bottom; each helper below does one job
# --------------------------------------------------------------------------------------------------
ALIGN_ROUTES = ("oneshot", "recorder")


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
    sync_every: int | None = None,
    align_route: str = "oneshot",
) -> TrainResult:
    """Train ``model`` in place; see the module docstring. ``y`` are class indices (or targets for 'mse').

    ``eval_sets`` adds named sets evaluated every epoch (e.g. the permuted / restored examples);
    ``on_step(step, model)`` runs after every optimizer step, ``on_epoch(epoch, model, record)`` after
    every evaluated epoch (including epoch 0 = init). ``run_info`` is stored with the config.
    ``if_done='return'`` returns the stored result of a finished run in ``out`` (same config) instead of
    refusing; the model is loaded with its final weights. ``scores``: a
    :class:`geomprobe.trainers.scores.ScoreRecorder` (per-example forgetting, EL2N, AUM, gradient norms;
    written to ``out/scores.csv`` when training ends; classification losses only).
    ``sync_every``: the step losses stay on the device and are read (divergence check, running loss,
    progress bar) every this many steps and at the end of each epoch (default: 1 on the CPU, where a
    read costs nothing, 50 on CUDA; a divergence is then reported up to that many steps late).
    ``align_route``: how the ``align_every`` statistics are taken: ``'oneshot'`` (default;
    ``gradstats.gradient_stats`` before the step, its own forward and backward in eval mode) or
    ``'recorder'`` (``gradstats.recorder`` inside the step's own backward, in the step's mode; models
    with BatchNorm in train mode fall back to the one-shot route).
    """
    check_choice(if_done, "if_done", ("raise", "return"))
    check_choice(align_route, "align_route", ALIGN_ROUTES)
    device = resolve_device(cfg.device)
    sync_every = _sync_every(sync_every, device)
    sets = _place_sets(_as_sets(x_train, y_train, x_test, y_test, eval_sets, cfg.loss), device)
    X, Y = sets["train"]
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    opt = _make_optimizer(model, cfg)
    run = _Run(cfg, model, opt, sets, device, out, {"train": asdict(cfg), "run": _jsonable(dict(run_info or {}))},
               on_epoch)
    stored = _open_run(run, force, if_done, scores)
    if stored is not None:
        return stored
    step_fn = _Step(run, scores, align_route)
    stopped = None
    with _deterministic(cfg, device), _rng(cfg, device, run.resume_rng):
        if run.resumed is None:
            _start(run)
        for epoch in range(run.start_epoch, cfg.epochs + 1):
            stopped = _should_stop(cfg, run.history, run.step)
            if stopped:
                break
            lr = _set_lr(opt, cfg, epoch)
            t0 = time.perf_counter()
            model.train()
            order = _epoch_order(cfg, epoch, X.shape[0], X.device)
            bar = _progress(cfg, math.ceil(X.shape[0] * cfg.repeat / cfg.batch_size), f"epoch {epoch}/{cfg.epochs}")
            meter, aligns = _LossMeter(sync_every, bar, epoch, lr), []
            for i in range(0, order.numel(), cfg.batch_size):
                if cfg.max_steps and run.step >= cfg.max_steps:
                    break
                step_fn(order[i:i + cfg.batch_size], epoch, meter, aligns)
                if on_step:
                    on_step(run.step, model)
            batch_loss = meter.close()
            for rec in aligns:
                _append(run.log_path, rec)
            _log_epoch(run, epoch, {"time": time.perf_counter() - t0, "batch_loss": batch_loss})
            if scores is not None:
                scores.end_epoch(epoch, run.out_path)
            run.done = bool(_should_stop(cfg, run.history, run.step)) or epoch == cfg.epochs
            _save_epoch(run, epoch)
            if run.done:
                stopped = _should_stop(cfg, run.history, run.step) or "epochs"
                break
        if run.out_path and not run.done:  # loop ended without a final mark (stopped early at resume)
            run.done = True
            save_checkpoint(run.last, _state(run, run.history[-1]["epoch"]))
        if scores is not None and cfg.loss != "mse":
            scores.finish(model, X, Y, run.out_path, loss=cfg.loss, device=device)
    _write_summary(run, stopped)
    return TrainResult(run.history, run.best_epoch, run.history[-1]["epoch"], run.step, run.out_path, run.resumed)


class _Run:
    """The mutable state of one training run (what a checkpoint stores) and where it is written."""

    def __init__(self, cfg, model, opt, sets, device, out, config, on_epoch):
        self.cfg, self.model, self.opt, self.sets, self.device = cfg, model, opt, sets, device
        self.config, self.on_epoch = config, on_epoch
        self.out_path = Path(out) if out is not None else None
        self.log_path = self.out_path / "metrics.jsonl" if self.out_path else None
        self.last = checkpoint_path(self.out_path, "last") if self.out_path else None
        self.history: list[dict] = []
        self.start_epoch, self.step, self.best_epoch, self.best_acc = 1, 0, 0, -math.inf
        self.resumed: int | None = None
        self.resume_rng = None
        self.done = False
        self.init_state = {k: v.detach().clone().cpu() for k, v in model.state_dict().items()}


def _sync_every(sync_every: int | None, device: torch.device) -> int:
    if sync_every is None:
        return 1 if device.type == "cpu" else 50
    if isinstance(sync_every, bool) or not isinstance(sync_every, int) or sync_every < 1:
        raise InputError(f"sync_every must be an integer >= 1, got {sync_every!r}")
    return sync_every


def _as_sets(x_train, y_train, x_test, y_test, eval_sets, loss: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{'train', 'test'?, extra names: (x float32, y int64 | float32 for 'mse')} as CPU tensors."""
    ydtype = torch.float32 if loss == "mse" else torch.int64
    X, Y = _to_tensor(x_train, torch.float32), _to_tensor(y_train, ydtype)
    if X.shape[0] != Y.shape[0] or X.shape[0] == 0:
        raise InputError(f"y_train has {Y.shape[0]} entries but x_train has {X.shape[0]} rows")
    sets = {"train": (X, Y)}
    if x_test is not None and len(x_test):
        sets["test"] = (_to_tensor(x_test, torch.float32), _to_tensor(y_test, ydtype))
    for k, (xs, ys) in (eval_sets or {}).items():
        if len(xs):
            sets[k] = (_to_tensor(xs, torch.float32), _to_tensor(ys, ydtype))
    return sets


def _place_sets(sets: dict, device: torch.device) -> dict:
    """On CUDA, datasets that fit (at most half of the free device memory and 2 GiB) move there once;
    larger ones stay in pinned host memory and move batch by batch."""
    if device.type != "cuda":
        return sets
    nbytes = sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in sets.values())
    free = torch.cuda.mem_get_info(device)[0]
    if nbytes < min(2**31, free // 2):
        return {k: (a.to(device), b.to(device)) for k, (a, b) in sets.items()}
    return {k: (a.pin_memory(), b.pin_memory()) for k, (a, b) in sets.items()}


def _make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _open_run(run: _Run, force: bool, if_done: str, scores) -> TrainResult | None:
    """Prepare ``out``: resume an unfinished run with the same config, return a finished one
    (``if_done='return'``), refuse the rest; or clear train()'s own files of an old run."""
    if not run.out_path:
        return None
    run.out_path.mkdir(parents=True, exist_ok=True)
    if not run.last.exists() or force:
        if run.log_path.exists():
            run.log_path.unlink()
        ckdir = run.out_path / "checkpoints"
        for stale in ckdir.glob("*.pt") if ckdir.is_dir() else []:
            if OWN_CHECKPOINT.match(stale.name):  # only the names train() writes: never a user's file
                stale.unlink()
        return None
    ck = load_checkpoint(run.last, keys=RESUME_KEYS)
    same = _comparable(ck.get("config", {})) == _comparable(run.config)
    if ck.get("done") and if_done == "return" and same:
        load_model_state(run.model, ck["model"], run.last)
        return TrainResult(list(ck["history"]), int(ck["best_epoch"]), int(ck["epoch"]), int(ck["step"]),
                           run.out_path, int(ck["epoch"]))
    if ck.get("done"):
        raise InputError(f"{run.out_path}: holds a finished run (checkpoints/last.pt, done); pass force=True "
                         "(CLI: --force) to train again")
    if not same:
        raise InputError(f"{run.out_path}: holds an unfinished run with a different configuration; pass "
                         "force=True (CLI: --force) to start over or use another --out")
    load_model_state(run.model, ck["model"], run.last)
    try:
        run.opt.load_state_dict(ck["optimizer"])
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise InputError(f"{run.last}: its optimizer state does not fit this run's model "
                         f"({type(exc).__name__}: {exc}); pass force=True (CLI: --force) to start over") from None
    run.resume_rng = (ck["rng_cpu"], ck.get("rng_cuda"))
    run.init_state = load_checkpoint(checkpoint_path(run.out_path, 0), keys=("model",))["model"]
    run.history = list(ck["history"])
    run.start_epoch, run.step = int(ck["epoch"]) + 1, int(ck["step"])
    run.best_epoch, run.best_acc = int(ck["best_epoch"]), float(ck["best_acc"])
    run.resumed = int(ck["epoch"])
    if scores is not None:
        scores.resume(run.out_path, run.resumed)
    _truncate_log(run.log_path, run.resumed)
    return None


@contextlib.contextmanager
def _deterministic(cfg: TrainConfig, device: torch.device):
    prev = torch.are_deterministic_algorithms_enabled()
    if cfg.deterministic and device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev)


@contextlib.contextmanager
def _rng(cfg: TrainConfig, device: torch.device, resume_rng):
    """The run's own RNG streams (seeded, or restored at resume); the caller's are restored after."""
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        if resume_rng is None:
            torch.manual_seed(cfg.seed)
        else:
            torch.set_rng_state(resume_rng[0])
            if device.type == "cuda" and resume_rng[1] is not None:
                torch.cuda.set_rng_state(resume_rng[1])
        yield


def _start(run: _Run) -> None:
    """Epoch 0: the initial weights (epoch_0000.pt), their evaluation, last.pt."""
    if run.out_path:
        save_checkpoint(checkpoint_path(run.out_path, 0), _state(run, 0))
    _log_epoch(run, 0, {"time": 0.0})
    if run.out_path:
        save_checkpoint(run.last, _state(run, 0))


def _set_lr(opt: torch.optim.Optimizer, cfg: TrainConfig, epoch: int) -> float:
    lr = cfg.lr * cfg.lr_gamma ** sum(1 for m in cfg.lr_milestones if epoch > int(m))
    for g in opt.param_groups:
        g["lr"] = lr
    return lr


def _epoch_order(cfg: TrainConfig, epoch: int, n: int, device: torch.device) -> torch.Tensor:
    """The epoch's example order: ``repeat`` permutations from a generator seeded by (seed, epoch)."""
    gen = torch.Generator().manual_seed(_epoch_seed(cfg.seed, epoch))
    return torch.cat([torch.randperm(n, generator=gen) for _ in range(cfg.repeat)]).to(device)


class _LossMeter:
    """Step losses kept on the device and read every ``sync_every`` steps: divergence check, running
    mean loss of the epoch (summed in float64 in step order, as a per-step read would), progress bar."""

    def __init__(self, sync_every: int, bar, epoch: int, lr: float):
        self.sync_every, self.bar, self.epoch, self.lr = sync_every, bar, epoch, lr
        self.pending: list[tuple[torch.Tensor, int, int]] = []
        self.total, self.seen = 0.0, 0

    def add(self, loss: torch.Tensor, m: int, step: int) -> None:
        self.pending.append((loss.detach(), m, step))
        if len(self.pending) >= self.sync_every:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        values = torch.stack([v for v, _, _ in self.pending]).cpu().tolist()  # the one read
        for v, (_, m, step) in zip(values, self.pending):
            if not math.isfinite(v):
                raise TrainingDiverged(f"training diverged: loss is {v} at step {step} (epoch {self.epoch}); "
                                       f"lower lr (now {self.lr})")
            self.total += v * m
            self.seen += m
        if self.bar is not None:
            self.bar.update(len(self.pending))
            self.bar.set_postfix(loss=f"{self.total / self.seen:.4f}")
        self.pending = []

    def close(self) -> float:
        self.flush()
        if self.bar is not None:
            self.bar.close()
        return self.total / max(self.seen, 1)


class _Step:
    """One optimizer step on the examples ``idx`` (plus, every ``align_every`` steps, the gradient
    statistics records appended to ``aligns``)."""

    def __init__(self, run: _Run, scores, align_route: str):
        self.run, self.scores, self.route = run, scores, align_route
        cfg = run.cfg
        self.loss_fn, self.per_ex = make_loss(cfg.loss), _per_example_loss(cfg.loss)
        self.regression = cfg.loss == "mse"
        self.gs = _gradstats() if cfg.align_every else None
        # the recorder's class codes straight from the device labels (no host round trip per step)
        Y = run.sets["train"][1]
        self.num_classes = int(Y.max()) + 1 if self.gs is not None and not self.regression and Y.numel() else None

    def __call__(self, idx: torch.Tensor, epoch: int, meter: _LossMeter, aligns: list) -> None:
        run, cfg, model = self.run, self.run.cfg, self.run.model
        X, Y = run.sets["train"]
        xb = X[idx].to(run.device, non_blocking=True)
        yb = Y[idx].to(run.device, non_blocking=True)
        if cfg.channels_last and xb.ndim == 4:
            xb = xb.contiguous(memory_format=torch.channels_last)
        stats_now = bool(cfg.align_every) and run.step % cfg.align_every == 0
        rec = None
        if stats_now and self.gs is not None and not self.regression:
            if self.route == "recorder" and not _coupled(model):
                rec = self.gs.recorder(model, labels=yb, num_classes=self.num_classes)
            else:
                aligns.append(_align_record(self.gs, model, xb, yb, self.per_ex, run.step, epoch))
        with rec if rec is not None else contextlib.nullcontext():
            with _autocast(run.device, cfg.amp):
                z = model(xb)
            loss = self.loss_fn(z.float(), yb)
            meter.add(loss, idx.numel(), run.step)
            if self.scores is not None and not self.regression:
                self.scores.on_batch(epoch, idx, z, yb)
            run.opt.zero_grad(set_to_none=True)
            loss.backward()
        if rec is not None:
            aligns.append(_jsonable({"kind": "align", "epoch": epoch, "step": run.step, "stats": rec.stats()}))
        if stats_now:
            ratio = {"kind": "grad_ratio", "epoch": epoch, "step": run.step, "grad_over_weight": _grad_ratios(model)}
            if not self.regression:
                ratio["rep_omega_in_class"] = _rep_alignment(model, xb, yb)
            aligns.append(_jsonable(ratio))
        run.opt.step()
        run.step += 1


def _coupled(model: nn.Module) -> bool:
    from .gradstats.rules import coupling_batchnorms

    return bool(coupling_batchnorms(model))


def _log_epoch(run: _Run, epoch: int, extra: dict) -> dict:
    """Evaluate every set, append the epoch's record to the history and the log, keep best.pt."""
    cfg = run.cfg
    rec = {"kind": "epoch", "epoch": epoch, "step": run.step, "lr": run.opt.param_groups[0]["lr"]}
    for name, (xs, ys) in run.sets.items():
        for k, v in evaluate(run.model, xs, ys, cfg.loss, batch_size=cfg.eval_batch_size, device=run.device,
                             amp=cfg.amp, channels_last=cfg.channels_last).items():
            rec[f"{name}_{k}"] = v
    rec["weight_distance"] = relative_weight_distance(run.init_state, run.model)
    rec.update(extra)
    rec = _jsonable(rec)
    run.history.append(rec)
    score = rec.get("test_acc", rec.get("train_acc"))
    if score is not None and score > run.best_acc:
        run.best_acc, run.best_epoch = score, epoch
        if run.out_path:
            save_checkpoint(checkpoint_path(run.out_path, "best"), _state(run, epoch))
    _append(run.log_path, rec)
    if run.on_epoch:
        run.on_epoch(epoch, run.model, rec)
    return rec


def _state(run: _Run, epoch: int) -> dict:
    return {
        "model": {k: v.detach().cpu() for k, v in run.model.state_dict().items()},
        "optimizer": run.opt.state_dict(), "config": run.config, "epoch": epoch, "step": run.step,
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state() if run.device.type == "cuda" else None,
        "history": run.history, "best_epoch": run.best_epoch, "best_acc": run.best_acc, "done": run.done,
    }


def _save_epoch(run: _Run, epoch: int) -> None:
    if run.out_path:
        if run.cfg.keep_every and epoch % run.cfg.keep_every == 0:
            save_checkpoint(checkpoint_path(run.out_path, epoch), _state(run, epoch))
        save_checkpoint(run.last, _state(run, epoch))


def _write_summary(run: _Run, stopped: str | None) -> None:
    if not run.out_path:
        return
    h = run.history
    summary = {"best_epoch": run.best_epoch, "final_epoch": h[-1]["epoch"], "steps": run.step, "stopped": stopped,
               "config": run.config, "final": h[-1], "best": h[run.best_epoch] if run.best_epoch < len(h) else None}
    atomic_write_text(run.out_path / "train_summary.json", json.dumps(_jsonable(summary), indent=1))


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
