"""Entry point of the ``geomprobe`` console script.

Exit codes: 0 success, 1 analysis error (a task or solver failed), 2 usage error (bad option, bad
or missing file, unusable output directory), 130 interrupted. User errors print one line on stderr,
never a traceback; a misspelled subcommand or option gets a "did you mean".
"""
from __future__ import annotations

import argparse
import difflib
import sys

from geomprobe import __version__
from geomprobe._validation import AnalysisError, InputError

from . import analyze, demo, plot, report, train

# Each subcommand module imports its heavy packages (torch, matplotlib) only when it runs.
_COMMANDS = [analyze, demo, train, report, plot]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="geomprobe",
        description="Measure how a neural network stores what it learns: alignment, MFTMA manifold "
        "geometry and probes over saved activations.",
    )
    parser.add_argument("--version", action="version", version=f"geomprobe {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for mod in _COMMANDS:
        mod.add_parser(sub)
    return parser


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # noqa: SLF001 - argparse keeps its subparsers here
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            return dict(action.choices)
    return {}


def _did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(close)}?" if close else ""


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """parse_args, with a misspelled subcommand or option answered by the subcommand's own usage
    and a "did you mean" (argparse alone prints the top-level usage for an unknown option)."""
    subs = _subparsers(parser)
    first = next((a for a in argv if not a.startswith("-")), None)
    if first is not None and first not in subs and not any(a in ("-h", "--help", "--version") for a in argv):
        parser.error(f"unknown command {first!r} (choose from {', '.join(subs)}){_did_you_mean(first, subs)}")
    args, extra = parser.parse_known_args(argv)
    if extra:
        sp = subs.get(getattr(args, "command", None) or "", parser)
        options = [s for a in sp._actions for s in a.option_strings]  # noqa: SLF001
        unknown = [a for a in extra if a.startswith("-")]
        hint = _did_you_mean(unknown[0].split("=")[0], options) if unknown else ""
        sp.error(f"unrecognized arguments: {' '.join(extra)}{hint}")
    return args


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = _parse(parser, argv)  # a usage error raises SystemExit(2) with the usage, --help SystemExit(0)
    try:
        return int(args.run(args) or 0)
    except InputError as exc:
        print(f"geomprobe {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except AnalysisError as exc:
        print(f"geomprobe {args.command}: analysis failed: {exc}", file=sys.stderr)
        return 1
    except MemoryError:
        print(f"geomprobe {args.command}: error: out of memory; analyse fewer layers at a time (--layers), "
              "subsample (--per-class) or stream (--stream-batch-rows)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"geomprobe {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
