"""``geomprobe analyze FILE...``: metrics of saved activations -> table, metrics.json, metrics.csv."""
from __future__ import annotations

import argparse
import math
import sys

from geomprobe._validation import InputError
from geomprobe.analysis import AnalyzeOptions, analyze

from ._common import Progress, print_notes, summary_table, table_legend
from .cluster import add_cluster_options, runner_from_args

DEFAULT_OUTDIR = "geomprobe-results"
PROG = "geomprobe analyze"


def _names(value: str) -> list[str]:
    """One --layers / --subsets value: NAME or NAME,NAME,... (empty parts refused)."""
    parts = [p.strip() for p in value.split(",")]
    if not value.strip() or any(not p for p in parts):
        raise argparse.ArgumentTypeError(f"expected NAME or NAME,NAME,... without empty names, got {value!r}")
    return parts


def add_parser(sub) -> None:
    p = sub.add_parser(
        "analyze",
        help="analyse activation files (.npz): alignment, MFTMA, gradient statistics, probes",
        description="Analyse one or more activation files (one per epoch, say). Every (file, layer, "
        "subset) is a task; results go to OUTDIR/metrics.json and OUTDIR/metrics.csv (long format: "
        "file, layer, subset, metric, class, value). One run writes an OUTDIR at a time (lock file); "
        "--resume reuses a saved task only if its input file and options are unchanged "
        "(docs/reliability.md).",
        epilog=table_legend() + "\n\nexit codes: 0 done, 1 a task's analysis failed (listed), 2 usage error or "
        "bad input (nothing computed), 130 interrupted (finished tasks are kept: rerun with --resume).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="activation files (.npz, see docs/format.md)")
    p.add_argument("-o", "--outdir", default=DEFAULT_OUTDIR, help=f"output directory (default: {DEFAULT_OUTDIR})")
    p.add_argument("--layers", type=_names, action="extend", metavar="LAYER[,LAYER...]",
                   help="only these layers (or gradient tensors layer/tensor), comma-separated; repeat the "
                   "option to add more (default: all). Takes one value, so files may follow it")
    p.add_argument("--subsets", type=_names, action="extend", metavar="SUBSET[,SUBSET...]",
                   help="only these subsets, comma-separated: unpermuted, permuted, restored, test, all")
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw (default 0)")
    p.add_argument("--force", action="store_true", help="overwrite results in an existing OUTDIR")
    p.add_argument("--resume", action="store_true",
                   help="reuse the saved results in OUTDIR/tasks of tasks whose input file and options are "
                   "unchanged; says how many were reused and why the others were not")
    p.add_argument("--quiet", action="store_true", help="no progress, no table, no notes (errors still shown)")
    g = p.add_argument_group("MFTMA")
    g.add_argument("--no-mftma", action="store_true", help="skip MFTMA (capacity, radius, dimension)")
    g.add_argument("--n-t", type=int, default=200, help="Gaussian samples per manifold (>= 1, default 200)")
    g.add_argument("--kappa", type=float, default=0.0, help="margin (>= 0, default 0)")
    g.add_argument("--n-reps", type=int, default=10, help="restarts of the center-model fit (>= 1, default 10)")
    g.add_argument("--per-class", type=int, default=50, metavar="M",
                   help="seeded subsample of M examples per class (M >= 0; default 50, the paper's; 0 = all)")
    g.add_argument("--max-classes", type=int, default=None, metavar="P",
                   help="seeded choice of P >= 2 classes (default: all)")
    g.add_argument("--empirical-capacity", action="store_true", help="also the simulated capacity")
    g.add_argument("--seed-mode", choices=("spawn", "reference"), default="spawn",
                   help="spawn (default): independent per-manifold streams, invariant to example order; "
                   "reference: consume a RandomState as the original MFTMA code does (docs/metrics.md)")
    g3 = p.add_argument_group("more measures (docs/glue.md, docs/companion.md)")
    g3.add_argument("--glue", action="store_true",
                    help="GLUE / GCMC capacity of a dichotomy ensemble with effective radius, dimension, utility "
                    "and alignments (uses --n-t, --kappa, --per-class, --max-classes)")
    g3.add_argument("--dichotomies", choices=("random", "one_vs_rest"), default="random",
                    help="GLUE dichotomy ensemble (default random)")
    g3.add_argument("--companion", action="store_true",
                    help="participation ratio, effective rank, neural collapse NC1-NC2, linear probes")
    g3.add_argument("--compare", action="store_true",
                    help="linear CKA and Procrustes angle between every pair of layers of every file -> "
                    "OUTDIR/similarity.csv (the files must hold the same examples)")
    g2 = p.add_argument_group("alignment and gradients")
    g2.add_argument("--no-pairwise", action="store_true",
                    help="skip the all-pairs gradient measures (sign stiffness, confusion)")
    g2.add_argument("--drop-nonfinite", action="store_true",
                    help="exclude rows holding NaN/Inf (reported) instead of refusing the file")
    add_cluster_options(p)
    p.set_defaults(run=run)


def _check_int(value: int, flag: str, minimum: int, note: str = "") -> None:
    if value < minimum:
        raise InputError(f"{flag} must be an integer >= {minimum}{note}, got {value}")


def options_from_args(args) -> AnalyzeOptions:
    """AnalyzeOptions from the parsed arguments; option errors name the flag as the user typed it."""
    _check_int(args.seed, "--seed", 0)
    _check_int(args.n_t, "--n-t", 1)
    _check_int(args.n_reps, "--n-reps", 1)
    _check_int(args.per_class, "--per-class", 0, " (0 = all examples)")
    if args.max_classes is not None:
        _check_int(args.max_classes, "--max-classes", 2)
    if not math.isfinite(args.kappa) or args.kappa < 0:
        raise InputError(f"--kappa must be a finite number >= 0, got {args.kappa}")
    return AnalyzeOptions(
        layers=tuple(dict.fromkeys(args.layers)) if args.layers else None,
        subsets=tuple(dict.fromkeys(args.subsets)) if args.subsets else None,
        seed=args.seed,
        mftma=not args.no_mftma,
        kappa=args.kappa,
        n_t=args.n_t,
        n_reps=args.n_reps,
        per_class=None if args.per_class == 0 else args.per_class,
        max_classes=args.max_classes,
        empirical_capacity=args.empirical_capacity,
        seed_mode=args.seed_mode,
        pairwise=not args.no_pairwise,
        drop_nonfinite=args.drop_nonfinite,
        glue=args.glue,
        glue_dichotomies=args.dichotomies,
        companion=args.companion,
        compare=args.compare,
    )


def resume_summary(report, outdir) -> str:
    """'--resume: 3 of 10 task(s) reused from OUTDIR/tasks; 7 recomputed: 5 options changed (...), ...'."""
    text = f"--resume: {report.n_resumed} of {report.n_tasks} task(s) reused from {outdir}/tasks"
    if report.resume_reasons:
        n = sum(report.resume_reasons.values())
        text += f"; {n} recomputed: " + "; ".join(f"{c} {why}" for why, c in report.resume_reasons.items())
    return text


def run(args) -> int:
    options = options_from_args(args)
    runner = runner_from_args(args)  # None (the serial runner) when no cluster/stream option is given
    with Progress(PROG, quiet=args.quiet) as prog:
        report = analyze(args.files, options, outdir=args.outdir, force=args.force, resume=args.resume,
                         runner=runner, progress=lambda r: prog.done(r.task.where),
                         on_plan=lambda n, reused: prog.start(n - reused, reused))
    if not args.quiet:
        print(summary_table(report.rows))
        if args.resume:
            print(resume_summary(report, args.outdir))
        print(f"wrote {args.outdir}/metrics.json and {args.outdir}/metrics.csv ({len(report.rows)} rows)")
        if args.compare:
            print(f"wrote {args.outdir}/similarity.csv ({len(report.similarity)} rows)")
    print_notes(report.notes, PROG, quiet=args.quiet)
    for key, err in report.errors:
        print(f"{PROG}: task {key} failed: {err}", file=sys.stderr)
    return 1 if report.errors else 0
