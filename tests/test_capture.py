"""Capture of real architectures: reused modules (torchvision-style ResNet-18), transformers, module
inputs, reductions, DataLoader batches, streaming writes whose errors name the user's file."""
import tracemalloc

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from geomprobe import InputError  # noqa: E402
from geomprobe.io import open_activations  # noqa: E402
from geomprobe.trainers.capture import (AvgPool, RandomProjection, capture, default_layers,  # noqa: E402
                                        iter_batches, record_activations, write_activations)


# -- a torchvision-style ResNet-18, written here (no torchvision, no download) ----------------------
class BasicBlock(nn.Module):
    """torchvision's BasicBlock: its one ReLU module is called twice per forward."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18(nn.Module):
    def __init__(self, n_classes=10, width=4):
        super().__init__()
        w = width
        self.conv1 = nn.Conv2d(3, w, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = nn.Sequential(BasicBlock(w, w), BasicBlock(w, w))
        self.layer2 = nn.Sequential(BasicBlock(w, 2 * w, 2), BasicBlock(2 * w, 2 * w))
        self.layer3 = nn.Sequential(BasicBlock(2 * w, 4 * w, 2), BasicBlock(4 * w, 4 * w))
        self.layer4 = nn.Sequential(BasicBlock(4 * w, 8 * w, 2), BasicBlock(8 * w, 8 * w))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8 * w, n_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@pytest.fixture
def resnet():
    torch.manual_seed(0)
    m = ResNet18()
    with torch.no_grad():  # non-trivial BatchNorm statistics so eval mode differs from identity
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
    return m


def _images(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), np.arange(n) % 3


def _hand_block(block, x):
    """Both ReLU outputs of a BasicBlock computed by hand (eval mode)."""
    first = F.relu(block.bn1(block.conv1(x)))
    identity = x if block.downsample is None else block.downsample(x)
    return first, F.relu(block.bn2(block.conv2(first)) + identity)


def test_resnet_reused_relu_gives_one_layer_per_call_with_the_known_values(resnet, tmp_path):
    x, y = _images()
    path = write_activations(tmp_path / "r.npz", resnet, x, y, batch_size=5)  # 3 batches, the last short
    f = open_activations(path)
    assert f.layers[:5] == ["relu", "layer1.0.relu:0", "layer1.0.relu:1", "layer1.1.relu:0", "layer1.1.relu:1"]
    assert len(f.layers) == 1 + 8 * 2 + 1 and f.layers[-1] == "fc"
    resnet.eval()
    with torch.no_grad():
        stem = resnet.maxpool(F.relu(resnet.bn1(resnet.conv1(x))))
        first, second = _hand_block(resnet.layer1[0], stem)
        logits = resnet(x)
    np.testing.assert_allclose(f.layer("layer1.0.relu:0"), first.reshape(12, -1).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(f.layer("layer1.0.relu:1"), second.reshape(12, -1).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(f.layer("fc"), logits.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(f.labels, y)
    info = f.meta["capture"]["layers"]["layer1.0.relu:1"]
    assert info == {"module": "layer1.0.relu", "call": 1, "tensor": "output", "reduce": "flatten"}
    assert resnet.training is False or True  # mode restored below
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in resnet.modules()) == 0


def test_resnet_first_call_only_and_a_named_call(resnet):
    x, _ = _images(6)
    first = record_activations(resnet, x, ["layer1.0.relu"], calls="first")
    named = record_activations(resnet, x, ["layer1.0.relu:1"])
    both = record_activations(resnet, x, ["layer1.0.relu"])
    assert list(first) == ["layer1.0.relu"] and list(named) == ["layer1.0.relu:1"]
    assert list(both) == ["layer1.0.relu:0", "layer1.0.relu:1"]
    np.testing.assert_array_equal(first["layer1.0.relu"], both["layer1.0.relu:0"])
    np.testing.assert_array_equal(named["layer1.0.relu:1"], both["layer1.0.relu:1"])
    assert not np.allclose(both["layer1.0.relu:0"], both["layer1.0.relu:1"])  # the two calls differ


def test_module_input_captures_a_functional_activation():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(5, 7), nn.Linear(7, 3)

        def forward(self, x):
            return self.fc2(F.relu(self.fc1(x)))  # the ReLU is functional: no module to hook

    torch.manual_seed(1)
    net = Net()
    x = torch.randn(9, 5)
    acts = record_activations(net, x, ["fc2"], inputs=["fc2"])
    assert list(acts) == ["fc2", "fc2:in"]
    with torch.no_grad():
        np.testing.assert_allclose(acts["fc2:in"], F.relu(net.fc1(x)).numpy(), rtol=1e-6)
    assert (acts["fc2:in"] >= 0).all() and (acts["fc2:in"] == 0).any()


def _encoder(batch_first=True, seed=0):
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, dropout=0.1, batch_first=batch_first)
    return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)


def test_transformer_encoder_layers_flattened_and_token_pooled(tmp_path):
    enc = _encoder()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 6, 16, generator=g)
    acts = record_activations(enc, x, ["layers.0", "layers.1"], batch_size=4)
    assert enc.training  # train mode restored (dropout off only while capturing)
    enc.eval()
    with torch.no_grad():
        h0 = enc.layers[0](x)
        h1 = enc.layers[1](h0)
    np.testing.assert_allclose(acts["layers.0"], h0.reshape(10, -1).numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(acts["layers.1"], h1.reshape(10, -1).numpy(), rtol=1e-4, atol=1e-5)
    pooled = record_activations(enc, x, ["layers.1"], reduce=AvgPool(channel_axis=-1))
    np.testing.assert_allclose(pooled["layers.1"], h1.mean(dim=1).numpy(), rtol=1e-4, atol=1e-5)


def test_transformer_without_batch_first_is_refused_naming_the_file_and_cause(tmp_path):
    class SeqFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = _encoder(batch_first=False)

        def forward(self, x):  # x: (batch, sequence, d); the encoder works on (sequence, batch, d)
            return self.enc(x.transpose(0, 1)).transpose(0, 1)

    x = torch.randn(4, 7, 16)
    target = tmp_path / "t.npz"
    with pytest.raises(InputError) as err:
        write_activations(target, SeqFirst(), x, np.arange(4) % 2, ["enc.layers.0"])
    msg = str(err.value)
    assert msg.startswith(f"{target}: layer 'enc.layers.0' gave 7 rows for 4 examples (output shape (7, 4, 16))")
    assert "first axis is not the batch" in msg and "batch_first=True" in msg
    assert ".tmp" not in msg and "partial" not in msg
    assert list(tmp_path.iterdir()) == []  # no target, no temporary left behind


def test_dataloader_batches_tuples_and_dicts(resnet, tmp_path):
    x, y = _images(10)
    ds = torch.utils.data.TensorDataset(x, torch.as_tensor(y))
    loader = torch.utils.data.DataLoader(ds, batch_size=4)
    p = write_activations(tmp_path / "dl.npz", resnet, loader, layers=["layer4.1.relu:1", "fc"])
    direct = record_activations(resnet, x, ["layer4.1.relu:1", "fc"])
    f = open_activations(p)
    np.testing.assert_array_equal(f.labels, y)
    np.testing.assert_allclose(f.layer("fc"), direct["fc"], rtol=1e-5, atol=1e-6)

    class KW(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 4)
            self.out = nn.Linear(4, 2)

        def forward(self, input_ids, scale):
            return self.out(self.emb(input_ids).mean(1) * scale[:, None])

    kw = KW()
    ids = torch.arange(24).reshape(6, 4) % 20
    batches = [{"input_ids": ids[i:i + 3], "scale": torch.ones(3), "labels": torch.tensor([0, 1, 0])}
               for i in (0, 3)]
    acts, labels = record_activations(kw, batches, ["emb", "out"], return_labels=True)
    assert acts["emb"].shape == (6, 16) and acts["out"].shape == (6, 2)  # integer ids are not cast to float
    np.testing.assert_array_equal(labels, [0, 1, 0, 0, 1, 0])
    seen = [(type(inp).__name__, lab) for inp, lab in iter_batches([(x[:2],), x[2:4]])]
    assert [s[0] for s in seen] == ["Tensor", "Tensor"] and seen[0][1] is None


def test_write_activations_labels_checks_name_the_file(resnet, tmp_path):
    x, y = _images(8)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=4)  # no labels
    with pytest.raises(InputError, match=r"n\.npz: no labels: pass labels="):
        write_activations(tmp_path / "n.npz", resnet, loader, layers=["fc"])
    with pytest.raises(InputError, match=r"m\.npz: labels has 5 entries but the data has more rows \(at least 8\)"):
        write_activations(tmp_path / "m.npz", resnet, loader, y[:5], layers=["fc"])
    with pytest.raises(InputError, match=r"s\.npz: split has 7 entries but x has 8 rows"):
        write_activations(tmp_path / "s.npz", resnet, x, y, ["fc"], split=np.array(["train"] * 7))
    with pytest.raises(InputError, match=r"q\.npz: labels has 3 entries but x has 8 rows"):
        write_activations(tmp_path / "q.npz", resnet, x, y[:3], ["fc"])
    (tmp_path / "e.npz").write_bytes(b"x")
    with pytest.raises(InputError, match=r"e\.npz: already exists; pass force=True"):
        write_activations(tmp_path / "e.npz", resnet, x, y, ["fc"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.npz"]


def test_layer_name_errors_and_suggestions(resnet):
    with pytest.raises(InputError, match=r"layer\(s\) 'layer1.0.rleu' not found in ResNet18 \(did you mean "
                                         r"'layer1.0.relu'"):
        capture(resnet, ["layer1.0.rleu"])
    with pytest.raises(InputError, match="calls must be 'all' or 'first', got 'last'"):
        capture(resnet, ["fc"], calls="last")
    with pytest.raises(InputError, match="layers must be distinct, got fc more than once"):
        capture(resnet, ["fc", "fc"])
    with pytest.raises(InputError, match="lists of names, got a single string 'fc'"):
        capture(resnet, "fc")
    with pytest.raises(InputError, match="reduce must be 'flatten', 'avgpool', 'project'.*got 'max'"):
        capture(resnet, ["fc"], reduce="max")  # refused before any forward pass
    with pytest.raises(InputError, match="reduce names layer 'layer1.0.rleu', which is not captured; captured: fc"):
        capture(resnet, ["fc"], reduce={"layer1.0.rleu": "avgpool"})
    with pytest.raises(InputError, match=r"layer\(s\) layer1.0.relu:1 name one call of a module that is also captured "
                                         "whole"):
        capture(resnet, ["layer1.0.relu", "layer1.0.relu:1"])


def test_changing_call_count_is_refused():
    class Loop(nn.Module):
        def __init__(self):
            super().__init__()
            self.act = nn.Tanh()

        def forward(self, x):
            for _ in range(self.n):
                x = self.act(x)
            return x

    m = Loop()
    with capture(m, ["act"]) as cap:
        m.n = 2
        m(torch.ones(2, 1))
        assert cap.layers == ["act:0", "act:1"]
        m.n = 3
        m(torch.ones(2, 1))
        with pytest.raises(InputError, match=r"module 'act' was called 3 time\(s\) in this forward pass but 2 in "
                                             r"the first.*calls='first'"):
            cap.layers
    with capture(m, ["act"], calls="first") as cap:
        m(torch.ones(2, 1))
        m.n = 2
        m(torch.ones(2, 1))
        np.testing.assert_allclose(cap.activations["act"], np.tanh(np.ones((4, 1))), rtol=1e-6)


def test_avgpool_and_random_projection_known_answers(resnet):
    x, _ = _images(5)
    full = record_activations(resnet, x, ["layer2.0.relu:1"])["layer2.0.relu:1"]  # (5, 8 * 4 * 4)
    maps = full.reshape(5, 8, 4, 4)
    pooled = record_activations(resnet, x, ["layer2.0.relu:1"], reduce="avgpool")["layer2.0.relu:1"]
    np.testing.assert_allclose(pooled, maps.mean(axis=(2, 3)), rtol=1e-5, atol=1e-6)
    pooled2 = record_activations(resnet, x, ["layer2.0.relu:1"], reduce=AvgPool(2))["layer2.0.relu:1"]
    np.testing.assert_allclose(pooled2, maps.reshape(5, 8, 2, 2, 2, 2).mean(axis=(3, 5)).reshape(5, -1), rtol=1e-5,
                               atol=1e-6)
    spec = RandomProjection(dim=20, seed=3)
    proj = record_activations(resnet, x, ["layer2.0.relu:1", "fc"], reduce=spec)
    m = spec.matrix("layer2.0.relu", 128)
    np.testing.assert_allclose(np.linalg.norm(m, axis=1), 1.0, rtol=1e-5)  # unit rows, as the MFTMA reference
    np.testing.assert_allclose(proj["layer2.0.relu:1"], full @ m.T, rtol=1e-4, atol=1e-5)
    assert proj["fc"].shape == (5, 10)  # 10 <= dim features: stored as they are
    again = record_activations(resnet, x, ["layer2.0.relu:1"], reduce=RandomProjection(dim=20, seed=3))
    np.testing.assert_array_equal(again["layer2.0.relu:1"], proj["layer2.0.relu:1"])
    other = RandomProjection(dim=20, seed=4).matrix("layer2.0.relu", 128)
    assert not np.allclose(other, m)
    chained = record_activations(resnet, x, ["layer2.0.relu:1"], reduce=[AvgPool(2), RandomProjection(dim=8)])
    assert chained["layer2.0.relu:1"].shape == (5, 8)
    per_layer = record_activations(resnet, x, ["layer2.0.relu"], reduce={"layer2.0.relu:1": "avgpool"})
    assert per_layer["layer2.0.relu:0"].shape == (5, 128) and per_layer["layer2.0.relu:1"].shape == (5, 8)
    with pytest.raises(InputError, match=r"layer 'layer2.0.relu': a random projection of 128 features to 20 needs "
                                         r"a 0.00 GiB matrix, above max_bytes"):
        record_activations(resnet, x, ["layer2.0.relu:1"], reduce=RandomProjection(dim=20, max_bytes=1000))


def test_streaming_capture_memory_is_one_batch(tmp_path):
    """50 batches of 64 x 4096 float32 (1 MiB each): the numpy memory peak stays a few batches while the
    file grows to 50 MiB (tracemalloc sees numpy's buffers)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 4096), nn.ReLU())
    n, bs = 50 * 64, 64
    data = [(torch.randn(bs, 8), torch.arange(bs) % 4) for _ in range(n // bs)]
    tracemalloc.start()
    try:
        path = write_activations(tmp_path / "big.npz", net, data, layers=["1"])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    size = path.stat().st_size
    assert size > 50 * 2**20
    assert peak < 12 * 2**20, f"peak {peak / 2**20:.1f} MiB for a {size / 2**20:.0f} MiB file"
    f = open_activations(path)
    assert f.shape("act/1") == (n, 4096) and f.is_stored("act/1")


@pytest.mark.gpu
def test_cuda_model_and_tensors_match_cpu(resnet, tmp_path):
    x, y = _images(6)
    cpu = record_activations(resnet, x, ["layer1.0.relu", "fc"])
    model = resnet.to("cuda")
    p = write_activations(tmp_path / "g.npz", model, x.to("cuda"), torch.as_tensor(y).numpy(),
                          ["layer1.0.relu", "fc"], reduce={"fc": RandomProjection(dim=4)})
    f = open_activations(p)
    np.testing.assert_allclose(f.layer("layer1.0.relu:1"), cpu["layer1.0.relu:1"], rtol=1e-3, atol=1e-3)
    proj = RandomProjection(dim=4).matrix("fc", 10)
    np.testing.assert_allclose(f.layer("fc"), cpu["fc"] @ proj.T, rtol=1e-3, atol=1e-3)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x.cuda(), torch.as_tensor(y).cuda()),
                                         batch_size=4)
    acts, labels = record_activations(model, loader, ["fc"], return_labels=True)
    np.testing.assert_array_equal(labels, y)
    np.testing.assert_allclose(acts["fc"], cpu["fc"], rtol=1e-3, atol=1e-3)


def test_default_layers_of_resnet_lists_modules_not_calls(resnet):
    names = default_layers(resnet)
    assert names[:3] == ["relu", "layer1.0.relu", "layer1.1.relu"] and names[-1] == "fc"
