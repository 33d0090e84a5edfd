"""The models of the seed papers, with configurable widths and depths.

Every model is an ``nn.Sequential`` of named modules (or holds such blocks) and carries
``capture_layers``: the names (for ``model.get_submodule``) of the modules whose outputs are the
post-nonlinearity representations of its layers, in order, ending with the output layer. The capture
context manager records those by default.

=================== ======================================================================= =======
name                model                                                                   paper
=================== ======================================================================= =======
mlp                 z = W2 phi(W1 x), no biases, W1 ~ N(0, sigma^2), W2 Glorot-uniform;       000
                    ``hidden=(1024, 1024, 1024)`` gives the 4-layer variant
convnet-h           2 x [conv 5x5 + ReLU + maxpool 3/2], FC 1024 + ReLU, linear (appendix H)   000
feedforward         5 x [Linear 1024 + ReLU] + Linear (table 1)                               003
alexnet             modified AlexNet for 32x32 inputs (table 2)                                003
vgg16               VGG16 with BatchNorm for 32x32 inputs (table 3)                           003
resnet18            ResNet18 for 32x32 inputs (table 4)                                       003
fcn                 linear or ReLU fully connected net mapping R^d -> R^d                     002
deep-convnet        depth x [conv 5x5, 128 channels, ReLU] + conv 5x5 to the input channels     002
convnet3            conv 64 5x5/2 + ReLU, conv 64 5x5/2 + ReLU, linear; no biases             004
=================== ======================================================================= =======

``build_model(name, seed=..., **options)`` builds with a seeded RNG (the global torch RNG is forked
and restored, so building a model never changes it).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Callable, Sequence

import torch
from torch import nn

from geomprobe._validation import InputError, check_choice, check_positive_int

__all__ = [
    "MODELS",
    "build_model",
    "Sin",
    "mlp",
    "convnet_h",
    "feedforward",
    "alexnet",
    "vgg16",
    "resnet18",
    "fcn",
    "deep_convnet",
    "convnet3",
    "weight_layers",
    "set_trainable",
    "count_parameters",
]


class Sin(nn.Module):
    """phi(x) = sin(x)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(x)


_PHI: dict[str, Callable[[], nn.Module]] = {
    "sin": Sin,
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "linear": nn.Identity,
    "tanh": nn.Tanh,
}


def _seq(layers: list[tuple[str, nn.Module]], capture: Sequence[str]) -> nn.Sequential:
    model = nn.Sequential(OrderedDict(layers))
    model.capture_layers = tuple(capture)
    return model


def _flat_dim(shape: Sequence[int]) -> int:
    return int(math.prod(shape))


def _image_shape(input_shape: Sequence[int], what: str) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3:
        raise InputError(f"{what} needs image inputs (C, H, W), got input_shape {shape}")
    return shape  # type: ignore[return-value]


def _out_shape(body: nn.Module, input_shape: Sequence[int]) -> tuple[int, ...]:
    with torch.no_grad():
        return tuple(body(torch.zeros(1, *input_shape)).shape[1:])


# -- paper 000 -----------------------------------------------------------------------------------
def mlp(input_shape: Sequence[int], n_classes: int = 10, *, hidden: int | Sequence[int] = 1024, phi: str = "sin",
        sigma: float = 0.1, bias: bool = False) -> nn.Sequential:
    """MLP of paper 000: z = W_L phi(... phi(W1 x)).

    W1 ~ N(0, sigma^2) (the scale being swept); every other layer Glorot-uniform (the paper's default
    for layers whose scale is not varied); no biases (sections 3, 3.2). ``hidden=1024`` is the 2-layer
    MLP, ``hidden=(1024, 1024, 1024)`` the 4-layer variant.
    """
    check_choice(phi, "phi", tuple(_PHI))
    widths = [hidden] if isinstance(hidden, int) else list(hidden)
    if not widths:
        raise InputError("hidden must name at least one hidden width, got an empty list")
    widths = [check_positive_int(w, "hidden width") for w in widths]
    layers: list[tuple[str, nn.Module]] = [("flatten", nn.Flatten())]
    capture = []
    d = _flat_dim(input_shape)
    for i, w in enumerate(widths, 1):
        fc = nn.Linear(d, w, bias=bias)
        if i == 1:
            nn.init.normal_(fc.weight, 0.0, float(sigma))
        else:
            nn.init.xavier_uniform_(fc.weight)
        if bias:
            nn.init.zeros_(fc.bias)
        layers += [(f"fc{i}", fc), (f"act{i}", _PHI[phi]())]
        capture.append(f"act{i}")
        d = w
    out = nn.Linear(d, n_classes, bias=bias)
    nn.init.xavier_uniform_(out.weight)
    if bias:
        nn.init.zeros_(out.bias)
    layers.append(("out", out))
    return _seq(layers, capture + ["out"])


def convnet_h(input_shape: Sequence[int] = (3, 32, 32), n_classes: int = 10, *, channels: Sequence[int] = (32, 64),
              hidden: int = 1024, padding: int = 2) -> nn.Sequential:
    """ConvNet of paper 000 appendix H: [conv 5x5 + ReLU, maxpool 3 stride 2] x 2, FC 1024 + ReLU, linear.

    Glorot-uniform weights, zero biases (section 5). ``padding=2`` keeps the spatial size ('same').
    """
    c, _, _ = _image_shape(input_shape, "convnet-h")
    layers: list[tuple[str, nn.Module]] = []
    capture = []
    for i, ch in enumerate(channels, 1):
        layers += [(f"conv{i}", nn.Conv2d(c, ch, 5, padding=padding)), (f"relu{i}", nn.ReLU()),
                   (f"pool{i}", nn.MaxPool2d(3, 2))]
        capture.append(f"pool{i}")
        c = ch
    body = nn.Sequential(OrderedDict(layers))
    d = _flat_dim(_out_shape(body, input_shape))
    layers += [("flatten", nn.Flatten()), ("fc", nn.Linear(d, hidden)), ("relu_fc", nn.ReLU()),
               ("out", nn.Linear(hidden, n_classes))]
    model = _seq(layers, capture + ["relu_fc", "out"])
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    return model


# -- paper 003 -----------------------------------------------------------------------------------
def feedforward(input_shape: Sequence[int], n_classes: int = 100, *, width: int = 1024, depth: int = 5) -> nn.Sequential:
    """Table 1 of paper 003: depth x [Linear width + ReLU] + Linear (PyTorch default init, biases)."""
    width = check_positive_int(width, "width")
    depth = check_positive_int(depth, "depth")
    layers: list[tuple[str, nn.Module]] = [("flatten", nn.Flatten())]
    d = _flat_dim(input_shape)
    for i in range(1, depth + 1):
        layers += [(f"fc{i}", nn.Linear(d, width)), (f"relu{i}", nn.ReLU())]
        d = width
    layers.append(("out", nn.Linear(d, n_classes)))
    return _seq(layers, [f"relu{i}" for i in range(1, depth + 1)] + ["out"])


def alexnet(input_shape: Sequence[int] = (3, 32, 32), n_classes: int = 100, *, width: float = 1.0) -> nn.Sequential:
    """Modified AlexNet of paper 003 table 2 (for 32x32: conv 11x11 stride 4 pad 5 gives 8x8)."""
    c, _, _ = _image_shape(input_shape, "alexnet")
    w = lambda n: max(1, int(round(n * width)))  # noqa: E731
    spec = [("conv1", nn.Conv2d(c, w(64), 11, stride=4, padding=5)), ("relu1", nn.ReLU()),
            ("pool1", nn.MaxPool2d(2, 2)),
            ("conv2", nn.Conv2d(w(64), w(192), 5, padding=2)), ("relu2", nn.ReLU()), ("pool2", nn.MaxPool2d(2, 2)),
            ("conv3", nn.Conv2d(w(192), w(384), 3, padding=1)), ("relu3", nn.ReLU()),
            ("conv4", nn.Conv2d(w(384), w(256), 3, padding=1)), ("relu4", nn.ReLU()),
            ("conv5", nn.Conv2d(w(256), w(1024), 3, padding=1)), ("relu5", nn.ReLU()), ("pool3", nn.MaxPool2d(2, 2))]
    body = nn.Sequential(OrderedDict(spec))
    d = _flat_dim(_out_shape(body, input_shape))
    spec += [("flatten", nn.Flatten()), ("out", nn.Linear(d, n_classes))]
    return _seq(spec, ["relu1", "relu2", "relu3", "relu4", "relu5", "out"])


_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def vgg16(input_shape: Sequence[int] = (3, 32, 32), n_classes: int = 100, *, width: float = 1.0,
          fc_width: int | None = None, dropout: float = 0.5) -> nn.Sequential:
    """VGG16 with BatchNorm for CIFAR of paper 003 table 3 (13 conv, 3 linear with dropout).

    ``width`` scales every conv's channels and, unless ``fc_width`` is given, the two hidden linear
    layers (4096 x width), so that a narrow VGG16 is narrow throughout.
    """
    c, _, _ = _image_shape(input_shape, "vgg16")
    fc_width = max(1, int(round(4096 * width))) if fc_width is None else check_positive_int(fc_width, "fc_width")
    layers: list[tuple[str, nn.Module]] = []
    capture = []
    i = p = 0
    for v in _VGG16:
        if v == "M":
            p += 1
            layers.append((f"pool{p}", nn.MaxPool2d(2, 2)))
            continue
        i += 1
        ch = max(1, int(round(v * width)))
        layers += [(f"conv{i}", nn.Conv2d(c, ch, 3, padding=1)), (f"bn{i}", nn.BatchNorm2d(ch)), (f"relu{i}", nn.ReLU())]
        capture.append(f"relu{i}")
        c = ch
    body = nn.Sequential(OrderedDict(layers))
    d = _flat_dim(_out_shape(body.eval(), input_shape))
    layers += [("flatten", nn.Flatten()),
               ("fc1", nn.Linear(d, fc_width)), ("relu_fc1", nn.ReLU()), ("drop1", nn.Dropout(dropout)),
               ("fc2", nn.Linear(fc_width, fc_width)), ("relu_fc2", nn.ReLU()), ("drop2", nn.Dropout(dropout)),
               ("out", nn.Linear(fc_width, n_classes))]
    return _seq(layers, capture + ["relu_fc1", "relu_fc2", "out"])


class BasicBlock(nn.Module):
    """ResNet basic block; ``relu2`` (after the addition) is the block's output."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(h)) + self.shortcut(x))


def resnet18(input_shape: Sequence[int] = (3, 32, 32), n_classes: int = 100, *, width: float = 1.0) -> nn.Sequential:
    """ResNet18 for 32x32 inputs (paper 003 table 4): 3x3 stem, 4 stages of 2 basic blocks, avgpool, linear.

    ``width`` scales every layer's channels by a common factor (the paper's width study).
    """
    c, _, _ = _image_shape(input_shape, "resnet18")
    w = lambda n: max(1, int(round(n * width)))  # noqa: E731
    layers: list[tuple[str, nn.Module]] = [("conv1", nn.Conv2d(c, w(64), 3, 1, 1, bias=False)),
                                           ("bn1", nn.BatchNorm2d(w(64))), ("relu1", nn.ReLU())]
    capture = ["relu1"]
    c_in = w(64)
    for s, (ch, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2)), 1):
        for b in range(2):
            name = f"layer{s}_{b}"
            layers.append((name, BasicBlock(c_in, w(ch), stride if b == 0 else 1)))
            capture += [f"{name}.relu1", f"{name}.relu2"]
            c_in = w(ch)
    layers += [("avgpool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()), ("out", nn.Linear(c_in, n_classes))]
    return _seq(layers, capture + ["avgpool", "out"])


# -- paper 002 -----------------------------------------------------------------------------------
def fcn(input_shape: Sequence[int] = (1, 28, 28), *, n_hidden: int = 3, width: int = 784, activation: str = "relu",
        bias: bool = True, init: str = "default") -> nn.Sequential:
    """Fully connected net R^d -> R^d of paper 002 (input flattened, output reshaped to the input shape).

    ``init='identity'`` sets the weights to the identity construction of appendix A.1 (linear: every
    weight an identity; needs width >= d) or A.2 (ReLU: the bottom layer splits x into [x; -x], middle
    layers identity on 2d units, the top layer merges; needs width >= 2d), biases zero. The default is
    PyTorch's initialisation.
    """
    check_choice(activation, "activation", ("relu", "linear"))
    check_choice(init, "init", ("default", "identity"))
    n_hidden = check_positive_int(n_hidden, "n_hidden", minimum=0)
    width = check_positive_int(width, "width")
    d = _flat_dim(input_shape)
    layers: list[tuple[str, nn.Module]] = [("flatten", nn.Flatten())]
    capture = []
    dims = [d] + [width] * n_hidden + [d]
    for i in range(n_hidden):
        layers += [(f"fc{i + 1}", nn.Linear(dims[i], dims[i + 1], bias=bias)),
                   (f"act{i + 1}", nn.ReLU() if activation == "relu" else nn.Identity())]
        capture.append(f"act{i + 1}")
    layers += [("out", nn.Linear(dims[-2], d, bias=bias)), ("unflatten", nn.Unflatten(1, tuple(input_shape)))]
    model = _seq(layers, capture + ["out"])
    if init == "identity":
        need = d if activation == "linear" else 2 * d
        if n_hidden and width < need:
            raise InputError(f"init='identity' for a {activation} FCN needs width >= {need}, got {width}")
        if n_hidden == 0 and activation == "relu":
            pass  # a single linear layer has no ReLU: plain identity
        linears = [m for m in model if isinstance(m, nn.Linear)]
        with torch.no_grad():
            for k, lin in enumerate(linears):
                lin.weight.zero_()
                if lin.bias is not None:
                    lin.bias.zero_()
                eye = torch.eye(d)
                if activation == "linear" or n_hidden == 0:
                    lin.weight[:d, :d] = eye
                elif k == 0:
                    lin.weight[:d, :d], lin.weight[d:2 * d, :d] = eye, -eye
                elif k == len(linears) - 1:
                    lin.weight[:d, :d], lin.weight[:d, d:2 * d] = eye, -eye
                else:
                    lin.weight[:2 * d, :2 * d] = torch.eye(2 * d)
    return model


def deep_convnet(input_shape: Sequence[int] = (1, 28, 28), *, depth: int = 5, channels: int = 128, kernel: int = 5,
                 bias: bool = True, init: str = "default") -> nn.Sequential:
    """ConvNet of paper 002: ``depth`` hidden layers [conv kernel x kernel, ``channels``, ReLU] with
    'same' padding, then a conv back to the input channels (no ReLU), so that f maps images to images.

    The architecture is identity-capable (appendix A.3: odd kernel, stride 1, same padding and
    channels >= 2 x input channels). ``init='identity'`` sets that construction: only kernel centres
    non-zero, the bottom layer splits x into [x, -x], middle layers pass 2C channels through, the top
    layer merges; biases zero. The default is PyTorch's initialisation.
    """
    c, _, _ = _image_shape(input_shape, "deep-convnet")
    depth = check_positive_int(depth, "depth")
    channels = check_positive_int(channels, "channels")
    check_choice(init, "init", ("default", "identity"))
    if kernel % 2 == 0:
        raise InputError(f"kernel must be odd (identity-capable convs need a centre tap), got {kernel}")
    layers: list[tuple[str, nn.Module]] = []
    c_in = c
    for i in range(1, depth + 1):
        layers += [(f"conv{i}", nn.Conv2d(c_in, channels, kernel, padding=kernel // 2, bias=bias)),
                   (f"relu{i}", nn.ReLU())]
        c_in = channels
    layers.append(("out", nn.Conv2d(c_in, c, kernel, padding=kernel // 2, bias=bias)))
    model = _seq(layers, [f"relu{i}" for i in range(1, depth + 1)] + ["out"])
    if init == "identity":
        if channels < 2 * c:
            raise InputError(f"init='identity' needs channels >= 2 x input channels = {2 * c}, got {channels}")
        convs = [m for m in model if isinstance(m, nn.Conv2d)]
        m0 = kernel // 2
        with torch.no_grad():
            for k, conv in enumerate(convs):
                conv.weight.zero_()
                if conv.bias is not None:
                    conv.bias.zero_()
                W = conv.weight
                for j in range(c):
                    if k == 0:
                        W[j, j, m0, m0], W[c + j, j, m0, m0] = 1.0, -1.0
                    elif k == len(convs) - 1:
                        W[j, j, m0, m0], W[j, c + j, m0, m0] = 1.0, -1.0
                    else:
                        W[j, j, m0, m0], W[c + j, c + j, m0, m0] = 1.0, 1.0
    return model


# -- paper 004 -----------------------------------------------------------------------------------
def convnet3(input_shape: Sequence[int] = (3, 32, 32), n_classes: int = 10, *, channels: int = 64,
             init_std: float | None = 0.01) -> nn.Sequential:
    """3-layer bias-free net of paper 004: conv 64 5x5 stride 2 pad 2 + ReLU, again, linear to n_classes.

    Every weight ~ N(0, init_std^2) (the paper sweeps 1e-4 .. 0.14); ``init_std=None`` keeps PyTorch's.
    """
    c, _, _ = _image_shape(input_shape, "convnet3")
    layers: list[tuple[str, nn.Module]] = [
        ("conv1", nn.Conv2d(c, channels, 5, stride=2, padding=2, bias=False)), ("relu1", nn.ReLU()),
        ("conv2", nn.Conv2d(channels, channels, 5, stride=2, padding=2, bias=False)), ("relu2", nn.ReLU())]
    d = _flat_dim(_out_shape(nn.Sequential(OrderedDict(layers)), input_shape))
    layers += [("flatten", nn.Flatten()), ("out", nn.Linear(d, n_classes, bias=False))]
    model = _seq(layers, ["relu1", "relu2", "out"])
    if init_std is not None:
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.normal_(m.weight, 0.0, float(init_std))
    return model


MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": mlp,
    "convnet-h": convnet_h,
    "feedforward": feedforward,
    "alexnet": alexnet,
    "vgg16": vgg16,
    "resnet18": resnet18,
    "fcn": fcn,
    "deep-convnet": deep_convnet,
    "convnet3": convnet3,
}


def build_model(name: str, *args: Any, seed: int = 0, **kwargs: Any) -> nn.Module:
    """Build a registered model with its parameters drawn from ``seed``; the global RNG is restored."""
    check_choice(name, "model", tuple(MODELS))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        try:
            return MODELS[name](*args, **kwargs)
        except TypeError as exc:
            raise InputError(f"model {name!r}: {exc}") from None


# -- helpers -------------------------------------------------------------------------------------
def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every Linear / Conv2d in forward-definition order (the layers that carry weights)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def set_trainable(model: nn.Module, which: str = "all") -> list[str]:
    """Train 'all', only the 'top' (last weight layer) or only the 'bottom' (first weight layer) layer.

    Returns the names of the weight layers left trainable (paper 002 trains top / bottom / all).
    """
    check_choice(which, "trainable", ("all", "top", "bottom"))
    layers = weight_layers(model)
    keep = {"all": [n for n, _ in layers], "top": [layers[-1][0]], "bottom": [layers[0][0]]}[which]
    for n, m in layers:
        for p in m.parameters(recurse=False):
            p.requires_grad_(n in keep)
    return keep


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
