"""Tests of geomprobe.probes (paper 002 probes, layer-wise collapse, weight distance; paper 004 loss)."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from geomprobe import InputError
from geomprobe import probes as gp
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


def twin_rowwise_correlation(A, B, centre):
    a, b = _centre(A, centre), _centre(B, centre)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    undefined = (na == 0) | (nb == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.sum(a * b, axis=1) / (na * nb)
    out[undefined] = np.nan
    return out, undefined


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
def test_kernels_match_numpy_twins(rng, centre, dtype):
    A = rng.standard_normal((40, 17)).astype(dtype)
    B = rng.standard_normal((40, 17)).astype(dtype)
    A[3] = 0.0
    if centre:
        B[5] = 2.5  # constant row: zero norm after centring
    got, und = kern.rowwise_correlation(A, B, centre)
    want, wund = twin_rowwise_correlation(A, B, centre)
    np.testing.assert_array_equal(und, wund)
    np.testing.assert_allclose(got[~und], want[~wund], rtol=0, atol=1e-12)
    assert np.all(np.isnan(got[und]))

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


def test_kernels_run_without_jit():
    code = (
        "import numpy as np\n"
        "from geomprobe._kernels import probes as k\n"
        "import geomprobe.probes as gp\n"
        "r = np.random.default_rng(0); A = r.standard_normal((9, 5)); c = r.integers(0, 3, 9)\n"
        "S, z = k.class_direction_sums(A, c, 3, True); s, p, zz = k.averaging_scores(A, S, False)\n"
        "o, u = k.rowwise_correlation(A, A[::-1].copy(), False)\n"
        "print(repr(float(S.sum())), repr(float(s.sum())), int(p.sum()), repr(float(o.sum())))\n"
    )
    env = dict(os.environ, NUMBA_DISABLE_JIT="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    r = np.random.default_rng(0)
    A = r.standard_normal((9, 5))
    c = r.integers(0, 3, 9)
    S, _ = kern.class_direction_sums(A, c, 3, True)
    s, p, _ = kern.averaging_scores(A, S, False)
    o, _ = kern.rowwise_correlation(A, A[::-1].copy(), False)
    vals = out.stdout.split()
    assert np.isclose(float(vals[0]), S.sum(), rtol=0, atol=1e-12)
    assert np.isclose(float(vals[1]), s.sum(), rtol=0, atol=1e-12)
    assert int(vals[2]) == int(p.sum())
    assert np.isclose(float(vals[3]), o.sum(), rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# probe inputs
# ------------------------------------------------------------------------------------------------
@settings(deadline=None, max_examples=40)
@given(
    d=st.integers(2, 300),
    rhos=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=6),
    count=st.integers(1, 4),
    seed=st.integers(0, 2**32 - 1),
    scale=st.floats(1e-3, 1e3),
    uniform=st.booleans(),
)
def test_probe_inputs_have_exact_correlation_and_norm(d, rhos, count, seed, scale, uniform):
    x_hat = np.random.default_rng(seed).standard_normal(d) * scale
    p = gp.make_probe_inputs(x_hat, rhos, count, seed=seed, distribution="uniform" if uniform else "normal")
    X = p.inputs.reshape(len(rhos) * count, d)
    cos = X @ x_hat / (np.linalg.norm(X, axis=1) * np.linalg.norm(x_hat))
    np.testing.assert_allclose(cos, np.repeat(rhos, count), rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(X, axis=1), np.linalg.norm(x_hat), rtol=1e-12)
    assert p.max_abs_error <= 1e-12 and p.max_rel_norm_error <= 1e-12
    U = p.directions.reshape(-1, d)
    np.testing.assert_allclose(np.linalg.norm(U, axis=1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(U @ x_hat / np.linalg.norm(x_hat), 0.0, atol=1e-12)


def test_probe_inputs_shape_seed_and_endpoints(rng):
    x_hat = rng.random((7, 6))
    grid = [0.0, 0.5, 1.0]
    a = gp.make_probe_inputs(x_hat, grid, 3, seed=5)
    b = gp.make_probe_inputs(x_hat, grid, 3, seed=5)
    c = gp.make_probe_inputs(x_hat, grid, 3, seed=6)
    assert a.inputs.shape == (9, 7, 6) and a.directions.shape == (9, 7, 6)
    np.testing.assert_array_equal(a.inputs, b.inputs)
    assert not np.array_equal(a.inputs, c.inputs)
    np.testing.assert_array_equal(a.rho, np.repeat(grid, 3))
    np.testing.assert_allclose(a.inputs[6:], np.broadcast_to(x_hat, (3, 7, 6)), atol=1e-14)  # rho = 1
    np.testing.assert_allclose(np.tensordot(a.inputs[:3], x_hat, axes=2), 0.0, atol=1e-12)  # rho = 0
    g = np.random.default_rng(11)
    d = gp.make_probe_inputs(x_hat, 0.3, seed=g)
    assert d.inputs.shape == (1, 7, 6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(x_hat=np.zeros(5), rho=[0.5]), r"x_hat must have a non-zero norm.*got norm 0"),
        (dict(x_hat=np.ones(1), rho=[0.5]), r"x_hat must have at least 2 element\(s\), got shape \(1,\)"),
        (dict(x_hat=np.ones(4), rho=[0.5, 1.2]), r"rho must lie in \[0, 1\], got 1\.2 at index 1"),
        (dict(x_hat=np.ones(4), rho=[-0.1]), r"rho must lie in \[0, 1\], got -0\.1 at index 0"),
        (dict(x_hat=np.ones(4), rho=[]), r"rho must hold at least one value"),
        (dict(x_hat=np.ones(4), rho=[[0.5]]), r"rho must be 1-D, got shape \(1, 1\)"),
        (dict(x_hat=np.ones(4), rho=[0.5], n_per_rho=0), r"n_per_rho must be an integer >= 1, got 0"),
        (dict(x_hat=np.ones(4), rho=[0.5], seed=-1), r"seed must be >= 0, got -1"),
        (dict(x_hat=np.ones(4), rho=[0.5], distribution="gauss"), r"distribution must be one of .*'gauss'"),
        (dict(x_hat=np.array([1.0, np.nan]), rho=[0.5]), r"x_hat contains 1 non-finite value"),
        (dict(x_hat=np.ones(4), rho=[np.nan]), r"rho must be finite, got nan at index 0"),
    ],
)
def test_probe_input_errors(kwargs, match):
    with pytest.raises(InputError, match=match):
        gp.make_probe_inputs(**kwargs)


# ------------------------------------------------------------------------------------------------
# identity / constant correlations and heatmap
# ------------------------------------------------------------------------------------------------
def test_identity_and_constant_models_give_known_correlations(rng):
    x_hat = rng.random((5, 5))
    grid = np.linspace(0, 1, 6)
    p = gp.make_probe_inputs(x_hat, grid, 4, seed=3)
    ident = gp.probe_correlations(p.inputs, p.inputs, x_hat, p.rho)  # f = identity
    np.testing.assert_allclose(ident.identity_mean, 1.0, atol=1e-12)
    np.testing.assert_allclose(ident.identity_std, 0.0, atol=1e-12)
    np.testing.assert_allclose(ident.constant_mean, grid, atol=1e-12)  # corr(x, x^) = rho
    const = gp.probe_correlations(p.inputs, np.broadcast_to(3 * x_hat, p.inputs.shape), x_hat, p.rho)
    np.testing.assert_allclose(const.constant_mean, 1.0, atol=1e-12)
    np.testing.assert_allclose(const.identity_mean, grid, atol=1e-12)
    np.testing.assert_array_equal(const.rho, grid)
    np.testing.assert_array_equal(const.count, 4)
    assert const.notes == ()
    # the one-layer linear model of eq. 1 is exact at rho = 1 (fits x^) for every W0
    W0 = rng.standard_normal((25, 25)) / 5
    pred = gp.one_layer_linear_prediction(W0, x_hat, p.inputs)
    lin = gp.probe_correlations(p.inputs, pred, x_hat, p.rho)
    assert lin.constant_mean[-1] == pytest.approx(1.0, abs=1e-12)
    assert lin.identity_mean[-1] == pytest.approx(1.0, abs=1e-12)
    # heatmap stacks models in order
    hm = gp.probe_heatmap({"identity": ident, "constant": const, "linear": lin})
    assert hm.models == ("identity", "constant", "linear")
    assert hm.identity.shape == hm.constant.shape == hm.constant_std.shape == (3, 6)
    np.testing.assert_array_equal(hm.constant[1], const.constant_mean)
    hm2 = gp.probe_heatmap([("a", ident)])
    assert hm2.models == ("a",)


def test_pearson_kind_matches_centred_cosine(rng):
    X = rng.standard_normal((12, 9)) + 3.0
    P = rng.standard_normal((12, 9)) + 1.0
    x_hat = rng.standard_normal(9) + 2.0
    rho = np.repeat([0.2, 0.7], 6)
    res = gp.probe_correlations(X, P, x_hat, rho, kind="pearson")
    want = [np.corrcoef(P[i], X[i])[0, 1] for i in range(12)]
    np.testing.assert_allclose(res.identity, want, atol=1e-12)
    want_c = [np.corrcoef(P[i], x_hat)[0, 1] for i in range(12)]
    np.testing.assert_allclose(res.constant, want_c, atol=1e-12)


def test_zero_predictions_are_undefined_and_reported(rng):
    x_hat = rng.random(8)
    p = gp.make_probe_inputs(x_hat, [0.0, 1.0], 3, seed=0)
    pred = p.inputs.copy()
    pred[0] = 0.0
    pred[3:] = 0.0  # all of rho = 1
    res = gp.probe_correlations(p.inputs, pred, x_hat, p.rho)
    assert np.isnan(res.identity[0]) and np.isnan(res.constant[0])
    np.testing.assert_array_equal(res.n_undefined, [1, 3])
    assert res.identity_mean[0] == pytest.approx(1.0)
    assert np.isnan(res.identity_mean[1])
    assert "4 of 6 prediction(s) have zero norm" in res.notes[0]
    assert "rho=1: all 3 prediction(s) have zero norm" in res.notes[1]


@pytest.mark.parametrize(
    "args, match",
    [
        ((np.ones((4, 3)), np.ones((3, 3)), np.ones(3), np.zeros(4)), r"predictions has 3 rows but inputs has 4 rows"),
        ((np.ones((4, 3)), np.ones((4, 2)), np.ones(3), np.zeros(4)),
         r"predictions must have as many elements per row as inputs \(identity target\), got 2 and 3"),
        ((np.ones((4, 3)), np.ones((4, 3)), np.ones(5), np.zeros(4)), r"x_hat has 5 elements but inputs has 3"),
        ((np.ones((4, 3)), np.ones((4, 3)), np.ones(3), np.zeros(5)), r"rho has 5 entries but inputs \(rows\) has 4"),
        ((np.ones(3), np.ones(3), np.ones(3), np.zeros(1)), r"inputs must be at least 2-D .* got shape \(3,\)"),
        ((np.ones((4, 3)), np.ones((4, 3)), np.zeros(3), np.zeros(4)), r"x_hat must have a non-zero norm \(the constant target\), got norm 0"),
        ((np.ones((4, 3)), np.ones((4, 3)), np.ones(3), np.full(4, 2.0)), r"rho must lie in \[0, 1\], got 2\.0 at index 0"),
    ],
)
def test_probe_correlation_errors(args, match):
    with pytest.raises(InputError, match=match):
        gp.probe_correlations(*args)


def test_heatmap_errors(rng):
    x_hat = rng.random(4)
    a = gp.probe_correlations(np.eye(4)[:2], np.eye(4)[:2], x_hat, [0.1, 0.2])
    b = gp.probe_correlations(np.eye(4)[:2], np.eye(4)[:2], x_hat, [0.1, 0.3])
    with pytest.raises(InputError, match=r"results\['b'\] has rho grid \[0\.1, 0\.3\] but results\['a'\] has \[0\.1, 0\.2\]"):
        gp.probe_heatmap({"a": a, "b": b})
    with pytest.raises(InputError, match=r"results must hold at least one"):
        gp.probe_heatmap({})
    with pytest.raises(InputError, match=r"results\['a'\] must be a ProbeCorrelations, got int"):
        gp.probe_heatmap({"a": 3})
    with pytest.raises(InputError, match=r"kind must be one of 'cosine', 'pearson'; got 'spearman'"):
        gp.probe_correlations(np.eye(2), np.eye(2), np.ones(2), [0, 0], kind="spearman")


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


# ------------------------------------------------------------------------------------------------
# weight distance
# ------------------------------------------------------------------------------------------------
def test_weight_distance_known_values(tmp_path):
    init = {"w1": np.ones((2, 2)), "b1": np.zeros(2), "w2": np.full(3, 2.0, dtype=np.float32)}
    final = {"w1": np.array([[2.0, 1.0], [1.0, 1.0]]), "b1": np.ones(2), "w2": np.array([2.0, 2.0, 2.0 + 1.2])}
    with pytest.raises(InputError, match=r"tensor 'b1' has zero norm at init \(shape \(2,\)\).*zero_init='skip'"):
        gp.weight_distance(init, final)
    wd = gp.weight_distance(init, final, zero_init="skip")
    assert wd.names == ("w1", "w2")
    np.testing.assert_allclose(wd.distance, [1.0 / 2.0, 1.2 / np.sqrt(12.0)], rtol=1e-6)
    np.testing.assert_allclose(wd.init_norm, [2.0, np.sqrt(12.0)], rtol=1e-7)
    assert wd.skipped == (("b1", "zero norm at init"),)
    # the same from .npz files
    np.savez(tmp_path / "init.npz", **init)
    np.savez(tmp_path / "final.npz", **final)
    wd2 = gp.weight_distance(tmp_path / "init.npz", str(tmp_path / "final.npz"), zero_init="skip")
    np.testing.assert_array_equal(wd2.distance, wd.distance)
    same = gp.weight_distance({"a": np.arange(1.0, 5.0)}, {"a": np.arange(1.0, 5.0)})
    assert same.distance[0] == 0.0


def test_weight_distance_errors(tmp_path):
    a = {"w": np.ones(3)}
    with pytest.raises(InputError, match=r"missing from final: v; missing from init: u"):
        gp.weight_distance({"w": np.ones(3), "v": np.ones(2)}, {"w": np.ones(3), "u": np.ones(2)})
    with pytest.raises(InputError, match=r"missing from final: v"):
        gp.weight_distance({"w": np.ones(3), "v": np.ones(2)}, a)
    with pytest.raises(InputError, match=r"missing from init: v"):
        gp.weight_distance(a, {"w": np.ones(3), "v": np.ones(2)})
    with pytest.raises(InputError, match=r"tensor 'w' has shape \(3,\) in init but \(1, 3\) in final"):
        gp.weight_distance(a, {"w": np.ones((1, 3))})
    with pytest.raises(InputError, match=r"final tensor 'w' contains 1 non-finite"):
        gp.weight_distance(a, {"w": np.array([1.0, np.nan, 1.0])})
    with pytest.raises(InputError, match=r"init: file '.*nope\.npz' does not exist"):
        gp.weight_distance(tmp_path / "nope.npz", a)
    np.save(tmp_path / "obj.npy", np.ones(3))
    np.savez(tmp_path / "obj.npz", w=np.array([{"a": 1}], dtype=object))
    with pytest.raises(InputError, match=r"final: could not read '.*obj\.npz' as \.npz without pickles"):
        gp.weight_distance(a, tmp_path / "obj.npz")
    with pytest.raises(InputError, match=r"init: .*obj\.npy' is a single \.npy array"):
        gp.weight_distance(tmp_path / "obj.npy", a)
    with pytest.raises(InputError, match=r"init must be a mapping name -> array or a path to an \.npz file, got list"):
        gp.weight_distance([np.ones(3)], a)
    with pytest.raises(InputError, match=r"zero_init must be one of 'raise', 'skip'; got 'ignore'"):
        gp.weight_distance(a, a, zero_init="ignore")


# ------------------------------------------------------------------------------------------------
# normalised loss
# ------------------------------------------------------------------------------------------------
def relu_net(weights, X):
    """Bias-free ReLU network: W_K relu(... relu(W_1 x)); rows of X are examples."""
    h = X
    for W in weights[:-1]:
        h = np.maximum(h @ W.T, 0.0)
    return h @ weights[-1].T


@settings(deadline=None, max_examples=25)
@given(seed=st.integers(0, 2**32 - 1), c=st.floats(0.05, 20.0), layers=st.tuples(st.integers(0, 2), st.integers(0, 2)))
def test_normalized_loss_invariant_to_layer_rescaling(seed, c, layers):
    r = np.random.default_rng(seed)
    Ws = [r.standard_normal((16, 10)), r.standard_normal((12, 16)), r.standard_normal((4, 12))]
    X = r.standard_normal((30, 10))
    y = r.integers(0, 4, 30)
    base = gp.normalized_loss(relu_net(Ws, X), y, weights=Ws)
    i, j = layers
    if i == j:
        j = (i + 1) % 3
    W2 = list(Ws)
    W2[i] = Ws[i] * c
    W2[j] = Ws[j] / c
    moved = gp.normalized_loss(relu_net(W2, X), y, weights=W2)
    assert moved.loss == pytest.approx(base.loss, rel=1e-10)
    assert moved.norm_product == pytest.approx(base.norm_product, rel=1e-10)
    # a common scale of every layer changes the raw loss but not the normalised one
    W3 = [W * c for W in Ws]
    grown = gp.normalized_loss(relu_net(W3, X), y, weights=W3)
    assert grown.loss == pytest.approx(base.loss, rel=1e-9)
    # normalised logits equal those of the network with unit-norm layers
    unit = [W / np.linalg.norm(W) for W in Ws]
    want = gp.normalized_loss(relu_net(unit, X), y, norms=[1.0, 1.0, 1.0])
    assert want.loss == pytest.approx(base.loss, rel=1e-10)


def test_normalized_loss_values(rng):
    Z = np.array([[2.0, 0.0], [0.0, 4.0]])
    y = np.array([0, 0])
    res = gp.normalized_loss(Z, y, norms=[2.0, 1.0])
    want = np.mean([np.log1p(np.exp(-1.0)), np.log1p(np.exp(2.0))])
    assert res.loss == pytest.approx(want, rel=1e-14)
    assert res.unnormalized_loss == pytest.approx(np.mean([np.log1p(np.exp(-2.0)), np.log1p(np.exp(4.0))]))
    assert res.norm_product == 2.0
    ws = [np.full((2, 2), 0.5), np.array([3.0, 4.0])]  # norms 1 and 5
    assert gp.frobenius_norm_product(ws) == pytest.approx(5.0)
    assert gp.frobenius_norm_product({"a": ws[0], "b": ws[1]}) == pytest.approx(5.0)
    big = gp.normalized_loss(np.array([[1000.0, -1000.0]]), [1], norms=[1.0])  # stable log-sum-exp
    assert big.loss == pytest.approx(2000.0)


def test_normalized_loss_errors():
    Z = np.zeros((3, 2))
    with pytest.raises(InputError, match=r"give exactly one of norms= .* or weights="):
        gp.normalized_loss(Z, [0, 1, 0])
    with pytest.raises(InputError, match=r"give exactly one of"):
        gp.normalized_loss(Z, [0, 1, 0], norms=[1.0], weights=[np.ones(2)])
    with pytest.raises(InputError, match=r"labels must be class indices in \[0, 1\] \(logits has 2 columns\), got 2 at index 1"):
        gp.normalized_loss(Z, [0, 2, 0], norms=[1.0])
    with pytest.raises(InputError, match=r"labels has 2 entries but logits has 3 rows"):
        gp.normalized_loss(Z, [0, 1], norms=[1.0])
    with pytest.raises(InputError, match=r"norms\[1\] must be a finite number > 0, got 0\.0"):
        gp.normalized_loss(Z, [0, 1, 0], norms=[1.0, 0.0])
    with pytest.raises(InputError, match=r"norm of weights\[0\] must be a finite number > 0, got 0\.0"):
        gp.normalized_loss(Z, [0, 1, 0], weights=[np.zeros((2, 2))])
    with pytest.raises(InputError, match=r"logits must have at least 2 feature\(s\), got shape \(3, 1\)"):
        gp.normalized_loss(np.zeros((3, 1)), [0, 0, 0], norms=[1.0])
    with pytest.raises(InputError, match=r"product of norms over/underflows"):
        gp.normalized_loss(Z, [0, 1, 0], norms=[1e200, 1e200])


def test_normalized_loss_fit(rng):
    x = np.array([0.1, 0.2, 0.4, 0.5, 0.9])
    fit = gp.normalized_loss_fit(x, 0.8 * x + 0.3)
    assert (fit.slope, fit.intercept) == (pytest.approx(0.8), pytest.approx(0.3))
    assert fit.r2 == pytest.approx(1.0) and fit.rmse == pytest.approx(0.0, abs=1e-15) and fit.n == 5
    y = 1.1 * x - 0.05 + rng.normal(0, 0.02, 5)
    fit = gp.normalized_loss_fit(x, y)
    slope, intercept = np.polyfit(x, y, 1)
    assert fit.slope == pytest.approx(slope) and fit.intercept == pytest.approx(intercept)
    r2 = np.corrcoef(x, y)[0, 1] ** 2
    assert fit.r2 == pytest.approx(r2)
    assert fit.adjusted_r2 == pytest.approx(1 - (1 - r2) * 4 / 3)
    np.testing.assert_allclose(fit.residuals, y - (slope * x + intercept), atol=1e-12)
    assert gp.normalized_loss_fit(x, np.full(5, 2.0)).r2 == 1.0
    with pytest.raises(InputError, match=r"train_losses must hold at least 3 networks .* got 2"):
        gp.normalized_loss_fit([1.0, 2.0], [1.0, 2.0])
    with pytest.raises(InputError, match=r"train_losses are all equal \(1\.0\)"):
        gp.normalized_loss_fit([1.0, 1.0, 1.0], [1.0, 2.0, 3.0])
    with pytest.raises(InputError, match=r"test_losses has 2 entries but train_losses has 3"):
        gp.normalized_loss_fit([1.0, 2.0, 3.0], [1.0, 2.0])


# ------------------------------------------------------------------------------------------------
# eq. 1: one-layer linear network trained on one example
# ------------------------------------------------------------------------------------------------
def gradient_descent_one_example(W0, x_hat, target, lr, steps):
    """Plain GD on 0.5 ||W x^ - y^||^2: gradient (W x^ - y^) x^T (paper 002, appendix B, eq. 3)."""
    W = W0.copy()
    for _ in range(steps):
        W -= lr * np.outer(W @ x_hat - target, x_hat)
    return W


@pytest.mark.parametrize("d, m", [(6, 6), (12, 12), (5, 3)])
def test_eq1_matches_gradient_descent(rng, d, m):
    W0 = rng.standard_normal((m, d)) / np.sqrt(d)
    x_hat = rng.standard_normal(d)
    target = x_hat if m == d else rng.standard_normal(m)
    lr = 0.5 / float(x_hat @ x_hat)  # contraction factor 1 - lr ||x^||^2 = 0.5 per step
    W_gd = gradient_descent_one_example(W0, x_hat, target, lr, 200)
    W_cf = gp.one_layer_linear_solution(W0, x_hat, None if m == d else target)
    np.testing.assert_allclose(W_gd, W_cf, rtol=0, atol=1e-12)
    X = rng.standard_normal((7, d))
    pred = gp.one_layer_linear_prediction(W0, x_hat, X, None if m == d else target)
    np.testing.assert_allclose(pred, X @ W_gd.T, rtol=0, atol=1e-12)
    # the parts of eq. 1: x^ maps to the target, directions orthogonal to x^ keep W0's map
    np.testing.assert_allclose(W_cf @ x_hat, target, atol=1e-12)
    u = X[0] - (X[0] @ x_hat) / (x_hat @ x_hat) * x_hat
    np.testing.assert_allclose(W_cf @ u, W0 @ u, atol=1e-12)


def test_eq1_shapes_and_errors(rng):
    x_hat = rng.random((3, 4))
    W0 = rng.standard_normal((12, 12))
    X = rng.random((5, 3, 4))
    pred = gp.one_layer_linear_prediction(W0, x_hat, X)
    assert pred.shape == (5, 3, 4)
    np.testing.assert_allclose(gp.one_layer_linear_prediction(W0, x_hat, x_hat[None])[0], x_hat, atol=1e-12)
    with pytest.raises(InputError, match=r"x_hat has 12 elements but W0 has 10 columns"):
        gp.one_layer_linear_solution(np.ones((12, 10)), x_hat)
    with pytest.raises(InputError, match=r"target has 12 elements but W0 has 3 rows"):
        gp.one_layer_linear_solution(np.ones((3, 12)), x_hat)
    with pytest.raises(InputError, match=r"x_hat must have a non-zero norm, got norm 0"):
        gp.one_layer_linear_solution(W0, np.zeros(12))
    with pytest.raises(InputError, match=r"x has 6 elements per row but x_hat has 12"):
        gp.one_layer_linear_prediction(W0, x_hat, np.ones((2, 6)))
    with pytest.raises(InputError, match=r"W0 must be 2-D \(n_samples, n_features\), got shape \(12,\)"):
        gp.one_layer_linear_solution(np.ones(12), x_hat)


# ------------------------------------------------------------------------------------------------
# probe_rows over an activations file
# ------------------------------------------------------------------------------------------------
class FakeFile:
    """The slice of geomprobe.io.ActivationFile that probe_rows uses."""

    def __init__(self, arrays, labels=None, split=None):
        self._arrays = dict(arrays)
        self.labels = labels
        self.split = split
        self.layers = [k[4:] for k in self._arrays if k.startswith("act/")]
        self.path = "fake.npz"
        self.loaded = []

    def keys(self):
        return list(self._arrays)

    def array(self, key):
        self.loaded.append(key)
        return self._arrays[key]

    def layer(self, name):
        self.loaded.append("act/" + name)
        a = self._arrays["act/" + name]
        return a.reshape(a.shape[0], -1)


def _probe_arrays(rng):
    x_hat = rng.random((4, 4))
    p = gp.make_probe_inputs(x_hat, [0.0, 0.5, 1.0], 4, seed=2)
    means = rng.standard_normal((3, 16)) * 2
    y = rng.integers(0, 3, 60)
    X = means[y] + rng.standard_normal((60, 16))
    arrays = {
        "probe/x_hat": x_hat,
        "probe/inputs": p.inputs,
        "probe/rho": p.rho,
        "probe/pred/depth1": p.inputs.copy(),  # identity model
        "probe/pred/depth9": np.broadcast_to(x_hat, p.inputs.shape).copy(),  # constant model
        "probe/layer/conv1": np.ones((12, 7)),  # wrong size: note only
        "probe/collapse_inputs": X.reshape(60, 4, 4),
        "act/conv1": X * 3.0,
        "act/fc": np.ones((60, 2)),
    }
    split = np.where(np.arange(60) < 40, "train", "test")
    return arrays, y, split


def test_probe_rows_on_fake_file(rng):
    arrays, y, split = _probe_arrays(rng)
    rows, notes = gp.probe_rows(FakeFile(arrays, labels=y, split=split))
    table = {(r[0], r[1], r[2], r[3]): r[4] for r in rows}
    assert table[("depth1", "probe", "identity_corr", "rho=0.50")] == pytest.approx(1.0)
    assert table[("depth1", "probe", "constant_corr", "rho=0.50")] == pytest.approx(0.5)
    assert table[("depth9", "probe", "constant_corr", "rho=0.00")] == pytest.approx(1.0)
    assert table[("depth9", "probe", "identity_corr", "rho=1.00")] == pytest.approx(1.0)
    assert table[("depth9", "probe", "identity_corr_std", "rho=0.00")] == pytest.approx(0.0, abs=1e-12)
    assert table[("depth1", "probe", "constant_corr", None)] == pytest.approx(0.5)
    assert table[("conv1", "test", "collapse_error", None)] == pytest.approx(table[("input", "test", "collapse_error_baseline", None)])
    assert table[("fc", "test", "collapse_error", None)] > table[("conv1", "test", "collapse_error", None)]
    assert table[("input", "test", "collapse_chance", None)] == pytest.approx(2 / 3)
    assert all(isinstance(r[4], float) for r in rows)
    assert len(rows) == 2 * (3 * 4 + 2) + 4
    assert any("'probe/layer/conv1' has 7 elements per probe but the inputs have 16" in n for n in notes)
    # rho labels get more digits when two grid values would print the same
    assert gp._rho_labels(np.array([0.5, 0.501])) == ["rho=0.500", "rho=0.501"]


def test_probe_rows_partial_files_and_errors(rng):
    arrays, y, split = _probe_arrays(rng)
    only_collapse = {k: v for k, v in arrays.items() if k.startswith("act/")}
    rows, notes = gp.probe_rows(FakeFile(only_collapse, labels=y, split=split))
    assert {r[2] for r in rows} == {"collapse_error", "collapse_chance"}
    assert any("no 'probe/collapse_inputs'" in n for n in notes)
    rows, notes = gp.probe_rows(FakeFile(arrays, labels=y, split=None))
    assert "collapse_error" not in {r[2] for r in rows}
    assert any("no 'split'" in n for n in notes)
    rows, notes = gp.probe_rows(FakeFile(arrays, labels=y, split=np.array(["train"] * 60)))
    assert any("split has no test rows" in n for n in notes)
    bad = dict(arrays)
    del bad["probe/rho"]
    with pytest.raises(InputError, match=r"fake\.npz: probe predictions need the keys probe/rho \(missing\)"):
        gp.probe_rows(FakeFile(bad))
    bad = dict(arrays, **{"probe/pred/depth1": arrays["probe/inputs"][:5]})
    with pytest.raises(InputError, match=r"fake\.npz: 'probe/pred/depth1' has shape \(5, 4, 4\) but 'probe/inputs' has 12 rows"):
        gp.probe_rows(FakeFile(bad))
    bad = dict(arrays, **{"probe/rho": arrays["probe/rho"][:3]})
    with pytest.raises(InputError, match=r"'probe/rho' has shape \(3,\) but 'probe/inputs' has 12 rows"):
        gp.probe_rows(FakeFile(bad))
    bad = dict(arrays, **{"probe/pred/depth1": np.ones((12, 5))})
    with pytest.raises(InputError, match=r"fake\.npz: 'probe/pred/depth1': predictions must have as many elements"):
        gp.probe_rows(FakeFile(bad))
    rows, notes = gp.probe_rows(FakeFile(dict(arrays, **{"probe/other": np.ones(2)})))
    assert any("'probe/other' is not a known probe key" in n for n in notes)


def test_probe_rows_on_real_activation_file(rng, tmp_path):
    io = pytest.importorskip("geomprobe.io")
    if not hasattr(io, "save_activations") or not hasattr(io, "open_activations"):
        pytest.skip("geomprobe.io has no save/open yet")
    arrays, y, split = _probe_arrays(rng)
    acts = {k[4:]: v for k, v in arrays.items() if k.startswith("act/")}
    extra = {k: v for k, v in arrays.items() if k.startswith("probe/")}
    path = io.save_activations(tmp_path / "a.npz", y, acts, split=split, extra=extra)
    with io.open_activations(path) as f:
        rows, notes = gp.probe_rows(f)
    fake_rows, _ = gp.probe_rows(FakeFile(arrays, labels=y, split=split))
    assert len(rows) == len(fake_rows)
    for a, b in zip(rows, fake_rows):
        assert a[:4] == b[:4] and a[4] == pytest.approx(b[4], rel=1e-6, abs=1e-6)
