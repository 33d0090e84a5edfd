"""``geomprobe analyze FILE...``: metrics of saved activations -> table, metrics.json, metrics.csv."""
from __future__ import annotations

import sys

from geomprobe.analysis import AnalyzeOptions, analyze, plan_tasks

from ._common import progress_bar, summary_table

DEFAULT_OUTDIR = "geomprobe-results"


def add_parser(sub) -> None:
    p = sub.add_parser(
        "analyze",
        help="analyse activation files (.npz): alignment, MFTMA, gradient statistics, probes",
        description="Analyse one or more activation files (one per epoch, say). Every (file, layer, "
        "subset) is a task; results go to OUTDIR/metrics.json and OUTDIR/metrics.csv (long format: "
        "file, layer, subset, metric, class, value).",
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="activation files (.npz, see docs/format.md)")
    p.add_argument("-o", "--outdir", default=DEFAULT_OUTDIR, help=f"output directory (default: {DEFAULT_OUTDIR})")
    p.add_argument("--layers", nargs="+", metavar="LAYER", help="only these layers (default: all)")
    p.add_argument("--subsets", nargs="+", metavar="SUBSET",
                   help="only these subsets: unpermuted, permuted, restored, test, all")
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw (default 0)")
    p.add_argument("--force", action="store_true", help="overwrite results in an existing OUTDIR")
    p.add_argument("--resume", action="store_true", help="reuse finished tasks found in OUTDIR/tasks")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no table")
    g = p.add_argument_group("MFTMA")
    g.add_argument("--no-mftma", action="store_true", help="skip MFTMA (capacity, radius, dimension)")
    g.add_argument("--n-t", type=int, default=200, help="Gaussian samples per manifold (default 200)")
    g.add_argument("--kappa", type=float, default=0.0, help="margin (default 0)")
    g.add_argument("--n-reps", type=int, default=10, help="restarts of the center-model fit (default 10)")
    g.add_argument("--per-class", type=int, default=50, metavar="M",
                   help="seeded subsample of M examples per class (default 50, the paper's); 0 = all")
    g.add_argument("--max-classes", type=int, default=None, metavar="P",
                   help="seeded choice of P classes (default: all)")
    g.add_argument("--empirical-capacity", action="store_true", help="also the simulated capacity")
    g.add_argument("--seed-mode", choices=("spawn", "reference"), default="spawn",
                   help="spawn (default): independent per-manifold streams, invariant to example order; "
                   "reference: consume a RandomState as the original MFTMA code does (docs/metrics.md)")
    g2 = p.add_argument_group("alignment and gradients")
    g2.add_argument("--no-pairwise", action="store_true",
                    help="skip the all-pairs gradient measures (sign stiffness, confusion)")
    g2.add_argument("--drop-nonfinite", action="store_true",
                    help="exclude rows holding NaN/Inf (reported) instead of refusing the file")
    _add_distributed_options(p)
    p.set_defaults(run=run)


def _add_distributed_options(p) -> None:
    try:
        from geomprobe.distributed import add_cli_options
    except ModuleNotFoundError:
        return
    add_cli_options(p)


def options_from_args(args) -> AnalyzeOptions:
    return AnalyzeOptions(
        layers=tuple(args.layers) if args.layers else None,
        subsets=tuple(args.subsets) if args.subsets else None,
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
    )


def run(args) -> int:
    options = options_from_args(args)
    runner = None
    if hasattr(args, "scheduler"):  # runner_from_args returns None when no cluster/stream option is given
        from geomprobe.distributed import runner_from_args

        runner = runner_from_args(args)
    n_tasks = len(plan_tasks(args.files, options, scan_values=False))
    with progress_bar(n_tasks, "analyze", args.quiet) as bar:
        def progress(r):
            bar.set_postfix_str(f"{r.task.layer} [{r.task.subset}]", refresh=False)
            bar.update(1)

        report = analyze(args.files, options, outdir=args.outdir, force=args.force, resume=args.resume,
                         runner=runner, progress=progress)
    if not args.quiet:
        print(summary_table(report.rows))
        if report.n_resumed:
            print(f"({report.n_resumed} of {report.n_tasks} task(s) reused from {args.outdir}/tasks)")
        print(f"wrote {args.outdir}/metrics.json and {args.outdir}/metrics.csv ({len(report.rows)} rows)")
    for note in report.notes:
        print(f"note: {note}", file=sys.stderr)
    for key, err in report.errors:
        print(f"geomprobe analyze: task {key} failed: {err}", file=sys.stderr)
    return 1 if report.errors else 0
