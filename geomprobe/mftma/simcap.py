"""Empirical (simulated) manifold capacity by bisection on the number of random projections (spec 5)."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from .._kernels.mftma_simcap import hull_nnls, scan_critical
from .._validation import AnalysisError, InputError, check_choice, check_positive_int, check_seed
from ._data import as_manifolds, blas_threads, n_workers

P_TOL = 0.05        # bisection stops when |p(n) - 1/2| <= P_TOL (reference value)
MAX_STEPS = 100     # reference cap on bisection steps
_ENTER = 16         # columns entering the active set per gradient pass of the warm-started NNLS
_BLOCK = 32         # random directions projected at a time by the warm-started scan
HINT_STEP = 8       # first bracket step around a hinted critical n
N_HINT_TRIALS = 2   # trials searched without a hint; the median of their critical n hints the others


@dataclass(frozen=True)
class EmpiricalCapacityResult:
    """capacity = P / N_c; N_c = interpolated number of projections at which half of the random
    dichotomies are linearly separable; n_trace / p_trace = every evaluated n and its separable
    fraction, in evaluation order; critical_n[r] = smallest n at which trial r is separable
    (N + 1 if never; 2 means <= 2); n_lp_fallback = separability tests decided by the LP fallback;
    dichotomies = the ensemble ("random", "one_vs_rest" or "fixed"); bias = hyperplanes with a bias."""
    capacity: float
    N_c: float
    P: int
    N: int
    n_rep: int
    n_trace: np.ndarray
    p_trace: np.ndarray
    critical_n: np.ndarray
    n_tests: int
    n_lp_fallback: int
    notes: tuple[str, ...] = field(default_factory=tuple)
    dichotomies: str = "random"
    bias: bool = True


def separable(Xp: np.ndarray, y: np.ndarray, bias: bool = True) -> tuple[bool, bool]:
    """Exact strict separability (with bias) of the rows of Xp by labels y = +-1.

    Returns (separable, used_lp_fallback). A positive answer is certified by a hyperplane whose
    every margin y_i (w . x_i + b) is recomputed and found > 0; a negative answer comes with an
    NNLS certificate that 0 is in the convex hull of the signed points y_i [x_i; 1].
    """
    one = np.full((Xp.shape[0], 1), 1.0 if bias else 0.0)   # a zero bias column: through the origin
    A = np.ascontiguousarray(y[:, None] * np.hstack([Xp, one]))
    z, u, r1, status = hull_nnls(A, 100 * A.shape[0] + 10000)
    if status == 0:
        return bool(r1 > 0.0 and float((A @ u).min()) > 0.0), False
    return _separable_lp(A), True


def _separable_lp(A: np.ndarray) -> bool:
    """Fallback: max t s.t. A u >= t, |u_j| <= 1, t <= 1 (HiGHS); certified like the NNLS path."""
    from scipy.optimize import linprog

    m, d = A.shape
    c = np.zeros(d + 1)
    c[-1] = -1.0
    res = linprog(c, A_ub=np.hstack([-A, np.ones((m, 1))]), b_ub=np.zeros(m),
                  bounds=[(-1.0, 1.0)] * d + [(None, 1.0)], method="highs")
    if res.status != 0:
        raise AnalysisError(
            f"HiGHS returned status {res.status} ({res.message}) on a separability LP "
            f"(size: {d + 1} variables, {m} constraints)"
        )
    return bool(-res.fun > 0.0 and float((A @ res.x[:d]).min()) > 0.0)


DICHOTOMIES = ("random", "one_vs_rest")


def check_dichotomies(dichotomies, P: int) -> tuple[str, np.ndarray | None]:
    """Validate a dichotomy ensemble: "random", "one_vs_rest" or a fixed array of P entries +-1.
    Returns (kind, fixed labels or None); kind is "fixed" for an array."""
    if isinstance(dichotomies, str):
        return check_choice(dichotomies, "dichotomies", DICHOTOMIES), None
    y = np.asarray(dichotomies)
    if y.dtype.hasobject or y.ndim != 1 or y.shape[0] != P:
        raise InputError(f"dichotomies must be 'random', 'one_vs_rest' or an array of P = {P} labels +-1, "
                         f"got {'shape ' + str(y.shape) if not y.dtype.hasobject else 'dtype object'}")
    if not np.issubdtype(y.dtype, np.number) or not np.all((y == 1) | (y == -1)):
        bad = [v for v in y.tolist() if v not in (1, -1)][:1]
        raise InputError(f"dichotomies must hold only +1 and -1, got {bad[0]!r}" if bad else
                         f"dichotomies must hold only +1 and -1, got dtype {y.dtype}")
    return "fixed", y.astype(np.float64)


def draw_dichotomy(kind: str, P: int, gen: np.random.Generator, fixed: np.ndarray | None = None) -> np.ndarray:
    """One dichotomy of the P manifolds (+-1 floats). "random": P // 2 manifolds +1 chosen uniformly
    (odd P gives -1 one more); "one_vs_rest": one manifold +1, drawn uniformly; "fixed": ``fixed``."""
    if kind == "fixed":
        return fixed.copy()
    lab = -np.ones(P)
    if kind == "random":
        lab[gen.permutation(P)[: P // 2]] = 1.0
    else:
        lab[int(gen.integers(P))] = 1.0
    return lab


class _CapReached(Exception):
    """The warm-started active set hit its iteration cap (never seen in practice)."""


class _Trial:
    """One random dichotomy with nested random projections: n features = the first n of a fixed
    sequence of unit-norm Gaussian directions, so separability is monotone in n (common random
    numbers across n)."""

    def __init__(self, X0, point_class, P, seq: np.random.SeedSequence, kind: str = "random",
                 fixed: np.ndarray | None = None, bias: bool = True):
        s_lab, s_w = seq.spawn(2)
        lab = draw_dichotomy(kind, P, np.random.default_rng(s_lab), fixed)
        self.y = lab[point_class]
        self.X0 = X0
        self.bias = bias
        self.s_w = s_w
        self.Xp = np.empty((X0.shape[0], 0))
        self.tests = 0
        self.lp = 0

    def status(self, n: int) -> bool:
        N = self.X0.shape[1]
        if self.Xp.shape[1] < n:
            n_alloc = min(N, max(n, 2 * self.Xp.shape[1]))
            W = np.random.default_rng(self.s_w).standard_normal((n_alloc, N))  # prefix-stable rows
            W /= np.linalg.norm(W, axis=1, keepdims=True)
            self.Xp = self.X0 @ W.T
        sep, lp = separable(self.Xp[:, :n], self.y, self.bias)
        self.tests += 1
        self.lp += lp
        return sep

    def critical_n(self, hint: int = 0) -> int:
        """Smallest n in [2, N] at which the dichotomy is separable (N + 1 if none).

        Without a hint: exponential search (n = 2, 4, 8, ...) then bisection, as :meth:`_search`.
        With a hint (a guess of the critical n, e.g. from other trials): the exponential search stops
        below 0.6 x hint, then the hint is tested and the bracket grows away from it in steps of
        HINT_STEP, 2 HINT_STEP, ... until it holds the critical n, then bisection. Tests near the
        critical n are the expensive ones (the active set changes most there), so a good hint saves
        about a third of them; the result is the same exact critical n either way.

        Every test continues the exact NNLS of the largest n known not to be separable: the problem
        at n' > n only appends coordinates (rank-1 updates of the passive Gram factor; the previous
        solution stays feasible), so a test re-uses the active set instead of starting from zero. The
        projection is computed in blocks of directions as the search needs them. Should the active
        set hit its iteration cap, the trial is redone by :meth:`_search` (exact tests, HiGHS LP
        fallback)."""
        X0 = self.X0
        m, N = X0.shape
        self._gen = np.random.default_rng(self.s_w)     # rows drawn in blocks: same stream, same rows
        self._A = np.empty((m, 1 + min(N, _BLOCK)))
        self._A[:, 0] = self.y if self.bias else 0.0   # bias column (zero: through the origin)
        self._At = np.empty((self._A.shape[1], m))
        self._At[0] = self._A[:, 0]
        self._n_have = 0
        lo_state = (np.zeros(m), np.zeros(m, dtype=bool), np.empty(m, dtype=np.int64),
                    np.empty((1, 1)), np.zeros(2, dtype=np.int64))
        hint = int(hint) if hint and 4 <= hint <= N else 0
        limit = int(0.6 * hint) if hint else N
        lo, n, hi = 0, 2, 0            # lo: largest n known not separable, with its NNLS state
        try:
            while n <= limit:          # exponential search (below the hint's region)
                n = min(n, N)
                sep, st = self._advance(lo_state, lo, n)
                if sep:
                    hi = n
                    break
                if n == N:
                    return N + 1
                lo, lo_state, n = n, st, 2 * n
            if not hi:                 # around the hint: test it, then grow the bracket away from it
                n = max(hint, lo + 1)
                sep, st = self._advance(lo_state, lo, n)
                step = HINT_STEP
                if sep:
                    hi = n
                    while hi - lo > 1:
                        n = max(hi - step, lo + 1)
                        sep, st = self._advance(lo_state, lo, n)
                        if not sep:
                            lo, lo_state = n, st
                            break
                        hi, step = n, 2 * step
                else:
                    lo, lo_state = n, st
                    while True:
                        if lo == N:
                            return N + 1
                        n = min(lo + step, N)
                        sep, st = self._advance(lo_state, lo, n)
                        if sep:
                            hi = n
                            break
                        lo, lo_state, step = n, st, 2 * step
            while hi - lo > 1:         # invariant: lo not separable (or lo = 0), hi separable
                mid = (lo + hi) // 2
                sep, st = self._advance(lo_state, lo, mid)
                if sep:
                    hi = mid
                else:
                    lo, lo_state = mid, st
            return hi
        except _CapReached:
            self.tests = 0
            return self._search()
        finally:
            self._A = self._At = self._gen = None

    def _advance(self, state, n_from: int, n: int):
        """Exact test at n, continuing (a copy of) the NNLS state converged at n_from < n."""
        m, N = self.X0.shape
        while self._n_have < n:
            nb = min(max(_BLOCK, n - self._n_have), N - self._n_have)
            lo = 1 + self._n_have
            if lo + nb > self._A.shape[1]:
                cap = min(N + 1, max(lo + nb, 2 * self._A.shape[1]))
                A2 = np.empty((m, cap))
                A2[:, :lo] = self._A[:, :lo]
                At2 = np.empty((cap, m))
                At2[:lo] = self._At[:lo]
                self._A, self._At = A2, At2
            W = self._gen.standard_normal((nb, N))
            W /= np.linalg.norm(W, axis=1, keepdims=True)
            np.multiply(self.X0 @ W.T, self.y[:, None], out=self._A[:, lo:lo + nb])
            self._At[lo:lo + nb] = self._A[:, lo:lo + nb].T
            self._n_have += nb
        z, passive, idx, L, kst = state
        k = int(kst[0])
        need = min(m, n + 3) + 1
        L2 = np.empty((max(need, L.shape[0]), max(need, L.shape[0])))
        L2[:k, :k] = L[:k, :k]
        st = (z.copy(), passive.copy(), idx.copy(), L2, kst.copy())
        d, status = scan_critical(self._A, self._At, n_from + 1 if n_from else 0, n + 1, *st,
                                  100 * m + 10000, _ENTER, True)
        self.tests += 1
        if status:
            raise _CapReached
        return d > 0, st

    def _search(self) -> int:
        """Exponential search then bisection with one exact test per evaluated n."""
        N = self.X0.shape[1]
        lo, n = 1, 2
        while True:                    # exponential search for a separable n
            n = min(n, N)
            if self.status(n):
                break
            if n == N:
                return N + 1
            lo, n = n, 2 * n
        hi = n
        if hi == 2:
            return 2
        while hi - lo > 1:             # invariant: lo not separable (or lo = 1), hi separable
            mid = (lo + hi) // 2
            if mid < 2:
                break
            if self.status(mid):
                hi = mid
            else:
                lo = mid
        return hi


def _normalise(X0: np.ndarray) -> np.ndarray:
    """X0 scaled in place by the power of two nearest to its root-mean-square entry, so that the
    separability tests (whose bias column is 1 and whose tolerances are absolute on data of order 1)
    see the same numbers, up to a factor in [0.71, 1.41], whatever the data's scale. A power of two
    is exact: data whose RMS entry is already within that range are unchanged bit for bit."""
    top = float(np.max(np.abs(X0), initial=0.0))
    if not top > 0.0:
        return X0
    rms = top * float(np.sqrt(np.mean(np.square(X0 / top))))
    e = int(np.round(np.log2(rms)))
    if e:
        np.ldexp(X0, -e, out=X0)
    return X0


def empirical_capacity(X, labels=None, *, n_rep: int = 30, seed=None,
                       dichotomies="random", bias: bool = True) -> EmpiricalCapacityResult:
    """Empirical manifold capacity alpha_sim = P / N_c (spec section 5).

    X: (n_samples, n_features) with labels, or a list of per-class arrays. n_rep: random dichotomies
    (half of the classes +1, the rest -1; odd P gives the negatives one more) per n. The data are
    centred by the pooled mean; the separating hyperplane has a bias. p(n) is the fraction of the
    n_rep dichotomies whose points, projected on n random unit-norm Gaussian directions, are
    strictly linearly separable (exact test: see :func:`separable`). The reference's bisection on
    p(n) - 1/2 over n in [2, N] is run with common random numbers (trial r uses the same dichotomy
    and the first n of the same directions for every n), and N_c is interpolated at p = 1/2.

    dichotomies: the ensemble of the labellings, as :func:`geomprobe.glue_analysis`: "random" (the
    default above), "one_vs_rest" (one class +1, drawn uniformly per trial) or a fixed array of P
    labels +-1 (every trial uses it; only the projections vary). The result is invariant to a
    common positive scale of X: the centred data are normalised once (see :func:`_normalise`).
    bias=False: hyperplanes through the origin (after centring), the separability problem whose
    capacity GLUE's joint QP estimates; the default keeps the reference protocol's bias.
    """
    n_rep = check_positive_int(n_rep, "n_rep")
    rng = check_seed(seed)
    man = as_manifolds(X, labels)
    P, N = man.P, man.N
    kind, fixed = check_dichotomies(dichotomies, P)
    X0 = np.concatenate([np.asarray(man.get(i), dtype=np.float64) for i in range(P)])
    X0 -= X0.mean(axis=0)
    _normalise(X0)
    point_class = np.repeat(np.arange(P), man.sizes)
    entropy = rng.integers(0, 2**63 - 1, size=4, dtype=np.int64)
    seqs = np.random.SeedSequence([int(e) for e in entropy]).spawn(n_rep)
    trials = [_Trial(X0, point_class, P, s, kind, fixed, bool(bias)) for s in seqs]
    workers = n_workers(n_rep)
    # the first N_HINT_TRIALS trials search from scratch; the median of their critical n is the hint
    # of all others (a fixed number of trials, so that the counts of tests do not depend on the
    # thread count; the critical n themselves never depend on the hint)
    first, rest = trials[:N_HINT_TRIALS], trials[N_HINT_TRIALS:]
    if workers > 1:
        with blas_threads(1), ThreadPoolExecutor(max_workers=workers) as ex:
            c0 = list(ex.map(lambda t: t.critical_n(), first))
            hint = int(np.median(c0)) if c0 and max(c0) <= N else 0
            c1 = list(ex.map(lambda t: t.critical_n(hint), rest))
    else:
        c0 = [t.critical_n() for t in first]
        hint = int(np.median(c0)) if c0 and max(c0) <= N else 0
        c1 = [t.critical_n(hint) for t in rest]
    crit = np.array(c0 + c1, dtype=np.int64)
    for t in trials:
        t.Xp = None  # free the projections

    def p_of(n: int) -> float:
        return float(np.mean(crit <= n))

    notes: list[str] = []
    trace_n: list[int] = []
    trace_p: list[float] = []

    def f(n: int) -> float:
        p = p_of(n)
        trace_n.append(n)
        trace_p.append(p)
        return p - 0.5

    n_min, n_max = 2, N
    f_min, f_max = f(n_min), f(n_max)
    N_c = np.nan
    if p_of(n_max) == 0.0:
        notes.append(f"no dichotomy is separable even with all N = {N} features: N_c undefined")
    elif f_min * f_max > 0:
        where = "already at n = 2" if f_min > 0 else f"even at n = N = {N}"
        notes.append(f"p(n) - 1/2 does not change sign on [2, N]: p = {p_of(2):.3g} at n = 2, "
                     f"{p_of(N):.3g} at n = N ({where}); N_c undefined")
    else:
        n_cur = int((n_min + n_max) / 2 + 0.5)
        f_cur = f(n_cur)
        steps, dN = 0, n_max - n_min
        while abs(f_cur) > P_TOL and dN > 1 and steps < MAX_STEPS:
            steps += 1
            if f_min * f_cur < 0:
                n_max, f_max = n_cur, f_cur
            else:
                n_min, f_min = n_cur, f_cur
            n_cur = int((n_min + n_max) / 2 + 0.5)
            f_cur = f(n_cur)
            dN = n_max - n_min
        order = np.argsort(np.array(trace_n), kind="stable")
        ns = np.array(trace_n, dtype=float)[order]
        ps = np.array(trace_p)[order]
        below = np.flatnonzero(ps < 0.5)
        above = np.flatnonzero(ps >= 0.5)
        if below.size and above.size:
            i, j = below.max(), above.min()
            N_c = float(np.interp(0.5, [ps[i], ps[j]], [ns[i], ns[j]])) if ps[j] != ps[i] else float(ns[j])
        else:  # pragma: no cover - excluded by the sign checks above
            notes.append("no evaluated n on each side of p = 1/2")
    n_tests = sum(t.tests for t in trials)
    n_lp = sum(t.lp for t in trials)
    if n_lp:
        notes.append(f"{n_lp} of {n_tests} separability tests fell back to the HiGHS LP")
    return EmpiricalCapacityResult(
        capacity=float(P / N_c) if np.isfinite(N_c) else np.nan, N_c=N_c, P=P, N=N, n_rep=n_rep,
        n_trace=np.array(trace_n), p_trace=np.array(trace_p), critical_n=crit, n_tests=n_tests,
        n_lp_fallback=n_lp, notes=tuple(notes), dichotomies=kind, bias=bool(bias),
    )
