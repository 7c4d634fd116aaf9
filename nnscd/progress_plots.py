"""Per-epoch curves beside nnU-Net's progress.png (keep statistics, pruning rates)."""
from typing import Dict, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from nnscd.safe_io import atomic_path  # noqa: E402


def plot_per_epoch(series: Dict[str, Sequence[float]], path: str, title: str, ylabel: str,
                   references: Optional[Dict[str, float]] = None) -> None:
    """One line per series over epochs, dashed horizontal references (chance levels, say), written atomically."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for (label, values), color in zip(series.items(), plt.cm.tab10.colors):
        ax.plot(range(len(values)), values, marker="o", color=color, label=label)
        if references and label in references:
            ax.axhline(references[label], color=color, ls="--", lw=1, label=f"{label}: chance")
    ax.set(xlabel="epoch", ylabel=ylabel, title=title, ylim=(0, 1.02))
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
