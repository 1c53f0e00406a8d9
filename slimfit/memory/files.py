"""Writes ledger reports to disk: per-module tables (CSV and markdown), the
history of measured steps, and a stacked-bar chart of the breakdown.

Why a separate module: the Lightning callback, the benchmark scripts and the
experiment reports all write the same files, and none of them should carry
plotting code. Matplotlib is used through its object API with the Agg canvas,
so no global backend is switched.
"""

from __future__ import annotations

import csv
import pathlib
from typing import Sequence

from slimfit.memory.report import CATEGORIES, MemoryReport

__all__ = ["write_memory_files", "plot_breakdown"]

_COLORS = {"parameters": "#4c72b0", "gradients": "#dd8452",
           "optimizer_state": "#55a868", "activations": "#c44e52"}


def plot_breakdown(history: Sequence[tuple[int, MemoryReport]], path: str | pathlib.Path,
                   depth: int | None = None, top: int = 30) -> pathlib.Path:
    """Stacked bars: one per measured step (left) and one per module of the
    last measurement, the ``top`` largest (right). Returns the PNG path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not history:
        raise ValueError("plot_breakdown needs at least one (step, MemoryReport) pair")
    fig = Figure(figsize=(13, 6), layout="constrained")
    FigureCanvasAgg(fig)
    ax_steps, ax_mods = fig.subplots(1, 2, width_ratios=[1, 2])
    steps = [str(s) for s, _ in history]
    bottom = [0.0] * len(history)
    for c in CATEGORIES:
        vals = [getattr(r, c) / 2**20 for _, r in history]
        ax_steps.bar(steps, vals, bottom=bottom, label=c.replace("_", " "), color=_COLORS[c])
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax_steps.set_xlabel("optimizer step")
    ax_steps.set_ylabel("MiB")
    ax_steps.set_title("training memory per measured step")
    ax_steps.legend(fontsize="small")

    rows = sorted(history[-1][1].grouped(depth).items(), key=lambda kv: kv[1].total,
                  reverse=True)[:top][::-1]
    names = [n for n, _ in rows]
    left = [0.0] * len(rows)
    for c in CATEGORIES:
        vals = [getattr(mb, c) / 2**20 for _, mb in rows]
        ax_mods.barh(names, vals, left=left, color=_COLORS[c])
        left = [a + v for a, v in zip(left, vals)]
    ax_mods.set_xlabel("MiB")
    ax_mods.set_title(f"per module, step {history[-1][0]} (largest {len(rows)})")
    ax_mods.tick_params(axis="y", labelsize=7)
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def write_memory_files(history: Sequence[tuple[int, MemoryReport]], out_dir: str | pathlib.Path,
                       depth: int | None = None) -> dict[str, pathlib.Path]:
    """Write ``memory_layers.csv``/``.md`` (last measurement, per module),
    ``memory_steps.csv`` (every measurement) and ``memory_breakdown.png``.

    Returns:
        ``{"layers_csv", "layers_md", "steps_csv", "plot"}`` -> written paths.
    """
    if not history:
        raise ValueError("write_memory_files needs at least one (step, MemoryReport) pair")
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    step, last = history[-1]
    paths = {"layers_csv": out / "memory_layers.csv", "layers_md": out / "memory_layers.md",
             "steps_csv": out / "memory_steps.csv", "plot": out / "memory_breakdown.png"}
    rows = last.module_rows(depth)
    with open(paths["layers_csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["module", *CATEGORIES, "total"])
        w.writeheader()
        w.writerows(rows)
    paths["layers_md"].write_text(
        last.summary_table(f"Training memory at step {step}") + "\n\n" + last.module_table(depth) + "\n")
    with open(paths["steps_csv"], "w", newline="") as f:
        # union over steps: host-held columns appear only once something is offloaded
        keys = list(dict.fromkeys(k for _, r in history for k in r.scalars(prefix="")))
        w = csv.writer(f)
        w.writerow(["step", *keys])
        for s, r in history:
            sc = r.scalars(prefix="")
            w.writerow([s, *(int(sc.get(k, 0)) for k in keys)])
    plot_breakdown(history, paths["plot"], depth=depth)
    return paths
