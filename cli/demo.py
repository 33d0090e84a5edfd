"""``geomprobe demo``: build a seeded synthetic activations file and analyse it (no torch needed)."""
from __future__ import annotations

import os
import sys

from geomprobe._validation import InputError
from geomprobe.analysis import AnalyzeOptions, analyze
from geomprobe.io import save_activations
from geomprobe.synthetic import synthetic_activations

from ._common import summary_table


def add_parser(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="run the embedded default: synthetic layered manifolds with label noise, analysed",
        description="Build a synthetic activations file (10 classes whose manifolds separate more in "
        "deeper layers, half of the training labels permuted) with a seeded generator and analyse it.",
    )
    p.add_argument("--out", default="geomprobe-demo", help="output directory (default: geomprobe-demo)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output directory")
    p.add_argument("--no-mftma", action="store_true", help="alignment only")
    p.set_defaults(run=run)


def run(args) -> int:
    out = args.out
    if os.path.exists(out) and os.listdir(out) and not args.force:
        raise InputError(f"output directory {out} already exists and is not empty; pass --force to overwrite")
    os.makedirs(out, exist_ok=True)
    acts = os.path.join(out, "activations.npz")
    save_activations(acts, **synthetic_activations(args.seed), force=True)
    options = AnalyzeOptions(seed=args.seed, mftma=not args.no_mftma, n_reps=3)
    report = analyze([acts], options, outdir=os.path.join(out, "analysis"), force=True)
    print(f"geomprobe demo: synthetic activations (seed {args.seed}) in {acts}")
    print(summary_table(report.rows))
    print(f"wrote {out}/analysis/metrics.json and metrics.csv")
    for key, err in report.errors:
        print(f"geomprobe demo: task {key} failed: {err}", file=sys.stderr)
    return 1 if report.errors else 0
