"""Plots people would rather look at than read: training history, ROC, event images.

matplotlib is imported here only (the ``plots`` extra), with the non-interactive Agg backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib as mpl

mpl.use("Agg")
import matplotlib.pyplot as plt
import numpy as np


def history(history: dict[str, Sequence[float]], path: str | Path) -> Path:
    """Loss and accuracy per epoch, train and validation side by side."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("loss", "accuracy")):
        for key, style in ((metric, "-o"), (f"val_{metric}", "--s")):
            if key in history:
                epochs = np.arange(1, len(history[key]) + 1)
                ax.plot(epochs, history[key], style, label=key)
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return _save(fig, path)


def roc(metrics: dict[str, Any], path: str | Path) -> Path:
    """The ROC curve with its AUC and the chosen working point."""
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(metrics["roc"]["fpr"], metrics["roc"]["tpr"], label=f"AUC = {metrics['auc']:.3f}")
    ax.plot([0, 1], [0, 1], ":", color="grey", label="chance")
    ax.plot(1 - metrics["background_rejection"], metrics["signal_acceptance"], "o", color="C3",
            label=f"threshold {metrics['best_threshold']:.2f}")
    ax.set_xlabel("false positive rate (1 - background rejection)")
    ax.set_ylabel("true positive rate (signal acceptance)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    return _save(fig, path)


def event_images(images: np.ndarray, titles: Sequence[str], path: str | Path, *,
                 dims: Sequence[str] = ("", ""), extent: Sequence[float] | None = None) -> Path:
    """A row of 2-D event images (the first channel of higher-rank ones)."""
    n = len(images)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3), squeeze=False)
    for ax, image, title in zip(axes[0], images, titles):
        shown = image if image.ndim == 2 else image.reshape(image.shape[0], image.shape[1], -1)[..., 0]
        im = ax.imshow(shown, origin="lower", aspect="auto", extent=extent, cmap="viridis")
        ax.set_title(title)
        ax.set_xlabel(dims[1])
        ax.set_ylabel(dims[0])
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
