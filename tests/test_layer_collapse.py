"""Tests of geomprobe.layer_collapse: the averaging classifier (paper 002 section 3.4) against a brute
force of the paper's description, layer-wise collapse; its kernels against their numpy twins."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from geomprobe import InputError
from geomprobe import layer_collapse as gp
from geomprobe._kernels import probes as kern


@pytest.fixture
def rng():
    return np.random.default_rng(20240607)


# ------------------------------------------------------------------------------------------------
# plain-numpy twins of the kernels
# ------------------------------------------------------------------------------------------------
def _centre(A, centre):
    A = np.asarray(A, dtype=np.float64)
    return A - A.mean(axis=1, keepdims=True) if centre else A


def twin_class_direction_sums(X, codes, k, centre):
    a = _centre(X, centre)
    n = np.linalg.norm(a, axis=1)
    zero = n == 0
    unit = np.zeros_like(a)
    unit[~zero] = a[~zero] / n[~zero, None]
    onehot = np.eye(k)[codes]
    return onehot.T @ unit, zero


def twin_averaging_scores(T, S, centre):
    a = _centre(T, centre)
    n = np.linalg.norm(a, axis=1)
    zero = n == 0
    unit = np.zeros_like(a)
    unit[~zero] = a[~zero] / n[~zero, None]
    scores = unit @ S.T
    return scores, np.argmax(scores, axis=1), zero


def brute_force_averaging(train, ytr, test, centre=False):
    """The paper's description literally: per test example, loop over training examples."""
    classes = np.unique(ytr)
    tr, te = _centre(train, centre), _centre(test, centre)
    preds = []
    for t in te:
        score = np.zeros(classes.size)
        for x, y in zip(tr, ytr):
            nt, nx = np.linalg.norm(t), np.linalg.norm(x)
            corr = 0.0 if nt == 0 or nx == 0 else float(t @ x) / (nt * nx)
            score += corr * (classes == y)
        preds.append(classes[np.argmax(score / len(ytr))])
    return np.array(preds)



@pytest.mark.parametrize("centre", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_collapse_kernels_match_numpy_twins(rng, centre, dtype):
    A = rng.standard_normal((40, 17)).astype(dtype)
    B = rng.standard_normal((40, 17)).astype(dtype)
    A[3] = 0.0
    if centre:
        B[5] = 2.5  # constant row: zero norm after centring
    codes = rng.integers(0, 4, size=40)
    S, zero = kern.class_direction_sums(A, codes, 5, centre)
    S2, zero2 = twin_class_direction_sums(A, codes, 5, centre)
    np.testing.assert_array_equal(zero, zero2)
    np.testing.assert_allclose(S, S2, rtol=0, atol=1e-12)
    assert np.all(S[4] == 0)  # a class without rows

    scores, pred, zt = kern.averaging_scores(B, S, centre)
    s2, p2, z2 = twin_averaging_scores(B, S, centre)
    np.testing.assert_allclose(scores, s2, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(pred, p2)
    np.testing.assert_array_equal(zt, z2)


# ------------------------------------------------------------------------------------------------
# averaging classifier and layer-wise collapse
# ------------------------------------------------------------------------------------------------
@settings(deadline=None, max_examples=30)
@given(
    n_train=st.integers(1, 25),
    n_test=st.integers(1, 15),
    d=st.integers(3, 8),  # d <= 2: correlations are exactly +-1 (ties), argmax order then arbitrary
    k=st.integers(1, 4),
    seed=st.integers(0, 2**32 - 1),
    pearson=st.booleans(),
)
def test_averaging_classifier_matches_brute_force(n_train, n_test, d, k, seed, pearson):
    r = np.random.default_rng(seed)
    Xtr = r.standard_normal((n_train, d))
    Xte = r.standard_normal((n_test, d))
    ytr = r.integers(0, k, n_train) * 3 + 1  # non-contiguous class ids
    yte = r.integers(0, k, n_test) * 3 + 1
    kind = "pearson" if pearson else "cosine"
    res = gp.averaging_classifier(Xtr, ytr, Xte, yte, kind=kind)
    want = brute_force_averaging(Xtr, ytr, Xte, centre=pearson)
    np.testing.assert_array_equal(res.predictions, want)
    assert res.error == pytest.approx(np.mean(want != yte))


def test_averaging_classifier_properties(rng):
    means = rng.standard_normal((3, 20)) * 3
    ytr = np.repeat([0, 1, 2], 30)
    yte = np.repeat([0, 1, 2], 10)
    Xtr = means[ytr] + rng.standard_normal((90, 20))
    Xte = means[yte] + rng.standard_normal((30, 20))
    res = gp.averaging_classifier(Xtr, ytr, Xte, yte)
    assert res.error < 0.1 and res.chance_error == pytest.approx(2 / 3)
    assert res.scores.shape == (30, 3)
    # cosine: invariant to a positive scale per row and to permuting the training rows
    scaled = gp.averaging_classifier(Xtr * rng.uniform(0.1, 10, (90, 1)), ytr, Xte * 7.0, yte)
    np.testing.assert_array_equal(scaled.predictions, res.predictions)
    perm = rng.permutation(90)
    permuted = gp.averaging_classifier(Xtr[perm], ytr[perm], Xte, yte)
    np.testing.assert_allclose(permuted.scores, res.scores, atol=1e-12)
    # float32 input gives the same predictions
    f32 = gp.averaging_classifier(Xtr.astype(np.float32), ytr, Xte.astype(np.float32), yte)
    np.testing.assert_array_equal(f32.predictions, res.predictions)
    # zero rows and unseen test labels are counted and reported
    Xtr2, Xte2 = Xtr.copy(), Xte.copy()
    Xtr2[0] = 0
    Xte2[:2] = 0
    yte2 = yte.copy()
    yte2[-1] = 9
    z = gp.averaging_classifier(Xtr2, ytr, Xte2, yte2)
    assert (z.n_zero_train, z.n_zero_test, z.n_unseen_test) == (1, 2, 1)
    assert z.predictions[0] == 0 and np.all(z.scores[:2] == 0)
    assert len(z.notes) == 3 and "label absent from train" in z.notes[2]


def test_averaging_classifier_errors(rng):
    X = rng.standard_normal((5, 3))
    y = np.arange(5)
    with pytest.raises(InputError, match=r"test has 4 features but train has 3"):
        gp.averaging_classifier(X, y, np.ones((2, 4)), [0, 1])
    with pytest.raises(InputError, match=r"train_labels has 4 entries but train has 5 rows"):
        gp.averaging_classifier(X, y[:4], X, y)
    with pytest.raises(InputError, match=r"test_labels must be integers, got .*0\.5.* at index 0"):
        gp.averaging_classifier(X, y, X[:1], [0.5])
    with pytest.raises(InputError, match=r"train contains 3 non-finite value\(s\) \(NaN or Inf\); first at row 0, column 0"):
        gp.averaging_classifier(np.where(np.eye(5, 3) > 0, np.inf, X), y, X, y)


def test_layerwise_collapse_identity_and_collapsed_layers(rng):
    means = rng.standard_normal((4, 30)) * 2
    y = rng.integers(0, 4, 200)
    X = means[y] + rng.standard_normal((200, 30))
    split = np.where(np.arange(200) < 150, "train", "test")
    reps = {
        "identity": X * 2.0,  # same correlations as the input
        "rotated": X @ np.linalg.qr(rng.standard_normal((30, 30)))[0],  # cosine is rotation invariant
        "collapsed": np.ones((200, 5)),  # every example maps to the same vector
    }
    col = gp.layerwise_collapse(reps, y, split, inputs=X.reshape(200, 5, 6))
    assert col.layers == ("identity", "rotated", "collapsed")
    assert col.error[0] == pytest.approx(col.baseline_error)
    assert col.error[1] == pytest.approx(col.baseline_error)
    majority = np.argmax(np.bincount(y[:150], minlength=4))  # all scores prop. to class counts
    assert col.error[2] == pytest.approx(np.mean(y[150:] != majority))
    assert col.chance_error == pytest.approx(0.75)
    bool_split = gp.layerwise_collapse(reps, y, np.arange(200) >= 150)  # True = test
    np.testing.assert_array_equal(bool_split.error, col.error)
    assert bool_split.baseline_error is None


def test_layerwise_collapse_errors(rng):
    X = rng.standard_normal((6, 3))
    y = np.arange(6) % 2
    split = np.array(["train"] * 4 + ["test"] * 2)
    with pytest.raises(InputError, match=r"split must hold 'train' or 'test', got 'val' at index 5"):
        gp.layerwise_collapse({"a": X}, y, np.array(["train"] * 5 + ["val"]))
    with pytest.raises(InputError, match=r"split must mark at least one 'train' and one 'test' row, got 6 train and 0"):
        gp.layerwise_collapse({"a": X}, y, ["train"] * 6)
    with pytest.raises(InputError, match=r"split must be 1-D with 6 entries"):
        gp.layerwise_collapse({"a": X}, y, split[:5])
    with pytest.raises(InputError, match=r"representations\['b'\] has 5 rows but labels has 6 entries"):
        gp.layerwise_collapse({"a": X, "b": X[:5]}, y, split)
    with pytest.raises(InputError, match=r"representations must be a non-empty mapping"):
        gp.layerwise_collapse({}, y, split)
