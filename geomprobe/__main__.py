"""``python -m geomprobe ...`` runs the ``geomprobe`` command line (same subcommands and exit codes)."""
import sys

from geomprobe.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
