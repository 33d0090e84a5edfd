"""Offline dataset loaders: tiny fake files of every format, the restricted unpickler, label noise."""
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from geomprobe import InputError
from geomprobe.trainers import data as D
from geomprobe.trainers.noise import LabelNoise, permute_labels

from conftest import write_idx


# -- fake files ----------------------------------------------------------------------------------
def _cifar_py(path: Path, n: int, rng, labels_key=b"labels", n_classes=10, protocol=2):
    d = {b"batch_label": b"fake", b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
         labels_key: [int(v) for v in rng.integers(0, n_classes, n)], b"filenames": [b"a.png"] * n}
    if labels_key == b"fine_labels":
        d[b"coarse_labels"] = [int(v) for v in rng.integers(0, 20, n)]
    with open(path, "wb") as fh:
        pickle.dump(d, fh, protocol=protocol)
    return d


def test_cifar10_binary(tmp_path, rng):
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    recs = {}
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        r = rng.integers(0, 256, (3, 3073), dtype=np.uint8)
        r[:, 0] = rng.integers(0, 10, 3)
        r.tofile(folder / name)
        recs[name] = r
    ds = D.load_cifar10(tmp_path)
    assert ds.x_train.shape == (15, 3, 32, 32) and ds.x_test.shape == (3, 3, 32, 32)
    assert ds.x_train.dtype == np.float32 and ds.n_classes == 10
    r = recs["data_batch_1.bin"]
    np.testing.assert_array_equal(ds.y_train[:3], r[:, 0])
    np.testing.assert_allclose(ds.x_train[0].reshape(-1), r[0, 1:] / 255.0, rtol=1e-6)


@pytest.mark.parametrize("protocol", [2, 4])
def test_cifar10_python_release(tmp_path, rng, protocol):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    first = None
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = _cifar_py(folder / name, 4, rng, protocol=protocol)
        first = first or d
    ds = D.load_cifar10(folder)  # the folder itself also works
    assert ds.x_train.shape == (20, 3, 32, 32)
    np.testing.assert_array_equal(ds.y_train[:4], first[b"labels"])
    np.testing.assert_allclose(ds.x_train[:4].reshape(4, -1), first[b"data"] / 255.0, rtol=1e-6)


def test_cifar100_both_releases(tmp_path, rng):
    b = tmp_path / "bin" / "cifar-100-binary"
    b.mkdir(parents=True)
    for name in ("train.bin", "test.bin"):
        r = rng.integers(0, 256, (5, 3074), dtype=np.uint8)
        r[:, 0] = rng.integers(0, 20, 5)
        r[:, 1] = rng.integers(0, 100, 5)
        r.tofile(b / name)
    fine = D.load_cifar100(tmp_path / "bin")
    coarse = D.load_cifar100(tmp_path / "bin", label="coarse")
    assert fine.n_classes == 100 and coarse.n_classes == 20
    raw = np.fromfile(b / "train.bin", np.uint8).reshape(5, -1)
    np.testing.assert_array_equal(fine.y_train, raw[:, 1])
    np.testing.assert_array_equal(coarse.y_train, raw[:, 0])
    p = tmp_path / "py" / "cifar-100-python"
    p.mkdir(parents=True)
    tr = _cifar_py(p / "train", 6, rng, b"fine_labels", 100)
    _cifar_py(p / "test", 2, rng, b"fine_labels", 100)
    ds = D.load_cifar100(tmp_path / "py")
    np.testing.assert_array_equal(ds.y_train, tr[b"fine_labels"])


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_restricted_unpickler_refuses_malicious_pickle(tmp_path, rng):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        _cifar_py(folder / name, 2, rng)
    with open(folder / "data_batch_3", "wb") as fh:
        pickle.dump({b"data": _Evil(), b"labels": [0]}, fh, protocol=2)
    with pytest.raises(InputError, match=r"refused to unpickle: global '(posix|os|nt)\.system' is not allowed"):
        D.load_cifar10(tmp_path)
    evil = tmp_path / "evil.pkl"
    with open(evil, "wb") as fh:
        pickle.dump(eval, fh)
    with pytest.raises(InputError, match="builtins.eval' is not allowed"):
        D.restricted_load(evil)


def test_cifar_python_bad_contents(tmp_path):
    p = tmp_path / "x"
    with open(p, "wb") as fh:
        pickle.dump([1, 2], fh, protocol=2)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(p.read_bytes())
    with pytest.raises(InputError, match="expected a dict in the CIFAR python file, got list"):
        D.load_cifar10(tmp_path)


def test_svhn_mat(tmp_path, rng):
    scipy_io = pytest.importorskip("scipy.io")
    for name, n in (("train_32x32.mat", 4), ("test_32x32.mat", 2)):
        X = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = np.array([[10], [1], [2], [10]][:n], dtype=np.uint8)
        scipy_io.savemat(tmp_path / name, {"X": X, "y": y})
    ds = D.load_svhn(tmp_path)
    assert ds.x_train.shape == (4, 3, 32, 32)
    np.testing.assert_array_equal(ds.y_train, [0, 1, 2, 0])  # label 10 is digit 0
    X = scipy_io.loadmat(tmp_path / "train_32x32.mat")["X"]
    np.testing.assert_allclose(ds.x_train[1, 2, 5, 7], X[5, 7, 2, 1] / 255.0, rtol=1e-6)


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx(tmp_path, rng, gz):
    xtr = rng.integers(0, 256, (5, 28, 28))
    ytr = rng.integers(0, 10, 5)
    xte = rng.integers(0, 256, (2, 28, 28))
    yte = np.array([9, 0])
    write_idx(tmp_path / "train-images-idx3-ubyte", xtr, gz)
    write_idx(tmp_path / "train-labels-idx1-ubyte", ytr, gz)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", xte, gz)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", yte, gz)
    ds = D.load_mnist(tmp_path)
    assert ds.x_train.shape == (5, 1, 28, 28) and ds.n_classes == 10
    np.testing.assert_array_equal(ds.y_train, ytr)
    np.testing.assert_allclose(ds.x_test[0, 0], xte[0] / 255.0, rtol=1e-6)
    fm = D.load_fashion_mnist(tmp_path)
    assert fm.name == "fashion-mnist" and fm.x_train.shape == (5, 1, 28, 28)


def test_idx_bad_magic(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(InputError, match="not an idx file"):
        D.read_idx(p)
    p.write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"abc")
    with pytest.raises(InputError, match="idx body has 3 bytes"):
        D.read_idx(p)


@pytest.mark.parametrize("name,expect", [
    ("cifar10", "cifar-10-batches-bin"), ("cifar100", "cifar-100-binary"), ("svhn", "train_32x32.mat"),
    ("mnist", "train-images-idx3-ubyte"),
])
def test_missing_dataset_names_files_and_place(tmp_path, name, expect):
    with pytest.raises(InputError, match=rf"dataset '{name}' not found: expected files .*{expect}.*{tmp_path}.*"
                                         "never downloads"):
        D.load_dataset(name, tmp_path)


def test_missing_fashion_mnist_hint(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "FASHION_MNIST_DIRS", (tmp_path / "nope",))
    monkeypatch.delenv("GEOMPROBE_DATA", raising=False)
    with pytest.raises(InputError, match="apt-get install dataset-fashion-mnist"):
        D.load_fashion_mnist()


def test_env_root(tmp_path, rng, monkeypatch):
    folder = tmp_path / "mnist"
    folder.mkdir()
    for name, arr in (("train-images-idx3-ubyte", rng.integers(0, 9, (2, 4, 4))), ("train-labels-idx1-ubyte", [1, 2]),
                      ("t10k-images-idx3-ubyte", rng.integers(0, 9, (1, 4, 4))), ("t10k-labels-idx1-ubyte", [3])):
        write_idx(folder / name, np.asarray(arr), False)
    monkeypatch.setenv("GEOMPROBE_DATA", str(tmp_path))
    assert D.load_dataset("mnist").y_test.tolist() == [3]


@pytest.mark.skipif(not (D.FASHION_MNIST_DIRS[0] / "train-images-idx3-ubyte.gz").exists(),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_debian_package():
    ds = D.load_fashion_mnist()
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert np.bincount(ds.y_train).tolist() == [6000] * 10


def test_digits_seeded_split():
    a, b = D.load_digits(seed=1), D.load_digits(seed=1)
    np.testing.assert_array_equal(a.y_train, b.y_train)
    assert a.x_train.shape[1:] == (1, 8, 8) and len(a.y_train) + len(a.y_test) == 1797
    assert 0.0 <= a.x_train.min() and a.x_train.max() <= 1.0
    assert not np.array_equal(D.load_digits(seed=2).y_train, a.y_train)


def test_spheres_geometry():
    ds = D.make_spheres(6, 40, 5, radius=0.5, intrinsic_dim=3, ambient_dim=16, seed=3)
    assert ds.x_train.shape == (240, 16) and ds.n_classes == 6
    centers = np.stack([ds.x_train[ds.y_train == c].mean(0) for c in range(6)])
    # points lie on spheres of radius r around unit centers: distance to the true center is exactly r
    again = D.make_spheres(6, 40, 5, radius=0.5, intrinsic_dim=3, ambient_dim=16, seed=3)
    np.testing.assert_array_equal(ds.x_train, again.x_train)
    u = centers / np.linalg.norm(centers, axis=1, keepdims=True)
    # diametrically opposed pairs, orthogonal to the other pairs
    assert np.allclose(u[0] @ u[1], -1, atol=0.1) and np.allclose(u[2] @ u[3], -1, atol=0.1)
    assert abs(u[0] @ u[2]) < 0.25 and abs(u[1] @ u[5]) < 0.25


def test_spheres_exact_radius_and_dim():
    ds = D.make_spheres(4, 50, 1, radius=5.0, intrinsic_dim=3, ambient_dim=20, seed=0)
    x = ds.x_train[ds.y_train == 0].astype(np.float64)
    # the points minus the center span intrinsic_dim dimensions and all have norm r
    c = np.linalg.lstsq(np.c_[np.ones(len(x)), 2 * x][:, :], (x ** 2).sum(1), rcond=None)[0]
    s = np.linalg.svd(x - x.mean(0), compute_uv=False)
    assert (s > 1e-3 * s[0]).sum() == 3
    assert c.shape == (21,)  # a sphere fit exists (sanity of the design matrix)


def test_spheres_errors():
    with pytest.raises(InputError, match="ambient_dim >= ceil"):
        D.make_spheres(10, 2, 2, ambient_dim=4)
    with pytest.raises(InputError, match="intrinsic_dim must be <= ambient_dim = 8, got 9"):
        D.make_spheres(4, 2, 2, ambient_dim=8, intrinsic_dim=9)


def test_preprocessing(rng):
    x = rng.random((3, 1, 4, 4)).astype(np.float32) * 5 + 2
    s = D.standardize_per_image(x)
    np.testing.assert_allclose(s.reshape(3, -1).mean(1), 0, atol=1e-5)
    np.testing.assert_allclose(s.reshape(3, -1).std(1), 1, atol=1e-4)
    const = D.standardize_per_image(np.ones((1, 1, 2, 2)))  # std 0: divided by 1/sqrt(n), no NaN
    assert np.all(const == 0)
    n = D.normalize_channels(np.ones((2, 3, 2, 2)), [1, 1, 1], [2, 2, 2])
    assert np.all(n == 0)
    with pytest.raises(InputError, match="normalize_channels needs"):
        D.normalize_channels(np.ones((2, 3, 2, 2)), [1], [1])


def test_subsample_balanced():
    ds = D.load_digits()
    sub = D.subsample(ds, 100, 50, seed=0)
    assert len(sub.y_train) == 100 and len(sub.y_test) == 50
    assert np.bincount(sub.y_train).min() >= 9
    assert D.subsample(ds, 100, 50, seed=0).y_train.tolist() == sub.y_train.tolist()


def test_unknown_dataset():
    with pytest.raises(InputError, match="dataset must be one of"):
        D.load_dataset("imagenet")


# -- label noise (paper 003 A.3) -----------------------------------------------------------------
def test_permute_labels(tmp_path):
    y = np.repeat(np.arange(10), 20)
    noise = permute_labels(y, 0.5, seed=7)
    assert noise.n_permuted == 100
    np.testing.assert_array_equal(noise.train_labels[~noise.permuted], y[~noise.permuted])
    # the permuted labels are a permutation of the chosen examples' labels
    assert sorted(noise.train_labels[noise.permuted]) == sorted(y[noise.permuted])
    assert noise.n_changed < noise.n_permuted  # some land on their true label and still count as permuted
    again = permute_labels(y, 0.5, seed=7)
    np.testing.assert_array_equal(again.train_labels, noise.train_labels)
    noise.save(tmp_path / "n.npz")
    back = LabelNoise.load(tmp_path / "n.npz")
    np.testing.assert_array_equal(back.permuted, noise.permuted)
    assert back.eps == 0.5 and back.seed == 7
    assert permute_labels(y, 0.0, 1).n_permuted == 0 and permute_labels(y, 1.0, 1).n_permuted == 200


def test_permute_labels_errors():
    with pytest.raises(InputError, match=r"eps must be a number in \[0, 1\], got 1.5"):
        permute_labels([0, 1], 1.5, 0)
    with pytest.raises(InputError, match="seed must be >= 0, got -1"):
        permute_labels([0, 1], 0.5, -1)


def _cifar10_py_folder(tmp_path, rng, n=4):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        _cifar_py(folder / name, n, rng)
    return folder


@pytest.mark.parametrize("labels, match", [
    (list(range(3)), r"data_batch_2: 'labels' has 3 entries but 'data' has 4 images \(one label per image\)"),
    (list(range(5)), r"data_batch_2: 'labels' has 5 entries but 'data' has 4 images"),
    ([[0, 1], [2, 3]], r"data_batch_2: 'labels' must be a flat list of integer labels, got dtype int64 shape \(2, 2\)"),
    ([0.5, 1.0, 2.0, 3.0], r"'labels' must be a flat list of integer labels, got dtype float64"),
])
def test_cifar_python_labels_must_match_images(tmp_path, rng, labels, match):
    """Issue 14: a batch with fewer (or more, or non-integer) labels than images is refused, naming the
    file, the rule and both counts; before, 100 images with 87 labels trained on misaligned labels."""
    folder = _cifar10_py_folder(tmp_path, rng)
    with open(folder / "data_batch_2", "wb") as fh:
        pickle.dump({b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": labels}, fh, protocol=2)
    with pytest.raises(InputError, match=match):
        D.load_cifar10(tmp_path)


def test_cifar100_python_fine_labels_must_match_images(tmp_path, rng):
    p = tmp_path / "cifar-100-python"
    p.mkdir()
    _cifar_py(p / "test", 2, rng, b"fine_labels", 100)
    d = {b"data": rng.integers(0, 256, (6, 3072), dtype=np.uint8), b"fine_labels": [1, 2, 3],
         b"coarse_labels": [1] * 6}
    with open(p / "train", "wb") as fh:
        pickle.dump(d, fh, protocol=2)
    with pytest.raises(InputError, match=r"train: 'fine_labels' has 3 entries but 'data' has 6 images"):
        D.load_cifar100(tmp_path)


@pytest.mark.parametrize("payload, kind", [
    # protocol-0 GLOBAL of the admitted _codecs.encode with an unknown codec name -> LookupError
    (b"c_codecs\nencode\n(Vx\nVno-such-codec\ntR.", "LookupError"),
    # BINUNICODE8 declaring a 2**62-byte string -> MemoryError / OverflowError before any read
    (b"\x80\x04\x8d" + (2 ** 62).to_bytes(8, "little") + b".", "(MemoryError|OverflowError|EOFError)"),
])
def test_restricted_unpickler_lookup_and_memory_errors_are_input_errors(tmp_path, payload, kind):
    p = tmp_path / "bad.pkl"
    p.write_bytes(payload)
    with pytest.raises(InputError, match=rf"bad.pkl: not a readable CIFAR python-release pickle \({kind}"):
        D.restricted_load(p)


def test_label_noise_file_damaged_or_foreign(tmp_path):
    p = tmp_path / "label_noise.npz"
    permute_labels(np.arange(10) % 3, 0.5, 0).save(p)
    assert LabelNoise.load(p).n_permuted == 5
    p.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(InputError, match=r"label_noise.npz: not a readable label-noise file \(BadZipFile"):
        LabelNoise.load(p)
    np.savez(p, true_labels=np.zeros(3))
    with pytest.raises(InputError, match="not a label-noise file: missing train_labels, permuted, eps, seed"):
        LabelNoise.load(p)
