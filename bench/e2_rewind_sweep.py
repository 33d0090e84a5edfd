"""How robust is E2's rewinding effect? Train the small preset (with option overrides) for several seeds
in parallel and print, per configuration, how many seeds pass the rewinding criterion.

    python bench/e2_rewind_sweep.py --device cuda --seeds 0-7 --jobs 8 --out DIR \
        --config base '{}' --config keep2 '{"keep_every": 2}'

Only training, the rewind table and the MFTMA-free part of the summary run (no capacities), so a
seed costs about 30-70 s on an H100 and 400 s on the 2-core CPU. Every finished run appends one JSON
line to DIR/results.jsonl (resumable: runs already there are skipped); the table is printed at the end
and by ``--table`` alone. ``--budget S`` stops starting runs after S seconds (device calls have limits).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

EXPERIMENT = "label-noise-geometry"
REWIND = "rewinding_last_layers_recovers_test_accuracy"


def _one(name: str, config: dict, seed: int, device: str, out: str, threads: int) -> dict:
    import torch

    from geomprobe.trainers.effects import summarize
    from geomprobe.trainers.experiments import run_experiment
    from geomprobe.trainers.options import options_for

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    opts = options_for(EXPERIMENT, "small", config, None, seed=seed, device=device, progress="off")
    run_dir = Path(out) / f"{name}-s{seed}"
    run_experiment(EXPERIMENT, opts, run_dir, force=True, preset="small", summarize=False)
    s = summarize(run_dir, mftma=False, write=False)
    eff = {e["name"]: e for e in s["effects"]}
    m = eff[REWIND]["measured"]
    split = eff["gradient_split_unpermuted_dominates_early"]
    return {"config": name, "options": config, "seed": seed, "device": device,
            "wall_s": round(time.perf_counter() - t0, 1), "passed": eff[REWIND]["passed"],
            "best_test_acc": m.get("best_test_acc"), "final_test_acc": m.get("final_test_acc"),
            "recovered_fraction": m.get("recovered_fraction"), "rewound_layer": m.get("rewound_layer"),
            "rewind_epoch": m.get("rewind_epoch"), "any_layer": m.get("any_layer"),
            "split_passed": split["passed"], "split_ratio": split["measured"].get("mean_ratio"),
            # raw material for re-deriving the criterion on other epoch grids, locally
            "rewind": json.loads((run_dir / "rewind.json").read_text()),
            "curve": [{k: r.get(k) for k in ("epoch", "train_acc", "test_acc", "permuted_acc", "restored_acc")}
                      for r in map(json.loads, (run_dir / "train" / "metrics.jsonl").read_text().splitlines())
                      if r.get("kind") == "epoch"]}


def _table(rows: list[dict]) -> str:
    lines = ["| config | seeds | rewinding passed | recovered fraction mean (min-max) | any layer: mean | "
             "best / final test acc | split passed | s per run |", "|---|---|---|---|---|---|---|---|"]
    for name in dict.fromkeys(r["config"] for r in rows):
        rs = sorted((r for r in rows if r["config"] == name), key=lambda r: r["seed"])
        fr = [r["recovered_fraction"] for r in rs if r["recovered_fraction"] is not None]
        anyf = [r["any_layer"]["recovered_fraction"] for r in rs
                if r.get("any_layer") and r["any_layer"]["recovered_fraction"] is not None]
        mean = lambda v: sum(v) / len(v) if v else float("nan")  # noqa: E731
        lines.append(f"| {name} `{json.dumps(rs[0]['options'])}` | {','.join(str(r['seed']) for r in rs)} | "
                     f"{sum(r['passed'] for r in rs)}/{len(rs)} | {mean(fr):.2f} ({min(fr, default=0):.2f}-"
                     f"{max(fr, default=0):.2f}) | {mean(anyf):.2f} | "
                     f"{mean([r['best_test_acc'] for r in rs]):.3f} / {mean([r['final_test_acc'] for r in rs]):.3f} | "
                     f"{sum(r['split_passed'] for r in rs)}/{len(rs)} | {mean([r['wall_s'] for r in rs]):.0f} |")
    return "\n".join(lines)


def _f(v) -> str:
    return "nan" if v is None else f"{v:.2f}"


def _seeds(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        out.extend(range(int(a), int(b) + 1) if b else [int(a)])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", nargs=2, action="append", metavar=("NAME", "JSON"), default=[])
    p.add_argument("--seeds", default="0-3")
    p.add_argument("--device", default="cpu")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--threads", type=int, default=2, help="torch threads per run")
    p.add_argument("--budget", type=float, default=0, help="start no run after this many seconds (0: no limit)")
    p.add_argument("--out", required=True)
    p.add_argument("--table", action="store_true", help="only print the table of DIR/results.jsonl")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    res = out / "results.jsonl"
    rows = [json.loads(x) for x in res.read_text().splitlines() if x.strip()] if res.is_file() else []
    if a.table:
        print(_table(rows))
        return 0
    configs = [(n, json.loads(j)) for n, j in a.config] or [("base", {})]
    done = {(r["config"], r["seed"]) for r in rows}
    # seeds outer, configs inner: a stopped sweep still has every configuration on its first seeds
    todo = [(n, c, s) for s in _seeds(a.seeds) for n, c in configs if (n, s) not in done]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(a.jobs, mp_context=mp.get_context("spawn")) as pool:
        running = {}
        while todo or running:
            while todo and len(running) < a.jobs and not (a.budget and time.perf_counter() - t0 > a.budget):
                n, c, s = todo.pop(0)
                running[pool.submit(_one, n, c, s, a.device, str(out), a.threads)] = (n, s)
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for f in finished:
                n, s = running.pop(f)
                try:
                    r = f.result()
                except Exception as exc:  # report and go on: one broken configuration must not stop the sweep
                    print(f"{n} seed {s} failed: {exc!r}", file=sys.stderr, flush=True)
                    continue
                rows.append(r)
                with res.open("a") as fh:
                    fh.write(json.dumps(r) + "\n")
                anyl = r["any_layer"] or {}
                print(f"[{time.perf_counter() - t0:5.0f} s] {n} seed {s}: recovered {_f(r['recovered_fraction'])} "
                      f"({r['rewound_layer']} @ {r['rewind_epoch']}), any {_f(anyl.get('recovered_fraction'))}"
                      f" ({anyl.get('layer')}), {r['wall_s']} s", flush=True)
    if todo:
        print(f"budget reached: {len(todo)} runs not started", file=sys.stderr)
    print(_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
