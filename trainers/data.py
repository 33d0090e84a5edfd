"""Datasets for the trainers, read offline from files the user already has.

Nothing here downloads anything. Every loader returns a :class:`Dataset` of numpy arrays: images as
float32 in [0, 1] with shape (n, C, H, W), features as float32 (n, D), labels as int64. Preprocessing
(per-image standardisation of paper 000, per-channel normalisation of paper 004) is separate.

Supported sources (``load_dataset(name, root=...)``):

=============== ======================================================================= ==============
name            files expected under ``root``                                           default root
=============== ======================================================================= ==============
cifar10         ``cifar-10-batches-bin/{data_batch_1..5,test_batch}.bin`` or
                ``cifar-10-batches-py/{data_batch_1..5,test_batch}`` (python release)    --
cifar100        ``cifar-100-binary/{train,test}.bin`` or ``cifar-100-python/{train,test}``  --
svhn            ``train_32x32.mat``, ``test_32x32.mat``                                 --
mnist           ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``                   --
fashion-mnist   same idx file names as mnist                                            Debian package
                                                                                        dataset-fashion-mnist
digits          none (scikit-learn's bundled 8x8 digits)                                --
spheres         none (synthetic, seeded; paper 003 appendix A.5)                        --
=============== ======================================================================= ==============

``root`` may also be given by the environment variable ``GEOMPROBE_DATA`` (a folder holding one
sub-folder per dataset name, e.g. ``$GEOMPROBE_DATA/cifar10``) or point directly at the folder with the
files. The CIFAR python release is read through a restricted unpickler that admits only the numpy
globals those files hold and refuses everything else.
"""
from __future__ import annotations

import gzip
import os
import pickle
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from geomprobe._validation import InputError, check_choice, check_positive_int, check_seed

__all__ = [
    "Dataset",
    "DATASETS",
    "FASHION_MNIST_DIRS",
    "load_dataset",
    "load_cifar10",
    "load_cifar100",
    "load_svhn",
    "load_mnist",
    "load_fashion_mnist",
    "load_digits",
    "make_spheres",
    "read_idx",
    "restricted_load",
    "standardize_per_image",
    "normalize_channels",
    "subsample",
]

FASHION_MNIST_DIRS = (Path("/usr/share/datasets/fashion-mnist"),)


@dataclass(frozen=True)
class Dataset:
    """A train/test split held in memory as numpy arrays."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    n_classes: int
    info: dict = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def __repr__(self) -> str:
        return (
            f"Dataset({self.name!r}, train={self.x_train.shape}, test={self.x_test.shape}, "
            f"n_classes={self.n_classes})"
        )


# -- file helpers --------------------------------------------------------------------------------
def _resolve_root(name: str, root: str | os.PathLike | None, defaults: tuple[Path, ...] = ()) -> list[Path]:
    """Candidate folders for a dataset, most specific first."""
    cands: list[Path] = []
    if root is not None:
        r = Path(root).expanduser()
        cands += [r, r / name]
    else:
        env = os.environ.get("GEOMPROBE_DATA")
        if env:
            cands += [Path(env).expanduser() / name, Path(env).expanduser()]
        cands += list(defaults)
    return cands


def _missing(name: str, expected: list[str], where: list[Path], hint: str = "") -> InputError:
    places = ", ".join(str(p) for p in where) or "(no folder given: pass root= / --set data_root=DIR)"
    msg = (
        f"dataset {name!r} not found: expected files {', '.join(expected)} in one of: {places}. "
        "geomprobe never downloads data; put the files there or pass the folder as root "
        "(CLI: --set data_root=DIR, or the environment variable GEOMPROBE_DATA)"
    )
    return InputError(msg + (f". {hint}" if hint else ""))


def _find_files(folder: Path, names: list[str], gz: bool = False) -> list[Path] | None:
    out = []
    for n in names:
        p = folder / n
        if p.is_file():
            out.append(p)
        elif gz and (folder / (n + ".gz")).is_file():
            out.append(folder / (n + ".gz"))
        else:
            return None
    return out


# -- restricted unpickler (CIFAR python release) ------------------------------------------------
def _numpy_globals() -> dict[tuple[str, str], Any]:
    try:  # numpy >= 2
        from numpy._core import multiarray as ma
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray as ma
    recon = ma._reconstruct  # noqa: SLF001
    allowed = {}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(mod, "_reconstruct")] = recon
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    # bytes re-pickled by Python 3 with protocol 2 are stored as _codecs.encode(str, 'latin1')
    import _codecs

    allowed[("_codecs", "encode")] = _codecs.encode
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    """Admits exactly the globals the CIFAR python release holds (numpy array reconstruction).

    Dicts, lists, bytes, str and numbers need no globals; anything else (os.system, builtins.eval,
    arbitrary classes) is refused before it can run.
    """

    _allowed = _numpy_globals()

    def find_class(self, module: str, name: str) -> Any:
        obj = self._allowed.get((module, name))
        if obj is None:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")
        return obj


def restricted_load(path: str | os.PathLike) -> Any:
    """Unpickle a CIFAR python-release file, refusing any global beyond numpy array reconstruction."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            return _RestrictedUnpickler(fh, encoding="bytes").load()
    except pickle.UnpicklingError as exc:
        raise InputError(
            f"{path}: refused to unpickle: {exc}; CIFAR python files hold only dicts, lists, bytes and "
            "numpy arrays"
        ) from None
    except (EOFError, ValueError, TypeError, AttributeError, LookupError, MemoryError, OverflowError, RecursionError,
            struct.error) as exc:  # LookupError: KeyError, IndexError and unknown codecs; MemoryError: a huge length
        raise InputError(f"{path}: not a readable CIFAR python-release pickle ({type(exc).__name__}: {exc})") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _dict_get(d: Any, key: str, path: Path) -> Any:
    if not isinstance(d, dict):
        raise InputError(f"{path}: expected a dict in the CIFAR python file, got {type(d).__name__}")
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    raise InputError(f"{path}: missing key {key!r}; keys present: {sorted(map(str, d))}")


def _cifar_images(data: Any, path: Path) -> np.ndarray:
    arr = np.asarray(data)
    if arr.dtype != np.uint8 or arr.ndim != 2 or arr.shape[1] != 3072:
        raise InputError(f"{path}: 'data' must be uint8 (n, 3072), got dtype {arr.dtype} shape {arr.shape}")
    return arr.reshape(-1, 3, 32, 32)


def _cifar_labels(labels: Any, key: str, path: Path) -> np.ndarray:
    """A python batch's labels as int64 (n,): a flat list or array of integers, else an InputError."""
    try:
        y = np.asarray(labels)
    except (ValueError, TypeError) as exc:
        raise InputError(f"{path}: {key!r} must be a flat list of integer labels ({exc})") from None
    if y.size == 0:
        y = y.astype(np.int64).reshape(0)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise InputError(f"{path}: {key!r} must be a flat list of integer labels, got dtype {y.dtype} shape {y.shape}")
    return y.astype(np.int64)


def _cifar_batch(data: Any, labels: Any, key: str, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of one python batch; the rule: one label per image."""
    x = _cifar_images(data, path)
    y = _cifar_labels(labels, key, path)
    if y.shape[0] != x.shape[0]:
        raise InputError(f"{path}: {key!r} has {y.shape[0]} entries but 'data' has {x.shape[0]} images "
                         "(one label per image)")
    return x, y


def _read_cifar_bin(path: Path, n_label_bytes: int, label_index: int) -> tuple[np.ndarray, np.ndarray]:
    raw = np.fromfile(path, dtype=np.uint8)
    rec = n_label_bytes + 3072
    if raw.size == 0 or raw.size % rec:
        raise InputError(f"{path}: size {raw.size} bytes is not a multiple of the {rec}-byte CIFAR record")
    raw = raw.reshape(-1, rec)
    return raw[:, n_label_bytes:].reshape(-1, 3, 32, 32), raw[:, label_index].astype(np.int64)


def _to_float_images(x: np.ndarray) -> np.ndarray:
    return (x.astype(np.float32) / 255.0)


def load_cifar10(root: str | os.PathLike | None = None) -> Dataset:
    """CIFAR-10 from the binary release (cifar-10-batches-bin) or the python release (cifar-10-batches-py)."""
    bin_names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    py_names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    cands = _resolve_root("cifar10", root)
    for base in cands:
        for folder in (base / "cifar-10-batches-bin", base):
            files = _find_files(folder, bin_names)
            if files:
                parts = [_read_cifar_bin(f, 1, 0) for f in files]
                return _cifar_dataset("cifar10", parts[:5], parts[5], 10, folder)
        for folder in (base / "cifar-10-batches-py", base):
            files = _find_files(folder, py_names)
            if files:
                parts = []
                for f in files:
                    d = restricted_load(f)
                    parts.append(_cifar_batch(_dict_get(d, "data", f), _dict_get(d, "labels", f), "labels", f))
                return _cifar_dataset("cifar10", parts[:5], parts[5], 10, folder)
    raise _missing("cifar10", ["cifar-10-batches-bin/" + "{data_batch_1..5,test_batch}.bin",
                               "or cifar-10-batches-py/{data_batch_1..5,test_batch}"], cands)


def load_cifar100(root: str | os.PathLike | None = None, *, label: str = "fine") -> Dataset:
    """CIFAR-100 (fine labels by default, ``label='coarse'`` for the 20 superclasses)."""
    check_choice(label, "label", ("fine", "coarse"))
    cands = _resolve_root("cifar100", root)
    n_classes = 100 if label == "fine" else 20
    for base in cands:
        for folder in (base / "cifar-100-binary", base):
            files = _find_files(folder, ["train.bin", "test.bin"])
            if files:
                idx = 1 if label == "fine" else 0
                tr, te = (_read_cifar_bin(f, 2, idx) for f in files)
                return _cifar_dataset("cifar100", [tr], te, n_classes, folder)
        for folder in (base / "cifar-100-python", base):
            files = _find_files(folder, ["train", "test"])
            if files:
                parts = []
                for f in files:
                    d = restricted_load(f)
                    key = f"{label}_labels"
                    parts.append(_cifar_batch(_dict_get(d, "data", f), _dict_get(d, key, f), key, f))
                return _cifar_dataset("cifar100", [parts[0]], parts[1], n_classes, folder)
    raise _missing("cifar100", ["cifar-100-binary/{train,test}.bin", "or cifar-100-python/{train,test}"], cands)


def _cifar_dataset(name, train_parts, test_part, n_classes, folder) -> Dataset:
    x_tr = np.concatenate([p[0] for p in train_parts])
    y_tr = np.concatenate([p[1] for p in train_parts])
    for what, y in (("train", y_tr), ("test", test_part[1])):
        if y.size and (y.min() < 0 or y.max() >= n_classes):
            raise InputError(f"{folder}: {name} {what} labels must lie in 0..{n_classes - 1}, got max {y.max()}")
    return Dataset(name, _to_float_images(x_tr), y_tr, _to_float_images(test_part[0]), test_part[1].astype(np.int64),
                   n_classes, {"source": str(folder)})


def load_svhn(root: str | os.PathLike | None = None) -> Dataset:
    """SVHN cropped digits (train_32x32.mat, test_32x32.mat); label 10 (digit 0) is mapped to 0."""
    import scipy.io

    cands = _resolve_root("svhn", root)
    for folder in cands:
        files = _find_files(folder, ["train_32x32.mat", "test_32x32.mat"])
        if not files:
            continue
        parts = []
        for f in files:
            try:
                m = scipy.io.loadmat(f)
            except (ValueError, OSError, TypeError) as exc:
                raise InputError(f"{f}: not a readable .mat file ({exc})") from None
            if "X" not in m or "y" not in m:
                raise InputError(f"{f}: expected variables 'X' and 'y', found {sorted(k for k in m if not k.startswith('__'))}")
            X, y = np.asarray(m["X"]), np.asarray(m["y"]).reshape(-1).astype(np.int64)
            if X.ndim != 4 or X.shape[:3] != (32, 32, 3) or X.shape[3] != y.size:
                raise InputError(f"{f}: 'X' must be (32, 32, 3, n) with n = len(y) = {y.size}, got {X.shape}")
            y = np.where(y == 10, 0, y)
            parts.append((np.ascontiguousarray(X.transpose(3, 2, 0, 1)), y))
        return Dataset("svhn", _to_float_images(parts[0][0]), parts[0][1], _to_float_images(parts[1][0]), parts[1][1],
                       10, {"source": str(folder)})
    raise _missing("svhn", ["train_32x32.mat", "test_32x32.mat"], cands)


# -- idx (MNIST, Fashion-MNIST) -----------------------------------------------------------------
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an idx file (optionally gzip-compressed) into a numpy array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError) as exc:
        raise InputError(f"{path}: could not read idx file ({exc})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise InputError(f"{path}: not an idx file (bad magic number {data[:4].hex() or '(empty)'})")
    ndim = data[3]
    if ndim == 0 or len(data) < 4 + 4 * ndim:
        raise InputError(f"{path}: idx header truncated")
    shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    count = int(np.prod(shape))
    body = data[4 + 4 * ndim:]
    if len(body) != count * dtype.itemsize:
        raise InputError(f"{path}: idx body has {len(body)} bytes, header promises shape {shape} ({count * dtype.itemsize} bytes)")
    return np.frombuffer(body, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


_IDX_NAMES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


def _load_idx_dataset(name: str, root, defaults=()) -> Dataset:
    cands = _resolve_root(name, root, defaults)
    for folder in cands:
        files = _find_files(folder, _IDX_NAMES, gz=True)
        if not files:
            continue
        xtr, ytr, xte, yte = (read_idx(f) for f in files)
        for xs, ys, what in ((xtr, ytr, "train"), (xte, yte, "t10k")):
            if xs.ndim != 3 or ys.ndim != 1 or xs.shape[0] != ys.shape[0]:
                raise InputError(f"{folder}: {what} images {xs.shape} and labels {ys.shape} do not match")
        return Dataset(name, _to_float_images(xtr[:, None]), ytr.astype(np.int64), _to_float_images(xte[:, None]),
                       yte.astype(np.int64), int(max(ytr.max(), yte.max())) + 1, {"source": str(folder)})
    hint = "On Debian/Ubuntu: apt-get install dataset-fashion-mnist" if name == "fashion-mnist" else ""
    raise _missing(name, [n + "[.gz]" for n in _IDX_NAMES], cands, hint)


def load_mnist(root: str | os.PathLike | None = None) -> Dataset:
    """MNIST from idx files (gzipped or not)."""
    return _load_idx_dataset("mnist", root)


def load_fashion_mnist(root: str | os.PathLike | None = None) -> Dataset:
    """Fashion-MNIST from idx files; found automatically where Debian's dataset-fashion-mnist puts them."""
    return _load_idx_dataset("fashion-mnist", root, FASHION_MNIST_DIRS)


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The bundled digits.csv.gz of scikit-learn, read without importing scikit-learn (seconds saved)."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("dataset 'digits' needs scikit-learn (its bundled 8x8 digits): pip install scikit-learn")
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "digits.csv.gz"
    if path.is_file():
        raw = np.loadtxt(path, delimiter=",", dtype=np.float32)
        return (raw[:, :-1] / 16.0).reshape(-1, 1, 8, 8), raw[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits as _sk  # pragma: no cover - other layouts

    d = _sk()
    return (d.images.astype(np.float32) / 16.0)[:, None], d.target.astype(np.int64)


def load_digits(root: Any = None, *, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1797 images), split into train/test with a seed.

    Images are scaled to [0, 1] and shaped (n, 1, 8, 8).
    """
    x, y = _digits_arrays()
    rng = check_seed(seed)
    order = rng.permutation(len(y))
    n_test = int(round(test_fraction * len(y)))
    te, tr = order[:n_test], order[n_test:]
    return Dataset("digits", x[tr], y[tr], x[te], y[te], 10, {"source": "sklearn.datasets.load_digits", "seed": seed})


# -- synthetic spheres (paper 003, appendix A.5) ------------------------------------------------
def make_spheres(
    n_classes: int = 10,
    n_train_per_class: int = 100,
    n_test_per_class: int = 50,
    *,
    radius: float = 5.0,
    intrinsic_dim: int = 30,
    ambient_dim: int = 1024,
    seed: int = 0,
) -> Dataset:
    """Spherical class manifolds with centers in diametrically opposed, mutually orthogonal pairs.

    Class 2k has center +u_k and class 2k+1 center -u_k, with u_0, u_1, ... orthonormal (unit norm,
    so the data are linearly separable iff radius < 1). Each class is a sphere of the given radius in
    its own random ``intrinsic_dim``-dimensional subspace, points drawn uniformly on it: x = c + r U s
    with U (D x d) orthonormal and s uniform on the unit sphere S^{d-1}. Only the direction u_k
    carries linearly decodable information about a pair's class.
    """
    n_classes = check_positive_int(n_classes, "n_classes", minimum=2)
    d = check_positive_int(intrinsic_dim, "intrinsic_dim")
    D = check_positive_int(ambient_dim, "ambient_dim")
    n_tr = check_positive_int(n_train_per_class, "n_train_per_class")
    n_te = check_positive_int(n_test_per_class, "n_test_per_class", minimum=0)
    n_pairs = (n_classes + 1) // 2
    if n_pairs > D:
        raise InputError(f"spheres need ambient_dim >= ceil(n_classes / 2) = {n_pairs}, got ambient_dim = {D}")
    if d > D:
        raise InputError(f"intrinsic_dim must be <= ambient_dim = {D}, got {d}")
    radius = float(radius)
    if not np.isfinite(radius) or radius < 0:
        raise InputError(f"radius must be a finite number >= 0, got {radius}")
    rng = check_seed(seed)
    q, _ = np.linalg.qr(rng.standard_normal((D, n_pairs)))
    centers = np.empty((n_classes, D))
    for c in range(n_classes):
        centers[c] = q[:, c // 2] * (1.0 if c % 2 == 0 else -1.0)
    bases = [np.linalg.qr(rng.standard_normal((D, d)))[0] for _ in range(n_classes)]

    def draw(n_per):
        xs, ys = [], []
        for c in range(n_classes):
            s = rng.standard_normal((n_per, d))
            s /= np.linalg.norm(s, axis=1, keepdims=True)
            xs.append(centers[c] + radius * s @ bases[c].T)
            ys.append(np.full(n_per, c, np.int64))
        return np.concatenate(xs).astype(np.float32), np.concatenate(ys)

    xtr, ytr = draw(n_tr)
    xte, yte = draw(n_te) if n_te else (np.zeros((0, D), np.float32), np.zeros(0, np.int64))
    info = {"radius": radius, "intrinsic_dim": d, "ambient_dim": D, "seed": seed}
    return Dataset("spheres", xtr, ytr, xte, yte, n_classes, info)


# -- preprocessing -------------------------------------------------------------------------------
def standardize_per_image(x: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """Per-image standardisation (as tf.image.per_image_standardization, paper 000).

    Each example: subtract its mean, divide by max(std, 1/sqrt(number of values)).
    """
    x = np.asarray(x, dtype=np.float32)
    flat = x.reshape(x.shape[0], -1)
    mean = flat.mean(axis=1, keepdims=True)
    std = flat.std(axis=1, keepdims=True)
    std = np.maximum(std, 1.0 / np.sqrt(flat.shape[1]))
    return ((flat - mean) / std).reshape(x.shape).astype(np.float32)


def normalize_channels(x: np.ndarray, mean, std) -> np.ndarray:
    """(x - mean[c]) / std[c] per channel of (n, C, H, W) images (paper 004 uses CIFAR-10's)."""
    x = np.asarray(x, dtype=np.float32)
    mean = np.asarray(mean, np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(std, np.float32).reshape(1, -1, 1, 1)
    if x.ndim != 4 or mean.shape[1] != x.shape[1] or std.shape[1] != x.shape[1]:
        raise InputError(f"normalize_channels needs (n, C, H, W) images and C means/stds, got x {x.shape}, "
                         f"{mean.shape[1]} mean(s), {std.shape[1]} std(s)")
    return (x - mean) / std


def subsample(ds: Dataset, n_train: int | None = None, n_test: int | None = None, *, seed: int = 0,
              classes: int | None = None) -> Dataset:
    """A seeded class-balanced subset: the first ``classes`` classes, n_train / n_test examples."""
    rng = check_seed(seed)

    def pick(x, y, n):
        keep = np.flatnonzero(y < classes) if classes else np.arange(len(y))
        if n is None or n >= keep.size:
            idx = keep
        else:
            labels = y[keep]
            ks = np.unique(labels)
            per = [rng.permutation(keep[labels == k]) for k in ks]
            take = n // len(ks)
            idx = np.concatenate([p[:take] for p in per])
            rest = np.setdiff1d(keep, idx)
            idx = np.concatenate([idx, rng.permutation(rest)[: n - idx.size]])
        idx = np.sort(idx)
        return x[idx], y[idx]

    xtr, ytr = pick(ds.x_train, ds.y_train, n_train)
    xte, yte = pick(ds.x_test, ds.y_test, n_test)
    info = dict(ds.info, subsample={"n_train": int(ytr.size), "n_test": int(yte.size), "seed": seed})
    return replace(ds, x_train=xtr, y_train=ytr, x_test=xte, y_test=yte,
                   n_classes=classes or ds.n_classes, info=info)


DATASETS: dict[str, Callable[..., Dataset]] = {
    "cifar10": load_cifar10,
    "cifar100": load_cifar100,
    "svhn": load_svhn,
    "mnist": load_mnist,
    "fashion-mnist": load_fashion_mnist,
    "digits": load_digits,
    "spheres": lambda root=None, **kw: make_spheres(**kw),
}


def load_dataset(name: str, root: str | os.PathLike | None = None, **kwargs: Any) -> Dataset:
    """Load a dataset by name (see the module docstring for the files each expects)."""
    check_choice(name, "dataset", tuple(DATASETS))
    return DATASETS[name](root, **kwargs)
