"""E2 and E4 criteria of trainers/effects.py on hand-made results (no training, no torch)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from geomprobe.trainers import effects


def _e4_dir(tmp_path, rows):
    d = tmp_path / "e4"
    d.mkdir()
    (d / "experiment.json").write_text(json.dumps({"experiment": "normalized-loss", "preset": "small",
                                                   "options": {"seed": 0}, "status": "done", "result": {}}))
    (d / "normalized_loss.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def _net(name, ntr, nte, tr, te, lognp, test_acc, train_acc=1.0, random=False):
    return {"net": name, "random_labels": random, "train_normalized_loss": ntr, "test_normalized_loss": nte,
            "train_loss": tr, "test_loss": te, "log_norm_product": lognp, "test_acc": test_acc,
            "train_acc": train_acc}


def _by_name(summary):
    return {e["name"]: e for e in summary["effects"]}


def test_e4_effects_pass_on_the_papers_picture(tmp_path):
    # normalised losses on one line (random-label net included); raw train losses ~0 while test losses vary
    ntr = np.linspace(2.0, 2.3, 5)
    rows = [_net(f"std_{i}", x, 0.9 * x + 0.21, 0.02 + 0.001 * (i % 2), 1.0 - 0.1 * i, 4 + i, 0.80 - 0.01 * i)
            for i, x in enumerate(ntr)]
    rows.append(_net("random", 2.3008, 0.9 * 2.3008 + 0.21 + 1e-4, 0.05, 4.2, 8.0, 0.1, random=True))
    rows.append(_net("untrained", 2.30, 2.30, 2.28, 2.34, 21.0, 0.10, train_acc=0.11))
    s = effects.summarize(_e4_dir(tmp_path, rows))
    e = _by_name(s)
    assert e["normalized_losses_on_a_line"]["passed"]
    assert e["unnormalized_losses_not_on_a_line"]["passed"]
    assert e["test_error_grows_with_norm_product"]["passed"]
    assert s["data"]["excluded_nets"] == ["untrained"]
    assert any("untrained" in m for m in s["missing"])
    assert e["normalized_losses_on_a_line"]["measured"]["n"] == 6


def test_e4_effects_fail_when_the_random_label_net_is_off_the_normalised_line(tmp_path):
    ntr = np.linspace(2.0, 2.3, 5)
    rows = [_net(f"std_{i}", x, 0.9 * x + 0.21, 0.02, 1.0 - 0.1 * i, 4 + i, 0.8 + 0.01 * i) for i, x in enumerate(ntr)]
    rows.append(_net("random", 2.0, 2.5, 0.05, 4.2, 8.0, 0.1, random=True))   # far above the line
    e = _by_name(effects.summarize(_e4_dir(tmp_path, rows)))
    m = e["normalized_losses_on_a_line"]["measured"]
    assert not e["normalized_losses_on_a_line"]["passed"]
    assert m["random_label_relative_residual"] > effects.CRITERIA["e4_on_line"]
    # test error falls with the norm product here: the third effect fails
    assert not e["test_error_grows_with_norm_product"]["passed"]


def test_e4_too_few_trained_nets_are_reported_missing(tmp_path):
    rows = [_net("a", 2.0, 2.1, 0.02, 1.0, 4, 0.8), _net("b", 2.1, 2.2, 0.02, 1.1, 5, 0.8, train_acc=0.5),
            _net("c", 2.2, 2.3, 0.03, 1.2, 6, 0.7)]
    s = effects.summarize(_e4_dir(tmp_path, rows))
    assert not any(e["passed"] for e in s["effects"])
    assert all("missing" in e["measured"] for e in s["effects"])
    assert any("zero training error" in m for m in s["missing"])


# -- E2 best epoch: permuted at 2/M; restored ~ test everywhere; all three agree in the early layers --------
_E2_LAYERS = ["input", "relu1", "relu2", "relu3", "relu4", "relu5", "out"]


def _e2_caps(**over):
    caps = {"unpermuted": [0.17, 0.16, 0.18, 0.19, 0.24, 0.28, 0.33],  # paper A.8: higher in the last layers
            "restored": [0.17, 0.15, 0.16, 0.17, 0.19, 0.19, 0.22],
            "test": [0.18, 0.15, 0.17, 0.17, 0.21, 0.20, 0.27],
            "permuted": [0.10, 0.10, 0.10, 0.09, 0.10, 0.10, 0.12]}
    caps.update(over)
    return caps


def _e2_best(caps):
    return effects._e2_best_epoch_effect(caps, _E2_LAYERS, 0.1, "criterion")


def test_e2_best_epoch_passes_when_unpermuted_separates_only_in_the_last_layers():
    e = _e2_best(_e2_caps())
    assert e["passed"] and e["name"] == "best_epoch_permuted_capacity_at_lower_bound"
    m = e["measured"]
    assert m["first_half_layers"] == _E2_LAYERS[:4]
    assert max(m["agree_rel_spread"]) > effects.CRITERIA["e2_agree_rel_spread"]  # last layers: unpermuted apart
    assert m["restored_test_rel_spread"][-1] == pytest.approx((0.27 - 0.22) / 0.245, rel=1e-5)


@pytest.mark.parametrize("over, why", [
    ({"permuted": [0.10, 0.10, 0.10, 0.09, 0.10, 0.10, 0.21]}, "permuted above 2 x 2/M in the last layer"),
    ({"restored": [0.17, 0.15, 0.16, 0.17, 0.19, 0.19, 0.12]}, "restored and test apart in the last layer"),
    ({"unpermuted": [0.17, 0.16, 0.30, 0.19, 0.24, 0.28, 0.33]}, "unpermuted apart in an early layer"),
    ({"test": [0.18, 0.15, 0.17, 0.17, 0.21, 0.20, float("nan")]}, "a missing value is no agreement"),
    ({"permuted": [0.10, 0.10, float("nan"), 0.09, 0.10, 0.10, 0.12]}, "a missing value is no lower bound"),
])
def test_e2_best_epoch_fails(over, why):
    e = _e2_best(_e2_caps(**over))
    assert not e["passed"], why
    if "missing" in why:
        assert e["measured"]["nonfinite_capacity"] in (["test/out"], ["permuted/relu2"])


# -- E3: only nets that fit their one example enter the effects -----------------------------------------


def _e3_dir(tmp_path, nets):
    """nets: (run name, 'identity' | 'constant', relative final loss); predictions are exact maps."""
    from geomprobe import probes
    from geomprobe.io import save_activations

    d = tmp_path / "e3"
    d.mkdir()
    rng = np.random.default_rng(0)
    x_hat = rng.standard_normal(16)
    pin = probes.make_probe_inputs(x_hat, [0.0, 0.5, 1.0], 4, seed=1)
    runs = []
    for name, kind, rel in nets:
        pred = pin.inputs if kind == "identity" else np.repeat(x_hat[None], len(pin.inputs), 0)
        save_activations(d / f"acts_{name}.npz", np.zeros(4, np.int64), {"h": rng.standard_normal((4, 3))},
                         extra={"probe/x_hat": x_hat, "probe/inputs": pin.inputs, "probe/rho": pin.rho,
                                f"probe/pred/{name}": pred})
        runs.append({"run": name, "steps": 10, "final_train_loss": rel * 0.5 * float(x_hat @ x_hat),
                     "activation_file": f"acts_{name}.npz"})
    (d / "experiment.json").write_text(json.dumps({"experiment": "identity-crisis", "preset": "small",
                                                   "options": {"seed": 0}, "status": "done",
                                                   "result": {"runs": runs}}))
    return d


def test_e3_a_net_that_did_not_fit_its_example_is_left_out_and_named(tmp_path):
    # the deepest ConvNet stopped at 20 % of the zero map's loss and still outputs its input: counted, it
    # would make "deep ConvNet learns the constant map" fail; as in the paper, only fitted nets count
    nets = [("conv-d1-c8", "identity", 0.0), ("conv-d5-c8", "constant", 0.01), ("conv-d9-c8", "identity", 0.2)]
    s = effects.summarize(_e3_dir(tmp_path, nets))
    e = _by_name(s)
    assert e["deep_convnet_learns_constant"]["passed"]
    assert e["deep_convnet_learns_constant"]["measured"]["run"] == "conv-d5-c8"
    assert e["shallow_convnet_learns_identity"]["passed"]
    assert any("not fitted" in m and "conv-d9-c8 (0.2)" in m for m in s["missing"])
    rel = {m["run"]: m["relative_train_loss"] for m in s["data"]["models"]}
    assert rel["conv-d5-c8"] == pytest.approx(0.01) and rel["conv-d9-c8"] == pytest.approx(0.2)
    # just below the threshold a net counts; just above it, it does not
    t = effects.CRITERIA["e3_fit"]
    for rel9, counted in ((t * 0.99, True), (t * 1.01, False)):
        sub = tmp_path / f"t{rel9}"
        sub.mkdir()
        s2 = effects.summarize(_e3_dir(sub, nets[:2] + [("conv-d9-c8", "identity", rel9)]))
        assert (_by_name(s2)["deep_convnet_learns_constant"]["measured"]["run"] == "conv-d9-c8") == counted


def test_summary_numbers_keep_six_significant_digits_not_six_decimals():
    # a residual of 6e-8 (eq. 1 in a paper run) must not be written as 0.0
    out = effects._clean({"eq1": 6.248763e-08, "acc": 0.78412345, "big": 123456789.0, "nan": float("nan")})
    assert out == {"eq1": 6.24876e-08, "acc": 0.784123, "big": 123457000.0, "nan": None}
