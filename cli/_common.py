"""Shared pieces of the subcommands: the summary table and the progress bar."""
from __future__ import annotations

import os
import sys

# aggregate metrics shown in the printed table, in this order (all rows are in the CSV/JSON)
TABLE_METRICS = [
    ("n_examples", "n"),
    ("rep_omega", "omega"),
    ("rep_omega_in_class", "omega_in"),
    ("capacity", "capacity"),
    ("radius", "radius"),
    ("dimension", "dim"),
    ("center_correlation", "rho_c"),
    ("K", "K"),
    ("empirical_capacity", "cap_sim"),
    ("grad_omega_in_class", "g_omega_in"),
    ("grad_diversity", "g_divers"),
    ("grad_cosine_stiffness_in_class", "g_cos_in"),
    ("grad_sign_stiffness", "g_sign"),
    ("grad_confusion_min_cosine", "g_mincos"),
]


def _fmt(v) -> str:
    if v is None:
        return "nan"
    if isinstance(v, str):
        return v
    if float(v).is_integer() and abs(v) < 1e9:
        return str(int(v))
    return f"{v:.4g}"


def summary_table(rows) -> str:
    """One line per (file, layer, subset) with the aggregate metrics present."""
    keys: list[tuple[str, str, str]] = []
    cells: dict[tuple[str, str, str], dict[str, object]] = {}
    for r in rows:
        if r["class"] != "":
            continue
        k = (os.path.basename(r["file"]), r["layer"], r["subset"])
        if k not in cells:
            keys.append(k)
            cells[k] = {}
        cells[k][r["metric"]] = r["value"]
    present = [(m, h) for m, h in TABLE_METRICS if any(m in c for c in cells.values())]
    if not keys:
        return "(no aggregate metrics)"
    multi_file = len({k[0] for k in keys}) > 1
    head = (["file"] if multi_file else []) + ["layer", "subset"] + [h for _, h in present]
    body = [
        ([k[0]] if multi_file else []) + [k[1], k[2]] + [_fmt(cells[k].get(m, "")) if m in cells[k] else "-"
                                                          for m, _ in present]
        for k in keys
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(str(x).rjust(w) if i >= len(head) - len(present) else str(x).ljust(w)
                       for i, (x, w) in enumerate(zip(line, widths))) for line in [head] + body]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def progress_bar(total: int, desc: str, quiet: bool = False):
    """A tqdm bar on stderr, shown only when stderr is a terminal (and not --quiet)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, disable=quiet or not sys.stderr.isatty(),
                unit="task", leave=False)
