"""Plots people would rather look at than read: training history, ROC, event images.

matplotlib is imported here only (the ``plots`` extra), with the non-interactive Agg backend.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib as mpl

mpl.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from .errors import ConfigError, StoreError


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


@dataclass
class ImageRow:
    """One row of :func:`event_images`: an image per event (2-D), its axis labels (rows,
    columns), its extent (column lo, hi, row lo, hi) and the view it shows (``{dim: value}``
    of the dims that are not summed over, such as the xyz format's ``projection``)."""

    images: np.ndarray
    dims: Sequence[str] = ("", "")
    extent: Sequence[float] | None = None
    view: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return ", ".join(f"{d} {v}" for d, v in self.view.items())


def store_rows(ds, image: str, chosen: Sequence[str], picks: Sequence[int]) -> list[ImageRow]:
    """The rows that show events *picks* of a store split's *image* (an xarray Dataset) over
    its two dims *chosen*.

    Dims left out are summed over (a projection of the image), except a dim of named views
    (text values, such as the xyz format's ``projection``): each view is a row of its own,
    with the projected axes' edges and units (``xy``: x and y) on its panels.
    """
    array = ds[image].isel(event=list(picks))
    others = [d for d in array.dims[1:] if d not in chosen]
    views = [d for d in others if d in ds.coords and (ds[d].dtype.kind in "OUS" or "axes" in ds[d].attrs)]
    summed = array.sum(dim=[d for d in others if d not in views])
    rows = []
    for index in itertools.product(*(range(array.sizes[d]) for d in views)):
        view = {d: ds[d].values[i : i + 1].tolist()[0] for d, i in zip(views, index)}
        images = summed.isel(dict(zip(views, index))).transpose("event", *chosen).values
        axes = [dict(ds[d].attrs) if d in ds.coords else {} for d in chosen]
        names = list(chosen)
        for dim, value in view.items():
            projected = ds[dim].attrs.get("axes", {})
            if isinstance(value, str) and len(value) == len(chosen) and all(a in projected for a in value):
                axes, names = [projected[a] for a in value], list(value)
        edges = [a.get("edges") for a in axes]
        extent = [edges[1][0], edges[1][-1], edges[0][0], edges[0][-1]] if all(edges) else None
        labels = [f"{n} [{a['units']}]" if a.get("units") else n for n, a in zip(names, axes)]
        rows.append(ImageRow(images, labels, extent, view))
    return rows


def event_images(rows: Sequence[ImageRow], titles: Sequence[str], path: str | Path) -> Path:
    """Event images in a grid: a column per event (*titles*), a row per :class:`ImageRow`
    (several views of the same events, such as the projections of an ``xyz`` image)."""
    n = len(titles)
    fig, axes = plt.subplots(len(rows), n, figsize=(3.2 * n, 3 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        for c, (ax, image) in enumerate(zip(axes[r], row.images)):
            im = ax.imshow(image, origin="lower", aspect="auto", extent=row.extent, cmap="viridis")
            ax.set_title(f"{titles[c]}\n{row.name}" if row.name else titles[c])
            ax.set_xlabel(row.dims[1])
            ax.set_ylabel(row.dims[0])
            fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    """Save *fig* at *path* (a PNG where no suffix says otherwise); return where it went."""
    path = Path(path)
    if not path.suffix:
        path = path.with_name(path.name + ".png")
    try:
        kinds = fig.canvas.get_supported_filetypes()
        if path.suffix.lower().lstrip(".") not in kinds:
            msg = f"cannot save a plot as {str(path)!r}: matplotlib writes {', '.join('.' + k for k in sorted(kinds))}"
            raise ConfigError(msg)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(path, dpi=110)
        except OSError as err:
            msg = f"cannot save a plot as {str(path)!r}: {err.strerror or err}"
            raise StoreError(msg) from None
    finally:
        plt.close(fig)
    return path
