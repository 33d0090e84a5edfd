"""`--preset paper` builds the paper's model on the paper's data format: every experiment runs end to end
on fake files in the real on-disk formats (CIFAR binary, idx), with only the schedule and the sample
sizes shortened. The model options (architecture, width, channels, depths, loss) stay the paper's."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from geomprobe.cli.main import main  # noqa: E402
from geomprobe.io import open_activations  # noqa: E402
from geomprobe.trainers.options import SPECS  # noqa: E402

from conftest import write_idx  # noqa: E402

pytestmark = pytest.mark.slow


def _cifar_bin(path, n, n_label_bytes, n_classes, rng):
    labels = np.stack([rng.integers(0, n_classes, n)] * n_label_bytes, axis=1).astype(np.uint8)
    images = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.concatenate([labels, images], axis=1).tofile(path)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for i in range(1, 6):
        _cifar_bin(root / "cifar10" / "cifar-10-batches-bin" / f"data_batch_{i}.bin", 60, 1, 10, rng)
    _cifar_bin(root / "cifar10" / "cifar-10-batches-bin" / "test_batch.bin", 60, 1, 10, rng)
    _cifar_bin(root / "cifar100" / "cifar-100-binary" / "train.bin", 600, 2, 100, rng)
    _cifar_bin(root / "cifar100" / "cifar-100-binary" / "test.bin", 300, 2, 100, rng)
    (root / "mnist").mkdir()
    for split, n in (("train", 100), ("t10k", 50)):
        write_idx(root / "mnist" / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        write_idx(root / "mnist" / f"{split}-labels-idx1-ubyte", rng.integers(0, 10, n))
    return root


SHORT = {  # schedule and sample sizes only
    "extreme-memorization": ["epochs=1", "sigmas=[0.01,10.0]", "n_train=200", "n_test=50", "capture_per_class=2"],
    "label-noise-geometry": ["epochs=1", "keep_every=1", "capture_per_class=2", "split_every=1",
                             "split_batch=16", "batch_size=128", "n_train=400", "n_test=200", "rewind_epochs=[0]",
                             "capture_classes=10"],
    "identity-crisis": ["steps=2", "conv_depths=[1,20]", "fcn_hidden=[1,9]", "n_per_rho=1", "collapse_per_class=2"],
    "normalized-loss": ["epochs=1", "init_stds=[1e-4,0.14]", "n_train=200", "n_test=50", "capture_per_class=2"],
}


@pytest.mark.parametrize("name", list(SHORT))
def test_paper_preset_runs_the_papers_model_on_the_papers_data_format(tmp_path, data_root, name, capsys):
    out = tmp_path / name
    sets = [f"data_root={data_root / SPECS[name].presets['paper']['dataset']}"] + SHORT[name]
    argv = ["train", name, "--preset", "paper", "--device", "cpu", "--out", str(out), "--quiet"]
    rc = main(argv + [x for s in sets for x in ("--set", s)])
    assert rc == 0, capsys.readouterr().err
    state = json.loads((out / "experiment.json").read_text())
    assert state["status"] == "done" and state["preset"] == "paper"
    paper = SPECS[name].presets["paper"]
    for key, value in paper.items():  # nothing but the shortened keys differs from the paper preset
        if not any(s.startswith(key + "=") for s in SHORT[name]):
            assert state["options"][key] == value, key
    acts = sorted(out.rglob("acts_*.npz"))
    assert acts
    with open_activations(acts[-1]) as f:
        layers = list(f.layers)
    if name == "label-noise-geometry":  # VGG16 of table 3: 13 conv + 2 hidden linear + output, 100 classes
        assert len([x for x in layers if x.startswith("relu")]) == 15 and layers[-1] == "out"
        rows = json.loads((out / "rewind.json").read_text())
        assert len({r["layer"] for r in rows}) == 16 and {r["epoch"] for r in rows} == {0}
    summary = json.loads((out / "summary.json").read_text())
    assert [e["name"] for e in summary["effects"]]
