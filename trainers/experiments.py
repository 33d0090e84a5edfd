"""The four experiments of docs/trainers.md (spec: experiments.md E1-E4), each with presets.

An experiment is a plain options dataclass plus a ``run(options, out, force)`` function. Presets:

* ``tiny``  -- seconds on a CPU (CI): scikit-learn digits or small synthetic spheres, a few epochs;
* ``small`` -- a real small-scale run (minutes on a 2-core CPU) on Fashion-MNIST / digits / spheres;
* ``paper`` -- the paper's model, data and schedule (needs the datasets' files and a GPU).

Every experiment writes into ``out``: ``experiment.json`` (name, preset, options, status), one folder
per trained network with ``checkpoints/``, ``metrics.jsonl`` and ``train_summary.json``, and
activation files (geomprobe's format, readable by ``geomprobe analyze``). A killed experiment resumes
where it stopped when run again with the same options; a finished one is refused without ``force``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from geomprobe._validation import InputError, check_positive_int
from geomprobe.io import atomic_write_text

from . import data as D
from . import models as Mo
from .capture import record_activations, sample_subsets
from .checkpoint import checkpoint_path, epoch_checkpoints, load_checkpoint, load_model_state, rewind_table
from .noise import LabelNoise, permute_labels
from .options import (SPECS, ExtremeMemorizationOptions, IdentityCrisisOptions, LabelNoiseGeometryOptions,
                      NormalizedLossOptions, get_spec, options_for, parse_value, validate_options)
from .train import TrainConfig, TrainingDiverged, evaluate, resolve_device, train

__all__ = ["Experiment", "EXPERIMENTS", "ExperimentRun", "get_experiment", "options_for", "parse_value",
           "run_experiment", "owned_files", "MANIFEST", "OWNED_PATTERN"]


@dataclass(frozen=True)
class Experiment:
    name: str
    summary: str
    options: type
    presets: dict
    run: Callable[..., dict]


# -- shared helpers ------------------------------------------------------------------------------


def _load(name: str, root: str, *, n_train: int = 0, n_test: int = 0, seed: int = 0, classes: int = 0,
          **kw: Any) -> D.Dataset:
    ds = D.load_dataset(name, root or None, **kw)
    if n_train or n_test or classes:
        ds = D.subsample(ds, n_train or None, n_test or None, seed=seed, classes=classes or None)
    return ds


def _cfg(o: Any, **kw: Any) -> TrainConfig:
    base = dict(seed=o.seed, device=o.device, amp=o.amp, channels_last=o.channels_last, progress=o.progress)
    base.update(kw)
    return TrainConfig(**base)


def _write_acts(path: Path, model, x, labels, *, split=None, train_labels=None, permuted=None, extra=None,
                meta=None, include_input=False, layers=None) -> str:
    from geomprobe.io import save_activations

    acts = record_activations(model, x, layers, include_input=include_input, batch_size=256)
    save_activations(path, np.asarray(labels, np.int64), acts, split=split, train_labels=train_labels,
                     permuted=permuted, extra=extra, meta=meta, force=True)
    return str(path)


def _load_epoch(model, out: Path, which) -> int:
    path = checkpoint_path(out, which)
    ck = load_checkpoint(path, keys=("model", "epoch"))
    load_model_state(model, ck["model"], path)
    return int(ck["epoch"])


# options that do not define a run: device and progress may change when it is resumed, and
# analysis_seeds / analysis_per_class only shape the summary
_NOT_DEFINING = ("device", "progress", "analysis_seeds", "analysis_per_class")


def _run_options(o: Any) -> dict:
    """Options that define a run (those not in _NOT_DEFINING)."""
    return {k: v for k, v in dataclasses.asdict(o).items() if k not in _NOT_DEFINING}


def _fmt(v: float) -> str:
    return f"{v:g}".replace("+", "")


# -- E1: extreme memorization (paper 000) ----------------------------------------------------------


def run_extreme_memorization(o: ExtremeMemorizationOptions, out: Path, force: bool) -> dict:
    ds = _load(o.dataset, o.data_root, n_train=o.n_train, n_test=o.n_test, seed=o.seed)
    xtr, xte = ds.x_train, ds.x_test
    if o.standardize:
        xtr, xte = D.standardize_per_image(xtr), D.standardize_per_image(xte)
    variants = [("true", ds.y_train)]
    if o.shuffled_labels:
        variants.append(("shuffled", np.random.default_rng([o.seed, 1]).permutation(ds.y_train)))
    runs = []
    for sigma in o.sigmas:
        for kind, ytr in variants:
            name = f"sigma_{_fmt(sigma)}" + ("_shuffled" if kind == "shuffled" else "")
            rdir = out / name
            if o.model == "convnet-h":
                model = Mo.build_model("convnet-h", ds.input_shape, ds.n_classes, hidden=o.hidden, seed=o.seed)
                with torch.no_grad():  # the scale being varied: the first layer
                    g = torch.Generator().manual_seed(o.seed)
                    model.conv1.weight.normal_(0.0, float(sigma), generator=g)
            else:
                hidden = o.hidden if o.model == "mlp" else [o.hidden] * 3
                model = Mo.build_model("mlp", ds.input_shape, ds.n_classes, hidden=hidden, phi=o.phi,
                                       sigma=float(sigma), seed=o.seed)
            cfg = _cfg(o, epochs=o.epochs, max_steps=o.max_steps, batch_size=o.batch_size, optimizer="sgd", lr=o.lr,
                       loss=o.loss, stop_train_acc=o.stop_train_acc, align_every=o.align_every, keep_every=o.keep_every)
            sample = sample_subsets(ds.y_train, ytr, np.zeros(len(ytr), bool), ds.y_test,
                                    n_classes=o.capture_classes, n_per_class=o.capture_per_class, seed=o.seed)
            xs = sample.gather(xtr, xte)
            files = {}

            def snap(epoch, m, rec, _rdir=rdir, _files=files, _sigma=sigma, _kind=kind, _xs=xs, _s=sample):
                if epoch == 0:
                    _files["init"] = _write_acts(_rdir / "acts_init.npz", m, _xs, _s.labels, split=_s.split,
                                                 meta={"experiment": "extreme-memorization", "sigma": _sigma,
                                                       "labels": _kind, "epoch": 0})

            res = train(model, xtr, ytr, xte, ds.y_test, cfg=cfg, out=rdir, force=force, on_epoch=snap,
                        run_info={"experiment": "extreme-memorization", "sigma": sigma, "labels": kind,
                                  "model": o.model, "phi": o.phi, "dataset": o.dataset}, if_done="return")
            if (rdir / "acts_init.npz").exists():  # written at epoch 0 (also by an earlier, resumed run)
                files["init"] = str(rdir / "acts_init.npz")
            for which in ("best", "last"):
                ep = _load_epoch(model, rdir, which)
                tag = "best" if which == "best" else "final"
                files[tag] = _write_acts(rdir / f"acts_{tag}.npz", model, xs, sample.labels, split=sample.split,
                                         meta={"experiment": "extreme-memorization", "sigma": sigma, "labels": kind,
                                               "epoch": ep, "which": tag})
            fin = res.final
            best = res.history[res.best_epoch]
            runs.append({"run": name, "sigma": sigma, "labels": kind, "final_train_acc": fin.get("train_acc"),
                         "final_test_acc": fin.get("test_acc"), "best_test_acc": best.get("test_acc"),
                         "best_epoch": res.best_epoch, "epochs": res.final_epoch, "steps": res.steps,
                         "activation_files": {k: str(Path(v).relative_to(out)) for k, v in files.items()}})
    return {"runs": runs}


# -- E2: memorization geometry under label noise (paper 003) --------------------------------------


def _e2_data(o: LabelNoiseGeometryOptions) -> D.Dataset:
    if o.dataset == "spheres":
        return D.make_spheres(o.n_classes, o.n_train_per_class, o.n_test_per_class, radius=o.radius,
                              intrinsic_dim=o.intrinsic_dim, ambient_dim=o.ambient_dim, seed=o.seed)
    ds = _load(o.dataset, o.data_root, n_train=o.n_train, n_test=o.n_test, seed=o.seed)
    if o.image_size and ds.x_train.ndim == 4:
        h, w = ds.x_train.shape[2:]
        if o.image_size < max(h, w):
            raise InputError(f"image_size must be >= the images' size {h}x{w}, got {o.image_size}")
        ph, pw = o.image_size - h, o.image_size - w
        pad = ((0, 0), (0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2))
        ds = dataclasses.replace(ds, x_train=np.pad(ds.x_train, pad), x_test=np.pad(ds.x_test, pad))
    if ds.x_train.ndim == 4:
        mean = ds.x_train.mean(axis=(0, 2, 3))
        std = ds.x_train.std(axis=(0, 2, 3)) + 1e-8
        ds = dataclasses.replace(ds, x_train=D.normalize_channels(ds.x_train, mean, std),
                                 x_test=D.normalize_channels(ds.x_test, mean, std))
    return ds


def _e2_model(o: LabelNoiseGeometryOptions, ds: D.Dataset):
    """The E2 network of ``o`` for dataset ``ds`` (initialised from ``o.seed``)."""
    if o.model == "feedforward":
        return Mo.build_model("feedforward", ds.input_shape, ds.n_classes, width=o.width, depth=o.depth, seed=o.seed)
    return Mo.build_model(o.model, ds.input_shape, ds.n_classes, width=o.width_factor, seed=o.seed)


def run_label_noise_geometry(o: LabelNoiseGeometryOptions, out: Path, force: bool,
                             progress: Callable[[int, int, dict], None] | None = None) -> dict:
    check_positive_int(o.analysis_seeds, "analysis_seeds")  # a summary option, checked before any training
    if isinstance(o.analysis_per_class, bool) or not isinstance(o.analysis_per_class, int) \
            or not 0 <= o.analysis_per_class <= o.capture_per_class:
        raise InputError(f"analysis_per_class must be an integer in 0..capture_per_class ({o.capture_per_class}) "
                         f"(0: all captured examples), got {o.analysis_per_class!r}")
    ds = _e2_data(o)
    noise_path = out / "label_noise.npz"
    noise = permute_labels(ds.y_train, o.eps, o.seed)
    if noise_path.exists() and not force:
        stored = LabelNoise.load(noise_path)
        if not np.array_equal(stored.train_labels, noise.train_labels):
            raise InputError(f"{noise_path}: stored label noise differs from this run's; pass --force")
    noise.save(noise_path)
    perm = noise.permuted
    model = _e2_model(o, ds)
    sample = sample_subsets(noise.true_labels, noise.train_labels, perm, ds.y_test, n_classes=o.capture_classes,
                            n_per_class=o.capture_per_class, seed=o.seed)
    xs = sample.gather(ds.x_train, ds.x_test)
    meta = {"experiment": "label-noise-geometry", "eps": o.eps, "model": o.model, "dataset": o.dataset}
    files: dict[str, str] = {}

    def write(tag: str, m, epoch: int) -> None:
        files[tag] = f"acts_{tag}.npz"
        _write_acts(out / f"acts_{tag}.npz", m, xs, sample.labels, split=sample.split,
                                 train_labels=sample.train_labels, permuted=sample.permuted, include_input=True,
                                 meta=dict(meta, epoch=epoch, which=tag))

    eval_sets = {"unpermuted": (ds.x_train[~perm], noise.true_labels[~perm]),
                 "permuted": (ds.x_train[perm], noise.train_labels[perm]),
                 "restored": (ds.x_train[perm], noise.true_labels[perm])}
    rng = np.random.default_rng([o.seed, 2])
    split_rows = np.sort(rng.choice(len(perm), size=min(o.split_batch, len(perm)), replace=False))
    split_log = out / "gradient_split.jsonl"
    from . import train as T

    def on_epoch(epoch, m, rec):
        if progress is not None:
            progress(epoch, o.epochs, rec)
        if epoch == 0 or epoch in set(int(e) for e in o.capture_epochs):
            write("init" if epoch == 0 else f"epoch{epoch:04d}", m, epoch)
        if o.split_every and epoch % o.split_every == 0:
            from .gradstats import gradient_split_norms

            dev = next(m.parameters()).device
            xb = torch.as_tensor(ds.x_train[split_rows]).to(dev)
            yb = torch.as_tensor(noise.train_labels[split_rows]).to(dev)
            norms = gradient_split_norms(m, xb, yb, {"unpermuted": ~perm[split_rows], "permuted": perm[split_rows]})
            T._append(split_log, T._jsonable({"epoch": epoch, "split": norms}))

    if split_log.exists():  # fresh run: start the log again; resumed run: keep it up to the checkpoint
        last = checkpoint_path(out / "train", "last")
        T._truncate_log(split_log, -1 if force or not last.exists() else int(load_checkpoint(last, keys=("epoch",))["epoch"]))
    cfg = _cfg(o, epochs=o.epochs, batch_size=o.batch_size, optimizer=o.optimizer, lr=o.lr,
               stop_train_acc=o.stop_train_acc, keep_every=o.keep_every)
    from .scores import ScoreRecorder

    # per-example forgetting / EL2N / AUM / gradient norms -> train/scores.csv (docs/companion.md)
    scores = ScoreRecorder(len(perm), subsets=np.where(perm, "permuted", "unpermuted"),
                           true_labels=noise.true_labels, el2n_epoch=max(1, o.epochs // 10))
    res = train(model, ds.x_train, noise.train_labels, ds.x_test, ds.y_test, cfg=cfg, out=out / "train", force=force,
                eval_sets=eval_sets, on_epoch=on_epoch, run_info=dict(meta, options=_run_options(o)),
                if_done="return", scores=scores)
    rdir = out / "train"
    for tag, which in (("best", "best"), ("final", "last")):
        ep = _load_epoch(model, rdir, which)
        write(tag, model, ep)
    summary: dict[str, Any] = {"best_epoch": res.best_epoch, "final_epoch": res.final_epoch,
                               "n_permuted": noise.n_permuted, "n_changed": noise.n_changed,
                               "activation_files": files, "final": res.final,
                               "best": res.history[res.best_epoch]}
    if o.rewind:
        final_state = load_checkpoint(checkpoint_path(rdir, "last"))["model"]
        cks = epoch_checkpoints(rdir)
        if o.rewind_epochs:
            cks = {e: p for e, p in cks.items() if e in set(int(x) for x in o.rewind_epochs)}
        device = resolve_device(o.device)
        model.to(device)
        tx, ty = torch.as_tensor(ds.x_train), torch.as_tensor(noise.train_labels)
        ex, ey = torch.as_tensor(ds.x_test), torch.as_tensor(ds.y_test)

        def ev(m):
            r = {"train_acc": evaluate(m, tx, ty, "ce", device=device)["acc"]}
            if len(ex):
                r["test_acc"] = evaluate(m, ex, ey, "ce", device=device)["acc"]
            return r

        rows = rewind_table(model, final_state, cks, ev)
        atomic_write_text(out / "rewind.json", json.dumps(rows, indent=1))
        summary["rewind_rows"] = len(rows)
    return summary


# -- E3: identity crisis (paper 002) -------------------------------------------------------------


def _ic_models(o: IdentityCrisisOptions, shape) -> list[tuple[str, str, dict]]:
    specs = []
    if o.one_layer:
        specs.append(("fcn-linear-h0", "fcn", {"n_hidden": 0, "activation": "linear"}))
    for act in o.fcn_activations:
        for h in o.fcn_hidden:
            for w in o.fcn_widths:
                specs.append((f"fcn-{act}-h{h}-w{w}", "fcn", {"n_hidden": int(h), "width": int(w), "activation": act}))
    for d in o.conv_depths:
        specs.append((f"conv-d{d}-c{o.conv_channels}", "deep-convnet", {"depth": int(d), "channels": o.conv_channels}))
    return specs


def run_identity_crisis(o: IdentityCrisisOptions, out: Path, force: bool) -> dict:
    from geomprobe import probes

    ds = _load(o.dataset, o.data_root, seed=o.seed)
    if not 0 <= o.train_index < len(ds.y_train):
        raise InputError(f"train_index must lie in 0..{len(ds.y_train) - 1}, got {o.train_index}")
    x_hat = ds.x_train[o.train_index:o.train_index + 1]
    pin = probes.make_probe_inputs(x_hat[0], o.rho, o.n_per_rho, seed=o.seed)
    probe_x = pin.inputs.astype(np.float32)
    sample = sample_subsets(ds.y_train, ds.y_train, np.zeros(len(ds.y_train), bool), ds.y_test,
                            n_classes=ds.n_classes, n_per_class=o.collapse_per_class, seed=o.seed)
    coll_x = sample.gather(ds.x_train, ds.x_test)
    lr = o.lr / float(np.sum(x_hat.astype(np.float64) ** 2)) if o.scale_lr else o.lr
    runs = []
    for name, kind, kw in _ic_models(o, ds.input_shape):
        rdir = out / name
        model = Mo.build_model(kind, ds.input_shape, seed=o.seed, **kw)
        Mo.set_trainable(model, o.trainable)
        w0 = {k: v.clone() for k, v in model.state_dict().items()}
        conv = kind == "deep-convnet"
        steps = (o.conv_steps or o.steps) if conv else o.steps
        optimizer = o.conv_optimizer if conv else o.optimizer
        per_epoch = min(steps, 50)
        cfg = _cfg(o, epochs=max(1, math.ceil(steps / per_epoch)), repeat=per_epoch, max_steps=steps, batch_size=1,
                   optimizer=optimizer, lr=o.conv_lr if conv else lr,
                   momentum=o.momentum if optimizer == "sgd" else 0.0, loss="mse",
                   stop_train_loss=o.stop_train_loss, keep_every=0)
        try:
            res = train(model, x_hat, x_hat, cfg=cfg, out=rdir, force=force, if_done="return",
                        run_info={"experiment": "identity-crisis", "model": name, "trainable": o.trainable})
        except TrainingDiverged as exc:  # recorded; the other models go on
            runs.append({"run": name, "diverged": str(exc)})
            continue
        with torch.no_grad():
            model.eval()
            dev = next(model.parameters()).device  # train() moved it to the run's device
            pred = model(torch.as_tensor(probe_x).to(dev)).cpu().numpy()
        entry = {"run": name, "steps": res.steps, "final_train_loss": res.final.get("train_loss"),
                 "weight_distance": res.final.get("weight_distance")}
        if name == "fcn-linear-h0":
            W0 = w0["out.weight"].double().numpy()
            b0 = w0["out.bias"].double().numpy()
            Wt = model.out.weight.detach().double().cpu().numpy()
            # eq. 1 with a bias: augment x with a constant 1 (the bias is a weight column)
            Wa0 = np.concatenate([W0, b0[:, None]], 1)
            xa = np.concatenate([x_hat.reshape(-1).astype(np.float64), [1.0]])
            closed = probes.one_layer_linear_solution(Wa0, xa, x_hat.reshape(-1).astype(np.float64))
            entry["eq1_max_abs_diff"] = float(np.max(np.abs(closed[:, :-1] - Wt)))
        acts_file = out / f"acts_{name}.npz"
        _write_acts(acts_file, model, coll_x, sample.labels, split=sample.split,
                    extra={"probe/x_hat": x_hat[0], "probe/inputs": probe_x, "probe/rho": pin.rho,
                           f"probe/pred/{name}": pred, "probe/collapse_inputs": coll_x},
                    meta={"experiment": "identity-crisis", "model": name, "steps": res.steps})
        entry["activation_file"] = acts_file.name
        runs.append(entry)
    return {"runs": runs}


# -- E4: normalised loss (paper 004) -------------------------------------------------------------


def _normalized(model, x, y, device) -> dict:
    from .gradstats import normalized_loss

    tot: dict[str, float] = {}
    n = len(y)
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    res = None
    for i in range(0, n, 1024):
        res = normalized_loss(model, xt[i:i + 1024].to(device), yt[i:i + 1024].to(device))
        k = len(yt[i:i + 1024])
        for key in ("loss", "normalized_loss", "accuracy"):
            tot[key] = tot.get(key, 0.0) + float(res[key]) * k / n
    tot["norm_product"] = float(res["norm_product"])
    tot["log_norm_product"] = float(res["log_norm_product"])
    return tot


def run_normalized_loss(o: NormalizedLossOptions, out: Path, force: bool) -> dict:
    ds = _load(o.dataset, o.data_root, n_train=o.n_train, n_test=o.n_test, seed=o.seed)
    xtr, xte = ds.x_train, ds.x_test
    c = xtr.shape[1]
    if len(o.normalize_mean) == c:
        xtr = D.normalize_channels(xtr, o.normalize_mean, o.normalize_std)
        xte = D.normalize_channels(xte, o.normalize_mean, o.normalize_std)
    else:  # another dataset: its own per-channel statistics
        mean, std = xtr.mean(axis=(0, 2, 3)), xtr.std(axis=(0, 2, 3)) + 1e-8
        xtr, xte = D.normalize_channels(xtr, mean, std), D.normalize_channels(xte, mean, std)
    nets = [(f"std_{_fmt(s)}", float(s), False) for s in o.init_stds]
    if o.random_label_std >= 0:
        nets.append((f"random_labels_std_{_fmt(o.random_label_std)}", float(o.random_label_std), True))
    rand_y = np.random.default_rng([o.seed, 3]).integers(0, ds.n_classes, len(ds.y_train))
    rand_yte = np.random.default_rng([o.seed, 4]).integers(0, ds.n_classes, len(ds.y_test))
    device = resolve_device(o.device)
    rows = []
    for name, std, random_labels in nets:
        ytr = rand_y if random_labels else ds.y_train
        yte = rand_yte if random_labels else ds.y_test
        model = Mo.build_model("convnet3", ds.input_shape, ds.n_classes, channels=o.channels, init_std=std, seed=o.seed)
        cfg = _cfg(o, epochs=o.epochs, batch_size=o.batch_size, optimizer="sgd", lr=o.lr,
                   lr_milestones=list(o.lr_milestones), stop_train_acc=o.stop_train_acc, keep_every=0)
        rdir = out / name
        try:
            res = train(model, xtr, ytr, xte, yte, cfg=cfg, out=rdir, force=force, if_done="return",
                        run_info={"experiment": "normalized-loss", "init_std": std, "random_labels": random_labels})
        except TrainingDiverged as exc:  # recorded; the other nets go on
            rows.append({"net": name, "init_std": std, "random_labels": random_labels, "diverged": str(exc)})
            continue
        _load_epoch(model, rdir, "last")
        model.to(device)
        tr, te = _normalized(model, xtr, ytr, device), _normalized(model, xte, yte, device)
        row = {"net": name, "init_std": std, "random_labels": random_labels, "epochs": res.final_epoch,
               "train_loss": tr["loss"], "test_loss": te["loss"], "train_normalized_loss": tr["normalized_loss"],
               "test_normalized_loss": te["normalized_loss"], "train_acc": tr["accuracy"],
               "test_acc": te["accuracy"], "norm_product": tr["norm_product"],
               "log_norm_product": tr["log_norm_product"]}
        sample = sample_subsets(ytr, ytr, np.zeros(len(ytr), bool), yte, n_classes=o.capture_classes,
                                n_per_class=o.capture_per_class, seed=o.seed)
        model.cpu()
        _write_acts(out / f"acts_{name}.npz", model, sample.gather(xtr, xte), sample.labels, split=sample.split,
                    meta={"experiment": "normalized-loss", "net": name, **{k: v for k, v in row.items() if k != "net"}})
        rows.append(row)
    lines = "".join(json.dumps(r) + "\n" for r in rows if "diverged" not in r)
    atomic_write_text(out / "normalized_loss.jsonl", lines)
    return {"nets": rows}


# -- registry and presets ------------------------------------------------------------------------
_RUNNERS = {
    "extreme-memorization": run_extreme_memorization,
    "label-noise-geometry": run_label_noise_geometry,
    "identity-crisis": run_identity_crisis,
    "normalized-loss": run_normalized_loss,
}

EXPERIMENTS: dict[str, Experiment] = {
    name: Experiment(spec.name, spec.summary, spec.options, spec.presets, _RUNNERS[name])
    for name, spec in SPECS.items()
}


def get_experiment(name: str) -> Experiment:
    get_spec(name)
    return EXPERIMENTS[name]




# -- the output folder: what a run owns --------------------------------------------------------------
#
# A run folder's files are the user's unless geomprobe wrote them. geomprobe reserves these names inside
# the folder (OWNED_PATTERN) and lists what the run owns in MANIFEST; every other file (for example
# train/checkpoints/mymodel.pt or notes.txt) is never deleted, moved or overwritten, --force included.

MANIFEST = "geomprobe-run.json"
OWNED_PATTERN = re.compile(r"""^(?:
      experiment\.json | geomprobe-run\.json | summary\.json | label_noise\.npz | rewind\.json
    | gradient_split\.jsonl | normalized_loss\.jsonl
    | (?:[^/]+/)?acts_[^/]+\.npz                       # activation files (top level or one run folder)
    | (?:[^/]+/)?metrics\.jsonl | (?:[^/]+/)?train_summary\.json
    | (?:[^/]+/)?scores\.(?:csv|json) | (?:[^/]+/)?scores_state\.npz
    | (?:[^/]+/)?checkpoints/(?:epoch_\d+|last|best)\.pt
    | analysis/.+ | report/.+                         # the summary's analysis cache and the report
    | (?:.+/)?\.[^/]+\.tmp(?:\.npz)?                   # temporary files of atomic writes
)$""", re.X)


@dataclass(frozen=True)
class ExperimentRun:
    """What :func:`run_experiment` returns: the run's result (as in experiment.json) and, when it was
    summarised, this run's summary (summary.json); ``summary`` is None with ``summarize=False`` or when
    the summary failed (the message is on stderr)."""

    out: Path
    result: dict
    summary: dict | None
    resumed: bool


def _files(out: Path) -> list[str]:
    """Every regular file under ``out`` (relative POSIX paths; symbolic links are not followed)."""
    found = []
    for root, dirs, names in os.walk(out):
        rel = Path(root).relative_to(out)
        found += [(rel / n).as_posix() for n in names if not os.path.islink(os.path.join(root, n))]
    return sorted(found)


def _read_manifest(out: Path) -> dict:
    try:
        m = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
        return m if isinstance(m, dict) else {}
    except (OSError, ValueError):
        return {}


def owned_files(out: str | Path) -> list[str]:
    """The files of run folder ``out`` that geomprobe wrote: names it reserves (OWNED_PATTERN) that were
    not already there, written by someone else, when the run first started (the manifest's ``foreign``)."""
    out = Path(out)
    foreign = set(_read_manifest(out).get("foreign", []))
    return [f for f in _files(out) if OWNED_PATTERN.match(f) and f not in foreign]


def _check_out(out: Path, name: str, comparable: dict, force: bool) -> tuple[bool, list[str]]:
    """Decide what a run may do with ``out``; returns (fresh start?, foreign files to keep listing).

    Allowed: a new or empty folder; a previous run of the same experiment with the same options
    (resumed; a finished one is refused without force); with force, a previous run (its owned files are
    deleted first) or a folder with other files whose names geomprobe does not use (left untouched)."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a directory")
    for parent in out.parents:  # `-o afile/sub`: say so before anything is written
        if parent.exists() and not parent.is_dir():
            raise InputError(f"--out {out}: {parent} is not a directory")
    files = _files(out) if out.is_dir() else []
    if not files:
        return True, []
    state_path = out / "experiment.json"
    if not state_path.is_file():  # not a run folder: only the user's files are here
        clash = [f for f in files if OWNED_PATTERN.match(f)]
        shown = ", ".join(files[:5]) + (", ..." if len(files) > 5 else "")
        if not force:
            raise InputError(f"--out {out}: not empty and holds no geomprobe run ({len(files)} file(s): {shown}); "
                             "choose a new or empty folder, or pass --force to write next to these files "
                             "(files geomprobe did not write are never deleted or overwritten)")
        if clash:
            raise InputError(f"--out {out}: holds files geomprobe did not write under names a run writes "
                             f"({', '.join(clash[:8])}{', ...' if len(clash) > 8 else ''}); even with --force "
                             "they are not overwritten: move them or choose another --out")
        return True, files
    try:
        prev = json.loads(state_path.read_text(encoding="utf-8"))
        prev = prev if isinstance(prev, dict) else {}
    except (OSError, ValueError):
        prev = {}
    prev_opts = prev.get("options") if isinstance(prev.get("options"), dict) else {}
    same = prev.get("experiment") == name and \
        {k: v for k, v in prev_opts.items() if k not in _NOT_DEFINING} == comparable
    foreign = [f for f in _read_manifest(out).get("foreign", []) if (out / f).exists()]
    if not force:
        if not same:
            raise InputError(f"--out {out}: holds a different run ({prev.get('experiment')!r} with other options); "
                             "pass --force to replace it (only the files that run wrote are deleted) or use "
                             "another --out")
        if prev.get("status") == "done":
            raise InputError(f"--out {out}: holds a finished {name!r} run; pass --force to run it again")
        return False, foreign
    for f in owned_files(out):  # --force: the previous run's files go, the user's stay
        (out / f).unlink()
    for root, dirs, _ in sorted(os.walk(out), key=lambda t: -len(t[0])):  # folders left empty by that
        for d in dirs:
            p = Path(root) / d
            if not os.path.islink(p) and p.is_dir() and not any(p.iterdir()):
                p.rmdir()
    return True, foreign


def _write_manifest(out: Path, name: str, foreign: list[str], status: str) -> None:
    manifest = {"format": "geomprobe-run-manifest", "format_version": 1, "experiment": name, "status": status,
                "rule": "geomprobe wrote the files under owned (names of OWNED_PATTERN in geomprobe/trainers/"
                        "experiments.py, except those under foreign); `geomprobe train --force` deletes only those",
                "foreign": sorted(foreign), "owned": []}
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1))  # foreign first: owned_files reads it
    manifest["owned"] = owned_files(out)
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1))


def run_experiment(name: str, options: Any, out: str | Path, *, force: bool = False, preset: str = "",
                   summarize: bool = True, progress: Callable[[int, int, dict], None] | None = None) -> ExperimentRun:
    """Run an experiment into ``out`` (resuming an unfinished run with the same options); then, with
    ``summarize``, measure its effects (``out/summary.json``) and write ``out/report/`` (trainers/effects.py).

    ``out`` must be new or empty, hold an unfinished run of the same experiment and options (resumed), or
    ``force`` is given: a previous run's files (listed in ``out/geomprobe-run.json``) are then deleted
    and a folder's other files are left untouched (see :func:`owned_files`). ``progress(epoch, epochs,
    record)`` is called after every epoch (E2). Returns an :class:`ExperimentRun`."""
    exp = get_experiment(name)
    validate_options(name, options)
    out = Path(out)
    opts = dataclasses.asdict(options)
    comparable = {k: v for k, v in opts.items() if k not in _NOT_DEFINING}
    fresh, foreign = _check_out(out, name, comparable, force)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"--out {out}: cannot create the folder ({exc.strerror or exc})") from None
    state_path = out / "experiment.json"
    state = {"experiment": name, "preset": preset, "options": opts, "status": "running"}
    atomic_write_text(state_path, json.dumps(state, indent=1))
    _write_manifest(out, name, foreign, "running")
    result = exp.run(options, out, fresh, **({"progress": progress} if name == "label-noise-geometry" else {}))
    state.update(status="done", result=result)
    atomic_write_text(state_path, json.dumps(_clean(state), indent=1))
    summary = _summarize(out) if summarize else None
    _write_manifest(out, name, foreign, "done")
    return ExperimentRun(out, result, summary, not fresh)


def _summarize(out: Path) -> dict | None:
    """summary.json and the report; a failure here is reported on stderr and leaves the finished run intact."""
    import sys

    from geomprobe._validation import AnalysisError

    from . import effects

    summary = None
    try:
        summary = effects.summarize(out)
        from .report import build_report

        build_report(out, umap=False, quiet=True)  # `geomprobe report DIR` adds the UMAP figure
    except ModuleNotFoundError as exc:
        if exc.name != "matplotlib":
            raise
        print(f"{out}: summary.json written; no figures (matplotlib is not installed)", file=sys.stderr)
    except (InputError, AnalysisError) as exc:
        print(f"{out}: the run finished but its summary failed: {exc}; retry with `geomprobe report {out}`",
              file=sys.stderr)
    return summary


def _clean(obj):
    from .train import _jsonable

    return _jsonable(obj)
