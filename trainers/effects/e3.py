"""E3, identity crisis (paper 002): FCNs drift to the constant map with depth; shallow ConvNets learn
the identity, deep ones the constant (probe correlations from :mod:`geomprobe.identity_probes`)."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from geomprobe.io import open_activations

from .common import CRITERIA, EFFECT_NAMES, _effect, _missing, _spearman

_FCN = re.compile(r"^fcn-(?P<act>[a-z]+)-h(?P<h>\d+)(?:-w(?P<w>\d+))?$")
_CONV = re.compile(r"^conv-d(?P<d>\d+)-c(?P<c>\d+)$")


def _e3(out: Path, exp: dict, missing: list[str]):
    from geomprobe.identity_probes import probe_correlations

    names = EFFECT_NAMES["identity-crisis"]
    runs = exp.get("result", {}).get("runs", [])
    models = []
    for r in runs:
        if "activation_file" not in r:
            models.append({"run": r["run"], "diverged": r.get("diverged", "no activation file")})
            continue
        with open_activations(out / r["activation_file"]) as f:
            inputs = f.array("probe/inputs")
            pred = f.array(f"probe/pred/{r['run']}")
            x_hat = f.array("probe/x_hat")
            rho = f.array("probe/rho")
        pc = probe_correlations(inputs, pred, x_hat, rho)
        m = _FCN.match(r["run"])
        mc = _CONV.match(r["run"])
        if m:
            family = f"fcn-{m['act']}" + (f"-w{m['w']}" if m["w"] else "")
            depth = int(m["h"])
        elif mc:
            family, depth = f"conv-c{mc['c']}", int(mc["d"])
        else:
            family, depth = "other", 0
        lo = pc.rho < 1.0
        loss = r.get("final_train_loss")
        # the training loss is 0.5 ||f(x) - x||^2: relative to the zero map's, 0.5 ||x||^2
        rel = float(loss) / (0.5 * float(np.sum(np.asarray(x_hat, np.float64) ** 2))) if loss is not None else None
        models.append({"run": r["run"], "family": family, "depth": depth, "rho": pc.rho,
                       "relative_train_loss": rel,
                       "identity": pc.identity_mean, "constant": pc.constant_mean,
                       "final_train_loss": loss, "steps": r.get("steps"),
                       "eq1_max_abs_diff": r.get("eq1_max_abs_diff"),
                       "constant_minus_identity": float(np.nanmean(pc.constant_mean[lo] - pc.identity_mean[lo]))
                       if lo.any() else float("nan"),
                       "identity_at_rho0": float(pc.identity_mean[0]), "constant_at_rho0": float(pc.constant_mean[0]),
                       "activation_file": r["activation_file"]})
    diverged = [m["run"] for m in models if "diverged" in m]
    if diverged:
        missing.append(f"diverged (no predictions): {', '.join(diverged)}")
    # as in the paper, only nets that fit their one example count (E4 likewise keeps nets at zero training error)
    unfit = [m for m in models if "family" in m and not (m["relative_train_loss"] is not None
                                                         and m["relative_train_loss"] <= CRITERIA["e3_fit"])]
    if unfit:
        rels = [m["relative_train_loss"] for m in unfit]
        shown = [f"{m['run']} ({'no loss logged' if v is None else format(v, '.3g')})" for m, v in zip(unfit, rels)]
        missing.append(f"not fitted (final loss > {CRITERIA['e3_fit']:g} x the zero map's 0.5 ||x||^2), left out of "
                       "the effects: " + ", ".join(shown))
    ok_models = [m for m in models if "family" in m and m not in unfit]
    data = {"models": models}
    fam: dict[str, list] = {}
    for m in ok_models:
        fam.setdefault(m["family"], []).append(m)
    for v in fam.values():
        v.sort(key=lambda m: m["depth"])
    fcns = {k: v for k, v in fam.items() if k.startswith("fcn-") and len({m["depth"] for m in v}) >= 2}
    convs = [m for k, v in fam.items() if k.startswith("conv-") for m in v]
    convs.sort(key=lambda m: m["depth"])
    eff = []
    crit0 = ("every FCN family (activation, width): s = mean over rho < 1 of (constant - identity correlation) "
             "has Spearman(depth, s) > 0 and s(deepest) > s(shallowest)")
    if not fcns:
        missing.append("FCNs of at least two depths")
        eff.append(_missing(names[0], "FCNs of at least two depths", crit0))
    else:
        per = {}
        for k, v in fcns.items():
            d = [m["depth"] for m in v]
            s = [m["constant_minus_identity"] for m in v]
            per[k] = {"depths": d, "constant_minus_identity": s, "spearman": _spearman(d, s)}
        ok = all(p["spearman"] > 0 and p["constant_minus_identity"][-1] > p["constant_minus_identity"][0]
                 for p in per.values())
        eff.append(_effect(names[0], ok, per, crit0))
    crit1 = (f"shallowest ConvNet: identity correlation on orthogonal inputs (rho = 0) >= {CRITERIA['e3_identity_min']} "
             "and > its constant correlation")
    crit2 = ("deepest ConvNet: mean over rho < 1 of constant correlation > identity correlation (s > 0), and s larger "
             "than the shallowest ConvNet's")
    if len(convs) < 2:
        missing.append("ConvNets of at least two depths")
        eff += [_missing(names[1], "ConvNets of at least two depths", crit1),
                _missing(names[2], "ConvNets of at least two depths", crit2)]
    else:
        sh, dp = convs[0], convs[-1]
        eff.append(_effect(names[1], sh["identity_at_rho0"] >= CRITERIA["e3_identity_min"]
                           and sh["identity_at_rho0"] > sh["constant_at_rho0"],
                           {"run": sh["run"], "depth": sh["depth"], "identity_at_rho0": sh["identity_at_rho0"],
                            "constant_at_rho0": sh["constant_at_rho0"]}, crit1))
        eff.append(_effect(names[2], dp["constant_minus_identity"] > 0
                           and dp["constant_minus_identity"] > sh["constant_minus_identity"],
                           {"run": dp["run"], "depth": dp["depth"], "constant_minus_identity": dp["constant_minus_identity"],
                            "shallowest_constant_minus_identity": sh["constant_minus_identity"],
                            "by_depth": {m["depth"]: m["constant_minus_identity"] for m in convs}}, crit2))
    return eff, data
