"""Options and presets of the trainer experiments (torch-free, so that the command line can list them).

Each experiment has a plain options dataclass; a preset is a dict of values over its defaults:

* ``tiny``  -- seconds on a CPU (CI): scikit-learn digits or small synthetic spheres, a few epochs;
* ``small`` -- a real small-scale run (minutes on a 2-core CPU) on Fashion-MNIST / digits / spheres;
* ``paper`` -- the paper's model, data and schedule (needs the datasets' files and a GPU).

Options are resolved as defaults < preset < config file < ``--set key=value`` < explicit arguments.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from typing import Any

from geomprobe._validation import InputError

__all__ = ["ExperimentSpec", "SPECS", "get_spec", "options_for", "parse_value", "option_defaults", "validate_options",
           "ExtremeMemorizationOptions", "LabelNoiseGeometryOptions", "IdentityCrisisOptions",
           "NormalizedLossOptions"]


@dataclass(frozen=True)
class ExperimentSpec:
    name: str
    summary: str
    options: type
    presets: dict


@dataclass
class _Common:
    seed: int = 0
    device: str = "auto"
    data_root: str = ""
    amp: bool = False  # bfloat16 autocast on CUDA
    channels_last: bool = False  # channels-last memory format for conv nets on CUDA
    progress: str = "auto"


@dataclass
class ExtremeMemorizationOptions(_Common):
    dataset: str = "digits"
    n_train: int = 0  # 0: all
    n_test: int = 0
    model: str = "mlp"  # mlp | mlp4 | convnet-h
    phi: str = "sin"
    hidden: int = 1024
    sigmas: list = field(default_factory=lambda: [0.001, 0.01, 0.1, 1.0, 10.0])
    loss: str = "ce"  # ce | hinge | squared
    shuffled_labels: bool = False  # also train every sigma on shuffled labels
    lr: float = 0.01
    batch_size: int = 256
    epochs: int = 100
    max_steps: int = 0
    stop_train_acc: float = 1.0
    align_every: int = 10
    keep_every: int = 0  # epoch checkpoints kept every k epochs (0: only init, best, last)
    standardize: bool = True
    capture_classes: int = 10
    capture_per_class: int = 50


@dataclass
class LabelNoiseGeometryOptions(_Common):
    dataset: str = "spheres"
    n_train: int = 0
    n_test: int = 0
    # synthetic spheres (appendix A.5)
    n_classes: int = 100
    n_train_per_class: int = 50
    n_test_per_class: int = 50
    radius: float = 5.0
    intrinsic_dim: int = 30
    ambient_dim: int = 1024
    model: str = "feedforward"  # feedforward | alexnet | vgg16 | resnet18
    image_size: int = 0  # zero-pad images to image_size x image_size (0: as loaded; AlexNet/VGG16 need >= 32)
    width: int = 1024  # feedforward width
    depth: int = 5  # feedforward hidden layers
    width_factor: float = 1.0  # channel multiplier of alexnet / vgg16 / resnet18
    eps: float = 0.5
    optimizer: str = "adam"
    lr: float = 1e-4
    batch_size: int = 1024
    epochs: int = 1000
    stop_train_acc: float = 0.0
    keep_every: int = 1
    capture_classes: int = 100
    capture_per_class: int = 50
    capture_epochs: list = field(default_factory=list)  # extra epochs with activation files
    rewind: bool = True
    rewind_epochs: list = field(default_factory=list)  # default: every kept checkpoint
    split_every: int = 1  # gradient split on a fixed batch every k epochs (0: off)
    split_batch: int = 1024
    # the summary's MFTMA capacities are means over this many analysis seeds: the center model's K comes
    # from random restarts, and with M = 10 points per manifold one seed's capacities are noisy
    analysis_seeds: int = 1
    # MFTMA points per manifold (M of the bound 2/M): each analysis seed draws this many of the captured
    # examples per class (0: all of them); with capture_per_class > M the seeds average over draws too
    analysis_per_class: int = 0


@dataclass
class IdentityCrisisOptions(_Common):
    dataset: str = "digits"
    train_index: int = 0  # which training image is the single example
    fcn_activations: list = field(default_factory=lambda: ["linear", "relu"])
    fcn_hidden: list = field(default_factory=lambda: [1, 3, 5, 9])
    fcn_widths: list = field(default_factory=lambda: [784])
    one_layer: bool = True  # also the one-layer linear net (closed form of eq. 1)
    conv_depths: list = field(default_factory=lambda: [1, 2, 3, 5, 8, 14, 20])
    conv_channels: int = 128
    trainable: str = "all"  # all | top | bottom
    optimizer: str = "sgd"
    lr: float = 0.1
    scale_lr: bool = True  # the step size is lr / ||x_hat||^2 (GD on 0.5 ||f(x) - x||^2 is then stable)
    momentum: float = 0.9
    steps: int = 2000
    conv_optimizer: str = "adam"  # the ConvNets' optimiser (GD with lr / ||x_hat||^2 diverges for depth >= 3)
    conv_lr: float = 1e-3
    conv_steps: int = 0  # 0: the same as steps
    stop_train_loss: float = 1e-6
    rho: list = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 0.9, 1.0])
    n_per_rho: int = 10
    collapse_per_class: int = 20


@dataclass
class NormalizedLossOptions(_Common):
    dataset: str = "cifar10"
    n_train: int = 0
    n_test: int = 0
    channels: int = 64
    init_stds: list = field(default_factory=lambda: [1e-4, 2e-4, 3e-4, 4e-4, 5e-4, 6e-4, 7e-4, 8e-4, 9e-4, 1e-3,
                                                     0.0016, 0.0032, 0.0064, 0.0128, 0.0256, 0.0512, 0.06, 0.07,
                                                     0.08, 0.09, 0.1, 0.1024, 0.11, 0.12, 0.14])
    random_label_std: float = 0.1  # one net on random labels (negative: none)
    lr: float = 0.01
    lr_milestones: list = field(default_factory=lambda: [100])
    batch_size: int = 128
    epochs: int = 200
    stop_train_acc: float = 1.0
    normalize_mean: list = field(default_factory=lambda: [0.4914, 0.4822, 0.4465])
    normalize_std: list = field(default_factory=lambda: [0.2023, 0.1994, 0.2010])
    capture_classes: int = 10
    capture_per_class: int = 50


SPECS: dict[str, ExperimentSpec] = {
    "extreme-memorization": ExperimentSpec(
        "extreme-memorization",
        "E1, paper 000: MLP (sin/relu/...) with W1 ~ N(0, sigma^2) swept; train to 100% train accuracy; "
        "gradient and representation alignment vs test accuracy",
        ExtremeMemorizationOptions,
        {
            "tiny": dict(dataset="digits", n_train=300, n_test=200, hidden=64, sigmas=[0.01, 10.0], epochs=3,
                         batch_size=64, lr=0.05, align_every=5, capture_per_class=10),
            "small": dict(dataset="fashion-mnist", n_train=1000, n_test=1000, hidden=1024,
                          sigmas=[0.001, 0.01, 0.1, 1.0, 10.0], epochs=200, align_every=16, capture_per_class=50),
            "paper": dict(dataset="cifar10", hidden=1024, sigmas=[0.001, 0.01, 0.1, 1.0, 10.0], epochs=2000,
                          align_every=1, capture_per_class=50),
        },
    ),
    "label-noise-geometry": ExperimentSpec(
        "label-noise-geometry",
        "E2, paper 003: a fraction eps of labels permuted; activations of unpermuted / permuted / restored / "
        "test manifolds at init, best and final epoch; layer rewinding; gradient split",
        LabelNoiseGeometryOptions,
        {
            "tiny": dict(dataset="spheres", n_classes=6, n_train_per_class=20, n_test_per_class=10, ambient_dim=32,
                         intrinsic_dim=4, radius=5.0, width=32, depth=3, epochs=3, batch_size=32, lr=1e-3,
                         capture_classes=6, capture_per_class=5, split_batch=64),
            # the paper's AlexNet (table 2) at 1/8 width on Fashion-MNIST: a conv net on images, where paper 003
            # shows rewinding; 10 classes, so M = 10 points per manifold keep 2/M attainable (each of the 5
            # analysis seeds draws 10 of the 20 captured examples per class: less sampling noise). Narrow and
            # long (150 epochs) localises the memorisation in the last conv layer, as in the paper; at half
            # width and 60 epochs it is spread over conv2-conv5 (docs/reproducing.md, bench/e2_rewind_sweep.py)
            "small": dict(dataset="fashion-mnist", n_train=5000, n_test=5000, model="alexnet", width_factor=0.125,
                          image_size=32, epochs=150, batch_size=128, lr=1e-3, keep_every=5, capture_classes=10,
                          capture_per_class=20, analysis_per_class=10, analysis_seeds=5),
            "paper": dict(dataset="cifar100", model="vgg16", epochs=1000, keep_every=50, capture_classes=100,
                          capture_per_class=50, split_every=10),
        },
    ),
    "identity-crisis": ExperimentSpec(
        "identity-crisis",
        "E3, paper 002: FCNs and ConvNets trained on one image to output their input; identity vs constant "
        "correlation over depth x rho; layer-wise collapse; weight distance",
        IdentityCrisisOptions,
        {
            "tiny": dict(dataset="digits", fcn_hidden=[1, 3], fcn_widths=[128], conv_depths=[1, 3], conv_channels=8,
                         steps=30, rho=[0.0, 0.5, 1.0], n_per_rho=3, collapse_per_class=5),
            "small": dict(dataset="fashion-mnist", fcn_hidden=[1, 3, 5, 9], fcn_widths=[784], conv_depths=[1, 3, 8, 14],
                          conv_channels=32, steps=300, conv_steps=500, collapse_per_class=20),
            "paper": dict(dataset="mnist", fcn_hidden=[1, 3, 5, 9], fcn_widths=[784, 2048],
                          conv_depths=[1, 2, 3, 5, 8, 14, 20], conv_channels=128, steps=5000),
        },
    ),
    "normalized-loss": ExperimentSpec(
        "normalized-loss",
        "E4, paper 004: 3-layer bias-free ConvNets from many init scales (and one on random labels); "
        "normalised train vs test cross-entropy",
        NormalizedLossOptions,
        {
            "tiny": dict(dataset="digits", n_train=200, n_test=100, channels=8, init_stds=[0.01, 0.1],
                         random_label_std=0.1, epochs=3, batch_size=32, lr=0.05, lr_milestones=[],
                         capture_per_class=5),
            "small": dict(dataset="fashion-mnist", n_train=500, n_test=500, channels=64,
                          init_stds=[0.03, 0.05, 0.07, 0.09, 0.11, 0.13], random_label_std=0.1, epochs=100,
                          batch_size=32, lr=0.02, lr_milestones=[70]),
            "paper": dict(dataset="cifar10", epochs=200, lr_milestones=[100]),
        },
    ),
}


def get_spec(name: str) -> ExperimentSpec:
    if name not in SPECS:
        raise InputError(f"unknown experiment {name!r}; experiments: {', '.join(SPECS)}")
    return SPECS[name]


def parse_value(text: str, default: Any, key: str) -> Any:
    """Parse a --set value by the type of the option's default (bool, int, float, str, list)."""
    try:
        if isinstance(default, bool):
            low = text.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
        if isinstance(default, list):
            t = text.strip()
            if t.startswith("["):
                val = json.loads(t)
                if not isinstance(val, list):
                    raise ValueError(text)
                return val
            items = [s.strip() for s in t.split(",") if s.strip()]
            kind = type(default[0]) if default else None
            out = []
            for s in items:
                if kind is str:
                    out.append(s)
                else:
                    try:
                        out.append(int(s))
                    except ValueError:
                        out.append(float(s))
            return out
        return text
    except (ValueError, json.JSONDecodeError):
        kind = type(default).__name__
        raise InputError(f"option {key}: cannot parse {text!r} as {kind}") from None


def options_for(name: str, preset: str = "tiny", config: dict | None = None, sets: list[str] | None = None,
                **overrides: Any) -> Any:
    """Build an experiment's options: defaults < preset < config dict < --set key=value < overrides."""
    exp = get_spec(name)
    if preset not in exp.presets:
        raise InputError(f"preset must be one of {', '.join(exp.presets)}; got {preset!r}")
    values = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
              for f in fields(exp.options)}
    known = set(values)

    def apply(src: dict, where: str):
        for k, v in src.items():
            k2 = k.replace("-", "_")
            if k2 not in known:
                raise InputError(f"{where}: unknown option {k!r} for {name}; options: {', '.join(sorted(known))}")
            values[k2] = v

    apply(exp.presets[preset], f"preset {preset}")
    apply(config or {}, "config")
    for item in sets or []:
        if "=" not in item:
            raise InputError(f"--set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        k2 = k.strip().replace("-", "_")
        if k2 not in known:
            raise InputError(f"--set: unknown option {k!r} for {name}; options: {', '.join(sorted(known))}")
        values[k2] = parse_value(v, values[k2], k2)
    apply({k: v for k, v in overrides.items() if v is not None}, "arguments")
    for k, v in values.items():  # light type check of config-file values
        d = next(f for f in fields(exp.options) if f.name == k)
        default = d.default if d.default is not dataclasses.MISSING else d.default_factory()
        if isinstance(default, bool) and not isinstance(v, bool):
            raise InputError(f"option {k} must be true/false, got {v!r}")
        if isinstance(default, float) and not isinstance(v, bool) and isinstance(v, int):
            values[k] = float(v)
        elif isinstance(default, (int, float)) and not isinstance(default, bool) and \
                (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise InputError(f"option {k} must be a number, got {v!r}")
        if isinstance(default, list) and not isinstance(v, list):
            raise InputError(f"option {k} must be a list, got {v!r}")
    options = exp.options(**values)
    validate_options(name, options)
    return options


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_list(o: Any, key: str, rule: str, ok, *, empty: bool = False) -> None:
    v = getattr(o, key)
    if not empty and not v:
        raise InputError(f"option {key} must be a non-empty list of {rule}, got {v!r}")
    bad = [x for x in v if not ok(x)]
    if bad:
        raise InputError(f"option {key} must be a list of {rule}, got {v!r} (bad: {', '.join(map(repr, bad[:4]))})")


def _check(o: Any, key: str, rule: str, ok) -> None:
    v = getattr(o, key)
    if not ok(v):
        raise InputError(f"option {key} must be {rule}, got {v!r}")


def validate_options(name: str, o: Any) -> None:
    """Check an experiment's options before any data is loaded or anything trained: every rule a run
    needs, each failure an InputError naming the option, the rule and the value."""
    _check(o, "seed", "an integer >= 0", lambda v: _int(v) and v >= 0)
    _check(o, "device", "auto, cpu or cuda", lambda v: v in ("auto", "cpu", "cuda"))
    _check(o, "progress", "auto, on or off", lambda v: v in ("auto", "on", "off"))
    for key in ("n_train", "n_test"):
        if hasattr(o, key):
            _check(o, key, "an integer >= 0 (0: all)", lambda v: _int(v) and v >= 0)
    for key in ("epochs", "batch_size", "capture_classes", "capture_per_class"):
        if hasattr(o, key):
            _check(o, key, "an integer >= 1", lambda v: _int(v) and v >= 1)
    for key in ("lr",):
        if hasattr(o, key):
            _check(o, key, "a number > 0", lambda v: _num(v) and v > 0)
    if name == "extreme-memorization":
        _check_list(o, "sigmas", "numbers > 0 (the first layer's init standard deviations)", lambda v: _num(v) and v > 0)
        _check(o, "loss", "one of ce, hinge, squared (a classification loss: E1 measures accuracy)",
               lambda v: v in ("ce", "hinge", "squared"))
        _check(o, "model", "one of mlp, mlp4, convnet-h", lambda v: v in ("mlp", "mlp4", "convnet-h"))
        _check(o, "hidden", "an integer >= 1", lambda v: _int(v) and v >= 1)
    elif name == "label-noise-geometry":
        _check(o, "eps", "a number in [0, 1]", lambda v: _num(v) and 0 <= v <= 1)
        _check(o, "model", "one of feedforward, alexnet, vgg16, resnet18",
               lambda v: v in ("feedforward", "alexnet", "vgg16", "resnet18"))
        _check_list(o, "capture_epochs", "epochs (integers >= 1)", lambda v: _int(v) and v >= 1, empty=True)
        _check_list(o, "rewind_epochs", "epochs (integers >= 0)", lambda v: _int(v) and v >= 0, empty=True)
    elif name == "identity-crisis":
        _check_list(o, "fcn_activations", "linear or relu", lambda v: v in ("linear", "relu"), empty=True)
        _check_list(o, "fcn_hidden", "integers >= 0", lambda v: _int(v) and v >= 0, empty=True)
        _check_list(o, "fcn_widths", "integers >= 1", lambda v: _int(v) and v >= 1, empty=True)
        _check_list(o, "conv_depths", "integers >= 1", lambda v: _int(v) and v >= 1, empty=True)
        _check_list(o, "rho", "numbers in [0, 1]", lambda v: _num(v) and 0 <= v <= 1)
        _check(o, "trainable", "one of all, top, bottom", lambda v: v in ("all", "top", "bottom"))
        _check(o, "steps", "an integer >= 1", lambda v: _int(v) and v >= 1)
    elif name == "normalized-loss":
        _check_list(o, "init_stds", "numbers > 0 (a zero init makes the bias-free net's output and its norms 0)",
                    lambda v: _num(v) and v > 0)
        _check(o, "random_label_std", "a number > 0, or negative for no random-label net",
               lambda v: _num(v) and v != 0)
        _check_list(o, "lr_milestones", "epochs (integers >= 0)", lambda v: _int(v) and v >= 0, empty=True)


def option_defaults(options_cls: type) -> dict[str, Any]:
    return {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
            for f in fields(options_cls)}
