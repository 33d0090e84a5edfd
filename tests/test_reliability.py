"""Regression tests for the hostile-input findings of issue 14 (analysis side) and the analyze-pipeline
items of issue 16, each through the real entry point (geomprobe.cli.main.main): exit code, one-line
message without a traceback, nothing lost, nothing stale (docs/reliability.md)."""
from __future__ import annotations

import io
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
import warnings
import zipfile

import numpy as np
import pytest

from geomprobe import InputError
from geomprobe.analysis import clear_file_cache
from geomprobe.cli.main import main
from geomprobe.io import LOCK_NAME, lock_directory, save_activations
from geomprobe.synthetic import synthetic_activations

FAST = ["--n-t", "20", "--n-reps", "1", "--per-class", "6"]


def call_main(argv) -> int:
    """geomprobe.cli.main.main as the console script runs it: argparse's usage errors (and --help)
    end in SystemExit, whose code is the exit status."""
    try:
        return main([str(a) for a in argv])
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)


def run(argv, capsys):
    code = call_main(argv)
    out = capsys.readouterr()
    assert "Traceback" not in out.err and "Traceback" not in out.out
    return code, out.out, out.err


def npy(arr=None, *, header=None, data=b""):
    """The bytes of a .npy member: a real array, or a crafted header followed by ``data``."""
    fh = io.BytesIO()
    if header is None:
        np.save(fh, arr, allow_pickle=False)
    else:
        np.lib.format.write_array_header_1_0(fh, header)
        fh.write(data)
    return fh.getvalue()


def write_zip(path, members, method=zipfile.ZIP_STORED):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate names warn
        with zipfile.ZipFile(path, "w", method) as z:
            for name, data in members:
                z.writestr(name, data)
    return path


def good_members(n=12, d=4, seed=0):
    rng = np.random.default_rng(seed)
    return [("labels.npy", npy(np.arange(n) % 3)), ("act/l.npy", npy(rng.standard_normal((n, d))))]


@pytest.fixture
def good(tmp_path):
    p = tmp_path / "good.npz"
    save_activations(p, **synthetic_activations(0, n_classes=3, per_class=6, n_test_per_class=3, n_layers=2, dim=6))
    return p


@pytest.fixture(autouse=True)
def _fresh_cache():
    yield
    clear_file_cache()


def rows_of(out):
    return json.loads((out / "metrics.json").read_text())["rows"]


def agg(rows, metric):
    return {(r["file"], r["layer"], r["subset"]): r["value"] for r in rows if r["metric"] == metric and r["class"] == ""}


# -- resume is keyed by what determines the result ------------------------------------------------
def test_resume_recomputes_when_seed_options_or_file_change(good, tmp_path, capsys):
    out, fresh = tmp_path / "r1", tmp_path / "fresh"
    base = ["analyze", good, "--layers", "layer1", "--subsets", "unpermuted", *FAST]
    assert run([*base, "-o", out, "--seed", "0"], capsys)[0] == 0
    code, stdout, _ = run([*base, "-o", out, "--resume", "--seed", "1"], capsys)
    assert code == 0 and "0 of 1 task(s) reused" in stdout and "options changed (seed 0 -> 1)" in stdout
    assert run([*base, "-o", fresh, "--seed", "1"], capsys)[0] == 0
    assert agg(rows_of(out), "capacity") == agg(rows_of(fresh), "capacity")  # the seed-1 numbers
    code, stdout, _ = run([*base, "-o", out, "--resume", "--seed", "1"], capsys)
    assert "1 of 1 task(s) reused" in stdout
    # --no-mftma: the task is recomputed and no capacity row survives
    code, stdout, _ = run([*base, "-o", out, "--resume", "--seed", "1", "--no-mftma"], capsys)
    assert code == 0 and "options changed (mftma True -> False)" in stdout
    assert not agg(rows_of(out), "capacity")
    assert json.loads((out / "metrics.json").read_text())["options"]["mftma"] is False
    # the file replaced by one with other contents: recomputed
    save_activations(good, **synthetic_activations(5, n_classes=3, per_class=6, n_test_per_class=3, n_layers=2,
                                                   dim=6), force=True)
    code, stdout, _ = run([*base, "-o", out, "--resume", "--seed", "1", "--no-mftma"], capsys)
    assert code == 0 and "input file contents changed" in stdout and "0 of 1" in stdout


def test_resume_reuses_tasks_whose_own_options_did_not_change(tmp_path, capsys, rng):
    p = tmp_path / "g.npz"
    save_activations(p, np.arange(12) % 3, {"h": rng.standard_normal((12, 4))},
                     grads={"fc": {"w": rng.standard_normal((12, 3))}})
    out = tmp_path / "o"
    assert run(["analyze", p, "-o", out, "--no-mftma"], capsys)[0] == 0
    code, stdout, _ = run(["analyze", p, "-o", out, "--no-mftma", "--resume", "--seed", "4"], capsys)
    assert code == 0 and "2 of 2 task(s) reused" in stdout  # without MFTMA nothing depends on the seed
    code, stdout, _ = run(["analyze", p, "-o", out, "--no-mftma", "--resume", "--no-pairwise"], capsys)
    assert code == 0 and "1 of 2 task(s) reused" in stdout and "options changed (pairwise True -> False)" in stdout
    assert not [r for r in rows_of(out) if r["metric"] == "grad_sign_stiffness"]


# -- one writer per OUTDIR -------------------------------------------------------------------------
def test_second_run_into_a_locked_outdir_fails_fast(good, tmp_path, capsys):
    out = tmp_path / "conc"
    out.mkdir()
    with lock_directory(out):
        t0 = time.monotonic()
        code, _, err = run(["analyze", good, "-o", out, "--no-mftma"], capsys)
        assert code == 2 and "is in use by another geomprobe run" in err and f"pid {os.getpid()}" in err
        assert time.monotonic() - t0 < 30
    assert sorted(os.listdir(out)) == []  # the lock file went with its holder; nothing else written
    assert run(["analyze", good, "-o", out, "--no-mftma"], capsys)[0] == 0


def test_lock_of_a_killed_process_is_stale_and_taken_over(good, tmp_path, capsys):
    out = tmp_path / "stale"
    out.mkdir()
    code = ("import sys, time; from geomprobe.io import lock_directory\n"
            f"with lock_directory({str(out)!r}):\n    print('locked', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        assert run(["analyze", good, "-o", out, "--no-mftma"], capsys)[0] == 2
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert (out / LOCK_NAME).exists()  # left behind by the killed holder
    code, _, err = run(["analyze", good, "-o", out, "--no-mftma"], capsys)
    assert code == 0, err
    assert not (out / LOCK_NAME).exists()


# -- degenerate layers -----------------------------------------------------------------------------
def test_constant_and_all_zero_layers_keep_their_rows_with_a_note(tmp_path, capsys):
    p = tmp_path / "zeros_act.npz"
    np.savez(p, labels=np.repeat(np.arange(3), 5), **{"act/z": np.zeros((15, 4)), "act/c": np.full((15, 4), 2.0)})
    out = tmp_path / "o"
    code, _, err = run(["analyze", p, "-o", out, *FAST], capsys)
    assert code == 0, err
    data = json.loads((out / "metrics.json").read_text())
    assert data["errors"] == []
    assert {r["layer"] for r in data["rows"] if r["metric"] == "rep_omega"} == {"z", "c"}
    codes = {n["code"]: n["count"] for n in data["note_summary"]}
    assert codes.get("degenerate_layer") == 2
    assert "MFTMA is undefined" in err and "(x2:" in err  # one line for both layers


def test_equal_class_centers_are_a_note_not_a_failed_task(tmp_path, capsys, rng):
    # every class has the same center but the points vary: MFTMA's center model is undefined
    base = rng.standard_normal((5, 4))
    X = np.concatenate([base, base, base])
    p = tmp_path / "same.npz"
    np.savez(p, labels=np.repeat(np.arange(3), 5), **{"act/l": X})
    code, _, err = run(["analyze", p, "-o", tmp_path / "o", *FAST, "--per-class", "0"], capsys)
    assert code == 0, err
    assert "MFTMA undefined for this layer: every class has the same center" in err
    assert agg(rows_of(tmp_path / "o"), "rep_omega")


# -- crafted files: a message and exit 2, before any work ------------------------------------------
CRAFTED = {
    "header-claims-1e12-labels": lambda p: write_zip(p, [
        ("labels.npy", npy(header={"descr": "<i8", "fortran_order": False, "shape": (10**12,)}, data=b"\0" * 64)),
        ("act/l.npy", npy(np.ones((8, 2))))]),
    "huge-feature-header": lambda p: write_zip(p, [
        ("labels.npy", npy(np.arange(4))),
        ("act/l.npy", npy(header={"descr": "<f4", "fortran_order": False, "shape": (4, 10**13)}, data=b"\0" * 64))]),
    "lzma-member": lambda p: write_zip(p, good_members(), method=zipfile.ZIP_LZMA),
    "bzip2-member": lambda p: write_zip(p, good_members(), method=zipfile.ZIP_BZIP2),
    "deep-meta": lambda p: write_zip(p, good_members() + [("meta.npy", npy(np.array("[" * 100000 + "]" * 100000)))]),
    "duplicate-members": lambda p: write_zip(p, good_members() + [("act/l.npy", npy(np.zeros((12, 4))))]),
    "layer-dotdot": lambda p: write_zip(p, good_members() + [("act/../../x.npy", npy(np.ones((12, 2))))]),
    "layer-slash": lambda p: write_zip(p, good_members() + [("act/a/b.npy", npy(np.ones((12, 2))))]),
    "layer-empty": lambda p: write_zip(p, good_members() + [("act/.npy", npy(np.ones((12, 2))))]),
    "layer-dot": lambda p: write_zip(p, good_members() + [("act/..npy", npy(np.ones((12, 2))))]),
    "uint64-labels-overflow": lambda p: write_zip(p, [
        ("labels.npy", npy(np.array([0, 2**64 - 1] * 6, dtype=np.uint64))), ("act/l.npy", npy(np.ones((12, 2))))]),
    "complex-layer": lambda p: write_zip(p, [("labels.npy", npy(np.arange(4))),
                                             ("act/l.npy", npy(np.ones((4, 2), complex)))]),
}
CRAFTED_MESSAGES = {
    "header-claims-1e12-labels": r"declares shape \(1000000000000,\).*holds only 64 data bytes",
    "huge-feature-header": r"declares shape \(4, 10000000000000\)",
    "lzma-member": r"compression method 14.*stored or deflated",
    "bzip2-member": r"compression method 12",
    "deep-meta": r"'meta' is nested 100000 levels deep; the limit is 64",
    "duplicate-members": r"member 'act/l.npy' appears more than once",
    "layer-dotdot": r"key 'act/\.\./\.\./x': layer name must be",
    "layer-slash": r"key 'act/a/b': layer name must be non-empty, without '/'",
    "layer-empty": r"key 'act/': layer name must be non-empty",
    "layer-dot": r"key 'act/\.': layer name",
    "uint64-labels-overflow": r"'labels' must fit in int64, got 18446744073709551615",
    "complex-layer": r"'act/l' must be float16, float32 or float64 \(either byte order\), got complex128",
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_file_is_a_message_and_exit_2(tmp_path, capsys, case):
    p = tmp_path / f"{case}.npz"
    CRAFTED[case](p)
    code, _, err = run(["analyze", p, "-o", tmp_path / "o", "--no-mftma"], capsys)
    assert code == 2
    assert re.search(CRAFTED_MESSAGES[case], err), err
    assert str(p) in err
    assert not (tmp_path / "o").exists()


def test_zip_bomb_is_refused_from_the_member_sizes(tmp_path, capsys, monkeypatch):
    import geomprobe.io as gio

    monkeypatch.setattr(gio, "RATIO_CHECK_BYTES", 2**20)  # the same rule at 1 MiB instead of 256 MiB
    p = tmp_path / "bomb.npz"
    np.savez_compressed(p, labels=np.arange(4), **{"act/l": np.zeros((4, 2**19))})  # 16 MiB of zeros
    assert p.stat().st_size < 100_000
    code, _, err = run(["analyze", p, "-o", tmp_path / "o", "--no-mftma"], capsys)
    assert code == 2 and "ratio" in err and "save such arrays uncompressed" in err


def test_not_regular_files_are_refused_without_reading(tmp_path, capsys):
    fifo = tmp_path / "fifo.npz"
    os.mkfifo(fifo)  # no writer: opening it would block forever
    code, _, err = run(["analyze", fifo, "-o", tmp_path / "o"], capsys)
    assert code == 2 and "is a FIFO" in err
    if os.path.exists("/dev/zero"):
        code, _, err = run(["analyze", "/dev/zero", "-o", tmp_path / "o"], capsys)
        assert code == 2 and "is a character device" in err


def test_big_endian_arrays_are_accepted_and_give_the_native_numbers(tmp_path, capsys, rng):
    X = rng.standard_normal((18, 5)).astype(np.float32)
    y = np.repeat(np.arange(3), 6)
    np.savez(tmp_path / "le.npz", labels=y, **{"act/l": X})
    np.savez(tmp_path / "be.npz", labels=y.astype(">i8"), **{"act/l": X.astype(">f4")})
    for name in ("le", "be"):
        assert run(["analyze", tmp_path / f"{name}.npz", "-o", tmp_path / f"o_{name}", "--no-mftma"], capsys)[0] == 0
    strip = [{k: v for k, v in r.items() if k != "file"} for r in rows_of(tmp_path / "o_le")]
    assert strip == [{k: v for k, v in r.items() if k != "file"} for r in rows_of(tmp_path / "o_be")]


def test_float_labels_beyond_2_53_are_refused_by_the_library(rng):
    from geomprobe import alignment

    with pytest.raises(InputError, match=r"labels given as floats must lie within \+-2\*\*53.*1e\+20 at index 0"):
        alignment(rng.standard_normal((3, 2)), np.array([1e20, 1e20 + 1e5, 0.0]))


def test_string_labels_are_encoded_and_the_mapping_kept(tmp_path, capsys, rng):
    names = np.array(["dog", "cat", "emu"] * 4)
    p = tmp_path / "s.npz"
    np.savez(p, labels=names, **{"act/l": rng.standard_normal((12, 3))})
    code, _, err = run(["analyze", p, "-o", tmp_path / "o", "--no-mftma"], capsys)
    assert code == 0, err
    data = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert data["label_names"] == {str(p): ["cat", "dog", "emu"]}
    assert {r["class"] for r in data["rows"] if r["metric"] == "rep_omega" and r["class"]} == {"0", "1", "2"}


# -- the output directory --------------------------------------------------------------------------
def test_output_directory_problems_are_messages_before_any_work(good, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    code, _, err = run(["analyze", good, "-o", afile / "sub", "--no-mftma"], capsys)
    assert code == 2 and f"{afile} is a file, not a directory" in err
    if os.path.isdir("/proc/self"):
        code, _, err = run(["analyze", good, "-o", "/proc/x", "--no-mftma"], capsys)
        assert code == 2 and "cannot write in /proc" in err
    out = tmp_path / "o"
    (out / "metrics.json").mkdir(parents=True)
    code, _, err = run(["analyze", good, "-o", out, "--no-mftma", "--force"], capsys)
    assert code == 2 and "metrics.json must be a regular file" in err
    assert sorted(os.listdir(out)) == ["metrics.json"]
    assert afile.read_text() == "mine"


@pytest.mark.skipif(not hasattr(os, "setrlimit") and sys.platform != "linux", reason="needs RLIMIT_FSIZE")
def test_file_size_limit_is_a_message_and_the_old_results_stay(good, tmp_path, capsys):
    import resource

    out = tmp_path / "o"
    assert run(["analyze", good, "-o", out, "--no-mftma"], capsys)[0] == 0
    before = (out / "metrics.json").read_bytes()

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    r = subprocess.run([sys.executable, "-m", "geomprobe.cli.main", "analyze", str(good), "-o", str(out),
                        "--no-mftma", "--force"], capture_output=True, text=True, preexec_fn=limit, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "could not be written (File too large)" in r.stderr and "previous version is left intact" in r.stderr
    assert (out / "metrics.json").read_bytes() == before


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_results_honour_the_umask(good, tmp_path, capsys, umask, mode):
    old = os.umask(umask)
    try:
        assert run(["analyze", good, "-o", tmp_path / "o", "--no-mftma"], capsys)[0] == 0
    finally:
        os.umask(old)
    for name in ("metrics.json", "metrics.csv"):
        assert stat.S_IMODE((tmp_path / "o" / name).stat().st_mode) == mode
    assert all(stat.S_IMODE(p.stat().st_mode) == mode for p in (tmp_path / "o" / "tasks").iterdir())


# -- issue 16: the printed table, progress, notes, options -----------------------------------------
def test_table_keeps_files_that_share_a_basename(tmp_path, capsys):
    files = []
    for i, d in enumerate(["e2", "e2tty"]):
        (tmp_path / "runs" / d).mkdir(parents=True)
        p = tmp_path / "runs" / d / "acts_final.npz"
        save_activations(p, **synthetic_activations(i, n_classes=3, per_class=4, n_test_per_class=2, n_layers=2, dim=4))
        files.append(p)
    code, stdout, _ = run(["analyze", *files, "-o", tmp_path / "o", "--no-mftma"], capsys)
    assert code == 0
    lines = [ln for ln in stdout.splitlines() if "acts_final.npz" in ln]
    assert len(lines) == 16  # 2 files x 2 layers x 4 subsets
    assert sum(ln.startswith("e2/acts_final.npz") for ln in lines) == 8
    assert sum(ln.startswith("e2tty/acts_final.npz") for ln in lines) == 8


def test_progress_lines_off_a_terminal_and_notes_once_with_a_count(tmp_path, capsys, rng):
    p = tmp_path / "n.npz"
    y = np.array([0, 0, 0, 1] * 3)  # nothing wrong but class sizes; one note per layer about nothing
    X = rng.standard_normal((12, 3))
    X[1, 1] = np.nan
    np.savez(p, labels=y, **{f"act/l{i}": X for i in range(3)})
    code, _, err = run(["analyze", p, "-o", tmp_path / "o", "--no-mftma", "--drop-nonfinite"], capsys)
    assert code == 0
    assert "geomprobe analyze: 3 task(s) to run" in err
    assert re.search(r"3/3 task\(s\) done \(100%\), elapsed \d+s", err)
    notes = [ln for ln in err.splitlines() if "dropped 1 row(s) holding NaN or Inf" in ln]
    assert len(notes) == 1 and "(x3: l0 [all], l1 [all], l2 [all])" in notes[0]
    code, _, err = run(["analyze", p, "-o", tmp_path / "q", "--no-mftma", "--drop-nonfinite", "--quiet"], capsys)
    assert code == 0 and err == ""


def test_progress_heartbeat_when_no_task_finishes():
    from geomprobe.cli._common import Progress

    buf = io.StringIO()
    with Progress("x", stream=buf, tty=False, heartbeat_s=0.2) as prog:
        prog.start(2)
        time.sleep(1.5)
        prog.done("a [all]")
    lines = buf.getvalue().splitlines()
    assert lines[0] == "x: 2 task(s) to run"
    assert any(re.fullmatch(r"x: 0/2 task\(s\) done \(0%\), elapsed \ds; running", ln) for ln in lines)


def test_layers_option_does_not_swallow_files(tmp_path, capsys, rng):
    p = tmp_path / "acts.npz"
    save_activations(p, np.arange(12) % 3, {"fc1": rng.standard_normal((12, 3)), "fc2": rng.standard_normal((12, 3))})
    code, stdout, err = run(["analyze", "--layers", "fc1", p, "-o", tmp_path / "a", "--no-mftma"], capsys)
    assert code == 0, err
    assert {r["layer"] for r in rows_of(tmp_path / "a")} == {"fc1"}
    code, _, _ = run(["analyze", p, "--layers", "fc1,fc2", "-o", tmp_path / "b", "--no-mftma"], capsys)
    assert code == 0 and {r["layer"] for r in rows_of(tmp_path / "b")} == {"fc1", "fc2"}
    code, _, _ = run(["analyze", p, "--layers", "fc2", "--layers", "fc1", "-o", tmp_path / "c", "--no-mftma"], capsys)
    assert code == 0 and {r["layer"] for r in rows_of(tmp_path / "c")} == {"fc1", "fc2"}
    code, _, err = run(["analyze", p, "--layers", "fc1,", "-o", tmp_path / "d"], capsys)
    assert code == 2 and "without empty names" in err


def test_unknown_options_and_commands_get_the_right_usage_and_a_suggestion(good, tmp_path, capsys):
    code, _, err = run(["analyze", good, "--bogus"], capsys)
    assert code == 2 and err.startswith("usage: geomprobe analyze") and "unrecognized arguments: --bogus" in err
    code, _, err = run(["analyze", good, "--no-mftmaa"], capsys)
    assert code == 2 and "did you mean --no-mftma" in err
    code, _, err = run(["analyse", good], capsys)
    assert code == 2 and "unknown command 'analyse'" in err and "did you mean analyze?" in err


@pytest.mark.parametrize("flag, value, message", [
    ("--per-class", "-1", "--per-class must be an integer >= 0 (0 = all examples), got -1"),
    ("--n-t", "0", "--n-t must be an integer >= 1, got 0"),
    ("--n-reps", "0", "--n-reps must be an integer >= 1, got 0"),
    ("--max-classes", "1", "--max-classes must be an integer >= 2, got 1"),
    ("--seed", "-3", "--seed must be an integer >= 0, got -3"),
    ("--kappa", "nan", "--kappa must be a finite number >= 0, got nan"),
])
def test_option_errors_name_the_flag_as_its_help_does(good, tmp_path, capsys, flag, value, message):
    code, _, err = run(["analyze", good, "-o", tmp_path / "o", flag, value], capsys)
    assert code == 2 and message in err


def test_help_explains_the_table_abbreviations(capsys):
    assert call_main(["analyze", "--help"]) == 0
    out = capsys.readouterr().out
    for abbrev, metric in [("g_divers", "grad_diversity"), ("g_mincos", "grad_confusion_min_cosine"),
                           ("rho_c", "center_correlation"), ("omega_in", "rep_omega_in_class")]:
        assert re.search(rf"{abbrev}\s+= {metric}: \S", out), abbrev
    assert "0 = all" in out  # --per-class help agrees with its error message


def test_docs_explain_every_table_abbreviation():
    from pathlib import Path

    from geomprobe.cli._common import TABLE_METRICS

    text = (Path(__file__).resolve().parents[1] / "docs" / "format.md").read_text()
    for metric, head in TABLE_METRICS:
        assert f"| `{head}` | `{metric}` |" in text, head
