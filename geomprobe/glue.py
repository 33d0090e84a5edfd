"""GLUE / GCMC: capacity and effective geometry from one joint anchor problem (docs/glue.md).

For each of n_t samples a Gaussian t and a dichotomy y of the P manifolds are drawn, the joint QP
min 1/2 ||v - t||^2 s.t. y_mu <v, x_{mu,i}> >= kappa is solved through its dual (an NNLS for
kappa = 0; exact column-generation active set in numba, geomprobe/_kernels/glue.py, or cvxpy), and
the anchors (dual-weighted means of each manifold's points) give capacity, effective radius,
effective dimension, utility and alignments.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from scipy.linalg import solve_triangular

from ._kernels.glue import anchor_products, joint_dual_batch
from ._validation import AnalysisError, check_choice, check_nonneg_float, check_positive_int, check_seed
from .mftma._data import as_manifolds, n_workers
from .mftma.simcap import check_dichotomies, draw_dichotomy
from .registry import MetricInfo, register

__all__ = ["GlueResult", "glue_analysis", "glue_rows"]

SOLVERS = ("fast", "cvxpy")
KKT_TOL = 1e-10            # a fast-path sample whose relative KKT residual exceeds this is re-solved by cvxpy
GRAM_MAX_BYTES = 1 << 30   # the point Gram X X^T is formed once when it takes at most this much memory
CVXPY_SOLVER = "CLARABEL"
CVXPY_OPTIONS = {"tol_gap_abs": 1e-12, "tol_gap_rel": 1e-12, "tol_feas": 1e-12, "tol_ktratio": 1e-10,
                 "max_iter": 500}
CVXPY_ZERO = 1e-9          # cvxpy duals below this fraction of the sample's largest dual are set to 0
_PINV_RTOL = 1e-12         # eigenvalues below this fraction of the largest are left out of the pseudo-inverse
_AXIS_MIN = 1e-6          # axes shorter than this fraction of their center's norm count as zero
_BLOCK_MIN = 16            # columns added to the working set per round: max(_BLOCK_MIN, 3 P)


def _block(P: int) -> int:
    """Columns entering the working set per column-generation round (about the number of active
    duals: 3-4 per manifold were measured at P = 100, M = 50, N = 2,048; 3 P was the fastest of
    P, 3 P and 5 P there)."""
    return max(_BLOCK_MIN, 3 * P)


@dataclass(frozen=True)
class GlueResult:
    """GLUE / GCMC measures of one set of manifolds for one dichotomy ensemble (docs/glue.md).

    capacity alpha = P / E[a]; dimension D_eff = E[b] / P; radius R_eff = sqrt(E[c] / E[b - c]);
    utility Psi = E[c] / E[a]; alpha = Psi (1 + R_eff^-2) / D_eff holds exactly. E_a, E_b, E_c are the
    three sample means. Alignments are means over ordered pairs mu != nu of cosines between anchor
    centers (center_alignment), between anchor axes of the same sample (axis_alignment, mean over
    samples in which both had an anchor) and between a center and another manifold's axis
    (center_axis_alignment); ``*_abs`` use |cos|. Per manifold: manifold_radius = E[||s1|| / ||s0||]
    (mean of ratios, over the samples with an anchor), manifold_radius_ratio_of_means =
    sqrt(E ||s1||^2) / ||s0||, manifold_dimension = E[(t . s1 / ||s1||)^2]; n_no_anchor[mu] = samples
    in which manifold mu had zero dual mass (no anchor). kkt_residual_max: largest relative KKT
    residual of the fast path (0 for solver="cvxpy"); n_cvxpy_fallback: fast-path samples re-solved
    by cvxpy because their residual exceeded KKT_TOL. a, b, c: the per-sample quadratic forms
    (their standard errors give the sampling error: capacity's relative error ~ std(a) / (E_a
    sqrt(n_t))); n_active_mean: mean number of non-zero duals per sample.
    """
    capacity: float
    radius: float
    dimension: float
    utility: float
    center_alignment: float
    center_alignment_abs: float
    axis_alignment: float
    axis_alignment_abs: float
    center_axis_alignment: float
    center_axis_alignment_abs: float
    manifold_radius: np.ndarray
    manifold_radius_ratio_of_means: np.ndarray
    manifold_dimension: np.ndarray
    n_no_anchor: np.ndarray
    E_a: float
    E_b: float
    E_c: float
    a: np.ndarray
    b: np.ndarray
    c: np.ndarray
    P: int
    N: int
    n_t: int
    kappa: float
    dichotomies: str
    solver: str
    kkt_residual_max: float
    n_cvxpy_fallback: int
    n_active_mean: float
    notes: tuple[str, ...] = field(default_factory=tuple)


def glue_analysis(X, labels=None, *, dichotomies="random", kappa: float = 0.0, n_t: int = 200, seed=None,
                  solver: str = "fast", center: bool = True) -> GlueResult:
    """GLUE capacity, effective radius / dimension, utility and alignments (docs/glue.md).

    X: (n_samples, n_features) with ``labels``, or a list of per-class (m_mu, N) arrays.
    dichotomies: "random" (half of the manifolds +1, uniformly; odd P gives the -1 side one more, as
    :func:`empirical_capacity`), "one_vs_rest" (one manifold +1, drawn uniformly) or a fixed
    array of P entries +-1 (in the order of the sorted class ids / of the list). kappa >= 0: margin.
    n_t: samples (t, y). seed: int / Generator. solver: "fast" (exact active set, numba) or "cvxpy"
    (the joint QP through Clarabel, status checked). center: subtract the pooled mean of all points
    first (the hyperplane has no bias).
    """
    n_t = check_positive_int(n_t, "n_t")
    kappa = check_nonneg_float(kappa, "kappa")
    solver = check_choice(solver, "solver", SOLVERS)
    rng = check_seed(seed)
    man = as_manifolds(X, labels)
    P, N = man.P, man.N
    kind, y_fixed = check_dichotomies(dichotomies, P)
    X0 = np.concatenate([np.asarray(man.get(i), dtype=np.float64) for i in range(P)])
    if center:
        X0 -= X0.mean(axis=0)
    sizes = np.asarray(man.sizes, dtype=np.int64)
    s_t, s_y = np.random.SeedSequence(int(rng.integers(0, 2**63 - 1))).spawn(2)
    T = np.random.default_rng(s_t).standard_normal((n_t, N))
    g_y = np.random.default_rng(s_y)
    Y = np.array([draw_dichotomy(kind, P, g_y, y_fixed) for _ in range(n_t)])
    return _glue(X0, sizes, T, Y, kappa, kind, solver)


def _glue(X0: np.ndarray, sizes: np.ndarray, T: np.ndarray, Y: np.ndarray, kappa: float, kind: str,
          solver: str) -> GlueResult:
    """GLUE measures of the stacked points X0 (n, N; manifold mu = the next sizes[mu] rows) for the
    given draws T (n_t, N) and Y (n_t, P) of +-1."""
    P = sizes.size
    n_t = T.shape[0]
    pc = np.repeat(np.arange(P), sizes)
    n = X0.shape[0]
    XT = X0 @ T.T                                   # (n, n_t)
    SGN = np.ascontiguousarray(Y[:, pc])            # (n_t, n)
    B = np.ascontiguousarray(kappa - SGN * XT.T)    # dual linear term per sample
    use_k = n * n * 8 <= GRAM_MAX_BYTES
    K = X0 @ X0.T if use_k else np.empty((0, 0))
    notes: list[str] = []
    if not use_k:
        notes.append(f"point Gram ({n} x {n}) larger than {GRAM_MAX_BYTES} bytes: entries computed as needed")
    LAM = np.zeros((n_t, n))
    res_max = 0.0
    n_fb = 0
    if solver == "fast":
        STAT, RES = _solve_fast(K, X0, use_k, SGN, B, LAM, block=_block(P))
        bad = np.flatnonzero((STAT[:, 0] != 0) | ~(RES <= KKT_TOL))
        res_max = float(np.max(RES, initial=0.0))
        if bad.size:
            n_fb = int(bad.size)
            for s in bad:
                LAM[s] = _cvxpy_dual(X0, SGN[s], T[s], kappa, s)
            notes.append(f"{n_fb} of {n_t} samples re-solved by cvxpy (fast-path KKT residual above "
                         f"{KKT_TOL:g} or iteration cap; largest residual {res_max:.3g})")
    else:
        for s in range(n_t):
            LAM[s] = _cvxpy_dual(X0, SGN[s], T[s], kappa, s)
    return _measures(X0, K if use_k else None, pc, sizes, T, XT, LAM, kappa, kind, solver, res_max,
                     n_fb, notes)


def _solve_fast(K, X0, use_k, SGN, B, LAM, *, block):
    n_t, n = B.shape
    STAT = np.zeros((n_t, 2), dtype=np.int64)
    RES = np.zeros(n_t)
    max_iter = 50 * n + 1000
    workers = n_workers(n_t)
    bounds = np.linspace(0, n_t, workers + 1).astype(int)

    def run(i):
        lo, hi = bounds[i], bounds[i + 1]
        joint_dual_batch(K, X0, use_k, SGN[lo:hi], B[lo:hi], LAM[lo:hi], STAT[lo:hi], RES[lo:hi],
                         block, max_iter)

    if workers > 1:
        with ThreadPoolExecutor(max_workers=workers) as ex:
            list(ex.map(run, range(workers)))
    else:
        run(0)
    return STAT, RES


def _cvxpy_dual(X0, sgn, t, kappa, s) -> np.ndarray:
    """The joint QP of one sample through cvxpy (Clarabel, tolerances 1e-12, then the solver's
    defaults); returns the constraint duals lam >= 0 with entries below CVXPY_ZERO x max set to 0."""
    import cvxpy as cp

    n, N = X0.shape
    v = cp.Variable(N)
    A = sgn[:, None] * X0
    cons = [A @ v >= kappa]
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(v - t)), cons)
    problem = None
    for options in (CVXPY_OPTIONS, {}):
        try:
            prob.solve(solver=CVXPY_SOLVER, **options)
        except cp.error.SolverError as exc:
            problem = f"failed: {exc}"
            continue
        if prob.status == cp.OPTIMAL:
            problem = None
            break
        problem = f"returned status {prob.status!r}"
    if problem is not None:
        raise AnalysisError(
            f"cvxpy solver {CVXPY_SOLVER} {problem} on the joint GLUE QP, sample {s} "
            f"(size: {N} variables, {n} constraints, kappa {kappa}), at tolerances 1e-12 and at its defaults"
        )
    lam = np.maximum(np.asarray(cons[0].dual_value, dtype=float).reshape(-1), 0.0)
    top = lam.max(initial=0.0)
    lam[lam < CVXPY_ZERO * top] = 0.0
    return lam


def _quad_pinv(G: np.ndarray, v: np.ndarray) -> float:
    """v^T G^+ v for a symmetric positive semi-definite G (eigenvalues below _PINV_RTOL x max left out)."""
    if G.shape[0] == 0:
        return 0.0
    try:                        # well-conditioned (the usual case): Cholesky, else eigen-decomposition
        Lc = np.linalg.cholesky(G)
        d = np.diag(Lc)
        if d.min() ** 2 > 1e-8 * np.diag(G).max():
            u = solve_triangular(Lc, v, lower=True, check_finite=False)
            return float(u @ u)
    except np.linalg.LinAlgError:
        pass
    e, U = np.linalg.eigh(G)
    top = e.max()
    if not top > 0.0:
        return 0.0
    keep = e > _PINV_RTOL * top
    p = U[:, keep].T @ v
    return float(np.sum(p * p / e[keep]))


def _measures(X0, K, pc, sizes, T, XT, LAM, kappa, kind, solver, res_max, n_fb, notes) -> GlueResult:
    n_t, n = LAM.shape
    P = sizes.size
    N = X0.shape[1]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    mass = np.add.reduceat(LAM, starts, axis=1)                 # (n_t, P) dual mass per manifold
    has = mass > 0.0
    count = has.sum(axis=0)
    n_no = n_t - count
    Wn = np.where(has[:, pc], LAM / np.where(mass > 0, mass, 1.0)[:, pc], 0.0)   # anchor weights
    wbar = Wn.sum(axis=0) / np.maximum(count, 1)[pc]
    s0 = np.add.reduceat(wbar[:, None] * X0, starts, axis=0)    # (P, N) anchor centers
    never = np.flatnonzero(count == 0)
    if never.size:
        notes.append(f"{never.size} manifold(s) never had an anchor in {n_t} samples (no center): "
                     f"{', '.join(map(str, never[:10]))}")
    H = X0 @ s0.T                                                # x_j . s0_nu
    G0 = s0 @ s0.T
    S0T = s0 @ T.T                                               # (P, n_t)
    n0 = np.sqrt(np.maximum(np.diag(G0), 0.0))
    A_s = np.zeros(n_t)
    B_s = np.zeros(n_t)
    C_s = np.zeros(n_t)
    ax_sum = np.zeros((P, P))
    ax_abs = np.zeros((P, P))
    ax_cnt = np.zeros((P, P))
    ca_sum = np.zeros((P, P))
    ca_abs = np.zeros((P, P))
    ca_cnt = np.zeros((P, P))
    rr_sum = np.zeros(P)
    r2_sum = np.zeros(P)
    d_sum = np.zeros(P)
    d_cnt = np.zeros(P)
    n_active = 0
    GSb = np.empty((P, P))
    SHb = np.empty((P, P))
    Stb = np.empty(P)
    XTc = np.ascontiguousarray(XT.T)                             # (n_t, n)
    for s in range(n_t):
        supp = np.flatnonzero(LAM[s])
        n_active += supp.size
        r = np.flatnonzero(has[s])
        if r.size == 0:
            continue
        # supp is sorted, so each anchored manifold's support points are one contiguous group
        g = pc[supp]
        grp = np.cumsum(np.r_[0, g[1:] != g[:-1]]).astype(np.int64)       # 0..|r|-1
        wv = Wn[s, supp]
        if K is not None:
            anchor_products(K, supp, supp, grp, wv, H, XTc[s], GSb, SHb, Stb)
        else:
            anchor_products(X0[supp] @ X0[supp].T, np.arange(supp.size), supp, grp, wv, H, XTc[s],
                            GSb, SHb, Stb)
        nr = r.size
        GS = GSb[:nr, :nr]                                                  # s_mu . s_nu
        SH = SHb[:nr]                                                       # s_mu . s0_nu, (|r|, P)
        St = Stb[:nr]
        S1t = St - S0T[r, s]
        SS0 = SH[:, r]
        G0r = G0[np.ix_(r, r)]
        G1 = GS - SS0 - SS0.T + G0r
        G1 = 0.5 * (G1 + G1.T)
        A_s[s] = _quad_pinv(GS, St - kappa)
        B_s[s] = _quad_pinv(G1, S1t)
        C_s[s] = _quad_pinv(G0r + G1, S1t)
        n1 = np.sqrt(np.maximum(np.diag(G1), 0.0))
        # G1 comes from Gram differences (||s - s0||^2 = ||s||^2 - 2 s.s0 + ||s0||^2), exact to about
        # 1e-15 ||s0||^2: an axis shorter than _AXIS_MIN ||s0|| (e.g. a manifold anchored in one
        # sample only) is treated as zero and gets no cosine and no per-manifold dimension term
        ok1 = n1 > _AXIS_MIN * n0[r]
        # axis alignment: cos(s1_mu, s1_nu) for pairs with non-zero axes
        cos = G1 / np.where(ok1, n1, 1.0)[:, None] / np.where(ok1, n1, 1.0)[None, :]
        m2 = np.outer(ok1, ok1)
        np.fill_diagonal(m2, False)
        ix = np.ix_(r, r)
        ax_sum[ix] += np.where(m2, cos, 0.0)
        ax_abs[ix] += np.where(m2, np.abs(cos), 0.0)
        ax_cnt[ix] += m2
        # center-axis alignment: cos(s0_mu, s1_nu), mu over all manifolds with a center, nu in r
        C = (SH - G0[r]) / np.where(ok1, n1, 1.0)[:, None] / np.where(n0 > 0, n0, 1.0)[None, :]  # [nu, mu]
        mc = ok1[:, None] & (n0 > 0)[None, :]
        mc[np.arange(r.size), r] = False
        ca_sum[:, r] += np.where(mc, C, 0.0).T
        ca_abs[:, r] += np.where(mc, np.abs(C), 0.0).T
        ca_cnt[:, r] += mc.T
        # per manifold
        n1z = np.where(ok1, n1, 0.0)
        rr_sum[r] += np.where(n0[r] > 0, n1z / np.where(n0[r] > 0, n0[r], 1.0), np.nan)
        r2_sum[r] += n1z ** 2
        d_sum[r] += np.where(ok1, S1t ** 2 / np.where(ok1, n1, 1.0) ** 2, 0.0)
        d_cnt[r] += ok1
    Ea, Eb, Ec = float(A_s.mean()), float(B_s.mean()), float(C_s.mean())
    capacity = P / Ea if Ea > 0 else np.inf
    dimension = Eb / P
    radius = float(np.sqrt(Ec / (Eb - Ec))) if Eb - Ec > 0 else (np.inf if Ec > 0 else np.nan)
    utility = Ec / Ea if Ea > 0 else np.nan
    if not Ea > 0:
        notes.append("no sample had an active constraint (E[a] = 0): capacity infinite")
    off = ~np.eye(P, dtype=bool)
    c0 = G0 / np.where(n0 > 0, n0, 1.0)[:, None] / np.where(n0 > 0, n0, 1.0)[None, :]
    mc0 = off & np.outer(n0 > 0, n0 > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        ca = float(c0[mc0].mean()) if mc0.any() else np.nan
        ca_a = float(np.abs(c0[mc0]).mean()) if mc0.any() else np.nan
        pa = ax_cnt > 0
        axa = float((ax_sum[pa] / ax_cnt[pa]).mean()) if pa.any() else np.nan
        axa_a = float((ax_abs[pa] / ax_cnt[pa]).mean()) if pa.any() else np.nan
        pc_ = ca_cnt > 0
        caa = float((ca_sum[pc_] / ca_cnt[pc_]).mean()) if pc_.any() else np.nan
        caa_a = float((ca_abs[pc_] / ca_cnt[pc_]).mean()) if pc_.any() else np.nan
        m_rad = np.where(count > 0, rr_sum / np.maximum(count, 1), np.nan)
        m_rom = np.where((count > 0) & (n0 > 0), np.sqrt(r2_sum / np.maximum(count, 1)) / np.where(n0 > 0, n0, 1.0),
                         np.nan)
        m_dim = np.where(d_cnt > 0, d_sum / np.maximum(d_cnt, 1), np.nan)
    if np.any(n_no):
        notes.append(f"{int((n_no > 0).sum())} of {P} manifolds had no anchor in some samples "
                     f"(at most {int(n_no.max())} of {n_t}); their per-sample terms leave those rows out")
    return GlueResult(
        capacity=float(capacity), radius=float(radius), dimension=float(dimension), utility=float(utility),
        center_alignment=ca, center_alignment_abs=ca_a, axis_alignment=axa, axis_alignment_abs=axa_a,
        center_axis_alignment=caa, center_axis_alignment_abs=caa_a, manifold_radius=m_rad,
        manifold_radius_ratio_of_means=m_rom, manifold_dimension=m_dim, n_no_anchor=n_no.astype(np.int64),
        E_a=Ea, E_b=Eb, E_c=Ec, a=A_s, b=B_s, c=C_s, P=int(P), N=int(N), n_t=int(n_t), kappa=float(kappa),
        dichotomies=kind, solver=solver, kkt_residual_max=float(res_max), n_cvxpy_fallback=int(n_fb),
        n_active_mean=float(n_active / n_t), notes=tuple(notes),
    )


def _r(description, better="neither"):
    return MetricInfo(description, better=better, scale_invariant=True, perm_invariant=True, random=True)


METRICS = register({
    "glue_capacity": _r("GLUE capacity alpha = P / E[a] of the dichotomy ensemble (docs/glue.md)", "higher"),
    "glue_radius": _r("GLUE effective radius R_eff (overall); per class with an id: mean over samples of "
                      "||s1|| / ||s0|| (mean of ratios)", "lower"),
    "glue_dimension": _r("GLUE effective dimension D_eff = E[b] / P (overall); per class with an id: "
                         "E[(t . s1 / ||s1||)^2]", "lower"),
    "glue_utility": _r("GLUE utility Psi = E[c] / E[a]", "higher"),
    "glue_center_alignment": _r("GLUE mean signed cosine between anchor centers"),
    "glue_center_alignment_abs": _r("GLUE mean |cosine| between anchor centers"),
    "glue_axis_alignment": _r("GLUE mean signed cosine between anchor axes of one sample"),
    "glue_axis_alignment_abs": _r("GLUE mean |cosine| between anchor axes of one sample"),
    "glue_center_axis_alignment": _r("GLUE mean signed cosine between a center and another manifold's axis"),
    "glue_center_axis_alignment_abs": _r("GLUE mean |cosine| between a center and another manifold's axis"),
    "glue_n_no_anchor": _r("samples in which the class had no anchor (zero dual mass), per class id"),
})


def glue_rows(
    X,
    labels,
    rng: np.random.Generator,
    *,
    dichotomies="random",
    n_t: int = 200,
    kappa: float = 0.0,
    per_class: int | None = 50,
    max_classes: int | None = None,
    solver: str = "fast",
) -> tuple[list[tuple[str, object, float]], list[str]]:
    """GLUE metrics as rows (metric, class_id or None, value) plus notes, like :func:`mftma_rows`.

    Rows (class None): glue_capacity, glue_radius, glue_dimension, glue_utility and the six
    alignments; per class id: glue_radius (mean of ratios), glue_dimension, glue_n_no_anchor.
    ``max_classes`` / ``per_class``: seeded choice of classes / examples per class (None = all).
    A fixed ``dichotomies`` array is given per chosen class, in sorted class-id order.
    All randomness comes from ``rng``.
    """
    from .mftma.rows import sample_manifolds

    n_t = check_positive_int(n_t, "n_t")
    X, classes, chosen, idxs, notes = sample_manifolds(X, labels, rng, per_class=per_class,
                                                       max_classes=max_classes, what="GLUE")
    check_dichotomies(dichotomies, len(chosen))
    res = glue_analysis([X[i] for i in idxs], dichotomies=dichotomies, kappa=kappa, n_t=n_t,
                        seed=int(rng.integers(0, 2**63 - 1)), solver=solver)
    notes.extend(f"GLUE: {n}" for n in res.notes)
    rows: list[tuple[str, object, float]] = [
        ("glue_capacity", None, res.capacity),
        ("glue_radius", None, res.radius),
        ("glue_dimension", None, res.dimension),
        ("glue_utility", None, res.utility),
        ("glue_center_alignment", None, res.center_alignment),
        ("glue_center_alignment_abs", None, res.center_alignment_abs),
        ("glue_axis_alignment", None, res.axis_alignment),
        ("glue_axis_alignment_abs", None, res.axis_alignment_abs),
        ("glue_center_axis_alignment", None, res.center_axis_alignment),
        ("glue_center_axis_alignment_abs", None, res.center_axis_alignment_abs),
    ]
    for i, cid in enumerate(classes[chosen]):
        cid = cid.item() if hasattr(cid, "item") else cid
        rows.append(("glue_radius", cid, float(res.manifold_radius[i])))
        rows.append(("glue_dimension", cid, float(res.manifold_dimension[i])))
        rows.append(("glue_n_no_anchor", cid, float(res.n_no_anchor[i])))
    return rows, notes
