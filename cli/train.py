"""``geomprobe train EXPERIMENT``: train one of the seed papers' experiments and write activation files.

Thin: parse, resolve the options (preset < --config < --set), call geomprobe.trainers.experiments.
torch is imported only when a run starts, so ``geomprobe --help`` stays fast and works without it.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from geomprobe._validation import InputError
from geomprobe.trainers.options import SPECS, get_spec, option_defaults, options_for

from .cluster import add_cluster_options

DEFAULT_OUT = "geomprobe-runs"


def _options_epilog(name: str) -> str:
    spec = SPECS[name]
    defaults = option_defaults(spec.options)
    presets = list(spec.presets)
    rows = [["option", "default"] + presets]
    for k, v in defaults.items():
        rows.append([k, _short(v)] + [_short(spec.presets[p][k]) if k in spec.presets[p] else "" for p in presets])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return ("options (set with --set key=value, lists as a,b,c or JSON; a --config file is a JSON object of "
            "options):\n  " + "\n  ".join(lines))


def _short(v) -> str:
    if isinstance(v, list):
        t = ",".join(f"{x:g}" if isinstance(x, float) else str(x) for x in v)
        return t if len(t) <= 28 else t[:25] + "..."
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def add_parser(sub) -> None:
    lines = "\n".join(f"  {n:22s} {s.summary}" for n, s in SPECS.items())
    p = sub.add_parser(
        "train",
        help="train a seed paper's experiment (needs torch): " + ", ".join(SPECS),
        description="Train one experiment of the seed papers and write checkpoints, a JSONL metrics log "
        "and activation files (readable by `geomprobe analyze`) into --out. A killed run resumes when "
        "started again with the same options; a finished one is refused without --force.\n\n"
        "experiments:\n" + lines,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    exps = p.add_subparsers(dest="experiment", metavar="EXPERIMENT")
    exps.required = True
    for name, spec in SPECS.items():
        e = exps.add_parser(name, help=spec.summary.replace("%", "%%"), description=spec.summary, epilog=_options_epilog(name),
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        e.add_argument("--preset", choices=list(spec.presets), default="tiny",
                       help="tiny: seconds on a CPU (CI); small: minutes on a CPU; paper: the paper's setting "
                       "(default tiny)")
        e.add_argument("--config", metavar="FILE", help="JSON file with an object of options")
        e.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                       help="set one option (repeatable); see the table below")
        e.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None,
                       help="default auto: CUDA when available")
        e.add_argument("--seed", type=int, default=None, help="seed of data, init and order (default 0)")
        e.add_argument("--out", metavar="DIR", default=None,
                       help=f"output folder (default {DEFAULT_OUT}/EXPERIMENT-PRESET)")
        e.add_argument("--force", action="store_true", help="overwrite a finished or different run in --out")
        e.add_argument("--quiet", action="store_true", help="no progress bars, no summary")
        e.add_argument("--sweep", metavar="KEY=V1,V2,...",
                       help="train once per value of one option into OUT/KEY=VALUE/, then analyse every run")
        e.add_argument("--resume", action="store_true", help="with --sweep: reuse finished runs and analyses")
        add_cluster_options(e)
    p.set_defaults(run=run)


def read_config(path: str) -> dict:
    """The options object of a --config JSON file (an InputError unless it holds a JSON object)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"--config {p}: no such file")
    try:
        cfg = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"--config {p}: not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise InputError(f"--config {p}: must hold a JSON object of options, got {type(cfg).__name__}")
    return cfg


def run(args) -> int:
    name = args.experiment
    get_spec(name)
    if args.seed is not None and args.seed < 0:
        raise InputError(f"--seed must be >= 0, got {args.seed}")
    config = read_config(args.config) if args.config else None
    opts = options_for(name, args.preset, config, args.sets, seed=args.seed, device=args.device,
                       progress="off" if args.quiet else None)
    out = Path(args.out) if args.out else Path(DEFAULT_OUT) / f"{name}-{args.preset}"
    if getattr(args, "sweep", None):
        from .sweep import run_sweep_command

        return run_sweep_command(args, out)
    if getattr(args, "scheduler", None) or getattr(args, "workers", None) is not None:
        raise InputError("--scheduler/--workers run a sweep: give --sweep KEY=V1,V2,...")
    try:
        from geomprobe.trainers.experiments import run_experiment
    except ModuleNotFoundError as exc:
        if exc.name == "torch":
            raise InputError("geomprobe train needs PyTorch: pip install 'geomprobe[train]'") from None
        raise
    run_ = run_experiment(name, opts, out, force=args.force, preset=args.preset)
    if not args.quiet:
        print(f"{name} ({args.preset}) finished: results in {out}", file=sys.stderr)
        files = sorted(str(p.relative_to(out)) for p in out.rglob("acts_*.npz"))
        print(f"activation files ({len(files)}): " + ", ".join(files[:12]) + (" ..." if len(files) > 12 else ""))
        print(next_command(out, files))
        if run_.summary is not None:  # this run's summary (None: it failed, said on stderr)
            from .report import effects_lines

            print("\n".join(effects_lines(run_.summary)))
            if (out / "report" / "report.md").is_file():
                print(f"report: {out / 'report' / 'report.md'} (criteria: docs/reproducing.md)")
    return 0


def next_command(out: Path, files: list[str]) -> str:
    """The `geomprobe analyze` command suggested after a run: its activation files (a shell pattern) into
    a new folder OUT/my-analysis (OUT/analysis is the summary's own cache, which `analyze` refuses to
    overwrite)."""
    patterns = sorted({str(out / Path(f).parent / "acts_*.npz") for f in files}) or [str(out / "acts_*.npz")]
    return f"next: geomprobe analyze {' '.join(patterns)} -o {out / 'my-analysis'}"
