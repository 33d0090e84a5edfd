"""The entry point: :func:`summarize` measures every effect of a finished run and writes summary.json."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from geomprobe._validation import InputError
from geomprobe.io import atomic_write_text

from .common import EFFECT_NAMES, SUMMARY_FILE, _clean, _experiment
from .e1 import _e1
from .e2 import _e2
from .e3 import _e3
from .e4 import _e4

__all__ = ["summarize"]


def summarize(outdir: str | Path, *, mftma: bool = True, recompute: bool = False, n_reps: int = 2,
              n_t: int = 50, seed: int | None = None, analysis_seeds: int | None = None, write: bool = True,
              tags: tuple[str, ...] | None = None, progress: Callable[[int, int], None] | None = None,
              jobs: int = 1) -> dict:
    """Measure every effect of the run in ``outdir`` and write ``outdir/summary.json`` (atomically).

    ``mftma``: run MFTMA on E2's activation files (else only alignment; capacity effects are then
    listed as missing); ``recompute``: analyse again even if ``outdir/analysis/metrics.json`` holds
    rows for the same files; ``n_reps``/``n_t``: MFTMA repetitions and sampled directions; ``seed``:
    the analysis seed (default: the run's seed); ``analysis_seeds``: E2's capacities are the mean over
    this many analysis seeds (default: the run's option ``analysis_seeds``, 1 for runs without it);
    ``tags``: E2, analyse only these activation files (``acts_<tag>.npz``; default all, the demo uses
    best and final); ``progress(done, total)``: called after every finished E2 analysis task; ``jobs``:
    E2's analysis tasks run in this many local processes (geomprobe.local_runner; same numbers).
    The E2 analysis options are recorded in ``summary["data"]["analysis"]`` with the ``geomprobe
    analyze`` command line that reproduces the cached rows.
    """
    out = Path(outdir)
    exp = _experiment(out)
    name = exp["experiment"]
    o = exp.get("options", {})
    if exp.get("status") != "done":
        raise InputError(f"{out}/experiment.json: status is {exp.get('status')!r}, not 'done' (the run did not finish)")
    seed = int(o.get("seed", 0)) if seed is None else int(seed)
    missing: list[str] = []
    fn = {"extreme-memorization": _e1, "label-noise-geometry": _e2, "identity-crisis": _e3,
          "normalized-loss": _e4}[name]
    kw = dict(mftma=mftma, recompute=recompute, n_reps=n_reps, n_t=n_t, seed=seed,
              analysis_seeds=analysis_seeds, tags=tags, progress=progress, jobs=jobs) if name == "label-noise-geometry" \
        else {}
    effects, data = fn(out, exp, missing, **kw)
    assert [e["name"] for e in effects] == EFFECT_NAMES[name]  # internal invariant, not user input
    summary = {"format": "geomprobe-summary", "format_version": 1, "experiment": name,
               "preset": exp.get("preset", ""), "seed": int(o.get("seed", 0)), "options": o,
               "n_passed": sum(e["passed"] for e in effects), "n_effects": len(effects),
               "effects": effects, "missing": missing, "data": _clean(data)}
    if write:
        atomic_write_text(out / SUMMARY_FILE, json.dumps(summary, indent=1, allow_nan=False))
    return summary
