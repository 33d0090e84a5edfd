"""Alignment (Omega) and related gradient statistics (paper 000, section 3.2; spec alignment.md).

Omega of n vectors v_1..v_n:

    Omega = E_{i != j} <v_i, v_j> / (E ||v||)^2
          = n (||sum v||^2 - sum ||v||^2) / ((n - 1) (sum ||v||)^2)

Everything except the sign stiffness and the gradient confusion is a function of additive per-class
sums (n, sum v, sum ||v||, sum ||v||^2, sum v/||v||), so it is computed in one pass, O(n d), and can be
streamed and merged (:class:`AlignmentAccumulator`). Sign stiffness and confusion need every pair:
they are computed in Gram blocks whose memory is bounded by the block size, with float32 blocks
re-checked exactly in float64 wherever rounding could change a sign or the minimum.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ._kernels import alignment as _k
from ._validation import InputError, check_finite, check_labels, check_matrix, check_positive_int, check_seed

__all__ = [
    "AlignmentAccumulator",
    "AlignmentStats",
    "AlignmentResult",
    "DiversityResult",
    "CosineStiffnessResult",
    "PairwiseResult",
    "ConfusionResult",
    "MinibatchAlignment",
    "alignment",
    "gradient_diversity",
    "cosine_stiffness",
    "sign_stiffness",
    "gradient_confusion",
    "pairwise_stats",
    "minibatch_alignment",
    "omega_from_sums",
]


def omega_from_sums(n: float, sum_sq_of_sum: float, sum_norm: float, sum_sq_norm: float) -> float:
    """Omega from the additive sums; NaN when n < 2.

    When the mean norm is 0 (all vectors zero) the official code divides by 1 instead of
    (E||v||)^2; so does this function (the value is then 0).
    """
    if n < 2:
        return float("nan")
    mean_pair = (sum_sq_of_sum - sum_sq_norm) / (n * (n - 1.0))
    denom = (sum_norm / n) ** 2
    if denom == 0.0:
        denom = 1.0
    return float(mean_pair / denom)


def _mean_cos(sq_sum_unit: float, m: float) -> float:
    """Mean pairwise cosine of m unit vectors from ||sum u||^2."""
    if m < 2:
        return float("nan")
    return float((sq_sum_unit - m) / (m * (m - 1.0)))


@dataclass(frozen=True)
class AlignmentStats:
    """Everything the additive sums give. Per-class arrays follow ``classes``; NaN = skipped."""

    classes: np.ndarray
    counts: np.ndarray
    omega: float
    omega_per_class: np.ndarray
    omega_in_class: float
    diversity: float
    diversity_per_class: np.ndarray
    cosine_stiffness: float
    cosine_within: np.ndarray
    cosine_between: np.ndarray
    cosine_in_class: float
    n_zero: int
    skipped: tuple[tuple[int, str], ...] = field(default=())


@dataclass(frozen=True)
class AlignmentResult:
    """Omega overall, per class (NaN where skipped) and the in-class mean over defined classes."""

    omega: float
    omega_in_class: float
    classes: np.ndarray
    per_class: np.ndarray
    counts: np.ndarray
    skipped: tuple[tuple[int, str], ...] = field(default=())


@dataclass(frozen=True)
class DiversityResult:
    """Gradient diversity sum ||g||^2 / ||sum g||^2 (>= 1/n), overall and per class."""

    value: float
    classes: np.ndarray
    per_class: np.ndarray


@dataclass(frozen=True)
class CosineStiffnessResult:
    """Mean pairwise cosine: overall, within each class, between classes (K x K, diagonal = within)."""

    value: float
    in_class: float
    classes: np.ndarray
    within: np.ndarray
    between: np.ndarray
    n_zero: int


@dataclass(frozen=True)
class PairwiseResult:
    """All-pairs statistics from the blocked Gram pass."""

    sign_stiffness: float
    sign_in_class: float
    classes: np.ndarray
    sign_within: np.ndarray
    sign_between: np.ndarray
    min_inner: float
    min_inner_pair: tuple[int, int]
    min_cosine: float
    min_cosine_pair: tuple[int, int]
    n_rechecked: int


@dataclass(frozen=True)
class ConfusionResult:
    """Gradient confusion: minimum pairwise inner product and minimum pairwise cosine."""

    min_inner: float
    min_inner_pair: tuple[int, int]
    min_cosine: float
    min_cosine_pair: tuple[int, int]


class AlignmentAccumulator:
    """Mergeable streaming accumulator of the per-class sums behind Omega, diversity and cosine
    stiffness. ``update`` with batches, ``merge`` accumulators from other workers, ``compute`` at the
    end; the result equals the one-shot functions up to float64 rounding (sums are float64).
    """

    def __init__(self) -> None:
        self.d: int | None = None
        self._classes: list[int] = []
        self._index: dict[int, int] = {}
        self.counts = np.zeros(0, np.int64)
        self.nonzero = np.zeros(0, np.int64)
        self.norm_sum = np.zeros(0, np.float64)
        self.sq_sum = np.zeros(0, np.float64)
        self.S = np.zeros((0, 0), np.float64)
        self.U = np.zeros((0, 0), np.float64)

    def _ensure(self, classes: np.ndarray, d: int) -> np.ndarray:
        if self.d is None:
            self.d = d
            self.S = np.zeros((0, d))
            self.U = np.zeros((0, d))
        elif d != self.d:
            raise InputError(f"batch has {d} features but the accumulator holds {self.d}")
        new = [int(c) for c in classes if int(c) not in self._index]
        if new:
            for c in new:
                self._index[c] = len(self._classes)
                self._classes.append(c)
            k = len(new)
            self.counts = np.concatenate([self.counts, np.zeros(k, np.int64)])
            self.nonzero = np.concatenate([self.nonzero, np.zeros(k, np.int64)])
            self.norm_sum = np.concatenate([self.norm_sum, np.zeros(k)])
            self.sq_sum = np.concatenate([self.sq_sum, np.zeros(k)])
            self.S = np.vstack([self.S, np.zeros((k, d))])
            self.U = np.vstack([self.U, np.zeros((k, d))])
        return np.array([self._index[int(c)] for c in classes], dtype=np.int64)

    def update(self, V, labels=None) -> AlignmentAccumulator:
        """Add a batch (n, d) of vectors (float16/32/64; accumulated in float64)."""
        X = check_matrix(V, "V", flatten=True, finite=False)  # NaN/Inf found by the kernel's norms
        lab = np.zeros(X.shape[0], np.int64) if labels is None else check_labels(labels, X.shape[0], rows_name="V")
        classes, codes = np.unique(lab, return_inverse=True)
        codes = codes.reshape(-1).astype(np.int64)
        k, d = classes.size, X.shape[1]
        if self.d is not None and d != self.d:
            raise InputError(f"batch has {d} features but the accumulator holds {self.d}")
        S = np.zeros((k, d))
        U = np.zeros((k, d))
        sq = np.empty(X.shape[0])
        _k.class_sums(X, codes, k, _group(k, d), S, U, sq)
        if not np.all(np.isfinite(sq)):
            check_finite(X, "V")  # raises with the count and first position; nothing was added yet
        norms = np.sqrt(sq)
        nz = norms > 0
        idx = self._ensure(classes, d)
        self.S[idx] += S
        self.U[idx] += U
        self.counts[idx] += np.bincount(codes, minlength=k)
        self.nonzero[idx] += np.bincount(codes, weights=nz.astype(np.float64), minlength=k).astype(np.int64)
        self.norm_sum[idx] += np.bincount(codes, weights=norms, minlength=k)
        self.sq_sum[idx] += np.bincount(codes, weights=sq, minlength=k)
        return self

    def merge(self, other: AlignmentAccumulator) -> AlignmentAccumulator:
        """Add another accumulator's sums into this one (returns self)."""
        if not isinstance(other, AlignmentAccumulator):
            raise InputError(f"merge needs an AlignmentAccumulator, got {type(other).__name__}")
        if other.d is None:
            return self
        idx = self._ensure(np.array(other._classes, np.int64), other.d)
        np.add.at(self.counts, idx, other.counts)
        np.add.at(self.nonzero, idx, other.nonzero)
        np.add.at(self.norm_sum, idx, other.norm_sum)
        np.add.at(self.sq_sum, idx, other.sq_sum)
        self.S[idx] += other.S
        self.U[idx] += other.U
        return self

    def compute(self) -> AlignmentStats:
        """Omega, diversity and cosine stiffness overall and per class from the sums."""
        if self.d is None:
            raise InputError("the accumulator is empty: call update() with at least one batch first")
        order = np.argsort(np.array(self._classes, np.int64), kind="stable")
        classes = np.array(self._classes, np.int64)[order]
        counts = self.counts[order]
        nonzero = self.nonzero[order]
        norm_sum = self.norm_sum[order]
        sq_sum = self.sq_sum[order]
        S = self.S[order]
        U = self.U[order]
        K = len(classes)
        S_sq = np.einsum("ij,ij->i", S, S)
        G_U = U @ U.T
        omega_pc = np.array([omega_from_sums(counts[c], S_sq[c], norm_sum[c], sq_sum[c]) for c in range(K)])
        div_pc = np.array([_diversity(sq_sum[c], S_sq[c]) for c in range(K)])
        within = np.array([_mean_cos(G_U[c, c], nonzero[c]) for c in range(K)])
        between = np.full((K, K), np.nan)
        for a in range(K):
            for b in range(K):
                if a == b:
                    between[a, a] = within[a]
                elif nonzero[a] and nonzero[b]:
                    between[a, b] = G_U[a, b] / (nonzero[a] * nonzero[b])
        S_all = S.sum(axis=0)
        U_all = U.sum(axis=0)
        n = int(counts.sum())
        skipped = tuple(
            (int(classes[c]), f"{int(counts[c])} example(s); Omega needs at least 2")
            for c in range(K) if counts[c] < 2
        )
        defined = omega_pc[~np.isnan(omega_pc)]
        defined_cos = within[~np.isnan(within)]
        return AlignmentStats(
            classes=classes,
            counts=counts,
            omega=omega_from_sums(n, float(S_all @ S_all), float(norm_sum.sum()), float(sq_sum.sum())),
            omega_per_class=omega_pc,
            omega_in_class=float(defined.mean()) if defined.size else float("nan"),
            diversity=_diversity(float(sq_sum.sum()), float(S_all @ S_all)),
            diversity_per_class=div_pc,
            cosine_stiffness=_mean_cos(float(U_all @ U_all), int(nonzero.sum())),
            cosine_within=within,
            cosine_between=between,
            cosine_in_class=float(defined_cos.mean()) if defined_cos.size else float("nan"),
            n_zero=int(n - nonzero.sum()),
            skipped=skipped,
        )


def _group(K: int, d: int) -> int:
    """Chunks reduced in parallel per step: up to 8, fewer when the partial sums would be large
    (2 * group * K * d float64 at most ~256 MB). Depends only on the shape, not on the threads."""
    return int(max(1, min(8, (256 << 20) // max(1, 16 * K * d))))


def _diversity(sq_sum: float, sum_sq: float) -> float:
    if sum_sq > 0:
        return float(sq_sum / sum_sq)
    return float("inf") if sq_sum > 0 else float("nan")


def _stats(V, labels) -> AlignmentStats:
    return AlignmentAccumulator().update(V, labels).compute()


def alignment(V, labels=None) -> AlignmentResult:
    """Omega of the rows of V (n, d...), overall and, with labels, per class and in-class mean.

    Classes with fewer than 2 examples are reported in ``skipped`` with NaN in ``per_class``.
    """
    s = _stats(V, labels)
    return AlignmentResult(s.omega, s.omega_in_class, s.classes, s.omega_per_class, s.counts, s.skipped)


def gradient_diversity(G, labels=None) -> DiversityResult:
    """Gradient diversity (Yin et al. 2018): sum_i ||g_i||^2 / ||sum_i g_i||^2, overall and per class."""
    s = _stats(G, labels)
    return DiversityResult(s.diversity, s.classes, s.diversity_per_class)


def cosine_stiffness(G, labels=None) -> CosineStiffnessResult:
    """Cosine stiffness (Fort et al. 2019): mean cos(g_i, g_j) over pairs i != j, from sums of unit
    vectors. Zero vectors have no direction and are left out (counted in ``n_zero``)."""
    s = _stats(G, labels)
    return CosineStiffnessResult(
        s.cosine_stiffness, s.cosine_in_class, s.classes, s.cosine_within, s.cosine_between, s.n_zero
    )


_U32 = 2.0 ** -24


def pairwise_stats(G, labels=None, *, block_size: int = 2048) -> PairwiseResult:
    """Sign stiffness and gradient confusion over all pairs i < j in one blocked pass.

    Gram blocks are computed by BLAS in the input precision (float32 stays float32 for speed); every
    pair whose sign, or whose candidacy for the minimum, could change under the float32 rounding bound
    |error| <= gamma_{d+2} ||g_i|| ||g_j|| is recomputed exactly in float64. Memory: O(block_size^2).
    """
    X = check_matrix(G, "G", flatten=True)
    bs = check_positive_int(block_size, "block_size")
    n, d = X.shape
    lab = np.zeros(n, np.int64) if labels is None else check_labels(labels, n, rows_name="G")
    classes, codes = np.unique(lab, return_inverse=True)
    codes = codes.reshape(-1).astype(np.int64)
    # rows sorted by class so that every block's columns form class segments (one copy of X, O(n d))
    order = np.argsort(codes, kind="stable")
    if np.any(order != np.arange(n)):
        X = X[order]
        codes = codes[order]
    K = len(classes)
    sign_sum = np.zeros((K, K), np.int64)
    pair_count = np.zeros((K, K), np.int64)
    norms = np.sqrt(_k.row_sq_norms(X))
    with np.errstate(divide="ignore"):
        inv = np.where(norms > 0, 1.0 / norms, np.nan)
    gamma = 0.0
    if X.dtype == np.float32:
        m = (d + 2) * _U32
        gamma = m / (1.0 - m)
    gnorm = gamma * norms
    best = (np.inf, (-1, -1))
    best_cos = (np.inf, (-1, -1))
    n_rechecked = 0
    bufsize = min(bs, n) ** 2
    buf = [np.empty(bufsize, np.int64) for _ in range(4)]
    for i0 in range(0, n, bs):
        i1 = min(n, i0 + bs)
        Xi = X[i0:i1]
        for j0 in range(i0, n, bs):
            j1 = min(n, j0 + bs)
            Xj = X[j0:j1]
            B = Xi @ Xj.T
            diag = i0 == j0
            cj = codes[j0:j1]
            cuts = np.flatnonzero(np.diff(cj)) + 1
            seg_start = np.concatenate([[0], cuts]).astype(np.int64)
            seg_end = np.concatenate([cuts, [j1 - j0]]).astype(np.int64)
            thr, cos_thr = _sampled_min_bounds(B, norms[i0:i1], norms[j0:j1], inv[i0:i1], inv[j0:j1], gamma, diag)
            thr, cos_thr = min(thr, best[0]), min(cos_thr, best_cos[0])
            n_amb, n_cand = _k.pair_block(
                B, norms[i0:i1], inv[i0:i1], inv[j0:j1], gnorm[j0:j1], codes[i0:i1], seg_start, seg_end,
                cj[seg_start], gamma, diag, thr, cos_thr, sign_sum, pair_count, *buf,
            )
            if n_amb:
                I, J = buf[0][:n_amb].copy(), buf[1][:n_amb].copy()
                exact = _exact_dots(Xi, Xj, I, J)
                s = np.sign(exact).astype(np.int64)
                ci, cjj = codes[i0 + I], codes[j0 + J]
                np.add.at(sign_sum, (ci, cjj), s)
                np.add.at(pair_count, (ci, cjj), 1)
                off = ci != cjj
                np.add.at(sign_sum, (cjj[off], ci[off]), s[off])
                np.add.at(pair_count, (cjj[off], ci[off]), 1)
                n_rechecked += n_amb
            if n_cand:
                I, J = buf[2][:n_cand].copy(), buf[3][:n_cand].copy()
                exact = _exact_dots(Xi, Xj, I, J)
                n_rechecked += n_cand
                a = int(np.argmin(exact))
                if exact[a] < best[0]:
                    best = (float(exact[a]), _orig_pair(order, i0 + int(I[a]), j0 + int(J[a])))
                nn = norms[i0 + I] * norms[j0 + J]
                ok = nn > 0
                if np.any(ok):
                    cos = np.full(n_cand, np.inf)
                    cos[ok] = exact[ok] / nn[ok]
                    a = int(np.argmin(cos))
                    if cos[a] < best_cos[0]:
                        best_cos = (float(cos[a]), _orig_pair(order, i0 + int(I[a]), j0 + int(J[a])))
    total_pairs = pair_count[np.triu_indices(K)].sum()
    total_sign = sign_sum[np.triu_indices(K)].sum()
    within = np.array(
        [sign_sum[c, c] / pair_count[c, c] if pair_count[c, c] else np.nan for c in range(K)]
    )
    with np.errstate(invalid="ignore", divide="ignore"):
        between = np.where(pair_count > 0, sign_sum / np.maximum(pair_count, 1), np.nan)
    defined = within[~np.isnan(within)]
    nan = float("nan")
    return PairwiseResult(
        sign_stiffness=float(total_sign / total_pairs) if total_pairs else nan,
        sign_in_class=float(defined.mean()) if defined.size else nan,
        classes=classes,
        sign_within=within,
        sign_between=between,
        min_inner=best[0] if n >= 2 else nan,
        min_inner_pair=best[1],
        min_cosine=best_cos[0] if np.isfinite(best_cos[0]) else nan,
        min_cosine_pair=best_cos[1],
        n_rechecked=n_rechecked,
    )


def _sampled_min_bounds(B, ni, nj, inv_i, inv_j, gamma, diag, stride: int = 16) -> tuple[float, float]:
    """Upper bounds of a block's minimum inner product and minimum cosine from every ``stride``-th
    row: any pair's upper bound (B + gamma n_i n_j) bounds the minimum, so a sample is valid; its
    tightness only sets how many candidate pairs are recomputed exactly."""
    rows = np.arange(0, B.shape[0], stride)
    S = B[rows].astype(np.float64)
    if diag:
        S[np.arange(rows.size), rows] = np.inf  # the pair (i, i) is not a pair
        S[rows[:, None] > np.arange(B.shape[1])[None, :]] = np.inf  # only j > i
    up = S + gamma * np.outer(ni[rows], nj)
    thr = float(up.min()) if up.size else np.inf
    with np.errstate(invalid="ignore"):
        cos = up * inv_i[rows][:, None] * inv_j[None, :]
    cos_thr = float(np.nanmin(cos)) if np.isfinite(cos).any() else np.inf
    return thr, cos_thr


def _orig_pair(order, a: int, b: int) -> tuple[int, int]:
    i, j = int(order[a]), int(order[b])
    return (i, j) if i < j else (j, i)


def _exact_dots(Xi, Xj, I, J) -> np.ndarray:
    return _k.exact_dots(Xi, Xj, I, J)


def sign_stiffness(G, labels=None, *, block_size: int = 2048) -> PairwiseResult:
    """Sign stiffness: mean sign <g_i, g_j> over pairs i != j (overall, within and between classes).

    Computed over all pairs in blocks (see :func:`pairwise_stats`, whose full result is returned).
    """
    return pairwise_stats(G, labels, block_size=block_size)


def gradient_confusion(G, *, block_size: int = 2048) -> ConfusionResult:
    """Gradient confusion (Sankararaman et al. 2019): min_{i != j} <g_i, g_j>, and the minimum cosine."""
    r = pairwise_stats(G, None, block_size=block_size)
    return ConfusionResult(r.min_inner, r.min_inner_pair, r.min_cosine, r.min_cosine_pair)


@dataclass(frozen=True)
class MinibatchAlignment:
    """The official code's statistic: per-minibatch per-class Omega (NaN where a class has < 2
    examples in the batch), and its mean over batches per class. Not the whole-dataset Omega."""

    classes: np.ndarray
    per_batch: np.ndarray  # (n_batches, K)
    mean_per_class: np.ndarray


def minibatch_alignment(V, labels, *, batch_size: int = 256, seed=None) -> MinibatchAlignment:
    """Per-class Omega computed inside shuffled minibatches of ``batch_size`` (paper 000's logging)."""
    X = check_matrix(V, "V", flatten=True)
    lab = check_labels(labels, X.shape[0], rows_name="V")
    bs = check_positive_int(batch_size, "batch_size", minimum=2)
    rng = check_seed(seed)
    classes = np.unique(lab)
    order = rng.permutation(X.shape[0])
    rows = []
    for s in range(0, X.shape[0], bs):
        idx = np.sort(order[s:s + bs])
        st = _stats(X[idx], lab[idx])
        vals = np.full(classes.size, np.nan)
        vals[np.searchsorted(classes, st.classes)] = st.omega_per_class
        rows.append(vals)
    per_batch = np.array(rows)
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(per_batch, axis=0)
    return MinibatchAlignment(classes, per_batch, mean)
