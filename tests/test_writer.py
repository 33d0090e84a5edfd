"""ActivationWriter: batches appended to disk give the same file as save_activations, atomically, in
bounded memory; every rule is checked per batch with a message naming the target file."""
import os
import stat
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from geomprobe import ActivationWriter, InputError
from geomprobe.io import open_activations, save_activations


def _batch(rng, n, start=0):
    return {
        "labels": (np.arange(start, start + n) % 3),
        "acts": {"conv": rng.standard_normal((n, 2, 3, 3)).astype(np.float32),
                 "fc": rng.standard_normal((n, 4)).astype(np.float16)},
        "split": np.array(["train", "test"] * n)[:n],
    }


def test_batches_equal_one_save_activations(tmp_path, rng):
    batches = [_batch(rng, n, s) for n, s in ((5, 0), (1, 5), (7, 6))]
    meta = {"epoch": 3}
    with ActivationWriter(tmp_path / "w.npz", meta=meta) as w:
        for b in batches:
            w.append(b["labels"], b["acts"], split=b["split"],
                     grads={"fc": {"weight": b["acts"]["fc"].astype(np.float32) * 2}})
        assert w.n == 13 and w.layers == ["conv", "fc"]
    whole = {k: np.concatenate([b["acts"][k] for b in batches]) for k in ("conv", "fc")}
    labels = np.concatenate([b["labels"] for b in batches])
    split = np.concatenate([b["split"] for b in batches])
    save_activations(tmp_path / "s.npz", labels, whole, split=split, meta=meta,
                     grads={"fc": {"weight": whole["fc"].astype(np.float32) * 2}})
    a, b = np.load(tmp_path / "w.npz"), np.load(tmp_path / "s.npz")
    assert sorted(a.files) == sorted(b.files)
    for k in a.files:
        np.testing.assert_array_equal(a[k], b[k])
        assert a[k].dtype == b[k].dtype, k
    f = open_activations(tmp_path / "w.npz", scan_values=True)
    assert f.layers == ["conv", "fc"] and f.meta["epoch"] == 3 and f.meta["format_version"] == 1
    assert f.is_stored("act/conv") and f.grad_tensors == {"fc": ["weight"]}
    assert set(f.subsets()) == {"unpermuted", "test"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npz", "w.npz"]  # no spool or temporary left


@settings(deadline=None, max_examples=25)
@given(sizes=st.lists(st.integers(0, 6), min_size=1, max_size=6).filter(lambda s: sum(s) > 0),
       compress=st.booleans())
def test_any_batch_split_reads_back_row_for_row(tmp_path_factory, sizes, compress):
    path = tmp_path_factory.mktemp("w") / "p.npz"
    rng = np.random.default_rng(sum(sizes))
    n = sum(sizes)
    X = rng.standard_normal((n, 5))
    lab = rng.integers(0, 4, n)
    perm = rng.random(n) < 0.5
    with ActivationWriter(path, compress=compress) as w:
        at = 0
        for s in sizes:
            w.append(lab[at:at + s], {"x": X[at:at + s]}, permuted=perm[at:at + s], train_labels=lab[at:at + s])
            at += s
    f = open_activations(path)
    np.testing.assert_array_equal(f.layer("x"), X)
    np.testing.assert_array_equal(f.labels, lab)
    np.testing.assert_array_equal(f.permuted, perm)
    assert f.is_stored("act/x") is (not compress)
    rows = np.concatenate([blk for _, blk in f.iter_rows("act/x", batch_rows=3)])
    np.testing.assert_array_equal(rows, X)


def test_every_rule_is_checked_per_batch_naming_the_file(tmp_path, rng):
    p = tmp_path / "e.npz"
    w = ActivationWriter(p)
    w.append([0, 1], {"a": np.zeros((2, 3))}, split=["train", "test"])
    cases = [
        (lambda: w.append([0, 1, 2], {"a": np.zeros((2, 3))}, split=["train"] * 3),
         r"e\.npz: batch 1: layer 'a' has 2 rows but the batch has 3 labels"),
        (lambda: w.append([0], {"a": np.zeros((1, 4))}, split=["train"]),
         r"batch 1: 'act/a' has \(4,\) values per row but the first batch had \(3,\)"),
        (lambda: w.append([0], {"b": np.zeros((1, 3))}, split=["train"]),
         r"batch 1: keys differ from the first batch's; missing act/a; new act/b"),
        (lambda: w.append([0], {"a": np.zeros((1, 3))}),
         r"batch 1: gives none of train_labels/permuted/split but the first batch gave split"),
        (lambda: w.append([0], {"a": np.zeros((1, 3))}, split=["val"]),
         r"batch 1: split must hold 'train' or 'test', got 'val' at batch row 0"),
        (lambda: w.append([0.5], {"a": np.zeros((1, 3))}, split=["train"]),
         r"batch 1: labels must be a 1-D integer array, got dtype float64"),
        (lambda: w.append([0], {"a": np.zeros(3)}, split=["train"]),
         r"batch 1: layer 'a' must be \(n, features...\), got shape \(3,\)"),
        (lambda: w.append([0], {"a/b": np.zeros((1, 3))}, split=["train"]),
         r"layer name must be a non-empty string without '/'"),
        (lambda: w.append([0], {"a": np.array([["x", "y", "z"]])}, split=["train"]),
         r"batch 1: layer 'a' must be numeric, got dtype <U1"),
    ]
    for fn, pattern in cases:
        with pytest.raises(InputError, match=pattern):
            fn()
    assert w.n == 2  # nothing of a refused batch was written
    with pytest.raises(InputError, match=r"e\.npz: extra key 'x' must start with 'probe/'"):
        w.close(extra={"x": np.zeros(2)})
    assert not p.exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(InputError, match="the writer is closed"):
        w.append([0], {"a": np.zeros((1, 3))})


def test_target_rules_and_nothing_left_on_failure(tmp_path):
    (tmp_path / "x.npz").write_bytes(b"old")
    with pytest.raises(InputError, match=r"x\.npz: already exists; pass force=True"):
        ActivationWriter(tmp_path / "x.npz")
    with pytest.raises(InputError, match=r"directory .*nope does not exist"):
        ActivationWriter(tmp_path / "nope" / "y.npz")
    with pytest.raises(InputError, match=r"meta must be JSON-serialisable"):
        ActivationWriter(tmp_path / "m.npz", meta={"a": object()})
    with pytest.raises(RuntimeError, match="boom"):
        with ActivationWriter(tmp_path / "x.npz", force=True) as w:
            w.append([0], {"a": np.ones((1, 2))})
            raise RuntimeError("boom")
    assert (tmp_path / "x.npz").read_bytes() == b"old"  # untouched by the failed writer
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npz"]
    with pytest.raises(InputError, match=r"e\.npz: no examples were appended"):
        ActivationWriter(tmp_path / "e.npz").close()
    with ActivationWriter(tmp_path / "x.npz", force=True) as w:
        w.append([0, 1], {"a": np.ones((2, 2))})
    assert open_activations(tmp_path / "x.npz").n == 2


def test_file_mode_follows_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        with ActivationWriter(tmp_path / "u.npz") as w:
            w.append([0], {"a": np.ones((1, 2))})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "u.npz").stat().st_mode) == 0o640


def test_memory_stays_one_batch_while_the_file_grows(tmp_path, rng):
    """40 batches of 256 x 1024 float32 (1 MiB each): tracemalloc's peak (numpy buffers included) stays
    near one batch plus the copy buffer while a 40 MiB file is written."""
    block = rng.standard_normal((256, 1024)).astype(np.float32)
    lab = np.arange(256) % 10
    tracemalloc.start()
    try:
        with ActivationWriter(tmp_path / "big.npz") as w:
            for i in range(40):
                w.append(lab, {"x": block + i})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    size = (tmp_path / "big.npz").stat().st_size
    assert size > 40 * 2**20
    assert peak < 6 * 2**20, f"peak {peak / 2**20:.1f} MiB"
    f = open_activations(tmp_path / "big.npz")
    last = next(blk for pos, blk in f.iter_rows("act/x", np.arange(39 * 256, 40 * 256)))
    np.testing.assert_array_equal(last, block + 39)
