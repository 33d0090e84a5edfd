"""Every metric that ``geomprobe analyze`` can emit, with its declared properties.

tests/test_common.py checks that every emitted metric is classified here and that the declared
invariances hold on real output; a new metric that is not classified fails that test.

``better``: "higher" / "lower" / "neither" (a description, not a score). ``scale_invariant``: unchanged
when every vector of the layer is multiplied by the same c > 0. ``perm_invariant``: unchanged when the
examples are reordered. ``random``: depends on the seed (MFTMA sampling).
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MetricInfo", "METRICS", "register"]


@dataclass(frozen=True)
class MetricInfo:
    description: str
    better: str = "neither"
    scale_invariant: bool = True
    perm_invariant: bool = True
    random: bool = False


def _m(description, **kw):
    return MetricInfo(description, **kw)


METRICS: dict[str, MetricInfo] = {
    # bookkeeping
    "n_examples": _m("examples analysed in this layer and subset"),
    "n_dropped_nonfinite": _m("rows excluded because they held NaN/Inf (--drop-nonfinite)"),
    "rep_n_classes_skipped": _m("classes with < 2 examples (no per-class Omega)"),
    "grad_n_classes_skipped": _m("classes with < 2 examples (no per-class Omega)"),
    # alignment (paper 000)
    "rep_omega": _m("representation alignment Omega (overall; per class with a class id)", better="higher"),
    "rep_omega_in_class": _m("mean over classes of the per-class representation Omega", better="higher"),
    "grad_omega": _m("gradient alignment Omega (overall; per class with a class id)", better="higher"),
    "grad_omega_in_class": _m("mean over classes of the per-class gradient Omega", better="higher"),
    "grad_diversity": _m("gradient diversity sum ||g||^2 / ||sum g||^2", better="neither"),
    "grad_cosine_stiffness": _m("mean pairwise cosine of gradients (overall; within a class with an id)"),
    "grad_cosine_stiffness_in_class": _m("mean over classes of the within-class cosine stiffness"),
    "grad_sign_stiffness": _m("mean pairwise sign of gradient inner products"),
    "grad_sign_stiffness_in_class": _m("mean over classes of the within-class sign stiffness"),
    "grad_confusion_min_inner": _m("minimum pairwise gradient inner product", better="higher", scale_invariant=False),
    "grad_confusion_min_cosine": _m("minimum pairwise gradient cosine", better="higher"),
    # MFTMA (paper 003)
    "capacity": _m("manifold capacity alpha_M (1/mean(1/alpha_i); per class with an id)", better="higher", random=True),
    "radius": _m("manifold radius R_M (mean; per class with an id)", better="lower", random=True),
    "dimension": _m("manifold dimension D_M (mean; per class with an id)", better="lower", random=True),
    "center_correlation": _m("mean |cos| between class centers (rho_c)", better="lower", random=True),
    "K": _m("number of shared center directions removed", random=True),
    "empirical_capacity": _m("simulated capacity P / N_c by bisection", better="higher", random=True),
    "empirical_Nc": _m("critical projection dimension N_c of the simulated capacity", random=True),
}


def register(family: dict[str, MetricInfo]) -> dict[str, MetricInfo]:
    """Add a measure family's rows to METRICS. A module that emits rows declares them next to the
    code that emits them (``METRICS = register({...})``); a name declared twice is an error."""
    clash = sorted(set(family) & set(METRICS))
    if clash:
        raise ValueError(f"metric name(s) declared twice: {', '.join(clash)}")
    METRICS.update(family)
    return family


# Families that declare their own rows (each module calls register at import).
_FAMILIES: tuple[str, ...] = ("spectral", "collapse", "linear_probe", "similarity", "scores", "glue",
                             "identity_probes", "layer_collapse")


def _load_families() -> None:
    import importlib

    for name in _FAMILIES:
        importlib.import_module(f"geomprobe.{name}")


_load_families()
