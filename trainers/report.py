"""One report page per run: ``DIR/report/report.md`` with the effects table and the figures (PNG).

    from geomprobe.trainers.report import build_report
    build_report("geomprobe-runs/label-noise-geometry-small")

Built from saved results only (``summary.json``, the logs and activation files): nothing is trained.
``summary.json`` is (re)computed by :func:`geomprobe.trainers.effects.summarize` when it is missing or
``resummarize=True``. A figure whose optional dependency is missing (umap-learn) is skipped with a note
in the report and on stderr, never silently.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from geomprobe.io import atomic_write_text

from . import effects

__all__ = ["build_report", "effects_table", "REPORT_DIR"]

REPORT_DIR = "report"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v[:8]) + (", ..." if len(v) > 8 else "") + "]"
    if isinstance(v, dict):
        return "; ".join(f"{k}: {_fmt(x)}" for k, x in v.items())
    return str(v)


def effects_table(summary: dict) -> str:
    lines = ["| effect | passed | measured | criterion |", "|---|---|---|---|"]
    for e in summary["effects"]:
        meas = _fmt(e["measured"]).replace("|", "/")
        lines.append(f"| {e['name']} | {'yes' if e['passed'] else '**no**'} | {meas} | {e['criterion']} |")
    return "\n".join(lines)


def analysis_section(out: Path, summary: dict) -> list[str]:
    """E2: the analysis options behind the capacities and the `geomprobe analyze` commands that reproduce
    the cached rows (one per analysis seed; compare OUTDIR/metrics.csv with DIR/analysis/...)."""
    a = summary.get("data", {}).get("analysis")
    if not a:
        return []
    files = [str(out / f) for f in a["files"]]
    lines = ["## Analysis", "",
             f"MFTMA options of the capacities above: files {', '.join(a['files'])}; n_reps {a['n_reps']}, "
             f"n_t {a['n_t']}, per_class {a['per_class']} (M), analysis seeds {', '.join(map(str, a['seeds']))} "
             f"(the capacities are their mean); every other option is `geomprobe analyze`'s default. Cached rows: "
             f"`{out}/analysis/` (seed {a['seeds'][0]}) and `{out}/analysis/seed-S/` (the others). These commands "
             "compute the same rows:", "", "```sh"]
    for k, s in enumerate(a["seeds"]):
        lines.append(effects.analyze_command(files, f"{out}/reanalysis" + (f"-seed-{s}" if k else ""), seed=s,
                                             n_reps=a["n_reps"], n_t=a["n_t"], per_class=a["per_class"],
                                             mftma=a.get("mftma", True)))
    return lines + ["```", ""]


def build_report(outdir: str | Path, *, resummarize: bool = False, umap: bool = True, mftma: bool = True,
                 quiet: bool = False, analysis_seeds: int | None = None) -> Path:
    """Write DIR/report/report.md and its PNGs; returns the report's path."""
    from . import figures as F

    out = Path(outdir)
    summary_path = out / effects.SUMMARY_FILE
    if resummarize or not summary_path.is_file():
        summary = effects.summarize(out, mftma=mftma, analysis_seeds=analysis_seeds)
    else:
        summary = json.loads(summary_path.read_text())
    rdir = out / REPORT_DIR
    rdir.mkdir(parents=True, exist_ok=True)
    name = summary["experiment"]
    made, notes = [], []
    for stem, fn, needs_dir, optional in F.FIGURES[name]:
        if optional == "umap" and not umap:
            notes.append(f"{stem}: skipped (--no-umap)")
            continue
        try:
            fig = fn(out, summary) if needs_dir else fn(summary)
        except ModuleNotFoundError as exc:
            if optional and exc.name == optional:
                notes.append(f"{stem}: skipped ({optional} is not installed: pip install 'geomprobe[report]')")
                continue
            raise
        F.save(fig, rdir / f"{stem}.png")
        made.append(stem)
    for n in notes:
        if not quiet:
            print(f"geomprobe report: {n}", file=sys.stderr)
    o = summary.get("options", {})
    body = [f"# {name}: preset {summary.get('preset')}, seed {summary.get('seed')}", "",
            f"{summary['n_passed']} of {summary['n_effects']} effects shown. Criteria and the values measured "
            "with several seeds: docs/reproducing.md. Rebuild with `geomprobe report DIR`.", "",
            "## Effects", "", effects_table(summary), ""]
    if summary.get("missing"):
        body += ["## Not logged by this run", ""] + [f"- {m}" for m in summary["missing"]] + [""]
    body += analysis_section(out, summary)
    from .scores import scores_figure, scores_section

    section = scores_section(out)
    if section:
        body += [section]
        F.save(scores_figure(out), rdir / "scores.png")
        made.append("scores")
    body += ["## Figures", ""]
    for stem in made:
        body += [f"### {stem}", "", f"![{stem}]({stem}.png)", ""]
    body += [f"- {n}" for n in notes] + ([""] if notes else [])
    body += ["## Options", "", "```", json.dumps(o, indent=1), "```", ""]
    path = rdir / "report.md"
    atomic_write_text(path, "\n".join(body))
    return path
