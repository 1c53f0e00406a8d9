"""The frozen/trained history (unit x step) and what is made from it: the
per-unit summary a user reads and the heatmap PNG handed to loggers.

Rows are stored as packed bit masks (``bytes``, one bit per unit): plain
Python that checkpoints with the callback, ~13 bytes a step for BERT-base.
"""

from __future__ import annotations

import pathlib
from typing import Any, Sequence

import numpy as np

__all__ = ["FreezeHistory"]


class FreezeHistory:
    """Which units were frozen at each recorded optimizer step."""

    def __init__(self, names: Sequence[str]):
        self.names = list(names)
        self.steps: list[int] = []
        self._rows: list[bytes] = []

    def record(self, step: int, frozen: Sequence[int]) -> None:
        mask = np.zeros(len(self.names), dtype=bool)
        mask[list(frozen)] = True
        self.steps.append(int(step))
        self._rows.append(np.packbits(mask).tobytes())

    def __len__(self) -> int:
        return len(self.steps)

    def frozen_sets(self) -> list[frozenset[str]]:
        """Per recorded step, the names of the frozen units."""
        m = self.matrix()
        return [frozenset(self.names[j] for j in np.flatnonzero(m[:, i]))
                for i in range(m.shape[1])]

    def matrix(self) -> np.ndarray:
        """``(units, steps)`` bool array, True where frozen."""
        if not self._rows:
            return np.zeros((len(self.names), 0), dtype=bool)
        bits = np.unpackbits(np.frombuffer(b"".join(self._rows), dtype=np.uint8)
                             .reshape(len(self._rows), -1), axis=1)[:, :len(self.names)]
        return bits.T.astype(bool)

    def summary(self) -> list[dict[str, Any]]:
        """Per unit: steps frozen, steps trained, frozen fraction (most frozen first)."""
        m = self.matrix()
        n = max(m.shape[1], 1)
        rows = [{"unit": name, "frozen_steps": int(m[i].sum()),
                 "trained_steps": int(m.shape[1] - m[i].sum()),
                 "frozen_fraction": float(m[i].sum() / n)} for i, name in enumerate(self.names)]
        return sorted(rows, key=lambda r: (-r["frozen_fraction"], r["unit"]))

    def summary_table(self, top: int | None = None) -> str:
        rows = self.summary()[:top] if top else self.summary()
        lines = ["| unit | frozen steps | trained steps | frozen % |", "|---|---:|---:|---:|"]
        lines += [f"| {r['unit']} | {r['frozen_steps']} | {r['trained_steps']} | "
                  f"{100 * r['frozen_fraction']:.1f} |" for r in rows]
        return "\n".join(lines)

    def plot_heatmap(self, path: str | pathlib.Path, title: str = "SlimFit frozen layers"
                     ) -> pathlib.Path:
        """Write the unit x step heatmap (dark = frozen) as a PNG."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        m = self.matrix()
        h = max(4.0, min(0.12 * len(self.names), 24.0))
        fig = Figure(figsize=(12, h), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        extent = (self.steps[0] - 0.5, self.steps[-1] + 0.5, len(self.names) - 0.5, -0.5) \
            if self.steps else None
        ax.imshow(m.astype(np.uint8), aspect="auto", interpolation="nearest", cmap="Greys",
                  vmin=0, vmax=1, extent=extent)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("unit")
        ax.set_yticks(range(len(self.names)))
        ax.set_yticklabels(self.names, fontsize=max(3, min(8, 400 // max(len(self.names), 1))))
        ax.set_title(f"{title} (dark = frozen)")
        path = pathlib.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
        return path

    def state_dict(self) -> dict[str, Any]:
        return {"names": list(self.names), "steps": list(self.steps), "rows": list(self._rows)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = [int(s) for s in state["steps"]]
        self._rows = [bytes(r) for r in state["rows"]]
