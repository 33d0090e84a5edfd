"""Linear CKA and the Procrustes angle: netrep-style known answers, n x n brute-force twins, files."""
import csv
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.linalg import orthogonal_procrustes

from geomprobe import InputError
from geomprobe.io import save_activations
from geomprobe.similarity import (SIMILARITY_FIELDS, layer_similarity, linear_cka, procrustes_distance,
                                  similarity_rows, write_similarity_csv)


def _cka_twin(X, Y):
    """Kornblith et al.: HSIC = tr(K H L H) with n x n Gram matrices."""
    n = X.shape[0]
    H = np.eye(n) - 1.0 / n
    K, L = H @ X @ X.T @ H, H @ Y @ Y.T @ H
    return np.sum(K * L) / np.sqrt(np.sum(K * K) * np.sum(L * L))


def _hsic1_twin(K, L):
    """Song et al. 2012 eq. 5 on the raw (uncentred) Gram matrices."""
    n = K.shape[0]
    K, L = K.copy(), L.copy()
    np.fill_diagonal(K, 0)
    np.fill_diagonal(L, 0)
    one = np.ones(n)
    return (np.trace(K @ L) + (one @ K @ one) * (one @ L @ one) / ((n - 1) * (n - 2))
            - 2.0 / (n - 2) * one @ K @ L @ one) / (n * (n - 3))


def _cka1_twin(X, Y):
    K, L = X @ X.T, Y @ Y.T
    return _hsic1_twin(K, L) / np.sqrt(_hsic1_twin(K, K) * _hsic1_twin(L, L))


def _procrustes_twin(X, Y):
    """Solve the Procrustes problem explicitly (zero-padded to a common width) and take the angle."""
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    Xc, Yc = Xc / np.linalg.norm(Xc), Yc / np.linalg.norm(Yc)
    w = max(Xc.shape[1], Yc.shape[1])
    Xp = np.pad(Xc, ((0, 0), (0, w - Xc.shape[1])))
    Yp = np.pad(Yc, ((0, 0), (0, w - Yc.shape[1])))
    R, _ = orthogonal_procrustes(Xp, Yp)
    return math.acos(min(1.0, np.sum((Xp @ R) * Yp)))


@pytest.mark.parametrize("p,q", [(8, 5), (60, 7), (70, 90)])  # narrow, one wide, both wide (n = 40)
def test_matches_brute_force_twins(rng, p, q):
    X = rng.standard_normal((40, p)) + 3.0
    Y = X[:, :min(p, q)] @ rng.standard_normal((min(p, q), q)) + rng.standard_normal((40, q)) - 1.0
    r = layer_similarity(X, Y)
    assert r.cka == pytest.approx(_cka_twin(X, Y), rel=1e-10)
    assert r.cka_unbiased == pytest.approx(_cka1_twin(X, Y), rel=1e-10)
    assert r.procrustes_angle == pytest.approx(_procrustes_twin(X, Y), rel=1e-10)
    assert linear_cka(X, Y) == r.cka and linear_cka(X, Y, unbiased=True) == r.cka_unbiased
    assert procrustes_distance(X, Y) == r.procrustes_angle


@pytest.mark.parametrize("d", [6, 80])
def test_rotation_scale_translation_give_identity(rng, d):
    X = rng.standard_normal((50, d))
    Q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    for Y in (X @ Q, 7.5 * X, 0.2 * X @ Q + 4.0):
        r = layer_similarity(X, Y)
        assert r.cka == pytest.approx(1.0, abs=1e-10)
        assert r.cka_unbiased == pytest.approx(1.0, abs=1e-10)
        assert r.procrustes_angle == pytest.approx(0.0, abs=1e-7)  # arccos(1 - e) ~ sqrt(2e)


def test_noise_moves_all_three(rng):
    X = rng.standard_normal((200, 10))
    prev = layer_similarity(X, X)
    for s in (0.3, 1.0, 3.0):
        r = layer_similarity(X, X + s * rng.standard_normal(X.shape))
        assert r.cka < prev.cka and r.cka_unbiased < prev.cka_unbiased and r.procrustes_angle > prev.procrustes_angle
        prev = r
    # a nonlinear map changes CKA, a non-orthogonal linear map changes the Procrustes angle
    assert layer_similarity(X, X @ np.diag(np.linspace(0.1, 3, 10))).procrustes_angle > 0.1


def test_minibatch_path(rng):
    X = rng.standard_normal((40, 60))
    Q, _ = np.linalg.qr(rng.standard_normal((60, 60)))
    r = layer_similarity(X, 2 * X @ Q, max_gram_n=10, batch_size=10)
    assert r.method == "minibatch" and r.cka_unbiased == pytest.approx(1.0, abs=1e-10)
    assert math.isnan(r.cka) and "minibatch" in r.notes[0]
    ind = layer_similarity(X, rng.standard_normal((40, 60)), max_gram_n=10, batch_size=20)
    assert abs(ind.cka_unbiased) < 0.5


def test_bad_input_is_refused(rng):
    with pytest.raises(InputError, match="Y has 3 rows but X has 4 rows"):
        layer_similarity(np.ones((4, 2)), np.ones((3, 2)))
    with pytest.raises(InputError, match="at least 2 rows"):
        layer_similarity(np.ones((1, 2)), np.ones((1, 2)))
    r = layer_similarity(np.ones((5, 2)), rng.standard_normal((5, 2)))
    assert math.isnan(r.cka) and math.isnan(r.procrustes_angle) and "constant" in r.notes[0]


@settings(deadline=None, max_examples=25)
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(0.01, 100), shift=st.floats(-50, 50))
def test_invariances(seed, scale, shift):
    rng = np.random.default_rng(seed)
    X, Y = rng.standard_normal((20, 5)), rng.standard_normal((20, 9))
    Y[:, :5] += X
    Q, _ = np.linalg.qr(rng.standard_normal((9, 9)))
    p = rng.permutation(20)
    base = layer_similarity(X, Y)
    for Xb, Yb in ((scale * X, Y), (X, Y @ Q), (X + shift, Y - shift), (X[p], Y[p]), (Y, X)):
        r = layer_similarity(Xb, Yb)
        assert r.cka == pytest.approx(base.cka, rel=1e-8)
        assert r.cka_unbiased == pytest.approx(base.cka_unbiased, rel=1e-7, abs=1e-10)
        assert r.procrustes_angle == pytest.approx(base.procrustes_angle, rel=1e-8)
    assert 0 <= base.cka <= 1 + 1e-12 and 0 <= base.procrustes_angle <= math.pi / 2


def _files(tmp_path, rng):
    y = np.repeat(np.arange(3), 10)
    a = rng.standard_normal((30, 6))
    Q, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    f1 = save_activations(tmp_path / "e1.npz", y, {"l1": a, "l2": np.tanh(a @ rng.standard_normal((6, 40)))})
    f2 = save_activations(tmp_path / "e2.npz", y, {"l1": 3 * a @ Q + 1, "l2": rng.standard_normal((30, 40))})
    return str(f1), str(f2), y


def test_similarity_rows_and_csv(tmp_path, rng):
    f1, f2, y = _files(tmp_path, rng)
    rows, notes = similarity_rows([f1, f2])
    assert len(rows) == 3 * 6  # 4 (file, layer) items -> 6 pairs x 3 metrics
    v = {(r["file_a"], r["layer_a"], r["file_b"], r["layer_b"], r["metric"]): r["value"] for r in rows}
    assert v[(f1, "l1", f2, "l1", "cka")] == pytest.approx(1.0, abs=1e-10)
    assert v[(f1, "l1", f2, "l1", "procrustes_angle")] == pytest.approx(0.0, abs=1e-7)
    assert v[(f1, "l2", f2, "l2", "cka")] < 0.9
    assert len(similarity_rows([f1, f2], scope="files")[0]) == 2 * 3
    assert len(similarity_rows([f1, f2], scope="layers")[0]) == 2 * 3
    path = write_similarity_csv(tmp_path / "similarity.csv", rows)
    with open(path, newline="") as fh:
        got = list(csv.DictReader(fh))
    assert tuple(got[0]) == SIMILARITY_FIELDS and len(got) == len(rows)
    assert float(got[0]["value"]) == rows[0]["value"]


def test_similarity_rows_refuses_other_examples(tmp_path, rng):
    f1, _, y = _files(tmp_path, rng)
    f3 = save_activations(tmp_path / "e3.npz", y[::-1].copy(), {"l1": rng.standard_normal((30, 6))})
    with pytest.raises(InputError, match="holds other examples"):
        similarity_rows([f1, str(f3)], layers=["l1"])
    with pytest.raises(InputError, match="no layer 'zz'"):
        similarity_rows([f1], layers=["zz"])
    with pytest.raises(InputError, match="scope must be one of"):
        similarity_rows([f1], scope="both")


def test_plots_draw_the_similarity_heatmap_and_score_histograms(tmp_path, rng):
    """geomprobe plot: similarity.csv -> a layer x layer heatmap (symmetric, identity diagonal); the
    scores.csv of the analysed files' run -> per-subset histograms; score_* rows draw no line figure."""
    pytest.importorskip("matplotlib")
    from geomprobe.plots import build_figures, load_metrics
    from geomprobe.scores import score_metric_rows, write_scores
    from geomprobe.similarity import similarity_csv

    run = tmp_path / "run"
    (run / "train").mkdir(parents=True)
    acts = str(run / "acts_final.npz")
    n = 30
    sub = np.where(np.arange(n) < 10, "permuted", "unpermuted")
    write_scores(run / "train", {"index": np.arange(n), "subset": sub, "label": np.zeros(n, int),
                                 "true_label": np.zeros(n, int), "forgetting": np.where(sub == "permuted", 2, 0),
                                 "never_learned": np.zeros(n, int), "first_learned": np.zeros(n, int),
                                 "n_presented": np.full(n, 4), "el2n": rng.random(n), "aum": rng.random(n)},
                 {"epochs": 4, "el2n_epoch": 1})
    out = tmp_path / "analysis"
    out.mkdir()
    srows, _ = score_metric_rows([acts])
    assert {"file": str(run / "train" / "scores.csv"), "layer": "scores", "subset": "permuted",
            "metric": "score_forgetting_mean", "class": "", "value": 2.0} in srows
    lines = ["file,layer,subset,metric,class,value"] + [f"{acts},{x},test,participation_ratio,,{v}"
                                                        for x, v in (("a", 3.0), ("b", 2.0), ("c", 1.5))]
    lines += [f"{r['file']},{r['layer']},{r['subset']},{r['metric']},{r['class']},{r['value']}" for r in srows]
    (out / "metrics.csv").write_text("\n".join(lines) + "\n")
    sim = [{"file_a": acts, "layer_a": a, "file_b": acts, "layer_b": b, "metric": m, "value": v}
           for a, b, v in (("a", "b", 0.9), ("a", "c", 0.5), ("b", "c", 0.7))
           for m in ("cka", "procrustes_angle")]
    (out / "similarity.csv").write_text(similarity_csv(sim))
    figs = build_figures(load_metrics(out))
    assert set(figs) == {"other", "similarity", "scores"}  # no line figure of score_* rows
    ax = figs["similarity"][0].axes[0]
    A = ax.images[0].get_array()
    assert A[0, 1] == A[1, 0] == 0.9 and A[1, 2] == 0.7 and A[0, 0] == 1.0
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b", "c"]
    assert len(figs["scores"][0].axes) == 3 and "permuted (n=10)" in [
        t.get_text() for t in figs["scores"][0].axes[0].get_legend().get_texts()]


def test_nuclear_norm_twin_and_svd_fallback(rng, monkeypatch):
    """Sum of singular values: eigvalsh(M^T M) route for well-conditioned M (no SVD called), the SVD for
    a rank-deficient M (tiny singular values fail the rounding bound); both equal the SVD's sum to 1e-12."""
    from geomprobe.similarity import nuclear_norm

    svd = np.linalg.svd
    calls = []
    monkeypatch.setattr(np.linalg, "svd", lambda *a, **k: calls.append(1) or svd(*a, **k))
    for shape in ((40, 40), (60, 25), (25, 60)):
        M = rng.standard_normal(shape) + 3 * np.eye(*shape)
        assert nuclear_norm(M) == pytest.approx(svd(M, compute_uv=False).sum(), rel=1e-12)
    assert calls == []
    L = rng.standard_normal((50, 3)) @ rng.standard_normal((3, 40))  # rank 3: 37 zero singular values
    assert nuclear_norm(L) == pytest.approx(svd(L, compute_uv=False).sum(), rel=1e-12)
    assert calls == [1]
