"""``geomprobe plot OUTDIR``: figures and a one-page report of any ``geomprobe analyze`` output.

Thin: parse, call geomprobe.plots.plot_analysis, print the paths. matplotlib is imported only when the
command runs; without it the command exits 2 with the install line.
"""
from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser(
        "plot",
        help="draw the figures and a one-page report.md of a `geomprobe analyze` output folder",
        description="Read OUTDIR/metrics.csv (written by `geomprobe analyze`) and draw, per layer and "
        "subset with one line per input file (epoch): capacity, radius, dimension and center correlation, "
        "the alignment measures and any other aggregate metric present; writes PNGs and report.md into "
        "PLOTDIR (default OUTDIR/plots). Needs matplotlib (pip install 'geomprobe[report]').",
    )
    p.add_argument("outdir", metavar="OUTDIR", help="output folder of `geomprobe analyze` (holds metrics.csv)")
    p.add_argument("-o", "--plotdir", default=None, help="where the PNGs and report.md go (default OUTDIR/plots)")
    p.add_argument("--radius", choices=("median", "mean"), default="median",
                   help="median (default): per-class median with the interquartile band; mean: the mean row, "
                   "which one class with a center near the origin can dominate (docs/metrics.md)")
    p.add_argument("--dpi", type=int, default=110, help="resolution of the PNGs (default 110)")
    p.add_argument("--force", action="store_true", help="overwrite plots in an existing PLOTDIR")
    p.add_argument("--quiet", action="store_true", help="print only the report path")
    p.set_defaults(run=run)


def run(args) -> int:
    from geomprobe._validation import InputError
    from geomprobe.plots import plot_analysis

    if not 20 <= args.dpi <= 1200:
        raise InputError(f"--dpi must be in 20..1200, got {args.dpi}")
    res = plot_analysis(args.outdir, plotdir=args.plotdir, radius=args.radius, force=args.force, dpi=args.dpi)
    if not args.quiet:
        for p in res.figures:
            print(f"figure: {p}")
    print(f"report: {res.report}")
    return 0
