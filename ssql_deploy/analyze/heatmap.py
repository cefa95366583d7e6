"""The sensitivity heat-map: layers in graph order down, widths across, weights and activations side by side.

A person scanning 50-odd layers for the few that hurt looks for the bright cells; a table of
250 numbers hides them. The colour scale is logarithmic (sensitivities span orders of magnitude
between 8 and 2 bits), with values at or below zero drawn as the lowest colour.
"""

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import LogNorm

from ssql_deploy.run import atomic_open


def _grid(rows: list[dict[str, Any]], bits: list[int]) -> np.ndarray:
    return np.array([[row["sensitivity"][str(b)] for b in bits] for row in rows], dtype=float).reshape(len(rows), len(bits))


def plot_sensitivity(result: dict[str, Any], path: Path, title: str) -> None:
    bits = result["bits"]
    panels = [("weights", result["weights"], "layer"), ("activations (after)", result["activations"], "layer")]
    grids = [_grid(rows, bits) for _, rows, _ in panels]
    positive = np.concatenate([g[g > 0] for g in grids]) if any((g > 0).any() for g in grids) else np.array([1e-6, 1.0])
    floor = max(float(positive.min()), float(positive.max()) * 1e-6)
    norm = LogNorm(vmin=floor, vmax=float(positive.max()) if positive.max() > floor else floor * 10)
    height = 2.0 + 0.16 * max(len(g) for g in grids)
    fig, axes = plt.subplots(1, 2, figsize=(13, height))
    image = None
    for ax, (name, rows, key), grid in zip(axes, panels, grids, strict=True):
        image = ax.imshow(np.clip(grid, floor, None), aspect="auto", cmap="magma", norm=norm, interpolation="nearest")
        ax.set_xticks(range(len(bits)), [f"{b}-bit" for b in bits])
        ax.set_yticks(range(len(rows)), [row[key] for row in rows], fontsize=6)
        ax.set_title(f"{name}: {len(rows)} quantizers")
    assert image is not None
    fig.colorbar(image, ax=axes, label=result["unit"], shrink=0.8)
    fig.suptitle(title)
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
