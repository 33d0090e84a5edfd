"""Post-hoc effects of the four experiments (spec: experiments.md E1-E4), computed from a run's artefacts.

    from geomprobe.trainers.effects import summarize
    summary = summarize("geomprobe-runs/label-noise-geometry-small")   # writes DIR/summary.json

``summarize(outdir)`` reads ``experiment.json`` to learn which experiment ran, then the logs and
activation files it left (for E2 it runs :func:`geomprobe.analysis.analyze` on the activation files
for MFTMA and caches the rows in ``DIR/analysis``), measures every effect the spec asks for and writes
``DIR/summary.json`` atomically::

    {"experiment", "preset", "seed", "effects": [{"name", "passed", "measured", "criterion"}, ...],
     "data": {... the tables the figures are drawn from ...}, "missing": [... what the run did not log ...]}

No training happens here and torch is not imported: a report can be rebuilt on any machine from the
saved results. The thresholds of every criterion are stated in docs/reproducing.md next to the values
measured with several seeds. An effect that cannot be measured (an artefact is missing) is listed with
``passed: false`` and a ``measured`` that says what is missing, never silently dropped.

Layout (one module per job): ``common`` (criteria thresholds, effect names, the summary file, small
statistics), ``summary`` (:func:`summarize`, the entry point), ``e1`` .. ``e4`` (each experiment's
effects and the data its figures are drawn from).
"""
from __future__ import annotations

from .common import (  # noqa: F401 - _clean is used by tests
    CRITERIA,
    EFFECT_NAMES,
    SUMMARY_FILE,
    _clean,
    load_summary,
)
from .e2 import _e2_best_epoch_effect, analysis_dir, analyze_command, e2_analysis_seeds  # noqa: F401
from .summary import summarize

__all__ = ["summarize", "load_summary", "EFFECT_NAMES", "CRITERIA", "SUMMARY_FILE"]
