"""Per-example memorisation scores: scripted forgetting, EL2N / AUM twins, the table, the recorder."""
import json
import math

import numpy as np
import pytest

from geomprobe import InputError
from geomprobe.scores import (SCORE_COLUMNS, ForgettingState, aum_margin, el2n, forgetting_events, read_scores,
                              score_summary, scores_rows, write_scores)


def _forgetting_twin(seq):
    """Toneva et al.: count i -> i+1 transitions correct -> incorrect; first correct presentation."""
    count = sum(1 for a, b in zip(seq[:-1], seq[1:]) if a and not b)
    first = next((t for t, c in enumerate(seq) if c), -1)
    return count, first


def test_forgetting_on_a_scripted_sequence():
    seq = np.array([[0, 1, 0, 1, 1, 0, 0, 1],   # learned at 1, forgotten twice
                    [0, 0, 0, 0, 0, 0, 0, 0],   # never learned
                    [1, 1, 1, 1, 1, 1, 1, 1],   # unforgettable
                    [1, 0, 1, 0, 1, 0, 1, 0]]).T  # (presentations, examples)
    r = forgetting_events(seq)
    assert r.counts.tolist() == [2, 0, 0, 4]
    assert r.first_learned.tolist() == [1, -1, 0, 0]
    assert r.never_learned.tolist() == [False, True, False, False]


def test_forgetting_matches_twin_and_streaming_with_repeats(rng):
    seq = rng.random((30, 50)) < 0.6
    r = forgetting_events(seq)
    for j in range(50):
        assert (r.counts[j], r.first_learned[j]) == _forgetting_twin(seq[:, j].tolist())
    # the same presentations streamed in shuffled batches that may repeat an example
    st = ForgettingState(50)
    order = np.concatenate([np.tile(np.arange(50), 1)] * 30)
    steps = np.repeat(np.arange(30), 50)
    perm = np.concatenate([rng.permutation(50) + 50 * t for t in range(30)])
    order, steps = order[perm], steps[perm]
    for s in range(0, order.size, 64):  # batches straddle presentations: an index can occur twice
        st.update(order[s:s + 64], seq[steps[s:s + 64], order[s:s + 64]])
    got = st.result()
    assert np.array_equal(got.counts, r.counts) and np.array_equal(got.first_learned, r.first_learned)


def test_el2n_and_aum_match_brute_force(rng):
    Z = rng.standard_normal((20, 5)) * 3
    y = rng.integers(0, 5, 20)
    e, m = el2n(Z, y), aum_margin(Z, y)
    for i in range(20):
        p = np.exp(Z[i]) / np.exp(Z[i]).sum()
        assert e[i] == pytest.approx(np.linalg.norm(p - np.eye(5)[y[i]]), rel=1e-12)
        assert m[i] == pytest.approx(Z[i, y[i]] - max(Z[i, k] for k in range(5) if k != y[i]), rel=1e-12)
    assert np.all(el2n(1e3 * np.eye(5)[y], y) < 1e-12)  # confident and right: 0
    with pytest.raises(InputError, match="labels must be column indices of logits"):
        el2n(Z, np.full(20, 7))
    with pytest.raises(InputError, match="at least 2 columns"):
        aum_margin(Z[:, :1], np.zeros(20, int))


def _table(tmp_path, rng, n=40):
    sub = np.where(np.arange(n) < 10, "permuted", "unpermuted")
    cols = {"index": np.arange(n), "subset": sub, "label": rng.integers(0, 3, n), "true_label": rng.integers(0, 3, n),
            "forgetting": np.where(sub == "permuted", 3, 1), "never_learned": (np.arange(n) == 0).astype(int),
            "first_learned": np.where(np.arange(n) == 0, -1, 2), "n_presented": np.full(n, 5),
            "el2n": np.where(sub == "permuted", 0.9, 0.2) + 0.01 * rng.random(n),
            "aum": np.where(sub == "permuted", -1.0, 2.0) + rng.random(n),
            "grad_norm/fc": np.where(sub == "permuted", 2.0, 1.0)}
    write_scores(tmp_path, cols, {"epochs": 5, "el2n_epoch": 1})
    return cols


def test_table_round_trip_and_summary(tmp_path, rng):
    cols = _table(tmp_path, rng)
    t = read_scores(tmp_path)
    assert t.meta["format"] == "geomprobe-scores" and t.meta["columns"][:len(SCORE_COLUMNS)] == list(SCORE_COLUMNS)
    for k, v in cols.items():
        if k == "subset":
            assert t.columns[k].tolist() == v.tolist()
        else:
            np.testing.assert_array_equal(t.columns[k], v)
    s = score_summary(t)
    assert s.per_subset["permuted"]["forgetting_mean"] == 3.0  # example 0 (never learned) left out
    assert s.per_subset["permuted"]["never_learned_frac"] == pytest.approx(0.1)
    assert s.auroc == {"forgetting": 1.0, "el2n": 1.0, "aum": 1.0, "grad_norm/fc": 1.0}
    rows, notes = scores_rows(t)
    assert ("scores", "permuted", "score_auroc", "aum", 1.0) in rows
    assert ("fc", "unpermuted", "score_grad_norm_mean", None, 1.0) in rows
    assert "EL2N at epoch 1" in notes[0]


def test_reader_refuses_bad_tables(tmp_path):
    with pytest.raises(InputError, match="no scores.csv"):
        read_scores(tmp_path)
    (tmp_path / "scores.csv").write_text("index,subset\n0,all\n")
    with pytest.raises(InputError, match="not a scores table: column"):
        read_scores(tmp_path)
    with pytest.raises(InputError, match="score columns missing"):
        write_scores(tmp_path, {"index": np.arange(2)}, {})


# -- the trainer side (torch) ---------------------------------------------------------------------
torch = pytest.importorskip("torch")


def test_layer_grad_norms_match_per_example_autograd():
    from torch import nn

    from geomprobe.trainers.scores import per_example_layer_grad_norms

    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 5 * 5, 4))
    for p in model.parameters():
        p.data = torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3
    model.double()
    x = torch.randn(6, 2, 5, 5, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    got = per_example_layer_grad_norms(model, x, y, batch_size=4)
    for i in range(6):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        for name in ("0", "3"):
            m = model.get_submodule(name)
            want = math.sqrt(float(m.weight.grad.pow(2).sum() + m.bias.grad.pow(2).sum()))
            assert got[name][i] == pytest.approx(want, rel=1e-10)


def test_recorder_in_training_flags_permuted_examples(tmp_path):
    from torch import nn

    from geomprobe.trainers.scores import ScoreRecorder, STATE_FILE, scores_figure, scores_section
    from geomprobe.trainers.train import TrainConfig, train

    g = torch.Generator().manual_seed(0)
    n = 300
    x = torch.randn(n, 10, generator=g)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    perm = np.zeros(n, bool)
    perm[:60] = True
    noisy = y.clone()
    noisy[:60] = (y[:60] + 1 + torch.randint(0, 3, (60,), generator=g)) % 4  # a wrong label each
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 4))
    rec = ScoreRecorder(n, subsets=np.where(perm, "permuted", "unpermuted"), true_labels=y.numpy(), el2n_epoch=2)
    assert scores_section(tmp_path) == ""
    train(model, x, noisy, cfg=TrainConfig(epochs=8, batch_size=50, optimizer="adam", lr=1e-2, progress="off",
                                           keep_every=0), out=tmp_path, scores=rec)
    t = read_scores(tmp_path)
    assert t.n == n and t.meta["epochs"] == 8 and t.columns["n_presented"].tolist() == [8] * n
    assert t.grad_layers == ["0", "2"]
    np.testing.assert_array_equal(t.columns["true_label"], y.numpy())
    s = score_summary(t)
    assert s.auroc["aum"] > 0.75 and s.auroc["el2n"] > 0.75  # permuted score as memorised
    assert "| permuted | 60 |" in scores_section(tmp_path)
    assert len(scores_figure(tmp_path).axes) == 3
    # the saved state restores the counts
    rec2 = ScoreRecorder(n, el2n_epoch=2)
    rec2.resume(tmp_path, 8)
    assert np.array_equal(rec2.forget.counts, rec.forget.counts) and (tmp_path / STATE_FILE).is_file()
    rec3 = ScoreRecorder(n)
    rec3.resume(tmp_path, 5)
    assert "epoch 8" in rec3.notes[0]


def test_recorder_refuses_bad_options():
    from geomprobe.trainers.scores import ScoreRecorder

    with pytest.raises(InputError, match="subsets has shape"):
        ScoreRecorder(5, subsets=["a"])
    with pytest.raises(InputError, match="el2n_epoch must be an integer >= 1, got 0"):
        ScoreRecorder(5, el2n_epoch=0)


def test_recorder_epoch_log_matches_the_core_formulas(rng):
    """The recorder (batches logged on the device, scored once per epoch) equals ForgettingState /
    aum_margin / el2n fed the same presentations batch by batch, also when a batch repeats an example
    (two passes per epoch straddling a batch)."""
    from geomprobe.trainers.scores import ScoreRecorder

    n, k = 40, 4
    rec = ScoreRecorder(n, el2n_epoch=2)
    st, margin, el_sum, el_cnt = ForgettingState(n), np.zeros(n), np.zeros(n), np.zeros(n)
    for epoch in (1, 2, 3):
        order = np.concatenate([rng.permutation(n), rng.permutation(n)])  # two passes: repeats in a batch
        for s in range(0, order.size, 16):
            idx = order[s:s + 16]
            z = rng.standard_normal((idx.size, k)) * 2
            y = rng.integers(0, k, idx.size)
            rec.on_batch(epoch, torch.as_tensor(idx), torch.as_tensor(z), torch.as_tensor(y))
            st.update(idx, z.argmax(axis=1) == y)
            np.add.at(margin, idx, aum_margin(z, y))
            if epoch == 2:
                np.add.at(el_sum, idx, el2n(z, y))
                np.add.at(el_cnt, idx, 1)
        rec.end_epoch(epoch, None)
    assert np.any([np.unique(order[s:s + 16]).size < 16 for s in range(0, order.size, 16)])  # repeats occurred
    for name in ("counts", "prev", "first", "presented"):
        np.testing.assert_array_equal(getattr(rec.forget, name), getattr(st, name), err_msg=name)
    np.testing.assert_allclose(rec.margin_sum, margin, rtol=1e-6, atol=1e-5)  # float32 logits
    np.testing.assert_allclose(rec.el2n, el_sum / el_cnt, rtol=1e-6)
    assert rec.forget.counts.sum() > 0 and np.all(rec.forget.presented == 6)


def test_analyze_companion_adds_the_runs_score_rows_per_subset(tmp_path, capsys):
    """geomprobe analyze --companion on a run's activation file adds the per-subset summary of the
    run's train/scores.csv (metrics.csv rows, not table columns); without --companion it does not."""
    from geomprobe.cli.main import main
    from geomprobe.io import save_activations
    from geomprobe.scores import write_scores

    rng = np.random.default_rng(4)
    run = tmp_path / "run"
    (run / "train").mkdir(parents=True)
    n = 40
    sub = np.where(np.arange(n) < 16, "permuted", "unpermuted")
    write_scores(run / "train", {"index": np.arange(n), "subset": sub, "label": np.arange(n) % 4,
                                 "true_label": np.arange(n) % 4, "forgetting": np.where(sub == "permuted", 3, 1),
                                 "never_learned": np.zeros(n, int), "first_learned": np.ones(n, int),
                                 "n_presented": np.full(n, 5), "el2n": rng.random(n), "aum": rng.random(n)},
                 {"epochs": 5, "el2n_epoch": 1})
    acts = run / "acts_final.npz"
    save_activations(acts, np.arange(n) % 4, {"l1": rng.standard_normal((n, 6)).astype(np.float32)})
    for flag, out in ((["--companion"], tmp_path / "a1"), ([], tmp_path / "a2")):
        rc = main(["analyze", str(acts), "-o", str(out), "--no-mftma", "--quiet", *flag])
        assert rc == 0
        rows = json.loads((out / "metrics.json").read_text())["rows"]
        got = {(r["subset"], r["metric"]): r["value"] for r in rows if r["metric"].startswith("score_")}
        if flag:
            assert got[("permuted", "score_forgetting_mean")] == 3.0
            assert got[("unpermuted", "score_forgetting_mean")] == 1.0
        else:
            assert got == {}
