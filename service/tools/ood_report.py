"""The picture of ``eddy eval --ood-test``: score histograms of in-scope and out-of-scope rows."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_scores(report: dict[str, Any], path: Path) -> Path:
    """One panel per score: in-scope vs out-of-scope histograms and eddy's threshold; write ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    scores = report["scores"]
    fig, axes = plt.subplots(1, len(scores), figsize=(4.2 * len(scores), 3.2), squeeze=False)
    for ax, (name, m) in zip(axes[0], scores.items(), strict=True):
        edges = np.asarray(m["hist"]["edges"])
        centres, width = (edges[1:] + edges[:-1]) / 2, np.diff(edges)
        for key, colour, label in (("in_scope", "tab:blue", "in scope"), ("ood", "tab:red", "out of scope")):
            counts = np.asarray(m["hist"][key], dtype=float)
            ax.bar(centres, counts / max(counts.sum(), 1), width=width, alpha=0.55, color=colour, label=label)
        if m["threshold"] is not None:
            ax.axvline(m["threshold"], color="black", linestyle="--", linewidth=1, label="eddy's threshold")
        auroc = m["ood_auroc"]
        ax.set_title(f"{name}: AUROC {auroc:.3f}, recall {m['ood_recall']:.2f}, "
                     f"in-scope rejected {m['in_scope_reject_rate']:.3f}" if auroc is not None else name, fontsize=8)
        ax.set_xlabel(name)
    axes[0][0].set_ylabel("share of rows")
    axes[0][0].legend(fontsize=7)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
