"""Participation ratio and effective rank: known answers, a brute-force SVD twin, invariances."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from geomprobe import InputError
from geomprobe.spectral import effective_rank, participation_ratio, spectral_rows, spectrum


def _twin(X, center=True):
    """Brute force: singular values of the (centred) X by a full SVD."""
    Xc = X - X.mean(axis=0) if center else X
    s = np.linalg.svd(Xc, compute_uv=False)
    lam = s ** 2
    p = s / s.sum()
    p = p[p > 0]
    return lam.sum() ** 2 / (lam ** 2).sum(), np.exp(-(p * np.log(p)).sum())


def _isotropic(rng, n, d):
    A = rng.standard_normal((n, d))
    Q, _ = np.linalg.qr(A - A.mean(axis=0))  # orthonormal, centred columns
    return Q * np.sqrt(n)  # covariance exactly I


@pytest.mark.parametrize("n,d", [(200, 7), (12, 40)])
def test_isotropic_data_has_pr_and_erank_d(rng, n, d):
    X = _isotropic(rng, n, min(d, n - 1))
    k = X.shape[1]
    if d > n:  # wide: embed the isotropic k dims in d features by an orthonormal map
        Q, _ = np.linalg.qr(rng.standard_normal((d, k)))
        X = X @ Q.T
    r = spectrum(X)
    assert r.participation_ratio == pytest.approx(k, rel=1e-10)
    assert r.effective_rank == pytest.approx(k, rel=1e-10)


def test_gaussian_pr_tends_to_d(rng):
    assert participation_ratio(rng.standard_normal((20000, 10))) > 9.9


@pytest.mark.parametrize("n,d,center", [(300, 25, True), (300, 25, False), (30, 90, True), (30, 90, False)])
def test_matches_svd_twin(rng, n, d, center):
    X = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) + 2.0
    pr, er = _twin(X, center)
    r = spectrum(X, center=center)
    assert r.participation_ratio == pytest.approx(pr, rel=1e-10)
    assert r.effective_rank == pytest.approx(er, rel=1e-10)
    assert participation_ratio(X, center=center) == pytest.approx(pr, rel=1e-10)
    assert effective_rank(X, center=center) == pytest.approx(er, rel=1e-10)
    s = np.linalg.svd(X - X.mean(0) if center else X, compute_uv=False)
    np.testing.assert_allclose(r.eigenvalues[:s.size], s ** 2 / n, rtol=1e-9, atol=1e-12 * s[0] ** 2)


def test_float32_close_to_float64(rng):
    X = rng.standard_normal((5000, 64)) * np.linspace(0.1, 3, 64)
    a, b = spectrum(X), spectrum(X.astype(np.float32))
    assert b.participation_ratio == pytest.approx(a.participation_ratio, rel=1e-5)
    assert b.effective_rank == pytest.approx(a.effective_rank, rel=1e-5)


def test_low_rank_moves_both_down(rng):
    X = rng.standard_normal((400, 20))
    low = X.copy()
    low[:, 5:] *= 1e-3
    assert spectrum(low).participation_ratio < 0.5 * spectrum(X).participation_ratio
    assert spectrum(low).effective_rank < 0.5 * spectrum(X).effective_rank


def test_constant_rows_are_undefined_with_a_note():
    r = spectrum(np.ones((10, 4)))
    assert np.isnan(r.participation_ratio) and np.isnan(r.effective_rank)
    assert "zero spectrum" in r.notes[0]
    rows, notes = spectral_rows(np.ones((10, 4)))
    assert [m for m, _, _ in rows] == ["participation_ratio", "effective_rank"] and notes


def test_bad_input_is_refused():
    with pytest.raises(InputError, match="X must be at least 2-D"):
        spectrum(np.ones(5))
    with pytest.raises(InputError, match="non-finite"):
        spectrum(np.array([[1.0, np.nan], [0.0, 1.0]]))


@settings(deadline=None, max_examples=25)
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(0.01, 100), shift=st.floats(-50, 50),
       wide=st.booleans())
def test_invariances(seed, scale, shift, wide):
    rng = np.random.default_rng(seed)
    n, d = (15, 30) if wide else (40, 8)
    X = rng.standard_normal((n, d)) * rng.uniform(0.2, 2, d)
    Q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    base = spectrum(X)
    for Y in (scale * X, X @ Q, X + shift, X[rng.permutation(n)]):
        r = spectrum(Y)
        assert r.participation_ratio == pytest.approx(base.participation_ratio, rel=1e-8)
        assert r.effective_rank == pytest.approx(base.effective_rank, rel=1e-8)
    assert 1 - 1e-9 <= base.participation_ratio <= min(n - 1, d) + 1e-9
    assert 1 - 1e-9 <= base.effective_rank <= min(n - 1, d) + 1e-9


def test_companion_rows_names_are_registered_and_seeded(rng):
    from geomprobe.companion import companion_rows
    from geomprobe.registry import METRICS

    y = np.repeat(np.arange(3), 20)
    X = rng.standard_normal((60, 8)) + 2 * np.eye(8)[y]
    W = rng.standard_normal((3, 8))
    rows, notes = companion_rows(X, y, np.random.default_rng(0), train_labels=y[::-1], weights=W, logits=X @ W.T)
    names = [m for m, _, _ in rows]
    assert names == ["participation_ratio", "effective_rank", "nc1", "nc2_equinorm", "nc2_equiangular",
                     "nc2_maxangle", "nc3", "nc4", "linear_probe_acc", "linear_probe_fit_acc",
                     "averaging_probe_acc", "linear_probe_acc_train_labels"]
    assert set(names) <= set(METRICS) and notes == []
    again, _ = companion_rows(X, y, np.random.default_rng(0), train_labels=y[::-1], weights=W, logits=X @ W.T)
    assert again == rows
    one, notes = companion_rows(X, np.zeros(60, int), np.random.default_rng(0))
    assert [m for m, _, _ in one] == ["participation_ratio", "effective_rank"]
    assert "neural collapse skipped: 1 class(es)" in notes[0] and "linear probe skipped" in notes[1]
