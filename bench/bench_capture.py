"""Peak memory of capturing a ResNet-18: streamed to disk (write_activations + ActivationWriter) vs in
memory (record_activations + save_activations), side by side, as the number of examples grows.

Each measurement runs in a fresh subprocess and reports its peak RSS (ru_maxrss) and the RSS before
the capture started (model built, data loader ready), so ``peak - base`` is what the capture cost.
Streaming should stay flat (one batch + bounded buffers) while the file grows; in memory grows with
the file. The ResNet-18 is torchvision's layout (reused ReLUs: 17 ReLU calls + fc captured), random
3 x 32 x 32 images generated batch by batch (the data set itself is never in memory).

    python bench/bench_capture.py                 # n = 500, 1000, 2000, width 16 (about a minute)
    python bench/bench_capture.py --n 2000 8000 --width 32 --batch 200
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import json, os, resource, sys, time
import numpy as np, torch
from torch import nn
torch.set_num_threads(1)
mode, n, width, batch, path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]

class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False); self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False); self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
    def forward(self, x):
        idn = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + idn)

class ResNet18(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.conv1 = nn.Conv2d(3, w, 7, 2, 3, bias=False); self.bn1 = nn.BatchNorm2d(w)
        self.relu = nn.ReLU(inplace=True); self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = nn.Sequential(BasicBlock(w, w), BasicBlock(w, w))
        self.layer2 = nn.Sequential(BasicBlock(w, 2 * w, 2), BasicBlock(2 * w, 2 * w))
        self.layer3 = nn.Sequential(BasicBlock(2 * w, 4 * w, 2), BasicBlock(4 * w, 4 * w))
        self.layer4 = nn.Sequential(BasicBlock(4 * w, 8 * w, 2), BasicBlock(8 * w, 8 * w))
        self.avgpool = nn.AdaptiveAvgPool2d(1); self.fc = nn.Linear(8 * w, 10)
    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))

class Images(torch.utils.data.IterableDataset):   # random images made batch by batch
    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        for i in range(0, n, batch):
            b = min(batch, n - i)
            yield torch.randn(b, 3, 32, 32, generator=g), torch.arange(i, i + b) % 10

from geomprobe.trainers.capture import record_activations, write_activations
from geomprobe.io import save_activations
torch.manual_seed(0)
model = ResNet18(width)
loader = torch.utils.data.DataLoader(Images(), batch_size=None)
kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
if mode == "stream":
    write_activations(path, model, loader, force=True)
else:
    acts, labels = record_activations(model, loader, return_labels=True)
    save_activations(path, labels, acts, force=True)
wall = time.perf_counter() - t
print(json.dumps({"base_mib": kib / 1024, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "wall_s": wall, "file_mib": os.path.getsize(path) / 2**20}))
"""


def measure(mode: str, n: int, width: int, batch: int, folder: str) -> dict:
    path = os.path.join(folder, f"{mode}_{n}.npz")
    out = subprocess.run([sys.executable, "-c", CHILD, mode, str(n), str(width), str(batch), path],
                         capture_output=True, text=True, check=True)
    os.unlink(path)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[500, 1000, 2000], help="examples captured")
    ap.add_argument("--width", type=int, default=16, help="ResNet-18 width (torchvision: 64)")
    ap.add_argument("--batch", type=int, default=100)
    a = ap.parse_args()
    print(f"ResNet-18 width {a.width}, 3x32x32 random images, batch {a.batch}, all 17 ReLU calls + fc flattened; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    head = (f"{'n':>6} {'file MiB':>9} | {'stream: +RSS MiB':>16} {'s':>6} | {'in memory: +RSS MiB':>19} {'s':>6} | "
            f"{'RSS ratio mem/stream':>20}")
    print(head)
    print("-" * len(head))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=".") as folder:
        for n in a.n:
            s = measure("stream", n, a.width, a.batch, folder)
            m = measure("memory", n, a.width, a.batch, folder)
            ds, dm = s["peak_mib"] - s["base_mib"], m["peak_mib"] - m["base_mib"]
            print(f"{n:>6} {s['file_mib']:>9.1f} | {ds:>16.1f} {s['wall_s']:>6.1f} | {dm:>19.1f} {m['wall_s']:>6.1f} | "
                  f"{dm / max(ds, 1e-9):>20.1f}")
    print(f"(total {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
