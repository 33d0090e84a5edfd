"""The activations file format: round trip, subsets, and every bad input with its message."""
import json
import zipfile

import numpy as np
import pytest

from geomprobe import InputError, open_activations, save_activations
from geomprobe.io import FORMAT_VERSION


def _write(path, **arrays):
    np.savez(path, **arrays)
    return path


@pytest.fixture
def good(tmp_path, rng):
    labels = np.repeat(np.arange(3), 4)
    acts = {"conv": rng.standard_normal((12, 2, 3, 3)).astype(np.float16),
            "fc": rng.standard_normal((12, 5))}
    p = save_activations(tmp_path / "a.npz", labels, acts, meta={"epoch": 3, "seed": 7})
    return p, labels, acts


def test_round_trip_keeps_layer_order_dtype_and_meta(good):
    p, labels, acts = good
    with open_activations(p) as f:
        assert f.layers == ["conv", "fc"]
        np.testing.assert_array_equal(f.labels, labels)
        conv = f.layer("conv")
        assert conv.shape == (12, 18) and conv.dtype == np.float32  # float16 promoted, flattened
        np.testing.assert_array_equal(conv, acts["conv"].reshape(12, -1).astype(np.float32))
        assert f.meta["epoch"] == 3 and f.meta["format_version"] == FORMAT_VERSION
        assert list(f.subsets()) == ["all"]


def test_subsets_follow_paper_003(tmp_path, rng):
    labels = np.array([0, 0, 1, 1, 0, 1, 0, 1])
    train_labels = np.array([0, 1, 1, 0, 0, 1, 0, 1])
    permuted = np.array([False, True, False, True, False, False, False, False])
    split = np.array(["train"] * 6 + ["test"] * 2)
    p = save_activations(tmp_path / "s.npz", labels, {"l": rng.standard_normal((8, 3))},
                         train_labels=train_labels, permuted=permuted, split=split)
    with open_activations(p) as f:
        s = f.subsets()
        assert list(s) == ["unpermuted", "permuted", "restored", "test"]
        np.testing.assert_array_equal(s["unpermuted"].rows, [0, 2, 4, 5])
        np.testing.assert_array_equal(s["permuted"].rows, [1, 3])
        np.testing.assert_array_equal(s["permuted"].labels, [1, 0])  # training labels
        np.testing.assert_array_equal(s["restored"].labels, [0, 1])  # true labels, same rows
        np.testing.assert_array_equal(s["test"].rows, [6, 7])


def test_save_refuses_overwrite_without_force(good):
    p, labels, acts = good
    before = p.read_bytes()
    with pytest.raises(InputError, match="already exists; pass force=True"):
        save_activations(p, labels, acts)
    assert p.read_bytes() == before
    save_activations(p, labels, {"x": np.ones((12, 2))}, force=True)
    with open_activations(p) as f:
        assert f.layers == ["x"]


def test_save_leaves_no_partial_file_on_error(tmp_path):
    with pytest.raises(InputError, match="has 4 rows but 'labels' has 3"):
        save_activations(tmp_path / "x.npz", np.arange(3), {"l": np.ones((4, 2))})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: None, "no such file"),
        (lambda p: p.write_bytes(b"not a zip at all"), "not a zip archive"),
        (lambda p: p.write_bytes(__import__("pickle").dumps({"labels": [1, 2]})), "not a zip archive"),
        (lambda p: _write(p, labels=np.array([0, 1], dtype=object), **{"act/l": np.ones((2, 2))}),
         "holds Python objects"),
        (lambda p: _write(p, **{"act/l": np.ones((2, 2))}), "missing required key 'labels'"),
        (lambda p: _write(p, labels=np.arange(3), **{"act/l": np.ones((4, 2))}),
         "'act/l' has 4 rows but 'labels' has 3 entries"),
        (lambda p: _write(p, labels=np.arange(3), **{"act/l": np.ones(3)}), "must be at least 2-D"),
        (lambda p: _write(p, labels=np.array([0.5, 1.0]), **{"act/l": np.ones((2, 2))}),
         "'labels' must be integers, got dtype float64"),
        (lambda p: _write(p, labels=np.arange(3), **{"act/l": np.ones((3, 0))}), "is empty.*0 features"),
        (lambda p: _write(p, labels=np.arange(2), **{"act/l": np.ones((2, 2)), "junk": np.ones(2)}),
         "unknown key"),
        (lambda p: _write(p, labels=np.arange(2), split=np.array(["train", "val"]), **{"act/l": np.ones((2, 2))}),
         "'split' must hold 'train' or 'test', got 'val' at index 1"),
        (lambda p: _write(p, labels=np.arange(2), meta=np.array(json.dumps({"format_version": 99})),
                          **{"act/l": np.ones((2, 2))}), "format_version 99"),
        (lambda p: _write(p, labels=np.arange(2)), "nothing to analyse"),
    ],
    ids=["missing", "garbage", "pickle", "object-array", "no-labels", "row-count", "1-d",
         "float-labels", "empty-layer", "unknown-key", "bad-split", "future-version", "no-layers"],
)
def test_bad_files_are_refused_with_a_clear_message(tmp_path, make, match):
    p = tmp_path / "bad.npz"
    make(p)
    with pytest.raises(InputError, match=match) as exc:
        open_activations(p)
    assert str(p) in str(exc.value)


def test_truncated_file_is_refused(good, tmp_path):
    p, _, _ = good
    data = p.read_bytes()
    t = tmp_path / "trunc.npz"
    t.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="not a zip archive|corrupt or truncated"):
        open_activations(t)


def test_corrupted_member_is_refused(tmp_path):
    p = tmp_path / "c.npz"
    with zipfile.ZipFile(p, "w", zipfile.ZIP_DEFLATED) as z:
        import io

        for k, a in {"labels": np.arange(50), "act/l": np.random.default_rng(0).random((50, 20))}.items():
            b = io.BytesIO()
            np.save(b, a)
            z.writestr(k + ".npy", b.getvalue())
    raw = bytearray(p.read_bytes())
    i = raw.find(b"act/l.npy") + 600  # inside the compressed data of the second member
    raw[i] ^= 0xFF
    p.write_bytes(bytes(raw))
    with pytest.raises(InputError, match="corrupt|not a readable|CRC|could not be read"):
        open_activations(p, scan_values=True)


def test_nan_scan_reports_count_and_first_position(tmp_path):
    a = np.ones((6, 4))
    a[2, 3] = np.nan
    a[4, 0] = np.inf
    p = _write(tmp_path / "n.npz", labels=np.arange(6), **{"act/l": a})
    with pytest.raises(InputError, match=r"'act/l' contains 2 non-finite value\(s\).*first at row 2, column 3"):
        open_activations(p, scan_values=True)


def test_identity_follows_the_contents_of_the_arrays_read(tmp_path, rng):
    p = tmp_path / "i.npz"
    a, b = rng.standard_normal((6, 2)), rng.standard_normal((6, 2))
    save_activations(p, np.arange(6) % 2, {"a": a, "b": b})
    with open_activations(p) as f:
        id_a, id_all = f.identity(["labels", "act/a"]), f.identity()
    save_activations(p, np.arange(6) % 2, {"a": a, "b": b + 1}, force=True)
    with open_activations(p) as f:
        assert f.identity(["labels", "act/a"])["content"] == id_a["content"]  # 'a' and labels unchanged
        assert f.identity()["content"] != id_all["content"]


def test_string_and_big_endian_labels(tmp_path, rng):
    p = _write(tmp_path / "s.npz", labels=np.array([b"b", b"a", b"b", b"c"]),
               train_labels=np.array(["b", "a", "c", "c"]), **{"act/l": rng.standard_normal((4, 2)).astype(">f8")})
    with open_activations(p) as f:
        assert f.label_names == ["a", "b", "c"]
        np.testing.assert_array_equal(f.labels, [1, 0, 1, 2])
        np.testing.assert_array_equal(f.train_labels, [1, 0, 2, 2])
        assert f.layer("l").dtype == np.float64 and f.layer("l").dtype.isnative


def test_names_the_format_forbids_are_refused_on_writing_too(tmp_path):
    for bad in ["", ".", "..", "a/b", ".x", "a\\b", "x\n"]:
        with pytest.raises(InputError, match="layer name must be non-empty"):
            save_activations(tmp_path / "x.npz", np.arange(2), {bad: np.ones((2, 2))})
    assert list(tmp_path.iterdir()) == []


def test_lock_directory_is_exclusive_and_removed(tmp_path):
    from geomprobe.io import LOCK_NAME, lock_directory, lock_holder

    assert lock_holder(tmp_path) is None
    with lock_directory(tmp_path):
        assert f"pid {__import__('os').getpid()}" in lock_holder(tmp_path)
        with pytest.raises(InputError, match="is in use by another geomprobe run"):
            with lock_directory(tmp_path):
                pass
    assert not (tmp_path / LOCK_NAME).exists() and lock_holder(tmp_path) is None
