"""``geomprobe report DIR``: rebuild a run's summary and report from its saved results (no training).

Thin: check DIR, call geomprobe.trainers.report.build_report, print the effects. matplotlib (and
umap-learn for the UMAP figure) are imported only when the command runs.
"""
from __future__ import annotations

import sys
from pathlib import Path

from geomprobe._validation import InputError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "report",
        help="rebuild summary.json and the report (effects table + figures) of a `geomprobe train` run",
        description="Measure the experiment's effects from the artefacts a `geomprobe train` run left in DIR "
        "(writes DIR/summary.json) and draw the figures and DIR/report/report.md. Nothing is retrained; "
        "an existing summary.json is reused unless --resummarize.",
    )
    p.add_argument("dirs", nargs="+", metavar="DIR", help="output folder(s) of `geomprobe train`")
    p.add_argument("--resummarize", action="store_true",
                   help="measure the effects again (re-reading the cached analysis in DIR/analysis)")
    p.add_argument("--no-umap", action="store_true", help="skip the UMAP figure (the slowest)")
    p.add_argument("--analysis-seeds", type=int, default=None, metavar="N",
                   help="E2, with --resummarize: capacities are the mean over N MFTMA analysis seeds "
                   "(default: the run's option analysis_seeds)")
    p.add_argument("--quiet", action="store_true", help="print only the report paths")
    p.set_defaults(run=run)


def run(args) -> int:
    if args.analysis_seeds is not None:
        if args.analysis_seeds < 1:
            raise InputError(f"--analysis-seeds must be >= 1, got {args.analysis_seeds}")
        if not args.resummarize:
            raise InputError("--analysis-seeds changes the summary: give --resummarize too")
    for d in args.dirs:
        if not (Path(d) / "experiment.json").is_file():
            raise InputError(f"{d}: no experiment.json (not a `geomprobe train` output folder)")
    try:
        from geomprobe.trainers.report import build_report
    except ModuleNotFoundError as exc:
        if exc.name == "matplotlib":
            raise InputError("geomprobe report needs matplotlib: pip install 'geomprobe[report]'") from None
        raise
    for d in args.dirs:
        path = build_report(d, resummarize=args.resummarize, umap=not args.no_umap, quiet=args.quiet,
                            analysis_seeds=args.analysis_seeds)
        if not args.quiet:
            from geomprobe.trainers.effects import load_summary

            print("\n".join(effects_lines(load_summary(d))))
        print(f"report: {path}")
    return 0


def effects_lines(summary: dict, skip: dict[str, str] | None = None) -> list[str]:
    """The effects of a summary.json as printed by `geomprobe report`, `train` and `demo`: one line per
    effect, and under every effect not shown the reason (what was missing, or the criterion and the
    values measured). ``skip``: effects the caller did not measure on purpose -> the reason why."""
    from geomprobe.trainers.report import _fmt

    s = summary
    skip = skip or {}
    shown = [e for e in s["effects"] if e["name"] not in skip]
    lines = [f"{s['experiment']} ({s['preset']}, seed {s['seed']}): {sum(e['passed'] for e in shown)}/{len(shown)} "
             "effects shown"]
    for e in s["effects"]:
        if e["name"] in skip:
            lines.append(f"  [-] {e['name']}: not measured: {skip[e['name']]}")
            continue
        lines.append(f"  [{'x' if e['passed'] else ' '}] {e['name']}")
        if not e["passed"]:
            m = e.get("measured")
            if isinstance(m, dict) and set(m) == {"missing"}:
                lines.append(f"      not shown: not measured, missing {m['missing']}")
            else:
                text = _fmt(m)
                lines.append(f"      not shown: criterion: {e['criterion']}")
                lines.append(f"      measured: {text if len(text) <= 400 else text[:397] + '...'}")
    return lines
