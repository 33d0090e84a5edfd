"""MFTMA low-rank center model (spec section 2, step 6): cost, analytic gradient, Riemannian CG.

Y (P x n) holds the mean-subtracted class centers in an orthonormal basis of their span; C = Y Y^T.
For an orthonormal frame V (n x K) the residual Gram matrix is M = C - (YV)(YV)^T, d = diag(M), and

    cost(V) = 1/2 sum_{a,b} M_ab^2 / (d_a d_b)          (= P/2 + sum_{a<b} cos^2(r_a, r_b))

Euclidean gradient: with W_ab = M_ab / (d_a d_b), u_a = sum_b M_ab^2 / (d_a^2 d_b) and c = Y V,
    dcost/dV = -2 Y^T (W - diag(u)) c.
The cost depends on span(V) only (a Grassmann problem); the Riemannian gradient is (I - V V^T) dcost/dV.
Optimisers (fit_frame): the reference's Riemannian conjugate gradient as in pymanopt 0.2.5 (exact=True,
seed_mode="reference"), and a Riemannian L-BFGS (default) that reaches the same gradient tolerance with
about half the cost evaluations.

Kernels never raise and run unchanged with NUMBA_DISABLE_JIT=1.
"""
from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def _residual(C, c):
    """Full residual Gram matrix M = C - c c^T (used by residual_stats)."""
    P = C.shape[0]
    K = c.shape[1]
    M = np.empty((P, P))
    for a in range(P):
        for b in range(a, P):
            acc = C[a, b]
            for k in range(K):
                acc -= c[a, k] * c[b, k]
            M[a, b] = acc
            M[b, a] = acc
    return M


@njit(cache=True, nogil=True)
def _cost_grad(Y, YT, C, V, want_grad):
    """(cost, Euclidean gradient or zeros) at V; YT = Y^T (contiguous). No P x P temporary.

    Row by row with inner loops over all b (numba vectorises them; no scalar reduction chains): row a
    of M = C - c c^T, w_ab = M_ab / (d_a d_b), and per column u_b = sum_a w_ab M_ab (diagonal term
    included). By symmetry u_a is also row a's sum, cost = sum_a u_a / 2, and the gradient is
    -2 Y^T (W - diag(u)) c with (W c)^T accumulated per column. The cost is computed by the same
    operations whether or not the gradient is wanted (bit-identical values).
    cost = +inf (gradient zeros) when a residual row vanishes.
    """
    P, n = Y.shape
    K = V.shape[1]
    ct = np.ascontiguousarray(np.dot(Y, V).T)        # c^T, (K, P)
    inv_d = np.empty(P)
    for a in range(P):
        acc = C[a, a]
        for k in range(K):
            acc -= ct[k, a] * ct[k, a]
        if not acc > 0.0:
            return np.inf, np.zeros((n, K))
        inv_d[a] = 1.0 / acc
    u = np.zeros(P)
    mrow = np.empty(P)
    Wct = np.zeros((K, P))
    for a in range(P):
        ia = inv_d[a]
        Ca = C[a]
        for b in range(P):
            mrow[b] = Ca[b]
        for k in range(K):
            cak = ct[k, a]
            ck = ct[k]
            for b in range(P):
                mrow[b] -= cak * ck[b]
        for b in range(P):
            w = mrow[b] * inv_d[b] * ia
            u[b] += w * mrow[b]
            mrow[b] = w
        if want_grad:
            for k in range(K):
                cak = ct[k, a]
                Wk = Wct[k]
                for b in range(P):
                    Wk[b] += mrow[b] * cak
    f = 0.0
    for b in range(P):
        f += u[b]
    f *= 0.5
    if not want_grad:
        return f, np.zeros((n, K))
    for k in range(K):
        for b in range(P):
            Wct[k, b] -= u[b] * inv_d[b] * ct[k, b]
    return f, -2.0 * np.dot(YT, np.ascontiguousarray(Wct.T))


@njit(cache=True, nogil=True)
def center_cost(Y, C, V):
    """cost(V); returns +inf when a residual row vanishes (cosine undefined)."""
    return _cost_grad(Y, np.ascontiguousarray(Y.T), C, V, False)[0]


@njit(cache=True, nogil=True)
def center_cost_grad(Y, C, V):
    """(cost, Euclidean gradient) at V; cost = +inf (gradient zeros) when a residual row vanishes."""
    return _cost_grad(Y, np.ascontiguousarray(Y.T), C, V, True)


@njit(cache=True, nogil=True)
def _qr_retract(A):
    """Orthonormal factor of A by twice-iterated modified Gram-Schmidt (= thin QR with a positive
    R diagonal): the retraction of the CG steps."""
    n, K = A.shape
    Q = A.copy()
    for k in range(K):
        for _ in range(2):
            for j in range(k):
                dot = 0.0
                for i in range(n):
                    dot += Q[i, j] * Q[i, k]
                for i in range(n):
                    Q[i, k] -= dot * Q[i, j]
        nrm = 0.0
        for i in range(n):
            nrm += Q[i, k] * Q[i, k]
        nrm = np.sqrt(nrm)
        if nrm > 0.0:
            for i in range(n):
                Q[i, k] /= nrm
    return Q


@njit(cache=True, nogil=True)
def _proj(V, X):
    """Projection of X onto the horizontal space at V: (I - V V^T) X."""
    return X - np.dot(V, np.dot(V.T, X))


@njit(cache=True, nogil=True)
def _proj_stiefel(V, U):
    """pymanopt 0.2.5's Stiefel projection (also its vector transport): U - V sym(V^T U),
    sym(A) = (A + A^T) / 2. For K = 1 it equals (I - V V^T) U; for K >= 2 it keeps the symmetric
    part's complement of V^T U inside span(V) (the two differ when V^T U is not symmetric, as for a
    direction transported from another point)."""
    A = np.dot(V.T, U)
    return U - np.dot(V, 0.5 * (A + A.T))


@njit(cache=True, nogil=True)
def _qr_retract_lapack(A):
    """pymanopt 0.2.5's Stiefel retraction: Q of numpy's (LAPACK Householder) thin QR of A with the
    columns whose R diagonal is negative flipped (sign(sign(r_kk) + 0.5): a zero diagonal keeps +)."""
    Qf, R = np.linalg.qr(A)
    Q = np.ascontiguousarray(Qf)
    for k in range(Q.shape[1]):
        if R[k, k] < 0.0:
            for i in range(Q.shape[0]):
                Q[i, k] = -Q[i, k]
    return Q


@njit(cache=True, nogil=True)
def _start(Y, C, V0):
    """Optimiser start: (V = a copy of V0, Y^T contiguous, cost at V0, Riemannian gradient at V0)."""
    V = V0.copy()
    YT = np.ascontiguousarray(Y.T)
    f, eg = _cost_grad(Y, YT, C, V, True)
    return V, YT, f, _proj(V, eg)


@njit(cache=True, nogil=True)
def fit_frame_pymanopt(Y, C, V0, max_iter, gtol, min_step):
    """pymanopt 0.2.5's ConjugateGradient().solve on Stiefel(n, K) from V0, to the letter (the
    reference's optimiser, seed_mode="reference"); returns (V, cost, iterations, final gradient norm).

    Riemannian gradient and vector transport: _proj_stiefel (U - V sym(V^T U)); retraction:
    _qr_retract_lapack; Hestenes-Stiefel beta = max(0, <g+, g+ - T(g)> / <g+ - T(g), T(d)>)
    (0 when the denominator is 0), steepest descent when d is not a descent direction; the adaptive
    line search (first trial 1 / ||d||, then the previous step, doubled unless one contraction was
    needed; sufficient decrease 0.5, contraction 0.5, at most 10 contractions; a failed search
    keeps the point with step 0). Stopping is tested before each iteration in pymanopt's order:
    iterations + 1 >= max_iter, gradient norm < gtol, last step length < min_step.
    """
    V = V0.copy()
    YT = np.ascontiguousarray(Y.T)
    f, eg = _cost_grad(Y, YT, C, V, True)
    if not np.isfinite(f):
        return V, f, 0, np.inf
    g = _proj_stiefel(V, eg)
    gg = np.sum(g * g)
    gn = np.sqrt(gg)
    d = -g
    old_alpha = -1.0
    step = np.nan
    it = 0
    while True:
        if it + 1 >= max_iter or gn < gtol or step < min_step:
            break
        df0 = np.sum(g * d)
        if df0 >= 0.0:
            d = -g
            df0 = -gg
        dn = np.sqrt(np.sum(d * d))
        alpha = old_alpha if old_alpha >= 0.0 else 1.0 / dn
        Vn = _qr_retract_lapack(V + alpha * d)
        fn, egn = _cost_grad(Y, YT, C, Vn, True)
        evals = 1
        while fn > f + 0.5 * alpha * df0 and evals <= 10:
            alpha *= 0.5
            Vn = _qr_retract_lapack(V + alpha * d)
            fn, egn = _cost_grad(Y, YT, C, Vn, True)
            evals += 1
        if fn > f:
            alpha = 0.0
            Vn = V
            fn = f
            egn = eg
        step = alpha * dn
        old_alpha = alpha if evals == 2 else 2.0 * alpha
        gnew = _proj_stiefel(Vn, egn)
        ggn = np.sum(gnew * gnew)
        gt = _proj_stiefel(Vn, g)        # transported old gradient
        dt = _proj_stiefel(Vn, d)        # transported old direction
        diff = gnew - gt
        den = np.sum(diff * dt)
        num = np.sum(gnew * diff)
        beta = 0.0
        if den != 0.0:
            beta = num / den
            if not beta > 0.0:
                beta = 0.0
        elif num > 0.0:
            beta = np.inf        # numpy's x / 0.0 (pymanopt catches only ZeroDivisionError)
        d = -gnew + beta * dt
        V = Vn
        f = fn
        eg = egn
        g = gnew
        gg = ggn
        gn = np.sqrt(ggn)
        it += 1
    return V, f, it, gn


@njit(cache=True, nogil=True)
def fit_frame_cg(Y, C, V0, max_iter, gtol, min_step, exact=False):
    """Riemannian CG from V0; returns (V, cost, iterations, final gradient norm).

    The reference's optimiser (pymanopt 0.2.5 ConjugateGradient defaults) re-implemented:
    Hestenes-Stiefel beta clipped at 0 with a steepest-descent restart when d is not a descent
    direction, projection transport, QR retraction, and pymanopt's adaptive back-tracking line search
    (first trial step of length 1, sufficient decrease 0.5, contraction 0.5, at most 10 trials; the
    next trial doubles the accepted step unless it needed one contraction). Where pymanopt stops on a
    failed line search, we first retry once along -g (fresh step, up to 60 contractions): this
    makes the fit converge on small problems. Stops when the gradient norm is <= gtol, the step
    length is < min_step, a retried line search fails, or after max_iter iterations.

    exact=True: fit_frame_pymanopt (pymanopt 0.2.5 to the letter, seed_mode="reference").
    """
    if exact:
        return fit_frame_pymanopt(Y, C, V0, max_iter, gtol, min_step)
    V, YT, f, g = _start(Y, C, V0)
    if not np.isfinite(f):
        return V, f, 0, np.inf
    gg = np.sum(g * g)
    d = -g
    old_alpha = -1.0
    max_trials = 10
    it = 0
    last_it = max_iter - 1 if exact else max_iter
    while it < last_it and np.sqrt(gg) > gtol:
        it += 1
        df0 = np.sum(g * d)
        if df0 >= 0.0:
            d = -g
            df0 = -gg
        dn = np.sqrt(np.sum(d * d))
        alpha = old_alpha if old_alpha > 0.0 else 1.0 / dn
        # every trial also yields its gradient (the cost is bit-identical with or without it), so
        # the accepted point's gradient is not recomputed
        Vn = _qr_retract(V + alpha * d)
        fn, egn = _cost_grad(Y, YT, C, Vn, True)
        evals = 1
        while fn > f + 0.5 * alpha * df0 and evals <= max_trials:
            alpha *= 0.5
            Vn = _qr_retract(V + alpha * d)
            fn, egn = _cost_grad(Y, YT, C, Vn, True)
            evals += 1
        if fn > f:
            # line search failed: pymanopt stops here; we restart once along -g with a fresh step
            # and more contractions, and stop only if that fails too
            if exact or max_trials > 10:
                break
            d = -g
            old_alpha = -1.0
            max_trials = 60
            continue
        max_trials = 10
        step = alpha * dn
        old_alpha = alpha if evals == 2 else 2.0 * alpha
        if step < min_step and not exact:
            break
        gn = _proj(Vn, egn)
        ggn = np.sum(gn * gn)
        gt = _proj(Vn, g)          # transported old gradient
        dt = _proj(Vn, d)          # transported old direction
        diff = gn - gt
        den = np.sum(dt * diff)
        beta = 0.0
        if den != 0.0:
            beta = np.sum(gn * diff) / den
            if beta < 0.0:
                beta = 0.0
        d = -gn + beta * dt
        V = Vn
        f = fn
        g = gn
        gg = ggn
        if step < min_step:   # exact: pymanopt takes the short step, then stops
            break
    return V, f, it, np.sqrt(gg)


@njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _dot(A, B):
    """Frobenius inner product of two arrays of one shape (no temporary)."""
    a = A.ravel()
    b = B.ravel()
    s = 0.0
    for i in range(a.size):
        s += a[i] * b[i]
    return s


@njit(cache=True, nogil=True)
def _axpy(alpha, X, Y):
    """Y += alpha X, in place."""
    x = X.ravel()
    y = Y.ravel()
    for i in range(x.size):
        y[i] += alpha * x[i]


@njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _proj_small(V, X):
    """(I - V V^T) X by plain loops (the L-BFGS's projection: no BLAS call, whose overhead exceeds
    the arithmetic of these n x K products; the CG keeps _proj's rounding)."""
    n, K = V.shape
    L = X.shape[1]
    VtX = np.zeros((K, L))
    for i in range(n):
        for k in range(K):
            v = V[i, k]
            for l in range(L):
                VtX[k, l] += v * X[i, l]
    out = X.copy()
    for i in range(n):
        for k in range(K):
            v = V[i, k]
            for l in range(L):
                out[i, l] -= v * VtX[k, l]
    return out


#: L-BFGS memory (pairs) and Armijo sufficient-decrease constant of fit_frame_lbfgs
LBFGS_MEMORY = 8
LBFGS_ARMIJO = 1e-4


@njit(cache=True, nogil=True)
def fit_frame_lbfgs(Y, C, V0, max_iter, gtol, min_step):
    """Riemannian L-BFGS from V0 on the Grassmann manifold; returns (V, cost, iterations, gradient norm).

    Two-loop recursion over the last LBFGS_MEMORY pairs (s, y) taken in the embedding space (s = the
    step, y = new Riemannian gradient - old one, no vector transport; a pair is kept only when
    <s, y> > 0), initial scaling <s, y> / <y, y>, direction projected onto the tangent space (steepest
    descent when it is not a descent direction, memory cleared); unit first trial step, halved until
    the Armijo condition holds (at most 40 halvings; when that fails along a quasi-Newton direction
    the memory is cleared and the iteration retried along -g); QR retraction. Stops when the
    Riemannian gradient norm is <= gtol, the step is shorter than min_step, a steepest-descent line
    search fails, or after max_iter iterations. Same stopping tolerance as the CG, about 0.5x its cost evaluations.
    """
    n, K = V0.shape
    mem = LBFGS_MEMORY
    V, YT, f, g = _start(Y, C, V0)
    if not np.isfinite(f):
        return V, f, 0, np.inf
    gg = _dot(g, g)
    S = np.zeros((mem, n, K))
    Yv = np.zeros((mem, n, K))
    rho = np.zeros(mem)
    a = np.zeros(mem)
    q = np.empty((n, K))
    cnt = 0
    head = 0
    gamma = -1.0
    restarted = False
    it = 0
    while it < max_iter and np.sqrt(gg) > gtol:
        it += 1
        q[:] = g
        for j in range(cnt):
            i = (head - 1 - j) % mem
            a[i] = rho[i] * _dot(S[i], q)
            _axpy(-a[i], Yv[i], q)
        q *= gamma if gamma > 0.0 else 1.0 / np.sqrt(gg)
        for j in range(cnt - 1, -1, -1):
            i = (head - 1 - j) % mem
            _axpy(a[i] - rho[i] * _dot(Yv[i], q), S[i], q)
        d = _proj_small(V, q)
        d *= -1.0
        df0 = _dot(g, d)
        if not df0 < 0.0:
            d = g * (-1.0 / np.sqrt(gg))
            df0 = -np.sqrt(gg)
            cnt = 0
        alpha = 1.0
        Vn = _qr_retract(V + d)
        fn, egn = _cost_grad(Y, YT, C, Vn, True)
        halvings = 0
        while not fn <= f + LBFGS_ARMIJO * alpha * df0 and halvings < 40:
            alpha *= 0.5
            Vn = _qr_retract(V + alpha * d)
            fn, egn = _cost_grad(Y, YT, C, Vn, True)
            halvings += 1
        if not fn <= f + LBFGS_ARMIJO * alpha * df0:
            if cnt == 0:
                break
            # the quasi-Newton direction failed: forget the memory and retry along -g once
            cnt = 0
            gamma = -1.0
            continue
        step = alpha * np.sqrt(_dot(d, d))
        gn = _proj_small(Vn, egn)
        s_new = d.copy()
        s_new *= alpha
        y_new = gn - g
        sy = _dot(s_new, y_new)
        yy = _dot(y_new, y_new)
        if sy > 1e-12 * np.sqrt(_dot(s_new, s_new) * yy):
            S[head] = s_new
            Yv[head] = y_new
            rho[head] = 1.0 / sy
            head = (head + 1) % mem
            cnt = min(cnt + 1, mem)
            gamma = sy / yy
        V = Vn
        f = fn
        g = gn
        gg = _dot(g, g)
        if step < min_step:
            if cnt == 0 or restarted:
                break
            # a vanishing quasi-Newton step (badly scaled memory): forget it and go on
            cnt = 0
            gamma = -1.0
            restarted = True
        else:
            restarted = False
    return V, f, it, np.sqrt(gg)


@njit(cache=True, nogil=True)
def fit_frame(Y, C, V0, max_iter, gtol, min_step, exact=False):
    """Fit the frame from V0: (V, cost, iterations, final gradient norm).

    exact=True: pymanopt 0.2.5's conjugate gradient to the letter (fit_frame_pymanopt), for
    seed_mode="reference". exact=False: Riemannian L-BFGS (fit_frame_lbfgs)."""
    if exact:
        return fit_frame_pymanopt(Y, C, V0, max_iter, gtol, min_step)
    return fit_frame_lbfgs(Y, C, V0, max_iter, gtol, min_step)



@njit(cache=True, nogil=True)
def residual_stats(Y, C, V):
    """(res_coeff, stability, mean norm ratio) of the residual rows of Y after removing span(V).

    res_coeff = mean |off-diagonal cosine|; stability = min_a ||r_a|| / ||Y_a||. res_coeff is NaN
    when a residual row vanishes.
    """
    c = np.dot(Y, V)
    M = _residual(C, c)
    P = C.shape[0]
    stab = np.inf
    ratio = 0.0
    bad = False
    for a in range(P):
        r = np.sqrt(max(M[a, a], 0.0) / C[a, a])
        ratio += r
        if r < stab:
            stab = r
        if not M[a, a] > 0.0:
            bad = True
    if bad:
        return np.nan, stab, ratio / P
    s = 0.0
    for a in range(P):
        for b in range(P):
            if a != b:
                s += abs(M[a, b]) / np.sqrt(M[a, a] * M[b, b])
    return s / (P * (P - 1)), stab, ratio / P


def fit_and_score(Y, C, V0, max_iter, gtol, min_step, exact=False):
    """fit_frame then residual_stats: (V, cost, iterations, res_coeff, stability); exact as in fit_frame.
    Both kernels release the GIL.

    Plain Python on purpose (compile time, docs/performance.md "First call in a fresh process"): a
    compiled caller would compile both optimisers (the pymanopt one serves seed_mode="reference"
    only), and LLVM re-optimises a callee's body inside each compiled caller, so a compiled wrapper
    alone cost ~5 s of compilation for two calls that Python makes in microseconds."""
    fit = fit_frame_pymanopt if exact else fit_frame_lbfgs
    V, f, it, gn = fit(Y, C, V0, max_iter, gtol, min_step)
    rc, stab, ratio = residual_stats(Y, C, V)
    return V, f, it, rc, stab
