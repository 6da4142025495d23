"""Figures reviewers look at in MLflow: ROC, reliability diagram, confusion matrix, and
predicted masks over a few de-identified test crops."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from numpy.typing import NDArray  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from pipelines.evaluate import reliability  # noqa: E402


def roc(y: NDArray, p: NDArray, title: str):
    fig, ax = plt.subplots(figsize=(4, 4))
    if len(set(y.tolist())) == 2:
        fpr, tpr, _ = roc_curve(y, p)
        ax.plot(fpr, tpr, lw=2)
    ax.plot([0, 1], [0, 1], "--", color="grey")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=title)
    fig.tight_layout()
    return fig


def reliability_diagram(y: NDArray, p: NDArray, title: str):
    mean_p, freq, count = reliability(y, p)
    fig, ax = plt.subplots(figsize=(4, 4))
    ok = count > 0
    ax.plot([0, 1], [0, 1], "--", color="grey")
    ax.plot(mean_p[ok], freq[ok], "o-")
    ax.set(xlabel="predicted probability", ylabel="observed frequency", title=title, xlim=(0, 1), ylim=(0, 1))
    fig.tight_layout()
    return fig


def confusion(y: NDArray, p: NDArray, threshold: float, title: str):
    pred = (p >= threshold).astype(int)
    cm = np.array([[np.sum((y == a) & (pred == b)) for b in (0, 1)] for a in (0, 1)])
    fig, ax = plt.subplots(figsize=(3.6, 3.2))
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=12)
    ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=["normal", "hypoplasia"],
           yticklabels=["normal", "hypoplasia"], xlabel="predicted", ylabel="truth", title=title)
    fig.tight_layout()
    return fig


def overlays(images: NDArray, labels: NDArray, n: int = 6):
    """Predicted cerebellum (red) and cisterna magna (blue) on de-identified crops."""
    k = min(n, len(images))
    fig, axes = plt.subplots(1, max(k, 1), figsize=(2 * max(k, 1), 2.2))
    axes = np.atleast_1d(axes)
    for ax, img, lab in zip(axes, images[:k], labels[:k], strict=False):
        rgb = np.repeat(np.clip(img[0], 0, 1)[..., None], 3, axis=2)
        rgb[lab == 1] = 0.5 * rgb[lab == 1] + 0.5 * np.array([1.0, 0, 0])
        rgb[lab == 2] = 0.5 * rgb[lab == 2] + 0.5 * np.array([0, 0.4, 1.0])
        ax.imshow(rgb)
        ax.axis("off")
    fig.tight_layout()
    return fig
