"""Entry point of the ``geomprobe`` console script.

Exit codes: 0 success, 1 analysis error (a task or solver failed), 2 usage error (bad option, bad
or missing file). User errors print one line on stderr, never a traceback.
"""
from __future__ import annotations

import argparse
import sys

from geomprobe import __version__
from geomprobe._validation import AnalysisError, InputError

from . import analyze, demo

_COMMANDS = [analyze, demo]


def _optional_commands():
    """Subcommands whose modules import heavy packages only when run (train, report)."""
    mods = []
    for name in ("train", "report"):
        try:
            mods.append(__import__(f"geomprobe.cli.{name}", fromlist=[name]))
        except ModuleNotFoundError as exc:
            if exc.name != f"geomprobe.cli.{name}":
                raise
    return mods


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="geomprobe",
        description="Measure how a neural network stores what it learns: alignment, MFTMA manifold "
        "geometry and probes over saved activations.",
    )
    parser.add_argument("--version", action="version", version=f"geomprobe {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for mod in _COMMANDS + _optional_commands():
        mod.add_parser(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except InputError as exc:
        print(f"geomprobe {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except AnalysisError as exc:
        print(f"geomprobe {args.command}: analysis failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"geomprobe {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
