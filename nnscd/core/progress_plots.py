"""Per-epoch curves beside nnU-Net's progress.png (keep statistics, pruning rates)."""
from typing import Dict, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from nnscd.core.safe_io import atomic_path  # noqa: E402


def per_epoch_figure(series: Dict[str, Sequence[float]], title: str, ylabel: str,
                     references: Optional[Dict[str, float]] = None) -> plt.Figure:
    """One line per series over epochs, dashed horizontal references (chance levels, say), legend beside the axes.

    Drawn in matplotlib's default style: nnU-Net's progress plot sets seaborn's font_scale 2.5 for the whole process,
    which would make every label here too large to fit."""
    with plt.style.context("default"):
        fig, ax = plt.subplots(figsize=(9, 4.5))
        for (label, values), color in zip(series.items(), plt.cm.tab10.colors):
            ax.plot(range(len(values)), values, marker="o", color=color, label=label)
            if references and label in references:
                ax.axhline(references[label], color=color, ls="--", lw=1, label=f"{label}: chance")
        ax.set(xlabel="epoch", ylabel=ylabel, ylim=(0, 1.02))
        ax.set_title(title, fontsize=11)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        fig.tight_layout()
    return fig


def plot_per_epoch(series: Dict[str, Sequence[float]], path: str, title: str, ylabel: str,
                   references: Optional[Dict[str, float]] = None) -> None:
    """`per_epoch_figure` written to `path` as PNG, atomically, cropped to what it draws."""
    fig = per_epoch_figure(series, title, ylabel, references)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
