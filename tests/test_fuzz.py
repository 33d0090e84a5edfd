"""Fuzzing ``geomprobe analyze`` through its real entry point (geomprobe.cli.main.main).

Hypothesis builds activation files (valid, odd and broken: dtypes, byte orders, shapes, names the
format forbids, NaN, labels of every kind, meta JSON, zip methods, truncation, flipped bytes) and
option lists (layer and subset selections, seeds, --resume / --force / --quiet, bogus options), and runs
them into an OUTDIR that already holds a previous run's results and a file of the user's. Whatever
the input, the run must:

- exit 0 or 2 (1 only for a documented analysis failure: every failed task is an InputError or
  AnalysisError, listed in metrics.json), and never raise out of ``main``;
- print no traceback;
- touch nothing outside OUTDIR (every other file keeps its bytes and mtime, the input included);
- lose nothing previously written (the user's file stays; a run that exits 2 leaves metrics.json as
  it was; a run that exits 0 or 1 leaves a metrics.json that parses).

Every hostile case of issue 14's table is also run through these checks (the CRAFTED files of
tests/test_reliability.py, which checks each one's message). MFTMA is off (--no-mftma): its numerics
are tested elsewhere and its compilation would dominate the time budget (<= 60 s in the default run).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from geomprobe.analysis import clear_file_cache
from geomprobe.cli.main import main
from geomprobe.io import save_activations
from test_reliability import CRAFTED, call_main

N_EXAMPLES = 45

LAYER_NAMES = ["fc1", "conv.2", "layer1.0.relu:1", "a b", "ünï", "", ".", "..", "../x", "a/b", ".hidden", "x\n"]
KEYS_EXTRA = ["junk", "probe/weird", "act", "grad/l", "grad/l/", "meta"]


@st.composite
def arrays(draw, n: int):
    """(n, ...) activations of a random dtype, byte order and shape, sometimes with NaN/Inf."""
    kind = draw(st.sampled_from(["f4"] * 8 + ["f8"] * 4 + ["f2", ">f4", ">f8", "f4-3d"] * 2
                                + ["i4", "c8", "f4-1d", "f4-0feat"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    rows = n if draw(st.integers(0, 19)) else draw(st.integers(0, n + 3))
    if kind == "f4-1d":
        return rng.standard_normal(rows).astype(np.float32)
    if kind == "f4-3d":
        return rng.standard_normal((rows, 2, 3)).astype(np.float32)
    if kind == "f4-0feat":
        return np.zeros((rows, 0), np.float32)
    scale = draw(st.sampled_from([0.0, 1e-30, 1.0, 1e30]))
    X = rng.standard_normal((rows, draw(st.integers(1, 5)))) * scale
    if draw(st.integers(0, 4)) == 0 and X.size:
        X.flat[draw(st.integers(0, X.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    if kind == "c8":
        return X.astype(np.complex64)
    with np.errstate(invalid="ignore", over="ignore"):
        return X.astype(kind)


@st.composite
def labels(draw, n: int):
    kind = draw(st.sampled_from(["int"] * 12 + ["uint8", "bool", "str", ">i8", "onecls"] * 2
                                + ["float", "bigfloat", "2d", "empty", "short", "uint64big"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    k = draw(st.integers(1, 4))
    y = rng.integers(0, k, n)
    return {
        "int": y, "uint8": y.astype(np.uint8), "bool": y.astype(bool), "float": y.astype(float),
        "bigfloat": y * 1e20, "str": np.array(["cat", "dog", "emu", "yak"])[y], ">i8": y.astype(">i8"),
        "2d": y.reshape(-1, 1) if n else y, "empty": y[:0], "short": y[: max(n - 2, 0)],
        "uint64big": np.append(y[:-1].astype(np.uint64), np.uint64(2**64 - 1)), "onecls": np.zeros(n, int),
    }[kind]


@st.composite
def activation_files(draw):
    """(dict of members name -> .npy bytes, zip method, corruption)."""
    n = draw(st.integers(2, 16))
    members: dict[str, np.ndarray] = {}
    if draw(st.integers(0, 19)):
        members["labels"] = draw(labels(n))
    for _ in range(draw(st.integers(1, 3)) if draw(st.integers(0, 19)) else 0):
        name = draw(st.sampled_from(LAYER_NAMES[:5])) if draw(st.integers(0, 9)) else draw(st.sampled_from(LAYER_NAMES))
        members["act/" + name] = draw(arrays(n))
    if draw(st.integers(0, 3)) == 0:
        members["grad/fc1/w"] = draw(arrays(n))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    if draw(st.booleans()):
        members["split"] = np.where(rng.random(n) < 0.6, "train", draw(st.sampled_from(["test"] * 5 + ["val"])))
    if draw(st.booleans()):
        members["permuted"] = rng.random(n) < 0.3
    if draw(st.integers(0, 3)) == 0:
        members["train_labels"] = draw(labels(n))
    if draw(st.integers(0, 3)) == 0:
        meta = draw(st.sampled_from(['{"epoch": 3}'] * 5 + ["[1, 2]", "not json", '{"format_version": 7}',
                                     "[" * 5000 + "]" * 5000, '{"a": ' * 50 + "1" + "}" * 50]))
        members["meta"] = np.array(meta)
    if draw(st.integers(0, 9)) == 0:
        members[draw(st.sampled_from(KEYS_EXTRA))] = np.ones(n)
    method = draw(st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_LZMA]))
    damage = draw(st.sampled_from([None] * 15 + ["truncate", "flip", "duplicate", "empty", "garbage"]))
    where = draw(st.floats(0, 1))
    return members, method, damage, where


def write(path, spec) -> None:
    members, method, damage, where = spec
    if damage == "empty":
        path.write_bytes(b"")
        return
    if damage == "garbage":
        path.write_bytes(b"PK\x03\x04" + bytes(range(256)) * 3)
        return
    with zipfile.ZipFile(path, "w", method) as z:
        for name, arr in members.items():
            buf = io.BytesIO()
            np.save(buf, arr, allow_pickle=False)
            z.writestr(name + ".npy", buf.getvalue())
        if damage == "duplicate" and members:
            import warnings

            name = next(iter(members))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                z.writestr(name + ".npy", b"\x93NUMPY")
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(bytes(data[: int(len(data) * where)]))
    elif damage == "flip" and data:
        data[min(int(len(data) * where), len(data) - 1)] ^= 0x5A
        path.write_bytes(bytes(data))


OPTION_CHOICES = [
    [], [], [], ["--resume"], ["--quiet"], ["--drop-nonfinite"], ["--drop-nonfinite"], ["--seed", "7"],
    ["--layers", "fc1"], ["--layers", "fc1,conv.2"], ["--subsets", "all"], ["--subsets", "test,unpermuted"],
    ["--no-pairwise"], ["--stream-batch-rows", "3"],
    # usage errors
    ["--seed", "-1"], ["--layers", "nope"], ["--layers", ","], ["--subsets", "bogus"], ["--per-class", "-2"],
    ["--bogus"], ["--n-t", "0"],
]


def snapshot(root, skip):
    """{path: (size, mtime_ns, sha256)} of every file under root outside ``skip``."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if os.path.abspath(dirpath).startswith(os.path.abspath(skip)):
            continue
        for f in filenames:
            p = os.path.join(dirpath, f)
            st_ = os.stat(p, follow_symlinks=False)
            if not stat.S_ISREG(st_.st_mode):  # a FIFO would block: compare its metadata only
                out[p] = (st_.st_mode, st_.st_mtime_ns, "")
                continue
            with open(p, "rb") as fh:
                digest = hashlib.sha256(fh.read()).hexdigest()
            out[p] = (st_.st_size, st_.st_mtime_ns, digest)
    return out


@pytest.fixture(scope="module")
def previous(tmp_path_factory):
    """A previous run's OUTDIR (metrics.json, metrics.csv, tasks/) plus a file of the user's."""
    d = tmp_path_factory.mktemp("prev")
    p = d / "prev.npz"
    save_activations(p, np.arange(8) % 2, {"fc1": np.random.default_rng(0).standard_normal((8, 3))})
    assert main(["analyze", str(p), "-o", str(d / "out"), "--no-mftma", "--quiet"]) == 0
    (d / "out" / "notes.txt").write_text("the user's own file")
    return d / "out"


def check_run(tmp_path, previous, input_path, options, capsys):
    """Run analyze on ``input_path`` into a copy of ``previous`` and check every guarantee."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(previous, out)
    before_out = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    before = snapshot(tmp_path, out)
    capsys.readouterr()
    try:
        code = call_main(["analyze", str(input_path), "-o", str(out), "--no-mftma", *options])
    finally:
        clear_file_cache()
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err + cap.out
    assert code in (0, 1, 2), (code, cap.err)
    assert snapshot(tmp_path, out) == before, "a file outside OUTDIR changed"
    assert (out / "notes.txt").read_text() == "the user's own file"
    if code == 2:
        assert (out / "metrics.json").read_bytes() == before_out["metrics.json"], cap.err
        assert cap.err.strip(), "exit 2 without a message"
    else:
        data = json.loads((out / "metrics.json").read_text())
        if code == 1:
            assert data["errors"], cap.err
            for e in data["errors"]:  # documented failures only, never a raw exception
                assert e["error"].startswith(("InputError: ", "AnalysisError: ")), e
        else:
            assert data["errors"] == []
    return code, cap


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(spec=activation_files(), opts=st.lists(st.sampled_from(OPTION_CHOICES), max_size=2),
       force=st.sampled_from([True, True, True, False]))
def test_fuzzed_files_and_options(tmp_path_factory, previous, capsys, spec, opts, force):
    tmp_path = tmp_path_factory.mktemp("fz")
    p = tmp_path / "acts.npz"
    write(p, spec)
    code, _ = check_run(tmp_path, previous, p, [a for o in opts for a in o] + (["--force"] if force else []), capsys)
    event(f"exit {code}")


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_issue_table_cases_keep_every_guarantee(tmp_path, previous, capsys, case):
    p = tmp_path / f"{case}.npz"
    CRAFTED[case](p)
    code, _ = check_run(tmp_path, previous, p, ["--force"], capsys)
    assert code == 2


def test_nonregular_inputs_keep_every_guarantee(tmp_path, previous, capsys):
    fifo = tmp_path / "fifo.npz"
    os.mkfifo(fifo)
    assert check_run(tmp_path, previous, fifo, ["--force"], capsys)[0] == 2
    for special in ("/dev/zero", "/dev/null"):
        if os.path.exists(special):
            assert check_run(tmp_path / special[5:], previous, special, ["--force"], capsys)[0] == 2
