"""Tests of geomprobe.trainers.gradstats (spec alignment.md §3, §4).

The fast route (one forward + one backward, no per-example gradient tensors) is compared with the
per-example oracle in float64 to 1e-5 (relative, floor 1); the identities are also checked on inputs
whose answer is known (identical gradients -> Omega = stiffness = 1, scale invariance, permutation
invariance, zero gradients).
"""
from __future__ import annotations

import contextlib
import copy
import json
import math

import numpy as np

import pytest

torch = pytest.importorskip("torch")
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from geomprobe import InputError  # noqa: E402
from geomprobe.trainers.gradstats import (  # noqa: E402
    GradientSums,
    _sq_norms,
    gradient_split,
    gradient_split_norms,
    gradient_stats,
    gradient_stats_oracle,
    gradient_sums,
    normalized_loss,
    recorder,
    relative_weight_distance,
)

TOL = 1e-5


def assert_same(a, b, path="", tol=TOL):
    """Compare two result trees: floats to tol (relative, floor 1), everything else exactly."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (path, sorted(a), sorted(b))
        for k in a:
            assert_same(a[k], b[k], f"{path}/{k}", tol)
    elif isinstance(a, float) or isinstance(b, float):
        assert isinstance(a, float) and isinstance(b, float), (path, a, b)
        assert abs(a - b) <= tol * max(1.0, abs(b)), (path, a, b)
    else:
        assert a == b, (path, a, b)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


def mlp(bias=True, d_in=12, h=9, c=4):
    return nn.Sequential(nn.Linear(d_in, h, bias=bias), nn.ReLU(inplace=True), nn.Linear(h, h, bias=bias),
                         nn.Tanh(), nn.Linear(h, c, bias=bias)).double()


def convnet(bias=True):
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=bias), nn.ReLU(inplace=True),
        nn.Conv2d(4, 5, 3, bias=not bias), nn.ReLU(),
        nn.Conv2d(5, 6, 2, padding="same", padding_mode="reflect", dilation=1, bias=bias), nn.ReLU(),
        nn.Flatten(), nn.Linear(6 * 2 * 2, 3, bias=bias),
    ).double()


def wide_conv():
    # few positions, many channels: the per-example norm takes the Gram form <D D^T, A A^T>
    return nn.Sequential(nn.Conv2d(16, 32, 3, dilation=2, padding=2, bias=True), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 3)).double()


class Shared(nn.Module):
    """One Linear applied twice (its per-example gradient sums over both calls) and to sequences."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 7)
        self.mix = nn.Linear(7, 7, bias=False)
        self.out = nn.Linear(7, 3)

    def forward(self, x):  # x: (n, T, 5)
        h = torch.tanh(self.inp(x))
        h = torch.relu(self.mix(h))
        h = torch.relu(self.mix(h))
        return self.out(h.mean(1))


# labels with a single-example class (3) and a class with two examples (1)
Y13 = [0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 0, 2, 0]


def make(kind, gen):
    """A model initialised from ``gen`` (not from torch's global RNG, whose state depends on the tests run
    before: with some inits an example has every ReLU off and a zero gradient) and its inputs."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(2 ** 31, (1,), generator=gen)))
        return _make(kind, gen)


def _make(kind, gen):
    y = torch.tensor(Y13)
    n = len(Y13)
    if kind in ("mlp", "mlp_nobias"):
        return mlp(bias=kind == "mlp"), torch.randn(n, 12, generator=gen, dtype=torch.float64), y
    if kind in ("conv", "conv_nobias"):
        return convnet(bias=kind == "conv"), torch.randn(n, 3, 8, 8, generator=gen, dtype=torch.float64), y % 3
    if kind == "wide_conv":
        return wide_conv(), torch.randn(n, 16, 4, 4, generator=gen, dtype=torch.float64), y % 3
    if kind == "shared":
        return Shared().double(), torch.randn(n, 4, 5, generator=gen, dtype=torch.float64), y % 3
    raise ValueError(kind)


def init(model, gen):
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.7)
    return model


@pytest.mark.parametrize("kind", ["mlp", "mlp_nobias", "conv", "conv_nobias", "wide_conv", "shared"])
@pytest.mark.parametrize("method", ["auto", "gram", "explicit"])
def test_matches_oracle(kind, method, gen):
    model, x, y = make(kind, gen)
    init(model, gen)
    fast = gradient_stats(model, x, y, method=method)
    ref = gradient_stats_oracle(model, x, y)
    assert_same(fast, ref)
    expected = {f"{n}.{p}" for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))
                for p in ("weight", "bias") if getattr(m, p) is not None} | {"logits"}
    assert set(fast) == expected


@pytest.mark.parametrize("kind", ["mlp_nobias", "conv", "shared"])
@pytest.mark.parametrize("method", ["gram", "explicit"])
def test_all_parameters_concatenated_matches_oracle(kind, method, gen):
    model, x, y = make(kind, gen)
    init(model, gen)
    x[3] = 0  # bias-free MLP: a zero gradient over all tensors
    fast = gradient_stats(model, x, y, include_all=True, method=method)
    assert_same(fast, gradient_stats_oracle(model, x, y, include_all=True))
    assert fast["all"]["shape"] == [sum(p.numel() for p in model.parameters())]


def test_oracle_vmap_equals_loop(gen):
    model, x, y = make("conv", gen)
    assert_same(gradient_stats_oracle(model, x, y, how="vmap"), gradient_stats_oracle(model, x, y))


def test_small_memory_budget_chunks_give_same_result(gen):
    model, x, y = make("conv", gen)
    assert_same(gradient_stats(model, x, y, memory_budget=50), gradient_stats_oracle(model, x, y))


@pytest.mark.parametrize("per_chunk", [1, 2, 3, 5])
def test_class_sorted_chunks_carry_classes_across_boundaries(per_chunk, gen):
    # a budget for `per_chunk` per-example gradients of the widest conv weight: the per-class sums of all
    # classes do not fit, so examples go in class-sorted chunks whose boundaries cut classes
    model, x, y = make("wide_conv", gen)
    d = max(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d))
    assert_same(gradient_stats(model, x, y, memory_budget=3 * d * per_chunk), gradient_stats_oracle(model, x, y))


@pytest.mark.parametrize("T,p,q", [(1, 6, 4), (9, 2, 3), (4, 30, 40)])  # T=1, explicit, Gram form
def test_sq_norms_both_forms(T, p, q, gen):
    D = torch.randn(7, T, p, generator=gen, dtype=torch.float64)
    A = torch.randn(7, T, q, generator=gen, dtype=torch.float64)
    want = torch.einsum("ntp,ntq->npq", D, A).pow(2).sum((1, 2))
    for budget in (1, 10 ** 6):
        torch.testing.assert_close(_sq_norms(D, A, budget), want, rtol=1e-12, atol=1e-12)


def test_mse_loss_with_onehot_targets_and_labels(gen):
    model, x, y = make("mlp", gen)
    target = F.one_hot(y, 4).double()

    def mse(out, t):
        return ((out - t) ** 2).sum(1)

    fast = gradient_stats(model, x, target, mse, labels=y.numpy())
    assert_same(fast, gradient_stats_oracle(model, x, target, mse, labels=y))


def test_grouping_labels_differ_from_targets(gen):
    # classes for grouping (e.g. original labels) need not be the training targets
    model, x, y = make("mlp", gen)
    groups = torch.tensor([5, 5, 9, 9, 9, 5, 7, 7, 7, 7, 5, 9, 5])
    assert_same(gradient_stats(model, x, y, labels=groups), gradient_stats_oracle(model, x, y, labels=groups))
    assert set(gradient_stats(model, x, y, labels=groups)["logits"]["per_class"]) == {"5", "7", "9"}


def test_skipped_classes_reported_not_zero(gen):
    model, x, y = make("mlp", gen)
    res = gradient_stats(model, x, y)["0.weight"]
    assert res["classes_skipped"] == [3]
    assert res["per_class"]["3"]["omega"] is None and res["per_class"]["3"]["stiffness"] is None
    defined = [res["per_class"][c]["omega"] for c in ("0", "1", "2")]
    assert res["omega_in_class"] == pytest.approx(sum(defined) / 3, rel=1e-12)
    # a batch where no class has two examples: in-class means are None, overall values defined
    one_each = gradient_stats(model, x[:4], torch.tensor([0, 1, 2, 3]))["0.weight"]
    assert one_each["omega_in_class"] is None and one_each["classes_skipped"] == [0, 1, 2, 3]
    assert isinstance(one_each["omega"], float)


def test_json_serialisable_without_nan(gen):
    model, x, y = make("conv", gen)
    json.dumps(gradient_stats(model, x, y), allow_nan=False)


def test_identical_examples_give_alignment_one(gen):
    model = mlp()
    x = torch.randn(1, 12, generator=gen, dtype=torch.float64).repeat(6, 1)
    y = torch.zeros(6, dtype=torch.long)
    for name, r in gradient_stats(model, x, y).items():
        assert r["omega"] == pytest.approx(1.0, abs=1e-10), name
        assert r["stiffness"] == pytest.approx(1.0, abs=1e-10), name
        assert r["diversity"] == pytest.approx(1 / 6, abs=1e-10), name
        assert r["omega_in_class"] == pytest.approx(1.0, abs=1e-10), name


def test_invariant_to_loss_scale_and_example_order(gen):
    model, x, y = make("conv", gen)
    base = gradient_stats(model, x, y)
    scaled = gradient_stats(model, x, y, lambda o, t: 3.5 * F.cross_entropy(o, t, reduction="none"))
    for name in base:
        for key in ("omega", "stiffness", "diversity", "omega_in_class", "stiffness_in_class"):
            assert scaled[name][key] == pytest.approx(base[name][key], rel=1e-9, abs=1e-12)
    perm = torch.randperm(len(y), generator=gen)
    assert_same(gradient_stats(model, x[perm], y[perm]), base, tol=1e-9)


def test_zero_gradients(gen):
    # rows of zeros: the first layer (no bias) has g_i = 0 for those examples
    model, _, _ = make("mlp_nobias", gen)  # seeded init: n_zero of "2.weight" depends on it
    x = torch.randn(8, 12, generator=gen, dtype=torch.float64)
    x[[1, 2, 5]] = 0
    y = torch.tensor([0, 0, 0, 1, 1, 1, 0, 1])
    fast = gradient_stats(model, x, y)
    assert_same(fast, gradient_stats_oracle(model, x, y))
    # class 0 examples 1, 2 only: every gradient zero -> mean norm 0 -> divide by 1 -> Omega 0
    res = gradient_stats(model, x[[1, 2, 3, 4]], torch.tensor([0, 0, 1, 1]))["0.weight"]
    assert res["per_class"]["0"]["omega"] == 0.0
    # zero gradients have no direction: left out of the cosine mean, counted in n_zero
    assert res["per_class"]["0"]["stiffness"] is None and res["per_class"]["0"]["n_zero"] == 2
    assert fast["0.weight"]["n_zero"] == 3 and fast["2.weight"]["n_zero"] == 3
    assert res["per_class"]["0"]["diversity"] is None  # 0 / 0


def test_merged_sums_equal_one_shot_over_union(gen):
    model, x, y = make("conv", gen)
    ref = gradient_stats_oracle(model, x, y)
    parts = [gradient_sums(model, x[a:b], y[a:b]) for a, b in ((0, 4), (4, 5), (5, 13))]
    total = GradientSums()
    for p in parts:
        total = total + p
    assert_same(total.stats(), ref)
    assert_same(parts[0].merge(parts[2]).merge(parts[1]).stats(), ref)
    # one-shot sums agree with gradient_stats
    assert_same(gradient_sums(model, x, y).stats(), gradient_stats(model, x, y))


def test_to_accumulator_matches_core_alignment(gen):
    # cross-check with the torch-free core implementation of the same sums
    model, x, y = make("mlp_nobias", gen)
    x[2] = 0  # a zero input: bias-free net -> zero weight gradients (n_zero = 1), not logits
    sums = gradient_sums(model, x[:7], y[:7]) + gradient_sums(model, x[7:], y[7:])
    ref = gradient_stats_oracle(model, x, y)
    for name, ts in sums.tensors.items():
        st = ts.to_accumulator().compute()
        r = ref[name]
        assert st.omega == pytest.approx(r["omega"], rel=1e-9)
        assert st.cosine_stiffness == pytest.approx(r["stiffness"], rel=1e-9)
        assert st.diversity == pytest.approx(r["diversity"], rel=1e-9)
        assert st.omega_in_class == pytest.approx(r["omega_in_class"], rel=1e-9)
        assert st.cosine_in_class == pytest.approx(r["stiffness_in_class"], rel=1e-9)
        assert st.n_zero == r["n_zero"] == (0 if name == "logits" else 1)
        assert [int(c) for c in st.classes] == [int(c) for c in r["per_class"]]
    with pytest.raises(InputError, match="to_accumulator needs sums made with gradient_sums"):
        with recorder(model, labels=y) as rec:
            F.cross_entropy(model(x), y).backward()
        rec.sums()["logits"].to_accumulator()


def test_merge_refuses_different_tensors(gen):
    model, x, y = make("mlp", gen)
    a = gradient_sums(model, x, y)
    b = gradient_sums(model, x, y, include_logits=False)
    with pytest.raises(InputError, match="different tensors"):
        a.merge(b)


def test_eval_mode_batchnorm_and_dropout_state_restored(gen):
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3)).double()
    model.train()
    model[4].eval()  # a mixed state must come back as it was
    x = torch.randn(10, 6, generator=gen, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    running = model[1].running_mean.clone()
    fast = gradient_stats(model, x, y)
    assert_same(fast, gradient_stats_oracle(model, x, y))
    assert [m.training for m in model] == [True, True, True, True, False]
    assert torch.equal(model[1].running_mean, running)
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(InputError, match="BatchNorm .* train mode couples"):
        gradient_stats(model, x, y, eval_mode=False)


def test_runs_under_no_grad_and_float32_close_to_float64(gen):
    model, x, y = make("mlp", gen)
    ref = gradient_stats_oracle(model, x, y)
    m32 = copy.deepcopy(model).float()
    with torch.no_grad():
        s32 = gradient_stats(m32, x.float(), y)
        s64 = gradient_stats(m32, x.float(), y, dtype=torch.float64)
    for name in ref:
        assert s32[name]["omega"] == pytest.approx(ref[name]["omega"], rel=1e-3, abs=1e-4)
        assert s64[name]["omega"] == pytest.approx(ref[name]["omega"], rel=1e-4, abs=1e-5)


def test_modules_selection(gen):
    model, x, y = make("mlp", gen)
    res = gradient_stats(model, x, y, modules=["2", model[4]], include_bias=False, include_logits=False)
    assert set(res) == {"2.weight", "4.weight"}
    full = gradient_stats(model, x, y)
    assert_same(res["2.weight"], full["2.weight"], tol=1e-12)


def test_top_level_linear_names(gen):
    model = nn.Linear(4, 3).double()
    x = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    res = gradient_stats(model, x, y)
    assert set(res) == {"weight", "bias", "logits"}
    assert_same(res, gradient_stats_oracle(model, x, y))


@pytest.mark.parametrize("call,match", [
    (lambda m, x, y: gradient_stats(m, x, y, lambda o, t: F.cross_entropy(o, t)),
     r"per-example losses of shape \(13,\) \(reduction='none'\), got \(\)"),
    (lambda m, x, y: gradient_stats(m, x, F.one_hot(y, 4).double(), lambda o, t: ((o - t) ** 2).sum(1)),
     r"labels is required .* \(y has shape \(13, 4\)\)"),
    (lambda m, x, y: gradient_stats(m, x, y, labels=[0, 1]), "labels has 2 entries but x has 13 rows"),
    (lambda m, x, y: gradient_stats(m, x, y, labels=[0.5] * 13), "labels must be integers, got dtype float64"),
    (lambda m, x, y: gradient_stats(m, x, y, modules=["1"]), "'1' is a ReLU, which no gradient rule covers"),
    (lambda m, x, y: gradient_stats(m, x, y, modules=["nope"]), "no submodule named 'nope'"),
    (lambda m, x, y: gradient_stats(m, x, y, modules=[nn.Linear(2, 2)]), "not a submodule of model"),
    (lambda m, x, y: gradient_stats(m, x, y, method="fast"), "method must be one of .* got 'fast'"),
    (lambda m, x, y: gradient_stats(m, x, y[:5]), "y has 5 rows but x has 13 rows"),
    (lambda m, x, y: gradient_stats_oracle(m, x, y, how="jit"), "how must be one of .* got 'jit'"),
])
def test_input_errors(call, match, gen):
    model, x, y = make("mlp", gen)
    with pytest.raises(InputError, match=match):
        call(model, x, y)


# ------------------------------------------------------------------------------------------------
# label-dependent / label-independent split
# ------------------------------------------------------------------------------------------------
def full_ce_grad(model, x, y):
    loss = F.cross_entropy(model(x), y)
    names = [k for k, _ in model.named_parameters()]
    return dict(zip(names, torch.autograd.grad(loss, list(model.parameters()))))


@pytest.mark.parametrize("as_onehot", [False, True])
def test_split_parts_sum_to_cross_entropy_gradient(as_onehot, gen):
    model, x, y = make("conv", gen)
    model.eval()
    target = F.one_hot(y, 3).double() if as_onehot else y
    dep, ind = gradient_split(model, x, target)
    full = full_ce_grad(model, x, y)
    assert set(dep) == set(ind) == set(full)
    for k in full:
        torch.testing.assert_close(dep[k] + ind[k], full[k], rtol=0, atol=1e-6)
        assert dep[k].norm() > 0 and ind[k].norm() > 0


def test_split_with_soft_labels_matches_soft_cross_entropy(gen):
    model, x, y = make("mlp", gen)
    P = torch.softmax(torch.randn(13, 4, generator=gen, dtype=torch.float64), 1)
    dep, ind = gradient_split(model, x, P)
    full = torch.autograd.grad(F.cross_entropy(model(x), P), list(model.parameters()))
    for (k, _), g in zip(model.named_parameters(), full):
        torch.testing.assert_close(dep[k] + ind[k], g, rtol=0, atol=1e-6)


def test_split_norms_per_subset(gen):
    model, x, y = make("mlp", gen)
    permuted = torch.zeros(13, dtype=torch.bool)
    permuted[[1, 4, 7, 8]] = True
    res = gradient_split_norms(model, x, y, {"unpermuted": ~permuted, "permuted": permuted.nonzero().squeeze(1),
                                             "all": torch.ones(13, dtype=torch.bool)})
    assert res["permuted"]["n"] == 4 and res["unpermuted"]["n"] == 9
    full = full_ce_grad(model, x, y)
    for k, g in full.items():
        assert res["all"]["full"][k] == pytest.approx(float(g.norm()), rel=1e-9)
    assert res["all"]["full_total"] == pytest.approx(math.sqrt(sum(float(g.pow(2).sum()) for g in full.values())))
    # 'subset' normalisation = the subset's own mean gradient
    sub = gradient_split_norms(model, x, y, {"p": permuted}, normalize="subset")["p"]
    dep, ind = gradient_split(model, x[permuted], y[permuted])
    for k in dep:
        assert sub["dependent"][k] == pytest.approx(float(dep[k].norm()), rel=1e-9)
        assert sub["independent"][k] == pytest.approx(float(ind[k].norm()), rel=1e-9)
    json.dumps(res, allow_nan=False)


@pytest.mark.parametrize("call,match", [
    (lambda m, x, y: gradient_split(m, x, torch.full((13, 4), 0.5, dtype=torch.float64)),
     "rows must be probability distributions .* row 0 sums to 2.0"),
    (lambda m, x, y: gradient_split(m, x, y + 4), r"class indices in \[0, 4\), got values in \[4, 7\]"),
    (lambda m, x, y: gradient_split(m, x, y, parameters=["zz"]), "no parameter named 'zz'"),
    (lambda m, x, y: gradient_split_norms(m, x, y, {"a": y > 0}, normalize="x"), "normalize must be one of"),
    (lambda m, x, y: gradient_split_norms(m, x, y, {"a": torch.ones(3, dtype=torch.bool)}),
     r"subset 'a': boolean mask has shape \(3,\), need \(13,\)"),
])
def test_split_errors(call, match, gen):
    model, x, y = make("mlp", gen)
    with pytest.raises(InputError, match=match):
        call(model, x, y)


# ------------------------------------------------------------------------------------------------
# normalised loss
# ------------------------------------------------------------------------------------------------
def relu_mlp():
    return nn.Sequential(nn.Linear(12, 16, bias=False), nn.ReLU(), nn.Linear(16, 16, bias=False), nn.ReLU(),
                         nn.Linear(16, 4, bias=False)).double()


def relu_convnet():
    return nn.Sequential(nn.Conv2d(3, 6, 3, stride=2, padding=1, bias=False), nn.ReLU(),
                         nn.Conv2d(6, 6, 3, stride=2, padding=1, bias=False), nn.ReLU(),
                         nn.Flatten(), nn.Linear(6 * 2 * 2, 4, bias=False)).double()


@pytest.mark.parametrize("factory,shape", [(relu_mlp, (13, 12)), (relu_convnet, (13, 3, 8, 8))])
def test_normalized_loss_invariant_to_layer_rescaling(factory, shape, gen):
    model = init(factory(), gen)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    y = torch.tensor(Y13)
    base = normalized_loss(model, x, y)
    layers = [m for m in model if isinstance(m, (nn.Linear, nn.Conv2d))]
    pred = model(x).argmax(1)

    # c on one layer and 1/c on another: the function, loss and norm product are unchanged
    m2 = copy.deepcopy(model)
    l2 = [m for m in m2 if isinstance(m, (nn.Linear, nn.Conv2d))]
    with torch.no_grad():
        l2[0].weight.mul_(3.0)
        l2[-1].weight.div_(3.0)
    r2 = normalized_loss(m2, x, y)
    for key in ("loss", "normalized_loss", "norm_product", "accuracy"):
        assert r2[key] == pytest.approx(base[key], rel=1e-10)
    assert torch.equal(m2(x).argmax(1), pred)

    # one layer alone: loss changes, normalised loss and predictions do not
    m3 = copy.deepcopy(model)
    with torch.no_grad():
        [m for m in m3 if isinstance(m, (nn.Linear, nn.Conv2d))][1].weight.mul_(4.0)
    r3 = normalized_loss(m3, x, y)
    assert abs(r3["loss"] - base["loss"]) > 1e-3
    assert r3["normalized_loss"] == pytest.approx(base["normalized_loss"], rel=1e-10)
    assert r3["norm_product"] == pytest.approx(4 * base["norm_product"], rel=1e-10)
    assert torch.equal(m3(x).argmax(1), pred) and r3["accuracy"] == base["accuracy"]

    # equals the loss of the net with every layer divided by its Frobenius norm
    m4 = copy.deepcopy(model)
    with torch.no_grad():
        for m in [m for m in m4 if isinstance(m, (nn.Linear, nn.Conv2d))]:
            m.weight.div_(m.weight.norm())
    with torch.no_grad():
        assert base["normalized_loss"] == pytest.approx(float(F.cross_entropy(m4(x), y)), rel=1e-10)
    assert base["has_bias"] is False and len(base["layer_norms"]) == len(layers)
    json.dumps(base, allow_nan=False)


def test_normalized_loss_not_invariant_with_bias(gen):
    model = init(mlp(bias=True), gen)
    x = torch.randn(13, 12, generator=gen, dtype=torch.float64)
    y = torch.tensor(Y13)
    base = normalized_loss(model, x, y)
    with torch.no_grad():
        model[2].weight.mul_(4.0)
    assert base["has_bias"] is True
    assert normalized_loss(model, x, y)["normalized_loss"] != pytest.approx(base["normalized_loss"], rel=1e-6)


def test_normalized_loss_errors(gen):
    model = relu_mlp()
    x = torch.randn(4, 12, generator=gen, dtype=torch.float64)
    with pytest.raises(InputError, match=r"y must be 1-D integer labels with 4 entries, got shape \(3,\)"):
        normalized_loss(model, x, torch.tensor([0, 1, 2]))
    with pytest.raises(InputError, match="no nn.Linear / nn.Conv2d layer"):
        normalized_loss(nn.Sequential(nn.Flatten()), x, torch.tensor([0, 1, 2, 3]))


# ------------------------------------------------------------------------------------------------
# relative weight distance
# ------------------------------------------------------------------------------------------------
def test_relative_weight_distance(gen):
    model = mlp()
    with torch.no_grad():
        model[0].bias.zero_()
    init_state = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        model[0].weight.mul_(1.5)       # distance 0.5
        model[2].weight.neg_()          # distance 2
        model[0].bias.add_(1.0)         # initial norm 0 -> None
    d = relative_weight_distance(model, init_state)
    assert set(d) == {k for k, _ in model.named_parameters()}
    assert d["0.weight"] == pytest.approx(0.5, rel=1e-12)
    assert d["2.weight"] == pytest.approx(2.0, rel=1e-12)
    assert d["4.weight"] == 0.0 and d["0.bias"] is None
    # a state dict (with buffers / numpy values) works as well
    bn = nn.BatchNorm1d(3)
    d2 = relative_weight_distance({k: v.numpy() for k, v in bn.state_dict().items()}, bn)
    assert d2["weight"] == 0.0 and "num_batches_tracked" not in d2
    json.dumps(d, allow_nan=False)


def test_relative_weight_distance_errors():
    a = nn.Linear(3, 2)
    with pytest.raises(InputError, match=r"tensor 'weight' has shape \(2, 3\) but init_state has \(3, 3\)"):
        relative_weight_distance(a, {"weight": torch.zeros(3, 3), "bias": torch.zeros(2)})
    with pytest.raises(InputError, match="init_state has no tensor named 'bias'"):
        relative_weight_distance(a, {"weight": torch.ones(2, 3)})
    with pytest.raises(InputError, match="init_state must be an nn.Module or a mapping"):
        relative_weight_distance(a, [1, 2])


def test_normalized_loss_zero_layer_is_an_input_error_naming_it(gen):
    # the core's rule since issue 15 (geomprobe.weights): an all-zero layer is an InputError naming it
    model = relu_mlp()
    with torch.no_grad():
        model[2].weight.zero_()
    x = torch.randn(4, 12, generator=gen, dtype=torch.float64)
    with pytest.raises(InputError, match=r"2\.weight"):
        normalized_loss(model, x, torch.tensor([0, 1, 2, 3]))


# ------------------------------------------------------------------------------------------------
# layer rules against the torch.func vmap(grad) oracle (float64, 1e-6 relative)
# ------------------------------------------------------------------------------------------------
from hypothesis import assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from geomprobe.alignment import AlignmentAccumulator  # noqa: E402
from geomprobe.alignment_sums import stats_from_sums  # noqa: E402
from geomprobe.trainers.gradstats import (  # noqa: E402
    Explicit,
    oracle_gradients,
    per_example_norms,
    register_rule,
    write_gradients,
)

TOL6 = 1e-6
Y7 = torch.tensor([0, 0, 1, 1, 1, 2, 0])


class EmbedBag(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 5, padding_idx=0)
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        return self.out(self.emb(x).mean(1))


class Attention(nn.Module):
    """MultiheadAttention, batch-first or sequence-first, self- or cross-attention, kdim != embed_dim."""

    def __init__(self, batch_first=True, kdim=None, cross=False):
        super().__init__()
        self.bf, self.kdim, self.cross = batch_first, kdim, cross
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first, kdim=kdim, vdim=kdim)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        kv = x[..., :self.kdim] if self.kdim else (x[:, :3] * 2 if self.cross else x)
        if not self.bf:
            x, kv = x.transpose(0, 1), kv.transpose(0, 1)
        o, _ = self.attn(x, kv, kv)
        if not self.bf:
            o = o.transpose(0, 1)
        return self.out(o.mean(1))


class Encoder(nn.Module):
    def __init__(self, batch_first):
        super().__init__()
        self.bf = batch_first
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=batch_first)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        h = self.enc(x if self.bf else x.transpose(0, 1))
        return self.out((h if self.bf else h.transpose(0, 1)).mean(1))


def _layer_case(kind, gen):
    n = len(Y7)

    def randn(*shape):
        return torch.randn(n, *shape, generator=gen, dtype=torch.float64)

    if kind == "conv1d_groups_circular":
        return nn.Sequential(nn.Conv1d(4, 6, 3, stride=2, padding=2, padding_mode="circular", groups=2), nn.ReLU(),
                             nn.Conv1d(6, 6, 2, dilation=2, groups=3), nn.Flatten(), nn.Linear(6 * 5, 3)), randn(4, 11)
    if kind == "conv3d_replicate_depthwise":
        return nn.Sequential(nn.Conv3d(2, 4, (2, 3, 2), stride=(1, 2, 1), padding=1, padding_mode="replicate"),
                             nn.Tanh(), nn.Conv3d(4, 4, 2, groups=4, dilation=(1, 2, 1)), nn.Flatten(),
                             nn.Linear(4 * 4 * 1 * 4, 3)), randn(2, 4, 5, 4)
    if kind == "conv2d_same_groupnorm":
        return nn.Sequential(nn.Conv2d(4, 8, 3, padding="same", padding_mode="reflect", groups=2), nn.ReLU(),
                             nn.GroupNorm(2, 8), nn.Flatten(), nn.Linear(8 * 25, 3)), randn(4, 5, 5)
    if kind == "batchnorm_eval":
        m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(36, 3),
                          nn.BatchNorm1d(3))
        with torch.no_grad():
            for bn in (m[1], m[5]):
                bn.running_mean.uniform_(-1, 1, generator=gen)
                bn.running_var.uniform_(0.5, 2, generator=gen)
        return m, randn(3, 5, 5)
    if kind == "layernorm_rmsnorm_sequence":
        return nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.Tanh(), nn.RMSNorm(6), nn.Linear(6, 3),
                             nn.Flatten(), nn.Linear(12, 3)), randn(4, 5)
    if kind == "embedding":
        return EmbedBag(), torch.randint(0, 10, (n, 6), generator=gen)
    if kind == "mha":
        return Attention(), randn(5, 8)
    if kind == "mha_seq_first":
        return Attention(batch_first=False), randn(5, 8)
    if kind == "mha_kdim":
        return Attention(kdim=4), randn(5, 8)
    if kind == "mha_cross":
        return Attention(cross=True), randn(5, 8)
    if kind == "encoder":
        return Encoder(True), randn(5, 8)
    if kind == "encoder_seq_first":
        return Encoder(False), randn(5, 8)
    raise ValueError(kind)


LAYER_KINDS = ["conv1d_groups_circular", "conv3d_replicate_depthwise", "conv2d_same_groupnorm", "batchnorm_eval",
               "layernorm_rmsnorm_sequence", "embedding", "mha", "mha_seq_first", "mha_kdim", "mha_cross",
               "encoder", "encoder_seq_first"]


def _seeded(kind, gen):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(2 ** 31, (1,), generator=gen)))
        m, x = _layer_case(kind, gen)
    return m.double(), x


def _oracle_norms(model, x, y, how="vmap"):
    names, grads, _ = oracle_gradients(model, x, y, how=how)
    return {k: g.reshape(g.shape[0], -1).norm(dim=1) for k, g in zip(names, grads)}


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_layer_rules_match_vmap_oracle(kind, gen):
    model, x = _seeded(kind, gen)
    how = "loop" if kind.startswith(("mha", "encoder", "embedding")) else "vmap"
    fast = gradient_stats(model, x, Y7, per_example_norms=True)
    ref = gradient_stats_oracle(model, x, Y7, how=how)
    norms = _oracle_norms(model, x, Y7, how=how)
    expected = {k for k, p in model.named_parameters()} | {"logits"}
    assert set(fast) == set(ref) == expected
    for k, v in fast.items():
        got = torch.tensor(v.pop("norms"), dtype=torch.float64)
        if k != "logits":
            torch.testing.assert_close(got, norms[k], rtol=TOL6, atol=1e-12)
    assert_same(fast, ref, tol=TOL6)


@settings(max_examples=12, deadline=None)
@given(dim=st.sampled_from([1, 2, 3]), k=st.integers(1, 3), stride=st.integers(1, 2), pad=st.integers(0, 2),
       dil=st.integers(1, 2), groups=st.sampled_from([1, 2]), mode=st.sampled_from(["zeros", "reflect", "circular"]),
       bias=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_conv_hyperparameters_match_oracle(dim, k, stride, pad, dil, groups, mode, bias, seed):
    gen = torch.Generator().manual_seed(seed)
    size = 5 if dim < 3 else 4
    assume((k - 1) * dil + 1 <= size + 2 * pad and not (mode != "zeros" and pad >= size))
    conv = [nn.Conv1d, nn.Conv2d, nn.Conv3d][dim - 1](2 * groups, 2 * groups, k, stride=stride, padding=pad,
                                                      dilation=dil, groups=groups, bias=bias, padding_mode=mode)
    x = torch.randn(6, 2 * groups, *([size] * dim), generator=gen, dtype=torch.float64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        feat = conv.double()(x).flatten(1).shape[1]
        model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(feat, 3)).double()
    y = torch.tensor([0, 1, 0, 1, 2, 2])
    fast = gradient_stats(model, x, y, per_example_norms=True)
    norms = _oracle_norms(model, x, y)
    for key in ("0.weight", "0.bias") if bias else ("0.weight",):
        torch.testing.assert_close(torch.tensor(fast[key].pop("norms"), dtype=torch.float64), norms[key],
                                   rtol=TOL6, atol=1e-12)
    for v in fast.values():
        v.pop("norms", None)
    assert_same(fast, gradient_stats_oracle(model, x, y, how="vmap"), tol=TOL6)


@settings(max_examples=8, deadline=None)
@given(T=st.integers(1, 6), d_in=st.integers(1, 7), d_out=st.integers(1, 7), method=st.sampled_from(["gram", "explicit"]),
       seed=st.integers(0, 2 ** 16))
def test_linear_sequences_match_oracle(T, d_in, d_out, method, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(d_in, d_out), nn.Tanh(), nn.Flatten(), nn.Linear(T * d_out, 3)).double()
    x = torch.randn(7, T, d_in, generator=gen, dtype=torch.float64)
    assert_same(gradient_stats(model, x, Y7, method=method), gradient_stats_oracle(model, x, Y7, how="vmap"), tol=TOL6)


# ------------------------------------------------------------------------------------------------
# the recorder inside a real training step
# ------------------------------------------------------------------------------------------------
def _train_model(gen):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(2 ** 31, (1,), generator=gen)))
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True), nn.GroupNorm(2, 4),
                             nn.Dropout(0.3), nn.Flatten(), nn.Linear(100, 3))


def test_recorder_changes_neither_loss_nor_update(gen):
    model = _train_model(gen)
    twin = copy.deepcopy(model)
    x = torch.randn(9, 3, 5, 5, generator=gen)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 0, 1])
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3) for m in (model, twin)]
    losses = []
    for step in range(2):
        for m, opt, rec in ((model, opts[0], False), (twin, opts[1], True)):
            torch.manual_seed(step)  # same dropout masks
            opt.zero_grad()
            with (recorder(m, labels=y) if rec else contextlib.nullcontext()) as r:
                loss = F.cross_entropy(m(x), y)
                loss.backward()
            opt.step()
            losses.append(loss.detach())
            if rec:
                stats = r.stats()
                assert stats["5.weight"]["n"] == 9 and stats["5.weight"]["omega"] is not None
    assert all(torch.equal(a, b) for a, b in zip(losses[0::2], losses[1::2]))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


def test_recorder_mean_loss_scale_matches_one_shot(gen):
    model, x, y = make("conv", gen)
    init(model, gen)
    ref = gradient_stats(model, x, y, per_example_norms=True)
    for scale, loss_of in (("mean", lambda o: F.cross_entropy(o, y)),
                           ("sum", lambda o: F.cross_entropy(o, y, reduction="sum")),
                           (0.25, lambda o: 0.25 * F.cross_entropy(o, y, reduction="sum"))):
        with recorder(model, labels=y, loss_scale=scale) as rec:
            loss_of(model(x)).backward()
        got = rec.stats(per_example_norms=True)
        for k in ref:
            assert got[k]["norms"] == pytest.approx(ref[k]["norms"], rel=1e-12), (scale, k)
        assert_same({k: {a: b for a, b in v.items() if a != "norms"} for k, v in got.items()},
                    {k: {a: b for a, b in v.items() if a != "norms"} for k, v in ref.items()}, tol=1e-10)
        model.zero_grad()
    # per-example norms by layer: the tensors of a module together
    by_layer = rec.layer_norms()
    t = rec.norms()
    torch.testing.assert_close(by_layer["0"], (t["0.weight"] ** 2 + t["0.bias"] ** 2).sqrt())


def test_recorder_num_classes_without_host_labels(gen):
    model, x, y = make("mlp", gen)
    with recorder(model, labels=y, num_classes=6) as rec:  # classes 4, 5 absent: left out
        F.cross_entropy(model(x), y).backward()
    assert_same(rec.stats(), gradient_stats(model, x, y), tol=1e-10)


def test_recorder_refuses_batchnorm_in_train_mode(gen):
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 2)).double()
    x = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    with pytest.raises(InputError, match=r"BatchNorm module\(s\) \['1'\] are in train mode"):
        with recorder(model, labels=torch.zeros(6, dtype=torch.long)):
            model(x).sum().backward()
    model.eval()
    with recorder(model, labels=torch.zeros(6, dtype=torch.long)) as rec:
        model(x).sum().backward()
    assert set(rec.norms()) >= {"1.weight", "1.bias"}


class Scale(nn.Module):
    """A module no built-in rule covers: y = x * w (per feature)."""

    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, d, dtype=torch.float64))

    def forward(self, x):
        return x * self.w


def test_unsupported_module_named_skipped_or_registered(gen):
    model = nn.Sequential(nn.Linear(4, 5), Scale(5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.randn(7, 4, generator=gen, dtype=torch.float64)
    with pytest.raises(InputError, match=r"module '1' \(Scale\) has trainable parameters \['w'\] that no gradient rule"):
        gradient_stats(model, x, Y7)
    res = gradient_stats(model, x, Y7, skip_unsupported=True)
    assert res["skipped_modules"] == ["1"] and "1.w" not in res
    try:
        register_rule(Scale, lambda m, inputs, out, grad, bdim: {"w": Explicit(grad * inputs[0])})
        assert_same(gradient_stats(model, x, Y7), gradient_stats_oracle(model, x, Y7, how="vmap"), tol=TOL6)
    finally:
        from geomprobe.trainers.gradstats.rules import RULES
        RULES.pop(Scale, None)
    with pytest.raises(InputError, match="register_rule needs an nn.Module subclass"):
        register_rule(int, lambda *a: {})


# ------------------------------------------------------------------------------------------------
# per-example norms and the gradient writer
# ------------------------------------------------------------------------------------------------
def test_per_example_norms_by_tensor_and_layer(gen):
    model, x = _seeded("mha", gen)
    ref = _oracle_norms(model, x, Y7, how="loop")
    got = per_example_norms(model, x, Y7)
    for k, v in ref.items():
        torch.testing.assert_close(got[k], v, rtol=TOL6, atol=1e-12)
    layer = per_example_norms(model, x, Y7, by="layer")
    assert set(layer) == {"attn", "out"}
    attn = sum(ref[k] ** 2 for k in ref if k.startswith("attn.")).sqrt()
    torch.testing.assert_close(layer["attn"], attn, rtol=TOL6, atol=1e-12)
    with pytest.raises(InputError, match="by must be one of 'tensor', 'layer'; got 'module'"):
        per_example_norms(model, x, Y7, by="module")


def test_write_gradients_streams_exact_per_example_gradients(tmp_path, gen):
    from geomprobe.io import open_activations

    model, x = _seeded("embedding", gen)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, Y7), batch_size=3)
    path = write_gradients(tmp_path / "g.npz", model, loader, out_dtype="float64")
    names, grads, _ = oracle_gradients(model, x, Y7, how="loop")
    with open_activations(path) as f:
        assert f.array("labels").tolist() == Y7.tolist()
        for name, g in zip(names, grads):
            layer, tensor = name.split(".", 1)
            got = f.array(f"grad/{layer}/{tensor}")
            assert got.shape == tuple(g.shape)
            np.testing.assert_allclose(got, g.numpy(), rtol=1e-10, atol=1e-12)
    path = write_gradients(tmp_path / "n.npz", model, [(x[:4], Y7[:4], Y7[:4] + 10), (x[4:], Y7[4:], Y7[4:] + 10)],
                           what="norms")
    with open_activations(path) as f:
        assert f.array("labels").tolist() == (Y7 + 10).tolist()
        got = f.array("grad/emb/weight.norm")
        assert got.shape == (7, 1) and got.dtype == np.float32
        np.testing.assert_allclose(got[:, 0], grads[0].reshape(7, -1).norm(dim=1).numpy(), rtol=1e-6)
    with pytest.raises(InputError, match="already exists"):
        write_gradients(tmp_path / "n.npz", model, [(x, Y7)], what="norms")
    with pytest.raises(InputError, match="what must be one of 'gradients', 'norms'; got 'sums'"):
        write_gradients(tmp_path / "m.npz", model, [(x, Y7)], what="sums")


# ------------------------------------------------------------------------------------------------
# the core formulas the torch side calls
# ------------------------------------------------------------------------------------------------
def test_stats_from_sums_equals_core_accumulator():
    rng = np.random.default_rng(3)
    V = rng.normal(size=(12, 5))
    V[4] = 0
    lab = np.array([0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 3, 0])
    acc = AlignmentAccumulator().update(V, lab)
    st_ = acc.compute()
    nrm = np.linalg.norm(V, axis=1)
    U = np.where(nrm[:, None] > 0, V / np.where(nrm > 0, nrm, 1)[:, None], 0)
    rows = [lab == c for c in range(4)]
    s = stats_from_sums([r.sum() for r in rows], [(nrm[r] > 0).sum() for r in rows], [nrm[r].sum() for r in rows],
                        [(nrm[r] ** 2).sum() for r in rows], [(V[r].sum(0) ** 2).sum() for r in rows],
                        [(U[r].sum(0) ** 2).sum() for r in rows])
    np.testing.assert_allclose(s.omega, st_.omega_per_class, rtol=1e-12)
    np.testing.assert_allclose(s.diversity, st_.diversity_per_class, rtol=1e-12)
    np.testing.assert_allclose(s.cosine_stiffness, st_.cosine_within, rtol=1e-12)
    assert np.isnan(s.omega[3])  # one example: undefined, not 0


# ------------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)
# ------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_layer_rules_on_cuda_match_cpu_oracle(kind, gen):
    model, x = _seeded(kind, gen)
    ref = gradient_stats_oracle(model, x, Y7, how="loop")
    dev = torch.device("cuda")
    fast = gradient_stats(copy.deepcopy(model).to(dev), x.to(dev), Y7.to(dev))
    assert_same(fast, ref, tol=TOL6)


@pytest.mark.gpu
def test_recorder_on_cuda_float32_close_to_float64(gen):
    model, x, y = make("conv", gen)
    ref = gradient_stats_oracle(model, x, y)
    dev = torch.device("cuda")
    m32 = copy.deepcopy(model).float().to(dev)
    with recorder(m32, labels=y.to(dev), num_classes=3) as rec:
        F.cross_entropy(m32(x.float().to(dev)), y.to(dev)).backward()
    got = rec.stats()
    for k in ref:
        assert got[k]["omega"] == pytest.approx(ref[k]["omega"], rel=1e-3, abs=1e-4)
