"""Rewind *groups* of layers of a finished E2 run: every suffix (layer i .. last) and every prefix
(first .. layer i) to every kept epoch, test accuracy printed as a table (docs/reproducing.md).

    python bench/rewind_groups.py DIR

DIR is the output folder of `geomprobe train label-noise-geometry`; nothing is trained. The run's
single-layer table is DIR/rewind.json; this asks whether the memorisation sits in the last layers as a
block (suffix rewinding recovers the test accuracy while prefix rewinding does not) or is spread out.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from geomprobe.trainers import experiments as X
from geomprobe.trainers.checkpoint import (checkpoint_path, epoch_checkpoints, layer_param_names, load_checkpoint,
                                           rewind_layer)
from geomprobe.trainers.options import SPECS
from geomprobe.trainers.train import evaluate


def main(run: str) -> None:
    d = Path(run)
    exp = json.loads((d / "experiment.json").read_text())
    o = SPECS["label-noise-geometry"].options(**exp["options"])
    ds = X._e2_data(o)
    model = X._e2_model(o, ds)
    final = load_checkpoint(checkpoint_path(d / "train", "last"))["model"]
    names = layer_param_names(model)
    layers = list(names)
    ex, ey = torch.as_tensor(ds.x_test), torch.as_tensor(ds.y_test)
    states = {e: load_checkpoint(p)["model"] for e, p in epoch_checkpoints(d / "train").items()}
    res = exp.get("result", {})
    print(f"best test acc {res['best']['test_acc']:.3f} (epoch {res['best_epoch']}), "
          f"final {res['final']['test_acc']:.3f}")
    print("| rewound layers | " + " | ".join(f"epoch {e}" for e in states) + " |")
    print("|---|" + "---|" * len(states))
    for mode in ("suffix", "prefix"):
        for i in range(1, len(layers)):
            group = layers[i:] if mode == "suffix" else layers[:i]
            accs = []
            for st in states.values():
                model.load_state_dict(final)
                for layer in group:
                    rewind_layer(model, layer, st, names)
                accs.append(evaluate(model, ex, ey, "ce")["acc"])
            label = f"{mode} {group[0]} .. {group[-1]}" if len(group) > 1 else f"{mode} {group[0]}"
            print(f"| {label} | " + " | ".join(f"{a:.3f}" for a in accs) + " |")


if __name__ == "__main__":
    main(sys.argv[1])
