"""Tests of geomprobe.weights: relative weight distance (paper 002 appendix D), normalised loss and its
line fit (paper 004)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from geomprobe import InputError
from geomprobe import weights as gp


@pytest.fixture
def rng():
    return np.random.default_rng(20240607)


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
# one home: the torch adapters compute tensors and call the formulas above
# ------------------------------------------------------------------------------------------------
def test_relative_distance_rule():
    assert gp.relative_distance(3.0, 2.0) == 1.5
    assert gp.relative_distance(0.0, 2.0) == 0.0
    assert gp.relative_distance(3.0, 0.0) is None  # the one zero-norm rule: undefined


def test_log_norm_product_names_the_layer():
    assert gp.log_norm_product({"a": 2.0, "b": 0.5}) == pytest.approx(0.0, abs=1e-15)
    assert gp.log_norm_product([np.e, np.e]) == pytest.approx(2.0)
    with pytest.raises(InputError, match=r"norms\['fc2.weight'\] must be a finite number > 0 .* got 0.0"):
        gp.log_norm_product({"fc1.weight": 1.0, "fc2.weight": 0.0})
    with pytest.raises(InputError, match=r"norms must hold at least one per-layer norm, got none"):
        gp.log_norm_product([])


def test_trainer_adapters_call_the_core():
    torch = pytest.importorskip("torch")
    from torch import nn

    from geomprobe.trainers.checkpoint import relative_weight_distance
    from geomprobe.trainers.gradstats import normalized_loss as torch_normalized_loss

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5, bias=False), nn.ReLU(), nn.Linear(5, 3, bias=False)).double()
    x = torch.randn(8, 6, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    got = torch_normalized_loss(model, x, y)
    with torch.no_grad():
        logits = model(x).numpy()
    norms = [float(model[0].weight.norm()), float(model[2].weight.norm())]
    want = gp.normalized_loss(logits, y.numpy(), norms=norms)
    assert got["normalized_loss"] == want.loss and got["loss"] == want.unnormalized_loss
    assert got["norm_product"] == want.norm_product
    assert got["log_norm_product"] == pytest.approx(np.log(want.norm_product), rel=1e-12)
    # scaling a layer by c leaves the normalised loss of a bias-free ReLU net unchanged (paper 004)
    with torch.no_grad():
        model[0].weight.mul_(7.0)
    assert torch_normalized_loss(model, x, y)["normalized_loss"] == pytest.approx(got["normalized_loss"], rel=1e-12)
    # an all-zero layer: the normalised loss is undefined -> an error naming the layer, never None
    with torch.no_grad():
        model[2].weight.zero_()
    with pytest.raises(InputError, match=r"norms\['2.weight'\] must be a finite number > 0"):
        torch_normalized_loss(model, x, y)

    init = {"w": torch.ones(2, 3), "b": torch.zeros(3), "running_mean": torch.zeros(3)}
    cur = {"w": 3 * torch.ones(2, 3), "b": torch.full((3,), 2.0), "running_mean": torch.ones(3)}
    d = relative_weight_distance(init, cur)
    core = gp.weight_distance({k: v.numpy() for k, v in init.items() if k != "running_mean"},
                              {k: v.numpy() for k, v in cur.items() if k != "running_mean"}, zero_init="skip")
    assert d["w"] == core.distance[0] == 2.0
    assert core.skipped == (("b", "zero norm at init"),)
    assert d == {"w": 2.0, "b (abs)": pytest.approx(np.sqrt(12.0))}  # undefined -> the absolute distance, named


def test_gradstats_weight_distance_is_a_deprecated_alias_with_the_same_rule():
    torch = pytest.importorskip("torch")
    from torch import nn

    from geomprobe.trainers.checkpoint import relative_weight_distance
    from geomprobe.trainers.gradstats import relative_weight_distance as old_order

    torch.manual_seed(1)
    m = nn.Linear(4, 3)
    init = {k: v.clone() for k, v in m.state_dict().items()}
    init["bias"].zero_()
    with torch.no_grad():
        m.weight.mul_(2.0)
    with pytest.warns(DeprecationWarning, match=r"checkpoint.relative_weight_distance\(initial, current\)"):
        old = old_order(m, init)  # current first: the old order
    new = relative_weight_distance(init, m)
    assert old["weight"] == new["weight"] == pytest.approx(1.0, rel=1e-12)
    assert old["bias"] is None and "bias (abs)" in new  # one rule (undefined), two presentations
