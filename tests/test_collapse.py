"""Neural collapse NC1-NC4: collapsed classes give 0, a brute-force pinv twin, invariances."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from geomprobe import InputError
from geomprobe.collapse import collapse_rows, neural_collapse


def _twin(X, y):
    """Brute force: Sigma_W, Sigma_B as d x d matrices and numpy's pinv."""
    classes = np.unique(y)
    C, n = classes.size, X.shape[0]
    mu = np.stack([X[y == c].mean(0) for c in classes])
    G = mu.mean(0)
    Sw = sum(((X[y == c] - mu[i]).T @ (X[y == c] - mu[i])) for i, c in enumerate(classes)) / n
    Sb = (mu - G).T @ (mu - G) / C
    nc1 = np.trace(Sw @ np.linalg.pinv(Sb, rcond=1e-10)) / C
    M = mu - G
    norms = np.linalg.norm(M, axis=1)
    cos = [M[i] @ M[j] / (norms[i] * norms[j]) for i in range(C) for j in range(C) if i != j]
    return nc1, norms.std() / norms.mean(), np.std(cos), np.mean(np.abs(np.array(cos) + 1 / (C - 1)))


def _data(rng, C=5, per=30, d=12, noise=1.0):
    means = rng.standard_normal((C, d)) * 3
    y = np.repeat(np.arange(C), per)
    return means[y] + noise * rng.standard_normal((C * per, d)), y, means


def test_matches_pinv_twin(rng):
    X, y, _ = _data(rng)
    y = np.where(y == 4, 9, y)  # class ids need not be contiguous
    r = neural_collapse(X, y)
    for got, want in zip((r.nc1, r.nc2_equinorm, r.nc2_equiangular, r.nc2_maxangle), _twin(X, y)):
        assert got == pytest.approx(want, rel=1e-10)
    assert r.rank_between == 4


def test_unbalanced_and_wide(rng):
    X = rng.standard_normal((40, 60))
    y = np.r_[np.zeros(5), np.ones(15), np.full(20, 2)].astype(int)
    X[y == 1] += 2
    r = neural_collapse(X, y)
    assert r.nc1 == pytest.approx(_twin(X, y)[0], rel=1e-10)


def test_collapsed_simplex_gives_zero(rng):
    C, d = 4, 10
    E = np.eye(C) - 1.0 / C  # simplex ETF (centred one-hots), embedded by an orthonormal map
    Q, _ = np.linalg.qr(rng.standard_normal((d, C)))
    M = 5.0 * E @ Q.T + 3.0  # class means (shifted)
    y = np.repeat(np.arange(C), 7)
    X = M[y]
    W = M - M.mean(0)  # self-dual classifier
    logits = (X - M.mean(0)) @ W.T  # a linear classifier with its bias
    r = neural_collapse(X, y, weights=W, logits=logits)
    assert r.nc1 == pytest.approx(0.0, abs=1e-12)
    assert r.nc2_equinorm == pytest.approx(0.0, abs=1e-12)
    assert r.nc2_equiangular == pytest.approx(0.0, abs=1e-12)
    assert r.nc2_maxangle == pytest.approx(0.0, abs=1e-12)
    assert r.nc3 == pytest.approx(0.0, abs=1e-12)
    assert r.nc4 == 0.0


def test_nc1_tends_to_zero_and_grows_with_spread(rng):
    vals = []
    for noise in (1.0, 0.1, 0.01, 0.0):
        X, y, _ = _data(np.random.default_rng(3), noise=noise)
        vals.append(neural_collapse(X, y).nc1)
    assert vals[0] > vals[1] > vals[2] > vals[3]
    assert vals[3] < 1e-20 and vals[2] == pytest.approx(vals[0] * 1e-4, rel=0.2)


def test_nc3_nc4_detect_a_mismatched_classifier(rng):
    X, y, means = _data(rng, noise=0.3)
    W = means - means.mean(0)
    good = neural_collapse(X, y, weights=W, logits=X @ W.T)
    bad_W = rng.standard_normal(W.shape)
    bad = neural_collapse(X, y, weights=bad_W, logits=X @ bad_W.T)
    assert good.nc3 < 0.05 < bad.nc3
    assert good.nc4 < 0.05 < bad.nc4
    rows, _ = collapse_rows(X, y, weights=W, logits=X @ W.T)
    assert [m for m, _, _ in rows] == ["nc1", "nc2_equinorm", "nc2_equiangular", "nc2_maxangle", "nc3", "nc4"]


def test_coinciding_means_are_undefined_with_a_note():
    X = np.array([[0.0, 1], [0, -1], [1, 0], [-1, 0]])
    r = neural_collapse(X, [0, 0, 1, 1])
    assert np.isnan(r.nc1) and "coincide" in r.notes[0]


def test_bad_input_is_refused(rng):
    X, y, _ = _data(rng)
    with pytest.raises(InputError, match="at least 2 classes, labels contain 1"):
        neural_collapse(X, np.zeros(len(y), int))
    with pytest.raises(InputError, match="labels has 3 entries but X has 150 rows"):
        neural_collapse(X, [0, 1, 2])
    with pytest.raises(InputError, match="weights has 5 columns but X has 12 features"):
        neural_collapse(X, y, weights=np.ones((5, 5)))
    with pytest.raises(InputError, match="weights has 3 rows but labels hold class id 4"):
        neural_collapse(X, y, weights=np.ones((3, 12)))
    with pytest.raises(InputError, match="logits has 2 rows but X has 150 rows"):
        neural_collapse(X, y, logits=np.ones((2, 5)))


@settings(deadline=None, max_examples=25)
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(0.01, 100), shift=st.floats(-50, 50))
def test_invariances(seed, scale, shift):
    rng = np.random.default_rng(seed)
    X, y, _ = _data(rng, C=4, per=6, d=7)
    Q, _ = np.linalg.qr(rng.standard_normal((7, 7)))
    base = neural_collapse(X, y)
    p = rng.permutation(len(y))
    relabel = np.array([3, 0, 2, 1])[y]
    for Xb, yb in ((scale * X, y), (X @ Q, y), (X + shift, y), (X[p], y[p]), (X, relabel)):
        r = neural_collapse(Xb, yb)
        for a, b in ((r.nc1, base.nc1), (r.nc2_equinorm, base.nc2_equinorm),
                     (r.nc2_equiangular, base.nc2_equiangular), (r.nc2_maxangle, base.nc2_maxangle)):
            assert a == pytest.approx(b, rel=1e-7, abs=1e-12)
