"""Capture hooks, subset sampling, the training loop (determinism, resume), checkpoints and rewinding."""
import json
import os
import subprocess
import sys
import textwrap
from collections import OrderedDict

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from geomprobe import InputError  # noqa: E402
from geomprobe.io import open_activations  # noqa: E402
from geomprobe.trainers import models as M  # noqa: E402
from geomprobe.trainers.capture import capture, default_layers, record_activations, sample_subsets, write_activations  # noqa: E402,E501
from geomprobe.trainers.checkpoint import (checkpoint_path, epoch_checkpoints, load_checkpoint,  # noqa: E402
                                           layer_param_names, relative_weight_distance, rewind_layer,
                                           rewind_table, save_checkpoint)
from geomprobe.trainers.train import TrainConfig, evaluate, make_loss, train  # noqa: E402


def _n_hooks(model):
    return sum(len(m._forward_hooks) for m in model.modules())


def _toy(n=60, d=6, k=3, seed=0):
    g = np.random.default_rng(seed)
    y = np.arange(n) % k
    x = (g.standard_normal((n, d)) + 2.0 * np.eye(k, d)[y]).astype(np.float32)
    return x, y


# -- capture -------------------------------------------------------------------------------------
def test_capture_records_post_nonlinearity_and_removes_hooks():
    m = M.build_model("mlp", (6,), 3, hidden=5, phi="relu", seed=0)
    x = torch.randn(4, 6)
    with capture(m) as cap:
        assert _n_hooks(m) == 2
        m(x[:2])
        m(x[2:])
    assert _n_hooks(m) == 0
    acts = cap.activations
    assert list(acts) == ["act1", "out"]
    np.testing.assert_allclose(acts["act1"], torch.relu(x @ m.fc1.weight.T).detach().numpy(), rtol=1e-6)
    assert (acts["act1"] >= 0).all() and acts["out"].shape == (4, 3)


def test_capture_removes_hooks_on_error():
    m = M.build_model("mlp", (6,), 3, hidden=5, seed=0)
    with pytest.raises(RuntimeError, match="boom"):
        with capture(m, ["act1", "out"]):
            assert _n_hooks(m) == 2
            raise RuntimeError("boom")
    assert _n_hooks(m) == 0
    with pytest.raises(RuntimeError):  # a failing forward pass (wrong input size) also leaves no hook
        with capture(m):
            m(torch.randn(2, 7))
    assert _n_hooks(m) == 0


def test_capture_any_module_and_errors():
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    assert default_layers(net) == ["1", "2"]
    acts = record_activations(net, np.ones((3, 4), np.float32), include_input=True)
    assert list(acts) == ["input", "1", "2"] and acts["1"].shape == (3, 8)
    assert net.training  # eval mode was restored
    with pytest.raises(InputError, match=r"layer\(s\) 'nope' not found in Sequential; modules: 0, 1, 2"):
        capture(net, ["nope"])
    with capture(net, ["0"]) as cap:
        pass
    with pytest.raises(InputError, match="layer '0' recorded no output"):
        cap.activations


def test_write_activations_readable(tmp_path):
    m = M.build_model("convnet3", (1, 8, 8), 4, channels=3, seed=0)
    x = np.random.default_rng(0).random((10, 1, 8, 8)).astype(np.float32)
    y = np.arange(10) % 4
    path = write_activations(tmp_path / "a.npz", m, x, y, split=np.array(["train"] * 6 + ["test"] * 4),
                             meta={"who": "test"})
    f = open_activations(path)
    assert f.layers == ["relu1", "relu2", "out"] and f.meta["who"] == "test"
    assert f.layer("relu1").shape == (10, 3 * 4 * 4)
    assert set(f.subsets()) == {"unpermuted", "test"}
    with pytest.raises(InputError, match="already exists"):
        write_activations(tmp_path / "a.npz", m, x, y)
    with pytest.raises(InputError, match="labels has 9 entries but x has 10 rows"):
        write_activations(tmp_path / "b.npz", m, x, y[:9])


def test_sample_subsets_matches_format(tmp_path):
    y = np.repeat(np.arange(6), 30)
    g = np.random.default_rng(0)
    perm = g.random(y.size) < 0.5
    ytrain = y.copy()
    ytrain[perm] = g.permutation(y[perm])
    yte = np.repeat(np.arange(6), 10)
    s = sample_subsets(y, ytrain, perm, yte, n_classes=4, n_per_class=5, seed=1)
    assert s.classes.size == 4
    unp = (s.split == "train") & ~s.permuted
    for c in s.classes:
        assert ((s.labels == c) & unp).sum() == 5  # M per class, by true label
        assert ((s.train_labels == c) & s.permuted).sum() == 5  # M per class, by training label
        assert ((s.labels == c) & (s.split == "test")).sum() == 5
    again = sample_subsets(y, ytrain, perm, yte, n_classes=4, n_per_class=5, seed=1)
    np.testing.assert_array_equal(again.index, s.index)
    x_tr = np.arange(y.size, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    x_te = -np.arange(yte.size, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32) - 1
    xs = s.gather(x_tr, x_te)
    from geomprobe.io import save_activations

    save_activations(tmp_path / "s.npz", s.labels, {"x": xs}, train_labels=s.train_labels, permuted=s.permuted,
                     split=s.split)
    subs = open_activations(tmp_path / "s.npz").subsets()
    assert set(subs) == {"unpermuted", "permuted", "restored", "test"}
    np.testing.assert_array_equal(subs["permuted"].rows, subs["restored"].rows)
    np.testing.assert_array_equal(ytrain[xs[subs["permuted"].rows, 0].astype(int)], subs["permuted"].labels)


# -- training ------------------------------------------------------------------------------------
def _cfg(**kw):
    base = dict(epochs=3, batch_size=16, lr=0.1, seed=0, progress="off")
    base.update(kw)
    return TrainConfig(**base)


def _mlp(seed=0):
    return M.build_model("mlp", (6,), 3, hidden=16, phi="relu", sigma=0.3, seed=seed)


def test_train_deterministic_and_logs(tmp_path):
    x, y = _toy()
    a, b = _mlp(), _mlp()
    ra = train(a, x, y, x[:20], y[:20], cfg=_cfg(), out=tmp_path / "a")
    rb = train(b, x, y, x[:20], y[:20], cfg=_cfg())
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert ra.final_epoch == 3 and ra.steps == 12
    assert ra.history[-1]["train_acc"] > ra.history[0]["train_acc"]
    lines = [json.loads(s) for s in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines if r["kind"] == "epoch"] == [0, 1, 2, 3]
    assert set(epoch_checkpoints(tmp_path / "a")) == {0, 1, 2, 3}
    ck = load_checkpoint(checkpoint_path(tmp_path / "a", "last"))
    assert ck["epoch"] == 3 and ck["step"] == 12 and ck["config"]["train"]["lr"] == 0.1 and ck["done"]
    summary = json.loads((tmp_path / "a" / "train_summary.json").read_text())
    assert summary["final_epoch"] == 3
    c = _mlp()
    train(c, x, y, cfg=_cfg(seed=1))
    assert not torch.equal(c.fc1.weight, a.fc1.weight)  # another seed, another order


def test_train_refuses_finished_run(tmp_path):
    x, y = _toy()
    train(_mlp(), x, y, cfg=_cfg(epochs=1), out=tmp_path)
    with pytest.raises(InputError, match="holds a finished run .* pass force=True"):
        train(_mlp(), x, y, cfg=_cfg(epochs=1), out=tmp_path)
    r = train(_mlp(), x, y, cfg=_cfg(epochs=1), out=tmp_path, if_done="return")
    assert r.final_epoch == 1
    train(_mlp(), x, y, cfg=_cfg(epochs=1), out=tmp_path, force=True)


class _Kill(Exception):
    pass


def test_resume_after_interruption_gives_same_weights(tmp_path):
    """An exception after step 7 (mid-epoch 2) kills the run; the rerun resumes from epoch 1's checkpoint
    and ends with exactly the weights of an uninterrupted run."""
    x, y = _toy()
    ref = _mlp()
    train(ref, x, y, x, y, cfg=_cfg(epochs=4, optimizer="adam", lr=0.01), out=tmp_path / "ref")

    def boom(step, model):
        if step == 7:
            raise _Kill()

    killed = _mlp()
    with pytest.raises(_Kill):
        train(killed, x, y, x, y, cfg=_cfg(epochs=4, optimizer="adam", lr=0.01), out=tmp_path / "run", on_step=boom)
    assert load_checkpoint(checkpoint_path(tmp_path / "run", "last"))["epoch"] == 1
    resumed = _mlp()
    r = train(resumed, x, y, x, y, cfg=_cfg(epochs=4, optimizer="adam", lr=0.01), out=tmp_path / "run")
    assert r.resumed_from == 1
    for pa, pb in zip(ref.parameters(), resumed.parameters()):
        assert torch.equal(pa, pb)
    ref_log = (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()
    run_log = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    strip = lambda lines: [{k: v for k, v in json.loads(s).items() if k != "time"} for s in lines]  # noqa: E731
    assert strip(ref_log) == strip(run_log)


def test_resume_refuses_other_config(tmp_path):
    x, y = _toy()
    with pytest.raises(_Kill):
        train(_mlp(), x, y, cfg=_cfg(), out=tmp_path, on_step=lambda s, m: (_ for _ in ()).throw(_Kill()) if s == 5 else None)
    with pytest.raises(InputError, match="unfinished run with a different configuration"):
        train(_mlp(), x, y, cfg=_cfg(lr=0.2), out=tmp_path)


_KILL_SCRIPT = textwrap.dedent("""
    import sys, numpy as np
    from geomprobe.trainers import models as M
    from geomprobe.trainers.train import TrainConfig, train
    g = np.random.default_rng(0)
    y = np.arange(200) % 3
    x = (g.standard_normal((200, 6)) + 2.0 * np.eye(3, 6)[y]).astype(np.float32)
    m = M.build_model("mlp", (6,), 3, hidden=32, phi="relu", sigma=0.3, seed=0)
    def slow(step, model):
        if sys.argv[2] == "slow" and step > 13:
            import time; time.sleep(0.5)
    train(m, x, y, cfg=TrainConfig(epochs=5, batch_size=16, lr=0.05, progress="off"), out=sys.argv[1], on_step=slow)
    import torch; torch.save(m.state_dict(), sys.argv[1] + "/final_weights.pt")
""")


@pytest.mark.slow
def test_resume_after_sigkill(tmp_path):
    """A subprocess killed with SIGKILL after its first epoch checkpoint resumes to the same weights."""
    import signal
    import time

    script = tmp_path / "run.py"
    script.write_text(_KILL_SCRIPT)
    env = dict(os.environ)
    subprocess.run([sys.executable, str(script), str(tmp_path / "ref"), "fast"], check=True, env=env)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "run"), "slow"], env=env)
    ck = tmp_path / "run" / "checkpoints" / "epoch_0001.pt"
    t0 = time.time()
    while not ck.exists() and time.time() - t0 < 120:
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "run" / "final_weights.pt").exists()
    subprocess.run([sys.executable, str(script), str(tmp_path / "run"), "fast"], check=True, env=env)
    a = torch.load(tmp_path / "ref" / "final_weights.pt")
    b = torch.load(tmp_path / "run" / "final_weights.pt")
    for k in a:
        assert torch.equal(a[k], b[k])


def test_stop_criteria_and_losses(tmp_path):
    x, y = _toy()
    r = train(_mlp(), x, y, cfg=_cfg(epochs=50, stop_train_acc=0.9, lr=0.2))
    assert r.final_epoch < 50 and r.history[-1]["train_acc"] >= 0.9
    r = train(_mlp(), x, y, cfg=_cfg(epochs=50, max_steps=5))
    assert r.steps == 5
    for loss in ("hinge", "squared"):
        r = train(_mlp(), x, y, cfg=_cfg(loss=loss, epochs=1))
        assert np.isfinite(r.final["train_loss"])
    z = torch.tensor([[2.0, 0.0]])
    assert float(make_loss("squared")(z, torch.tensor([0]))) == pytest.approx(0.5 * (1 + 0))
    # regression (identity task): target = input
    fc = M.build_model("fcn", (1, 2, 2), n_hidden=1, width=8, seed=0)
    xi = np.ones((1, 1, 2, 2), np.float32)
    r = train(fc, xi, xi, cfg=_cfg(loss="mse", epochs=2, repeat=10, batch_size=1, lr=0.05))
    assert r.steps == 20 and r.final["train_loss"] < r.history[0]["train_loss"]


def test_config_errors():
    with pytest.raises(InputError, match="optimizer must be one of 'sgd', 'adam'; got 'rmsprop'"):
        TrainConfig(optimizer="rmsprop")
    with pytest.raises(InputError, match="epochs must be an integer >= 1, got 0"):
        TrainConfig(epochs=0)
    with pytest.raises(InputError, match="lr must be a number > 0, got -1"):
        TrainConfig(lr=-1)
    x, y = _toy()
    with pytest.raises(InputError, match="y_train has 59 entries but x_train has 60 rows"):
        train(_mlp(), x, y[:59], cfg=_cfg())
    from geomprobe.trainers.train import TrainingDiverged

    with pytest.raises(TrainingDiverged, match="training diverged: loss is"):
        train(_mlp(), x * 1e30, y, cfg=_cfg(lr=1e10))


def test_alignment_logging_calls_gradstats(tmp_path):
    pytest.importorskip("geomprobe.trainers.gradstats")
    x, y = _toy()
    train(_mlp(), x, y, cfg=_cfg(epochs=1, align_every=2), out=tmp_path)
    recs = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    align = [r for r in recs if r["kind"] == "align"]
    assert [r["step"] for r in align] == [0, 2]
    assert "fc1.weight" in align[0]["stats"] and "omega_in_class" in align[0]["stats"]["fc1.weight"]
    ratio = [r for r in recs if r["kind"] == "grad_ratio"]
    assert ratio and ratio[0]["grad_over_weight"]["fc1.weight"] > 0
    assert set(ratio[0]["rep_omega_in_class"]) == {"act1", "out"}
    assert -1 <= ratio[0]["rep_omega_in_class"]["act1"] <= 1


def test_device_side_loss_reads_match_per_step_reads(tmp_path):
    """sync_every > 1 (the CUDA default) reads the step losses in blocks: the history, the log and the
    weights are bit for bit those of a read after every step (the CPU default)."""
    x, y = _toy()
    runs = []
    for k, d in ((1, tmp_path / "a"), (7, tmp_path / "b")):
        m = _mlp()
        r = train(m, x, y, cfg=_cfg(epochs=3, batch_size=8), out=d, sync_every=k)
        runs.append((r, m, [json.loads(s) for s in (d / "metrics.jsonl").read_text().splitlines()]))
    (ra, ma, la), (rb, mb, lb) = runs
    strip = lambda recs: [{k: v for k, v in r.items() if k != "time"} for r in recs]  # noqa: E731
    assert strip(la) == strip(lb) and len(la) == 4 and all(r["batch_loss"] > 0 for r in la[1:])
    assert all(torch.equal(a, b) for a, b in zip(ma.parameters(), mb.parameters()))
    from geomprobe.trainers.train import TrainingDiverged

    # a divergence inside a block names the step of the first non-finite loss
    with pytest.raises(TrainingDiverged, match=r"loss is (nan|inf) at step \d+ \(epoch 1\)"):
        train(_mlp(), x * 1e30, y, cfg=_cfg(lr=1e10), sync_every=5)
    with pytest.raises(InputError, match="sync_every must be an integer >= 1, got 0"):
        train(_mlp(), x, y, cfg=_cfg(), sync_every=0)
    with pytest.raises(InputError, match="align_route must be one of"):
        train(_mlp(), x, y, cfg=_cfg(), align_route="vmap")


def test_alignment_by_the_recorder_inside_the_step(tmp_path):
    """align_route='recorder': the statistics come from the step's own backward; the update is the
    plain one (weights equal to a run without statistics) and Omega matches the one-shot route."""
    pytest.importorskip("geomprobe.trainers.gradstats")
    x, y = _toy()
    m_rec, m_off, m_one = _mlp(), _mlp(), _mlp()
    train(m_rec, x, y, cfg=_cfg(epochs=1, align_every=2), out=tmp_path / "rec", align_route="recorder")
    train(m_off, x, y, cfg=_cfg(epochs=1))
    train(m_one, x, y, cfg=_cfg(epochs=1, align_every=2), out=tmp_path / "one")
    assert all(torch.equal(a, b) for a, b in zip(m_rec.parameters(), m_off.parameters()))
    read = lambda d: [json.loads(s) for s in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    rec = [r for r in read(tmp_path / "rec") if r["kind"] == "align"]
    one = [r for r in read(tmp_path / "one") if r["kind"] == "align"]
    assert [r["step"] for r in rec] == [r["step"] for r in one] == [0, 2]
    for a, b in zip(rec, one):
        for k in ("fc1.weight", "logits"):
            assert a["stats"][k]["omega"] == pytest.approx(b["stats"][k]["omega"], rel=1e-4, abs=1e-6)
            assert a["stats"][k]["omega_in_class"] == pytest.approx(b["stats"][k]["omega_in_class"], rel=1e-4, abs=1e-6)


# -- checkpoints, weight distance, rewinding -----------------------------------------------------
def test_weight_distance_and_atomic_checkpoint(tmp_path):
    m = M.build_model("fcn", (1, 2, 2), n_hidden=1, width=4, seed=0)
    w0 = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        m.fc1.weight.mul_(1.5)
        m.fc1.bias.zero_()
    d = relative_weight_distance(w0, m)
    assert d["fc1.weight"] == pytest.approx(0.5) and d["out.weight"] == 0.0
    assert d["fc1.bias"] == pytest.approx(1.0)
    p = save_checkpoint(tmp_path / "c" / "x.pt", {"model": m.state_dict(), "epoch": 1})
    assert load_checkpoint(p)["epoch"] == 1
    assert [f.name for f in (tmp_path / "c").iterdir()] == ["x.pt"]  # no temporary left over
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(InputError, match="not a readable geomprobe checkpoint"):
        load_checkpoint(tmp_path / "bad.pt")
    with pytest.raises(InputError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "none.pt")


def test_rewind_table(tmp_path):
    x, y = _toy()
    m = _mlp()
    train(m, x, y, x, y, cfg=_cfg(epochs=3), out=tmp_path)
    final = {k: v.clone() for k, v in m.state_dict().items()}
    ck0 = load_checkpoint(checkpoint_path(tmp_path, 0))["model"]
    rewind_layer(m, "fc1", ck0)
    assert torch.equal(m.fc1.weight, ck0["fc1.weight"]) and torch.equal(m.out.weight, final["out.weight"])
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    rows = rewind_table(m, final, epoch_checkpoints(tmp_path), lambda mod: {"acc": evaluate(mod, xt, yt, "ce")["acc"]})
    assert len(rows) == 4 * 2 and {r["layer"] for r in rows} == {"fc1", "out"}
    final_acc = evaluate(m, xt, yt, "ce")["acc"]
    assert all(r["acc"] == pytest.approx(final_acc) for r in rows if r["epoch"] == 3)
    assert torch.equal(m.fc1.weight, final["fc1.weight"])  # the model ends with the final weights
    with pytest.raises(InputError, match="layer 'act1' has no parameters"):
        rewind_layer(m, "act1", ck0)


def test_layer_param_names_groups_batchnorm_with_its_conv():
    """Paper 003 table 3: one layer is Conv + BatchNorm + ReLU; rewinding moves the BN statistics too."""
    vgg = M.build_model("vgg16", (1, 32, 32), 10, width=0.0625, seed=0)
    names = layer_param_names(vgg)
    assert list(names) == [f"conv{i}" for i in range(1, 14)] + ["fc1", "fc2", "out"]
    assert set(names["conv3"]) == {"conv3.weight", "conv3.bias", "bn3.weight", "bn3.bias", "bn3.running_mean",
                                   "bn3.running_var", "bn3.num_batches_tracked"}
    assert set(names["out"]) == {"out.weight", "out.bias"}
    # nested blocks keep depth-first order, and the shortcut's BN stays with the shortcut's conv
    res = M.build_model("resnet18", (1, 32, 32), 10, width=0.0625, seed=0)
    rn = layer_param_names(res)
    assert list(rn)[0] == "conv1" and list(rn)[-1] == "out"
    assert any(k.endswith("shortcut.0") and any(".shortcut.1." in n for n in v) for k, v in rn.items())
    keys = [k for v in rn.values() for k in v]
    assert sorted(keys) == sorted(res.state_dict())  # every tensor belongs to exactly one layer
    # a BatchNorm with no conv / linear before it (here after a pool) is a layer of its own
    odd = nn.Sequential(OrderedDict([("c", nn.Conv2d(1, 2, 3)), ("p", nn.MaxPool2d(2)), ("bn", nn.BatchNorm2d(2))]))
    assert list(layer_param_names(odd)) == ["c", "bn"]
    state = {k: v + 1 if v.is_floating_point() else v + 1 for k, v in vgg.state_dict().items()}
    before = vgg.bn4.running_var.clone()
    rewind_layer(vgg, "conv4", state)
    assert torch.equal(vgg.bn4.running_var, before + 1) and torch.equal(vgg.conv4.weight, state["conv4.weight"])
    assert not torch.equal(vgg.conv5.weight, state["conv5.weight"])


@pytest.mark.gpu
def test_cuda_training_path(tmp_path):
    x, y = _toy()
    m = _mlp()
    r = train(m, x, y, x, y, cfg=_cfg(device="cuda", amp=True), out=tmp_path)
    assert next(m.parameters()).is_cuda and r.final_epoch == 3
    conv = M.build_model("convnet3", (1, 8, 8), 3, channels=4, seed=0)
    xi = np.random.default_rng(0).random((32, 1, 8, 8)).astype(np.float32)
    r = train(conv, xi, np.arange(32) % 3, cfg=_cfg(device="cuda", channels_last=True, epochs=1))
    assert np.isfinite(r.final["train_loss"])


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["extreme-memorization", "label-noise-geometry", "identity-crisis",
                                  "normalized-loss"])
def test_every_experiment_runs_on_cuda_and_measures_like_the_cpu(name, tmp_path):
    """Each tiny preset end to end on CUDA (E3 once evaluated its probes on CPU tensors against a CUDA
    model): the run finishes, writes its effects, and its numbers match the CPU run's to rounding."""
    from geomprobe.trainers.effects import EFFECT_NAMES, load_summary
    from geomprobe.trainers.experiments import run_experiment
    from geomprobe.trainers.options import options_for

    out = {}
    for device in ("cuda", "cpu"):
        o = options_for(name, "tiny", seed=0, device=device, progress="off")
        run_experiment(name, o, tmp_path / device, preset="tiny")
        out[device] = load_summary(tmp_path / device)
    assert [e["name"] for e in out["cuda"]["effects"]] == EFFECT_NAMES[name]
    exp = {d: json.loads((tmp_path / d / "experiment.json").read_text()) for d in out}
    assert exp["cuda"]["status"] == "done"
    # same data, init and order: losses agree to float32 kernel differences, accuracies to a few examples
    for end, tol in (("loss", dict(rtol=2e-2, atol=1e-4)), ("acc", dict(rtol=0, atol=0.03))):
        got = {d: [v for k, v in _numbers(exp[d]["result"]) if k.endswith(end)] for d in exp}
        assert len(got["cuda"]) == len(got["cpu"])
        np.testing.assert_allclose(got["cuda"], got["cpu"], **tol, err_msg=f"{name}: *{end}")
    assert any(k.endswith(("loss", "acc")) for k, _ in _numbers(exp["cuda"]["result"]))


def _numbers(obj, key=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _numbers(v, f"{key}/{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _numbers(v, f"{key}/{i}")
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield key, float(obj)


def test_e2_image_size_zero_pads_and_rejects_a_smaller_size():
    from geomprobe.trainers.experiments import _e2_data
    from geomprobe.trainers.options import options_for

    o = options_for("label-noise-geometry", "tiny", sets=["dataset=digits", "image_size=12", "n_train=50",
                                                          "n_test=20"])
    ds = _e2_data(o)
    assert ds.x_train.shape[1:] == (1, 12, 12) and ds.x_test.shape[1:] == (1, 12, 12)
    assert ds.input_shape == (1, 12, 12)
    # the 2-pixel border is the padding: after the per-channel normalisation it holds one value
    border = np.concatenate([ds.x_train[:, :, :2].ravel(), ds.x_train[:, :, -2:].ravel()])
    assert np.ptp(border) == 0
    o2 = options_for("label-noise-geometry", "tiny", sets=["dataset=digits", "image_size=6"])
    with pytest.raises(InputError, match="image_size must be >= the images' size 8x8, got 6"):
        _e2_data(o2)
