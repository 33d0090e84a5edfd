"""Ridge linear probe: primal and dual forms against a brute-force twin, the split, invariances."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from geomprobe import InputError
from geomprobe.linear_probe import linear_probe, linear_probe_rows, probe_split


def _twin_acc(X, y, tr, te, alpha):
    """Brute force: augmented least squares [Xc; sqrt(lam) I] W = [Yc; 0] on the training rows."""
    Xtr, ytr = X[tr], y[tr]
    classes = np.unique(ytr)
    Y = (ytr[:, None] == classes).astype(float)
    mu, ybar = Xtr.mean(0), Y.mean(0)
    Xc, Yc = Xtr - mu, Y - ybar
    lam = alpha * np.sum(Xc ** 2) / X.shape[1]
    A = np.vstack([Xc, np.sqrt(lam) * np.eye(X.shape[1])])
    B = np.vstack([Yc, np.zeros((X.shape[1], classes.size))])
    W = np.linalg.lstsq(A, B, rcond=None)[0]
    pred = lambda rows: classes[np.argmax((X[rows] - mu) @ W + ybar, axis=1)]  # noqa: E731
    return np.mean(pred(te) == y[te]), np.mean(pred(tr) == y[tr]), (X[te] - mu) @ W + ybar


def _data(rng, n=240, d=12, C=4, sep=1.0):
    y = rng.integers(0, C, n)
    X = rng.standard_normal((n, d))
    X[:, :C] += sep * np.eye(C)[y]
    return X, y


@pytest.mark.parametrize("d", [12, 400])  # primal (d <= n_train) and dual (d > n_train)
def test_matches_brute_force_twin(rng, d):
    X, y = _data(rng, d=d, sep=1.5)
    r = linear_probe(X, y, seed=3, alpha=0.1)
    assert r.form == ("primal" if d == 12 else "dual")
    acc, fit, _ = _twin_acc(X, y, r.train_rows, r.test_rows, 0.1)
    assert r.accuracy["labels"] == acc
    assert r.fit_accuracy["labels"] == fit
    assert 0.3 < acc < 1.0  # not a trivial problem


def test_primal_and_dual_scores_agree(rng):
    from geomprobe.linear_probe import _solve

    X, y = _data(rng, n=60, d=40)
    T = (y[:, None] == np.unique(y)).astype(float)
    rows = np.arange(60)
    predict_p, lam_p, form_p = _solve(X, rows, [T], 0.05)
    assert form_p == "primal"
    Xw = np.hstack([X, np.zeros((60, 30))])  # 70 > 60 features: dual; zero columns change nothing
    predict_w, lam_w, form_w = _solve(Xw, rows, [T], 0.05 * 70 / 40)  # same lambda (tr / d scaling)
    assert form_w == "dual" and lam_w == pytest.approx(lam_p, rel=1e-12)
    np.testing.assert_allclose(predict_w(Xw)[0], predict_p(X)[0], rtol=1e-10, atol=1e-10)
    _, _, scores = _twin_acc(X, y, np.arange(60), np.arange(60), 0.05)
    np.testing.assert_allclose(predict_p(X)[0], scores, rtol=1e-10, atol=1e-10)


def test_separable_and_random_labels(rng):
    X, y = _data(rng, n=400, sep=8.0)
    r = linear_probe(X, y, extra_labels={"random": rng.integers(0, 4, 400)}, averaging=True)
    assert r.accuracy["labels"] == 1.0 and r.accuracy["averaging"] > 0.9
    assert r.accuracy["random"] < 0.45  # chance is 0.25
    assert r.fit_accuracy["random"] > r.accuracy["random"]


def test_split_is_stratified_and_seeded(rng):
    y = np.repeat([0, 1, 2], [10, 5, 1])
    tr, te = probe_split(y, np.random.default_rng(0), 0.5)
    assert np.bincount(y[te], minlength=3).tolist() == [5, 2, 0]
    assert set(tr) | set(te) == set(range(16)) and not set(tr) & set(te)
    tr2, _ = probe_split(y, np.random.default_rng(0), 0.5)
    tr3, _ = probe_split(y, np.random.default_rng(1), 0.5)
    assert np.array_equal(tr, tr2) and not np.array_equal(tr, tr3)


def test_rows_and_train_labels(rng):
    X, y = _data(rng, sep=4.0)
    noisy = y.copy()
    noisy[:60] = (noisy[:60] + 1) % 4
    rows, notes = linear_probe_rows(X, y, np.random.default_rng(0), train_labels=noisy)
    names = [m for m, _, _ in rows]
    assert names == ["linear_probe_acc", "linear_probe_fit_acc", "averaging_probe_acc", "linear_probe_acc_train_labels"]
    vals = dict((m, v) for m, _, v in rows)
    assert vals["linear_probe_acc_train_labels"] < vals["linear_probe_acc"]


def test_bad_input_is_refused(rng):
    X, y = _data(rng)
    with pytest.raises(InputError, match=r"test_fraction must be in \(0, 1\), got 1"):
        linear_probe(X, y, test_fraction=1)
    with pytest.raises(InputError, match="alpha must be > 0"):
        linear_probe(X, y, alpha=0)
    with pytest.raises(InputError, match="no held-out rows"):
        linear_probe(X[:3], [0, 1, 2])
    with pytest.raises(InputError, match="noisy has 2 entries but X has 240 rows"):
        linear_probe(X, y, extra_labels={"noisy": [0, 1]})


@settings(deadline=None, max_examples=20)
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(0.01, 100), shift=st.floats(-20, 20))
def test_invariances(seed, scale, shift):
    rng = np.random.default_rng(seed)
    X, y = _data(rng, n=80, d=6, sep=1.0)
    Q, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    base = linear_probe(X, y, seed=1, alpha=0.1)
    for Xb in (scale * X, X @ Q, X + shift):
        r = linear_probe(Xb, y, seed=1, alpha=0.1)
        assert r.accuracy == base.accuracy and r.fit_accuracy == base.fit_accuracy
