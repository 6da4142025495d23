"""Every figure reviewers look at, drawn in one place from the evaluation's tables (the same
tables DVC plots and the reviewer report read): ROC curves, reliability diagrams, a confusion
matrix, and predicted masks over de-identified crops.

Figures are built with matplotlib's object API (`Figure`), which needs no pyplot and no
backend choice at import: nothing global changes when this module is imported.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from numpy.typing import NDArray

CLASSES = ("normal", "hypoplasia")


def roc_figure(curves: list[tuple[str, pd.DataFrame]], title: str) -> Figure:
    """ROC curves (tables with `fpr`, `tpr`), one line per labelled curve."""
    fig = Figure(figsize=(5, 5))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
    for label, roc in curves:
        ax.plot(roc["fpr"], roc["tpr"], lw=2, label=label)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=title, xlim=(0, 1), ylim=(0, 1))
    if any(label for label, _ in curves):
        ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    return fig


def reliability_figure(curves: list[tuple[str, pd.DataFrame]], title: str) -> Figure:
    """Reliability diagrams (tables with `predicted`, `observed`), one line per labelled curve."""
    fig = Figure(figsize=(5, 5))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
    for label, rel in curves:
        ax.plot(rel["predicted"], rel["observed"], "o-", label=label)
    ax.set(xlabel="mean predicted probability", ylabel="observed frequency", title=title, xlim=(0, 1), ylim=(0, 1))
    if any(label for label, _ in curves):
        ax.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    return fig


def confusion_figure(predictions: pd.DataFrame, title: str) -> Figure:
    """The confusion matrix of a table with `actual` and `predicted` class names."""
    cm = np.array([[int(((predictions["actual"] == a) & (predictions["predicted"] == b)).sum()) for b in CLASSES]
                   for a in CLASSES])
    fig = Figure(figsize=(3.4, 3.0))
    ax = fig.add_subplot()
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=12, color="white" if v > cm.max() / 2 else "black")
    ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=CLASSES, yticklabels=CLASSES, xlabel="predicted",
           ylabel="truth", title=title)
    fig.tight_layout()
    return fig


def overlays(images: NDArray, labels: NDArray, n: int = 6) -> Figure:
    """Predicted cerebellum (red) and cisterna magna (blue) on de-identified crops."""
    k = max(min(n, len(images)), 1)
    fig = Figure(figsize=(2 * k, 2.2))
    axes = np.atleast_1d(fig.subplots(1, k))
    for ax, img, lab in zip(axes, images[:k], labels[:k], strict=False):
        rgb = np.repeat(np.clip(img[0], 0, 1)[..., None], 3, axis=2)
        rgb[lab == 1] = 0.5 * rgb[lab == 1] + 0.5 * np.array([1.0, 0, 0])
        rgb[lab == 2] = 0.5 * rgb[lab == 2] + 0.5 * np.array([0, 0.4, 1.0])
        ax.imshow(rgb)
        ax.axis("off")
    fig.tight_layout()
    return fig


def png_base64(fig: Figure, dpi: int = 90) -> str:
    """The figure as a base64 PNG (for a data URI in a self-contained report)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return base64.b64encode(buf.getvalue()).decode()
