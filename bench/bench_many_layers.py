"""Time of ``geomprobe analyze --no-mftma`` against the number of layers in one file (issue 14).

Before the fix every task reopened and revalidated the whole file (O(layers) per task, O(layers^2) per
run); now each file is opened and validated once per process (geomprobe.analysis.shared_file).

    python bench/bench_many_layers.py                      # this checkout: 100, 200, 400, 2000 layers
    python bench/bench_many_layers.py --old /path/to/old   # also an older checkout, side by side

Each run is a fresh ``python -c`` process calling geomprobe.analysis.analyze (what the CLI calls) on a
file of L layers x 200 examples x 8 features, one subset, into a new output directory; the time
includes writing the per-task results. Prints seconds and the per-layer cost.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

CODE = """
import sys, time
sys.path.insert(0, {root!r})
from geomprobe.analysis import AnalyzeOptions, analyze
t0 = time.perf_counter()
r = analyze([{path!r}], AnalyzeOptions(mftma=False), outdir={out!r})
assert not r.errors, r.errors[:1]
print(time.perf_counter() - t0)
"""


def make(path: str, n_layers: int) -> None:
    rng = np.random.default_rng(0)
    arrays = {"labels": np.arange(200) % 10}
    for i in range(n_layers):
        arrays[f"act/l{i:04d}"] = rng.standard_normal((200, 8)).astype(np.float32)
    np.savez(path, **arrays)


def timed(root: str, path: str, out: str, timeout: float) -> float | None:
    try:
        r = subprocess.run([sys.executable, "-c", CODE.format(root=root, path=path, out=out)],
                           capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    if r.returncode:
        raise SystemExit(r.stderr[-2000:])
    return float(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[100, 200, 400, 2000])
    ap.add_argument("--old", help="root of an older checkout to compare against")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per run (longer runs print '>')")
    args = ap.parse_args()
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    roots = [("this", here)] + ([("old", args.old)] if args.old else [])
    print("layers  " + "  ".join(f"{name:>9} s  {name:>6} ms/layer" for name, _ in roots)
          + ("  old/this" if args.old else ""))
    with tempfile.TemporaryDirectory() as d:
        for L in args.layers:
            path = os.path.join(d, f"l{L}.npz")
            make(path, L)
            times = []
            for name, root in roots:
                t = timed(root, path, os.path.join(d, f"out-{name}-{L}-{time.time_ns()}"), args.timeout)
                times.append(t)
            cells = "  ".join((f"{t:11.2f}  {1000 * t / L:15.1f}" if t is not None
                               else f"{'>' + str(int(args.timeout)):>11}  {'':>15}") for t in times)
            ratio = (f"  {times[1] / times[0]:8.1f}" if args.old and None not in times else "")
            print(f"{L:6d}  {cells}{ratio}", flush=True)


if __name__ == "__main__":
    main()
