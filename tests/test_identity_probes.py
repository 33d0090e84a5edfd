"""Tests of geomprobe.identity_probes: probe inputs at correlation rho, identity/constant correlations,
heatmap (paper 002); the kernel rowwise_correlation against its numpy twin."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from geomprobe import InputError
from geomprobe import identity_probes as gp
from geomprobe.closed_form import one_layer_linear_prediction
from geomprobe._kernels import probes as kern


@pytest.fixture
def rng():
    return np.random.default_rng(20240607)


    A = np.asarray(A, dtype=np.float64)
    return A - A.mean(axis=1, keepdims=True) if centre else A


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




@pytest.mark.parametrize("centre", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rowwise_correlation_kernel_matches_numpy_twin(rng, centre, dtype):
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
    pred = one_layer_linear_prediction(W0, x_hat, p.inputs)
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
