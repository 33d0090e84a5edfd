"""Entry point of the `geomprobe` console script (filled in below)."""
import sys


def main(argv=None) -> int:
    print("geomprobe: command line not ready yet", file=sys.stderr)
    return 2
