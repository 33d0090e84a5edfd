"""Record the previous anchor kernel (git e52633f) on small random cases for tests/test_mftma_anchors_scale.py.
Run: PYTHONPATH=<tree at e52633f> python record.py out.npz"""
import sys
import numpy as np
from geomprobe._kernels.mftma_anchors import manifold_metrics
rng = np.random.default_rng(20261127)
out = {}
specs = [(5, 3), (20, 10), (40, 40), (60, 20), (30, 80), (120, 15), (200, 60), (80, 80), (150, 150), (300, 25)]
for c, (m, D) in enumerate(specs):
    kind = c % 4
    S = rng.standard_normal((D, m))
    if kind == 1:
        S[:, m // 2:] = S[:, : m - m // 2]                     # duplicated points
    elif kind == 2:
        S = rng.standard_normal((D, 3)) @ rng.standard_normal((3, m))   # rank 3
    elif kind == 3:
        S *= 0.3                                               # small radius: more feasible samples
    sD1 = np.vstack([S, np.ones((1, m))])
    T = rng.standard_normal((D + 1, 40))
    kappa = 0.25 if c % 3 == 2 else 0.0
    out[f"sD1_{c}"] = sD1
    out[f"T_{c}"] = T
    out[f"kappa_{c}"] = np.array(kappa)
    out[f"out_{c}"] = np.array(manifold_metrics(sD1, T, kappa, 50 * m + 1000), dtype=float)
np.savez_compressed(sys.argv[1], **out)
