"""Small matplotlib helpers shared by the benchmarks: headless figures, CDFs, target lines, bars.

Every drawing function takes the ``Axes`` to draw on, so a benchmark composes its own panels and
writes them with ``save``. Matplotlib is imported lazily with the ``Agg`` backend, so importing this
module never needs a display (or matplotlib, until a plot is drawn).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# Quantile levels kept for a latency CDF: coarse in the body, fine in the tail (p99..max), so a
# few hundred numbers in a JSON file redraw the curve including p99.9.
CDF_LEVELS = np.concatenate([np.linspace(0.0, 0.99, 100, endpoint=False), np.linspace(0.99, 1.0, 101)])


def figure(ncols: int = 1, *, width: float = 5.0, height: float = 4.0) -> tuple[Any, list[Any]]:
    """A new figure with ``ncols`` side-by-side axes; returns ``(fig, [ax, ...])``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, list(axes[0])


def quantile_curve(values: Sequence[float] | np.ndarray) -> tuple[list[float], list[float]]:
    """``(x, level)`` of ``values`` at ``CDF_LEVELS``: the compact form of an empirical CDF.

    Empty input gives two empty lists.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return [], []
    return np.quantile(x, CDF_LEVELS).tolist(), CDF_LEVELS.tolist()


def cdf(ax: Any, curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], *, xlabel: str,
        title: str, log_x: bool = False) -> None:
    """One CDF per name from ``(x, level)`` pairs (see ``quantile_curve``); empty curves are skipped."""
    drawn = 0
    for name, (x, level) in curves.items():
        if len(x):
            ax.step(x, level, where="post", label=name)
            drawn += 1
    if not drawn:
        ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
    if log_x and drawn:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fraction of samples <= x")
    ax.set_ylim(0, 1.01)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(loc="lower right", fontsize=7)


def targets(ax: Any, lines: Mapping[str, float]) -> None:
    """Vertical dashed lines at target values, each labelled with its name."""
    for i, (name, x) in enumerate(lines.items()):
        color = f"C{7 + i % 3}"
        ax.axvline(x, color=color, linestyle="--", linewidth=1)
        ax.text(x, 0.93 - 0.07 * i, f" {name}", fontsize=7, color=color)  # top: legends sit low


def percentile_bars(ax: Any, rows: Mapping[str, Mapping[str, float]], *, ylabel: str, title: str) -> None:
    """Grouped bars: one group per row name, one bar per key of its mapping (e.g. p50/p99/p999)."""
    names = list(rows)
    keys = list(dict.fromkeys(k for r in rows.values() for k in r))  # first-seen order
    width = 0.8 / max(len(keys), 1)
    for j, key in enumerate(keys):
        values = [rows[n].get(key, np.nan) for n in names]
        ax.bar(np.arange(len(names)) + j * width, values, width, label=key)
    ax.set_xticks(np.arange(len(names)) + width * (len(keys) - 1) / 2, names, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)


def save(fig: Any, path: Path) -> Path:
    """Lay out, write ``path`` (PNG, 120 dpi, parent folders created), close the figure; return ``path``."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
