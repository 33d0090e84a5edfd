"""Command line of geomprobe (installed as geomprobe.cli)."""
