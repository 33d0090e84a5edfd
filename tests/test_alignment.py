"""Alignment measures: O(n) formulas vs brute-force pairwise oracles, kernels vs numpy twins,
streaming == one-shot, invariances, edge cases of the official code, messages."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from geomprobe import (
    AlignmentAccumulator,
    InputError,
    alignment,
    cosine_stiffness,
    gradient_confusion,
    gradient_diversity,
    minibatch_alignment,
    pairwise_stats,
    sign_stiffness,
)
from geomprobe._kernels import alignment as K


# ---- plain-numpy oracles (O(n^2), straight from the definitions) ------------------------------
def omega_bruteforce(V):
    V = np.asarray(V, np.float64)
    n = len(V)
    G = V @ V.T
    mean_pair = (G.sum() - np.trace(G)) / (n * (n - 1))
    mean_norm = np.linalg.norm(V, axis=1).mean()
    return mean_pair / (mean_norm**2 if mean_norm > 0 else 1.0)


def pairs(n):
    return np.triu_indices(n, 1)


def cos_matrix(V):
    V = np.asarray(V, np.float64)
    nr = np.linalg.norm(V, axis=1)
    return (V @ V.T) / np.outer(nr, nr)


def data(draw_seed, n, d, k):
    r = np.random.default_rng(draw_seed)
    V = r.standard_normal((n, d)) + r.standard_normal(d)  # a shared direction: Omega > 0
    y = r.integers(0, k, n)
    return V, y


# ---- kernels vs numpy twins -----------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kernels_match_numpy_twins(rng, dtype):
    X = rng.standard_normal((37, 130)).astype(dtype)
    codes = rng.integers(0, 4, 37)
    sq = K.row_sq_norms(X)
    np.testing.assert_allclose(sq, (X.astype(np.float64) ** 2).sum(1), rtol=1e-13)
    inv = 1 / np.sqrt(sq)
    S = np.zeros((4, 130))
    U = np.zeros((4, 130))
    sq2 = np.empty(37)
    K.class_sums(X, codes, 4, 2, S, U, sq2)
    np.testing.assert_allclose(sq2, sq, rtol=1e-13)
    X64 = X.astype(np.float64)
    for c in range(4):
        np.testing.assert_allclose(S[c], X64[codes == c].sum(0), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(U[c], (X64[codes == c] * inv[codes == c, None]).sum(0), rtol=1e-12, atol=1e-12)


def test_pair_block_kernel_matches_numpy_twin(rng):
    X = rng.standard_normal((20, 8))
    B = X @ X.T
    codes = np.sort(rng.integers(0, 3, 20))  # the kernel takes columns sorted by class
    norms = np.linalg.norm(X, axis=1)
    cuts = np.flatnonzero(np.diff(codes)) + 1
    seg_start = np.concatenate([[0], cuts]).astype(np.int64)
    seg_end = np.concatenate([cuts, [20]]).astype(np.int64)
    ss = np.zeros((3, 3), np.int64)
    pc = np.zeros((3, 3), np.int64)
    bi = np.empty(400, np.int64)
    bj = np.empty(400, np.int64)
    ci_ = np.empty(400, np.int64)
    cj_ = np.empty(400, np.int64)
    i, j = pairs(20)
    thr = np.sort(B[i, j])[3]  # the 4 smallest inner products are candidates
    n_amb, n_cand = K.pair_block(B, norms, 1 / norms, 1 / norms, 0.0 * norms, codes, seg_start, seg_end,
                                 codes[seg_start], 0.0, True, thr, -np.inf, ss, pc, bi, bj, ci_, cj_)
    assert n_amb == 0 and n_cand == 4
    assert sorted(B[ci_[:4], cj_[:4]]) == sorted(np.sort(B[i, j])[:4])
    ref = np.zeros((3, 3))
    cnt = np.zeros((3, 3))
    for a, b in zip(i, j):
        for p, q in {(codes[a], codes[b]), (codes[b], codes[a])}:
            ref[p, q] += np.sign(B[a, b])
            cnt[p, q] += 1
    np.testing.assert_array_equal(ss, ref)
    np.testing.assert_array_equal(pc, cnt)
    # with a rounding bound, pairs whose sign it could flip are handed back instead of counted
    gamma = 0.5
    ss[:] = 0
    pc[:] = 0
    n_amb, _ = K.pair_block(B, norms, 1 / norms, 1 / norms, gamma * norms, codes, seg_start, seg_end,
                            codes[seg_start], gamma, True, -np.inf, -np.inf, ss, pc, bi, bj, ci_, cj_)
    amb = np.abs(B[i, j]) <= gamma * norms[i] * norms[j]
    assert n_amb == amb.sum() and pc.sum() + pc.trace() == 2 * (len(i) - n_amb)


def test_class_sums_do_not_depend_on_the_thread_count():
    import subprocess
    import sys

    code = (
        "import numpy as np, numba; from geomprobe import AlignmentAccumulator as A; "
        "r=np.random.default_rng(1); X=r.standard_normal((5000,33)).astype(np.float32); y=r.integers(0,3,5000); "
        "s=A().update(X,y); print(repr(s.S.sum()), repr(s.U.sum()), repr(s.sq_sum.sum()))"
    )
    outs = set()
    for threads in ("1", "2"):
        env = dict(__import__("os").environ, NUMBA_NUM_THREADS=threads)
        outs.add(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                                check=True).stdout)
    assert len(outs) == 1


def test_exact_dots_kernel_matches_numpy_twin(rng):
    Xi = rng.standard_normal((30, 70)).astype(np.float32)
    Xj = rng.standard_normal((20, 70)).astype(np.float32)
    I = rng.integers(0, 30, 50)
    J = rng.integers(0, 20, 50)
    twin = np.einsum("ij,ij->i", Xi[I].astype(np.float64), Xj[J].astype(np.float64))
    np.testing.assert_allclose(K.exact_dots(Xi, Xj, I, J), twin, rtol=1e-13, atol=1e-12)


def test_kernels_run_without_jit():
    import subprocess
    import sys

    code = (
        "import numpy as np; from geomprobe import alignment, pairwise_stats; "
        "X=np.random.default_rng(0).standard_normal((30,5)); y=np.arange(30)%3; "
        "print(round(alignment(X,y).omega,12), pairwise_stats(X,y,block_size=7).sign_stiffness)"
    )
    env = dict(__import__("os").environ, NUMBA_DISABLE_JIT="1")
    a = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    b = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert a == b and a.strip()


# ---- O(n) formula vs the O(n^2) oracle ----------------------------------------------------------
@settings(deadline=None, max_examples=40)
@given(seed=st.integers(0, 2**31), n=st.integers(2, 40), d=st.integers(1, 20), k=st.integers(1, 4))
def test_omega_matches_bruteforce_overall_and_per_class(seed, n, d, k):
    V, y = data(seed, n, d, k)
    r = alignment(V, y)
    assert r.omega == pytest.approx(omega_bruteforce(V), rel=1e-9, abs=1e-12)
    for c, val, cnt in zip(r.classes, r.per_class, r.counts):
        if cnt < 2:
            assert np.isnan(val) and any(s[0] == c for s in r.skipped)
        else:
            assert val == pytest.approx(omega_bruteforce(V[y == c]), rel=1e-9, abs=1e-12)
    defined = r.per_class[~np.isnan(r.per_class)]
    if defined.size:
        assert r.omega_in_class == pytest.approx(defined.mean())


@settings(deadline=None, max_examples=30)
@given(seed=st.integers(0, 2**31), n=st.integers(2, 30), d=st.integers(1, 10), k=st.integers(1, 3))
def test_diversity_and_cosine_stiffness_match_definitions(seed, n, d, k):
    V, y = data(seed, n, d, k)
    div = gradient_diversity(V, y)
    assert div.value == pytest.approx((V**2).sum() / (V.sum(0) ** 2).sum(), rel=1e-9)
    assert div.value >= 1.0 / n - 1e-12
    cs = cosine_stiffness(V, y)
    C = cos_matrix(V)
    i, j = pairs(n)
    assert cs.value == pytest.approx(C[i, j].mean(), rel=1e-9, abs=1e-12)
    for a, ca in enumerate(cs.classes):
        for b, cb in enumerate(cs.classes):
            ia, ib = np.flatnonzero(y == ca), np.flatnonzero(y == cb)
            block = C[np.ix_(ia, ib)]
            if a == b:
                expect = (block.sum() - np.trace(block)) / (len(ia) * (len(ia) - 1)) if len(ia) > 1 else np.nan
            else:
                expect = block.mean()
            if np.isnan(expect):
                assert np.isnan(cs.between[a, b])
            else:
                assert cs.between[a, b] == pytest.approx(expect, rel=1e-9, abs=1e-12)


@settings(deadline=None, max_examples=30)
@given(seed=st.integers(0, 2**31), n=st.integers(2, 45), d=st.integers(1, 12), k=st.integers(1, 3),
       bs=st.integers(1, 17), f32=st.booleans())
def test_pairwise_measures_match_bruteforce_any_block_size(seed, n, d, k, bs, f32):
    V, y = data(seed, n, d, k)
    if f32:
        V = V.astype(np.float32)
    p = pairwise_stats(V, y, block_size=bs)
    V64 = V.astype(np.float64)
    G = V64 @ V64.T
    i, j = pairs(n)
    assert p.sign_stiffness == pytest.approx(np.sign(G[i, j]).mean(), abs=1e-12)
    assert p.min_inner == pytest.approx(G[i, j].min(), rel=1e-12, abs=1e-12)
    assert p.min_cosine == pytest.approx(cos_matrix(V64)[i, j].min(), rel=1e-12, abs=1e-12)
    a, b = p.min_inner_pair
    assert G[a, b] == pytest.approx(p.min_inner, rel=1e-12, abs=1e-12)
    for c_idx, c in enumerate(p.classes):
        idx = np.flatnonzero(y == c)
        if len(idx) > 1:
            sub = np.sign(G[np.ix_(idx, idx)])
            assert p.sign_within[c_idx] == pytest.approx((sub.sum() - np.trace(sub)) / (len(idx) * (len(idx) - 1)))


def test_float32_signs_are_exact_near_orthogonal_pairs(rng):
    """Pairs whose float32 inner product has the wrong sign are re-checked in float64."""
    d = 512
    base = rng.standard_normal((64, d)).astype(np.float32)
    V = base.copy()
    for r in range(1, 64):  # make row r almost orthogonal to row 0 (|cos| ~ 1e-8)
        v = V[r].astype(np.float64)
        u = V[0].astype(np.float64)
        V[r] = (v - (v @ u) / (u @ u) * u).astype(np.float32)
    p = pairwise_stats(V, block_size=16)
    G = V.astype(np.float64) @ V.astype(np.float64).T
    i, j = pairs(64)
    assert p.sign_stiffness == np.sign(G[i, j]).mean()
    assert p.n_rechecked > 0


def test_sign_stiffness_and_confusion_wrappers(rng):
    V = rng.standard_normal((12, 3))
    y = np.arange(12) % 2
    assert sign_stiffness(V, y).sign_stiffness == pairwise_stats(V, y).sign_stiffness
    c = gradient_confusion(V)
    G = V @ V.T
    assert c.min_inner == pytest.approx(G[pairs(12)].min())


# ---- streaming --------------------------------------------------------------------------------
@settings(deadline=None, max_examples=30)
@given(seed=st.integers(0, 2**31), n=st.integers(2, 60), cuts=st.lists(st.integers(0, 60), max_size=5),
       reverse=st.booleans())
def test_streaming_equals_one_shot_any_split_and_merge_order(seed, n, cuts, reverse):
    V, y = data(seed, n, 6, 3)
    bounds = sorted({0, n, *[c % (n + 1) for c in cuts]})
    parts = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b > a:
            parts.append(AlignmentAccumulator().update(V[a:b], y[a:b]))
    if reverse:
        parts = parts[::-1]
    acc = parts[0]
    for p in parts[1:]:
        acc.merge(p)
    s = acc.compute()
    one = AlignmentAccumulator().update(V, y).compute()
    np.testing.assert_array_equal(s.classes, one.classes)
    np.testing.assert_array_equal(s.counts, one.counts)
    for a, b in [(s.omega, one.omega), (s.diversity, one.diversity), (s.cosine_stiffness, one.cosine_stiffness)]:
        assert a == pytest.approx(b, rel=1e-12, abs=1e-14) or (np.isnan(a) and np.isnan(b))
    np.testing.assert_allclose(s.omega_per_class, one.omega_per_class, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(s.cosine_between, one.cosine_between, rtol=1e-12, atol=1e-14)


def test_streaming_with_a_single_batch_is_bit_identical(rng):
    V = rng.standard_normal((50, 7))
    y = rng.integers(0, 3, 50)
    assert AlignmentAccumulator().update(V, y).compute().omega == alignment(V, y).omega


# ---- invariances and bounds -----------------------------------------------------------------------
@settings(deadline=None, max_examples=30)
@given(seed=st.integers(0, 2**31), n=st.integers(3, 40), scale=st.floats(1e-3, 1e3))
def test_invariant_to_permutations_relabelling_and_positive_scale(seed, n, scale):
    V, y = data(seed, n, 5, 3)
    r = alignment(V, y)
    perm = np.random.default_rng(seed).permutation(n)
    relabel = np.array([7, -2, 40])
    r2 = alignment(V[perm] * scale, relabel[y[perm]])
    assert r2.omega == pytest.approx(r.omega, rel=1e-9, abs=1e-12)
    assert r2.omega_in_class == pytest.approx(r.omega_in_class, rel=1e-9, abs=1e-12) or np.isnan(r.omega_in_class)
    assert r.omega <= 1 + 1e-12


def test_identical_vectors_give_one_and_opposite_pairs_negative():
    v = np.array([[1.0, 2.0, 3.0]] * 5)
    assert alignment(v).omega == pytest.approx(1.0)
    assert alignment(np.array([[1.0, 0.0], [-1.0, 0.0]])).omega == pytest.approx(-1.0)


def test_zero_mean_norm_divides_by_one_like_the_official_code():
    r = alignment(np.zeros((4, 3)), np.array([0, 0, 1, 1]))
    assert r.omega == 0.0 and np.all(r.per_class == 0.0)


def test_class_with_one_example_is_skipped_not_zero():
    V = np.arange(12, dtype=float).reshape(4, 3)
    r = alignment(V, np.array([0, 0, 0, 5]))
    assert np.isnan(r.per_class[1])
    assert r.skipped == ((5, "1 example(s); Omega needs at least 2"),)
    assert r.omega_in_class == pytest.approx(r.per_class[0])


def test_float16_and_float32_are_accumulated_in_float64(rng):
    V = (rng.standard_normal((2000, 64)) * 30 + 100).astype(np.float16)
    y = rng.integers(0, 4, 2000)
    ref = alignment(V.astype(np.float64), y)
    assert alignment(V, y).omega == pytest.approx(ref.omega, rel=1e-12)
    assert alignment(V.astype(np.float32), y).omega == pytest.approx(ref.omega, rel=1e-12)


def test_minibatch_statistic_is_per_batch(rng):
    V = rng.standard_normal((100, 4)) + 1
    y = np.arange(100) % 3
    mb = minibatch_alignment(V, y, batch_size=25, seed=0)
    assert mb.per_batch.shape == (4, 3)
    assert np.array_equal(mb.per_batch, minibatch_alignment(V, y, batch_size=25, seed=0).per_batch)
    order = np.random.default_rng(0).permutation(100)
    first = np.sort(order[:25])
    expect = alignment(V[first], y[first]).per_class
    np.testing.assert_allclose(mb.per_batch[0], expect)


# ---- messages ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: alignment(np.ones(5)), r"V must be at least 2-D .* got shape \(5,\)"),
        (lambda: alignment(np.ones((5, 2)), np.arange(4)), "labels has 4 entries but V has 5 rows"),
        (lambda: alignment(np.ones((2, 2)), np.array([0.5, 1])), "labels must be integers, got 0.5 at index 0"),
        (lambda: alignment(np.array([[1.0, np.nan]])), r"V contains 1 non-finite value\(s\).*row 0, column 1"),
        (lambda: alignment(np.ones((3, 0))), "V must have at least 1 feature"),
        (lambda: alignment(np.array([["a"]])), "V must be a numeric array, got dtype <U1"),
        (lambda: pairwise_stats(np.ones((3, 2)), block_size=0), "block_size must be an integer >= 1, got 0"),
        (lambda: AlignmentAccumulator().update(np.ones((2, 3))).update(np.ones((2, 4))),
         "batch has 4 features but the accumulator holds 3"),
        (lambda: AlignmentAccumulator().compute(), "the accumulator is empty"),
        (lambda: minibatch_alignment(np.ones((4, 2)), np.zeros(4), batch_size=1), "batch_size must be an integer >= 2"),
    ],
)
def test_error_messages(call, match):
    with pytest.raises(InputError, match=match):
        call()
