"""Tests of geomprobe.probes: the deprecated re-export alias, probe_rows over an activations file (both
probe families), and the probe kernels without JIT."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from geomprobe import InputError
from geomprobe import identity_probes
from geomprobe import probes as gp
from geomprobe._kernels import probes as kern


@pytest.fixture
def rng():
    return np.random.default_rng(20240607)


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



def test_probes_alias_reexports_the_owning_modules():
    from geomprobe import closed_form, identity_probes, layer_collapse, weights

    owners = {identity_probes: ["make_probe_inputs", "probe_correlations", "probe_heatmap", "ProbeInputs"],
              layer_collapse: ["averaging_classifier", "layerwise_collapse", "LayerCollapse"],
              weights: ["weight_distance", "frobenius_norm_product", "normalized_loss", "normalized_loss_fit"],
              closed_form: ["one_layer_linear_solution", "one_layer_linear_prediction"]}
    for mod, names in owners.items():
        for name in names:
            assert getattr(gp, name) is getattr(mod, name), name
    import geomprobe

    assert all(hasattr(gp, name) for name in gp.__all__)
    assert geomprobe.weight_distance is weights.weight_distance


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
    assert identity_probes._rho_labels(np.array([0.5, 0.501])) == ["rho=0.500", "rho=0.501"]


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
