"""E4 criteria of trainers/effects.py on hand-made results (no training, no torch)."""
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
