"""Models of the seed papers: shapes, parameter counts, initialisation statistics, identity constructions."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from geomprobe import InputError  # noqa: E402
from geomprobe.trainers import models as M  # noqa: E402


def _out(model, shape, n=2):
    model.eval()
    with torch.no_grad():
        return model(torch.randn(n, *shape, generator=torch.Generator().manual_seed(0)))


def test_mlp_paper000_init_and_shapes():
    m = M.build_model("mlp", (3, 32, 32), 10, hidden=1024, phi="sin", sigma=0.5, seed=1)
    assert _out(m, (3, 32, 32)).shape == (2, 10)
    assert all(mod.bias is None for mod in m if isinstance(mod, torch.nn.Linear))
    assert M.count_parameters(m) == 3072 * 1024 + 1024 * 10
    w1 = m.fc1.weight.detach().numpy()
    assert abs(w1.mean()) < 0.01 and abs(w1.std() - 0.5) < 0.005  # N(0, sigma^2)
    w2 = m.out.weight.detach().numpy()
    bound = np.sqrt(6 / (1024 + 10))  # Glorot uniform
    assert np.abs(w2).max() <= bound and np.abs(w2).max() > 0.95 * bound
    assert abs(w2.var() - bound ** 2 / 3) < 0.1 * bound ** 2 / 3
    assert m.capture_layers == ("act1", "out")


@pytest.mark.parametrize("phi,fn", [("sin", torch.sin), ("relu", torch.relu), ("sigmoid", torch.sigmoid),
                                    ("linear", lambda t: t)])
def test_mlp_phi(phi, fn):
    m = M.build_model("mlp", (5,), 3, hidden=7, phi=phi, sigma=1.0, seed=0)
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expect = fn(x @ m.fc1.weight.T) @ m.out.weight.T
        np.testing.assert_allclose(m(x).numpy(), expect.numpy(), rtol=1e-5, atol=1e-6)


def test_mlp_four_layer_and_seed():
    m = M.build_model("mlp", (8,), 4, hidden=(16, 16, 16), seed=3)
    assert [n for n, _ in M.weight_layers(m)] == ["fc1", "fc2", "fc3", "out"]
    assert m.capture_layers == ("act1", "act2", "act3", "out")
    again = M.build_model("mlp", (8,), 4, hidden=(16, 16, 16), seed=3)
    assert torch.equal(m.fc2.weight, again.fc2.weight)
    other = M.build_model("mlp", (8,), 4, hidden=(16, 16, 16), seed=4)
    assert not torch.equal(m.fc2.weight, other.fc2.weight)


def test_build_model_leaves_global_rng_alone():
    state = torch.get_rng_state()
    M.build_model("feedforward", (10,), 3, width=8, seed=5)
    assert torch.equal(state, torch.get_rng_state())


def test_convnet_h():
    m = M.build_model("convnet-h", (3, 32, 32), 10, seed=0)
    assert _out(m, (3, 32, 32)).shape == (2, 10)
    assert m.conv1.weight.shape == (32, 3, 5, 5) and m.conv2.weight.shape == (64, 32, 5, 5)
    assert m.fc.out_features == 1024 and float(m.fc.bias.detach().abs().sum()) == 0.0


def test_feedforward_table1():
    m = M.build_model("feedforward", (1024,), 100, seed=0)
    assert _out(m, (1024,)).shape == (2, 100)
    # 5 x (1024*1024 + 1024) + 1024*100 + 100: the paper's ~5.2e6 parameters
    assert M.count_parameters(m) == 5 * (1024 * 1024 + 1024) + 1024 * 100 + 100
    assert len(m.capture_layers) == 6


def test_alexnet_table2():
    m = M.build_model("alexnet", (3, 32, 32), 100, seed=0)
    assert _out(m, (3, 32, 32)).shape == (2, 100)
    convs = [mod for _, mod in M.weight_layers(m) if isinstance(mod, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 192, 384, 256, 1024]
    assert [c.kernel_size[0] for c in convs] == [11, 5, 3, 3, 3]
    assert m.out.in_features == 1024


def test_vgg16_table3():
    m = M.build_model("vgg16", (3, 32, 32), 100, width=0.25, fc_width=64, seed=0)
    assert _out(m, (3, 32, 32)).shape == (2, 100)
    convs = [mod for _, mod in M.weight_layers(m) if isinstance(mod, torch.nn.Conv2d)]
    assert len(convs) == 13 and convs[-1].out_channels == 128
    assert len(m.capture_layers) == 16
    full = M.build_model("vgg16", (3, 32, 32), 100, seed=0)
    assert full.fc1.in_features == 512 and full.fc1.out_features == 4096
    narrow = M.build_model("vgg16", (1, 32, 32), 10, width=0.125, seed=0)  # the hidden linear layers scale too
    assert narrow.fc1.in_features == 64 and narrow.fc1.out_features == 512 and narrow.fc2.out_features == 512


def test_resnet18_table4():
    m = M.build_model("resnet18", (3, 32, 32), 100, width=0.25, seed=0)
    assert _out(m, (3, 32, 32)).shape == (2, 100)
    convs = [mod for _, mod in M.weight_layers(m) if isinstance(mod, torch.nn.Conv2d)]
    assert len(convs) == 20  # 1 stem + 16 in blocks + 3 shortcut 1x1 (table 4)
    full = M.build_model("resnet18", (3, 32, 32), 100, seed=0)
    assert 11.1e6 < M.count_parameters(full) < 11.3e6  # the usual CIFAR ResNet18 with 100 classes
    for name in m.capture_layers:
        m.get_submodule(name)


def test_convnet3_paper004():
    m = M.build_model("convnet3", (3, 32, 32), 10, init_std=0.05, seed=0)
    assert _out(m, (3, 32, 32)).shape == (2, 10)
    assert m.out.in_features == 64 * 8 * 8
    assert all(getattr(mod, "bias", None) is None for _, mod in M.weight_layers(m))
    w = torch.cat([p.detach().reshape(-1) for p in m.parameters()])
    assert abs(float(w.std()) - 0.05) < 0.002


@pytest.mark.parametrize("activation", ["linear", "relu"])
def test_fcn_identity_construction(activation):
    shape = (1, 4, 4)
    width = 16 if activation == "linear" else 32
    m = M.build_model("fcn", shape, n_hidden=3, width=width, activation=activation, init="identity", seed=0)
    x = torch.randn(5, *shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(m(x), x)
    rnd = M.build_model("fcn", shape, n_hidden=3, width=width, activation=activation, seed=0)
    assert rnd(x).shape == x.shape
    with pytest.raises(InputError, match=f"needs width >= {32 if activation == 'relu' else 16}, got 8"):
        M.build_model("fcn", shape, n_hidden=1, width=8, activation=activation, init="identity")


def test_deep_convnet_identity_construction():
    m = M.build_model("deep-convnet", (1, 9, 9), depth=4, channels=8, init="identity", seed=0)
    x = torch.randn(3, 1, 9, 9, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(m(x), x)
    paper = M.build_model("deep-convnet", (1, 28, 28), depth=2, seed=0)
    assert paper.conv1.weight.shape == (128, 1, 5, 5) and paper.out.weight.shape == (1, 128, 5, 5)
    with pytest.raises(InputError, match="kernel must be odd"):
        M.build_model("deep-convnet", (1, 8, 8), kernel=4)
    with pytest.raises(InputError, match="channels >= 2 x input channels = 6, got 4"):
        M.build_model("deep-convnet", (3, 8, 8), channels=4, init="identity")


def test_set_trainable():
    m = M.build_model("fcn", (1, 2, 2), n_hidden=2, width=8, seed=0)
    assert M.set_trainable(m, "top") == ["out"]
    assert [p.requires_grad for p in m.parameters()] == [False] * 4 + [True] * 2
    assert M.set_trainable(m, "bottom") == ["fc1"]
    assert M.count_parameters(m, trainable_only=True) == 4 * 8 + 8


def test_model_errors():
    with pytest.raises(InputError, match="model must be one of"):
        M.build_model("transformer")
    with pytest.raises(InputError, match="phi must be one of"):
        M.build_model("mlp", (4,), 2, phi="gelu")
    with pytest.raises(InputError, match=r"needs image inputs \(C, H, W\), got input_shape \(10,\)"):
        M.build_model("alexnet", (10,))
    with pytest.raises(InputError, match="model 'mlp': .*unexpected keyword argument 'depth'"):
        M.build_model("mlp", (4,), 2, depth=3)
