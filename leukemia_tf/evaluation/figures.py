"""PNG figures of an evaluation (matplotlib, no display needed).

Figures are drawn on ``matplotlib.figure.Figure`` objects and saved with the
Agg renderer directly, without ``pyplot``: no global backend switch, no
figure manager, nothing left open.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import sklearn.metrics as skm
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

#: Output resolution.
DPI = 110


def _save(figure: Figure, path: str | os.PathLike) -> str:
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=DPI, bbox_inches="tight")
    return str(path)


def _matrix_panel(
    ax,
    matrix: np.ndarray,
    rows: Sequence[str],
    columns: Sequence[str],
    title: str,
    fmt: str,
    vmax: float | None = None,
) -> None:
    peak = float(np.nanmax(matrix)) if np.isfinite(matrix).any() else 0.0
    image = ax.imshow(matrix, cmap="Blues", vmin=0, vmax=vmax or max(peak, 1e-9))
    ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(np.arange(len(columns)), labels=list(columns), rotation=45, ha="right")
    ax.set_yticks(np.arange(len(rows)), labels=list(rows))
    ax.set_xlabel("Predicted")
    ax.set_ylabel("True")
    ax.set_title(title)
    if len(columns) <= 20:
        for (i, j), value in np.ndenumerate(matrix):
            if np.isfinite(value):
                color = "white" if value > 0.6 * (vmax or peak) else "black"
                ax.text(j, i, format(value, fmt), ha="center", va="center", color=color, fontsize=8)


def confusion_matrix_figure(
    matrix: Sequence[Sequence[int]],
    class_names: Sequence[str],
    path: str | os.PathLike,
    title: str = "",
    no_decision: Sequence[int] | None = None,
) -> str:
    """Counts and row-normalised (recall) confusion matrices side by side.

    Args:
      matrix: ``[C, C]`` counts, rows true, columns predicted.
      class_names: ``C`` names.
      path: the PNG to write.
      title: a title over both panels.
      no_decision: optional ``[C]`` counts of examples with no decision,
        drawn as an extra last column.

    Returns:
      ``path`` as a string.
    """
    counts = np.asarray(matrix, np.float64)
    columns = list(class_names)
    if no_decision is not None:
        counts = np.concatenate([counts, np.asarray(no_decision, np.float64)[:, None]], axis=1)
        columns.append("(no decision)")
    rows = counts.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        normalised = np.where(rows > 0, counts / rows, np.nan)
    side = max(4.0, 0.55 * len(columns) + 2.5)
    # Fixed spacing instead of a layout engine: several times faster, and the
    # gap leaves room for the colour bar and the second panel's labels.
    figure = Figure(figsize=(2 * side + 1.5, side))
    left, right = figure.subplots(1, 2, gridspec_kw={"wspace": 0.45})
    _matrix_panel(left, counts, class_names, columns, "Counts", ".0f")
    # A fixed 0-1 scale, so that colours compare across figures.
    _matrix_panel(right, normalised, class_names, columns, "Row-normalised (recall)", ".2f", 1.0)
    if title:
        figure.suptitle(title)
    return _save(figure, path)


def roc_figure(
    y_true: np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    path: str | os.PathLike,
    title: str = "",
) -> str:
    """One-vs-rest ROC curve of every class present (and not alone) in ``y_true``."""
    figure = Figure(figsize=(6.5, 6), layout="constrained")
    ax = figure.subplots()
    drawn = 0
    for c, name in enumerate(class_names):
        positive = np.asarray(y_true) == c
        if positive.all() or not positive.any():
            continue
        fpr, tpr, _ = skm.roc_curve(positive, probs[:, c])
        auc = skm.roc_auc_score(positive, probs[:, c])
        ax.plot(fpr, tpr, lw=1.5, label=f"{name} (AUC {auc:.3f}, n={int(positive.sum())})")
        drawn += 1
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="chance")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("1 - specificity (false-positive rate)")
    ax.set_ylabel("Sensitivity (true-positive rate)")
    ax.set_title(title or "ROC curves (one-vs-rest)")
    if not drawn:
        ax.text(0.5, 0.5, "no class has both positives and negatives", ha="center")
    ax.legend(loc="lower right", fontsize=8)
    return _save(figure, path)


def reliability_figure(
    bins_by_label: dict[str, dict],
    path: str | os.PathLike,
    title: str = "",
) -> str:
    """Reliability diagram(s): accuracy against confidence per bin, with bin counts.

    Args:
      bins_by_label: ``{legend label: calibration.reliability_bins(...)}``,
        e.g. before and after temperature scaling.
      path: the PNG to write.
      title: the title.
    """
    figure = Figure(figsize=(6.5, 7.5), layout="constrained")
    top, bottom = figure.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    top.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfect calibration")
    markers = ("o", "s", "^", "D")
    for k, (label, bins) in enumerate(bins_by_label.items()):
        edges = np.asarray(bins["edges"])
        centres = (edges[:-1] + edges[1:]) / 2
        filled = [i for i, n in enumerate(bins["count"]) if n]
        top.plot(
            [bins["confidence"][i] for i in filled],
            [bins["accuracy"][i] for i in filled],
            marker=markers[k % len(markers)],
            lw=1.2,
            label=label,
        )
        width = (edges[1] - edges[0]) / (len(bins_by_label) + 0.5)
        bottom.bar(
            centres - (edges[1] - edges[0]) / 2 + width * (k + 0.75),
            bins["count"],
            width=width,
            label=label,
        )
    top.set_ylabel("Accuracy in bin")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1.02)
    top.legend(loc="upper left", fontsize=8)
    top.set_title(title or "Reliability diagram")
    bottom.set_xlabel("Confidence (max class probability)")
    bottom.set_ylabel("Examples")
    return _save(figure, path)


def risk_coverage_figure(
    curves: dict[str, dict],
    path: str | os.PathLike,
    title: str = "",
    full_risk: float | None = None,
    referral: tuple[float, float] | None = None,
) -> str:
    """Risk (error rate of the accepted) against coverage (fraction accepted), per score.

    Args:
      curves: ``{legend label: {"coverage": [...], "risk": [...]}}`` (the
        ``curve`` of :func:`leukemia_tf.evaluation.selective.summary`).
      path: the PNG to write.
      title: the title.
      full_risk: the risk at full coverage, drawn as a dashed line.
      referral: ``(coverage, risk)`` of the fitted referral, marked.
    """
    figure = Figure(figsize=(6.5, 5), layout="constrained")
    ax = figure.subplots()
    peak = 0.0
    for label, curve in curves.items():
        coverage = np.asarray(curve["coverage"], np.float64)
        risk = np.asarray(curve["risk"], np.float64)
        ax.plot(coverage, risk, lw=1.5, label=label)
        if risk.size:
            peak = max(peak, float(np.nanmax(risk)))
    if full_risk is not None:
        ax.axhline(full_risk, color="k", ls="--", lw=0.8, label=f"full coverage ({full_risk:.3f})")
        peak = max(peak, full_risk)
    if referral is not None and referral[1] is not None:
        ax.plot(*referral, "k*", ms=12, label="fitted referral")
    ax.set_xlim(0, 1.01)
    ax.set_ylim(0, max(peak * 1.1, 0.05))
    ax.set_xlabel("Coverage (fraction of cells answered)")
    ax.set_ylabel("Risk (error rate among the answered)")
    ax.set_title(title or "Risk-coverage curves")
    ax.legend(loc="best", fontsize=8)
    return _save(figure, path)


def explanation_figure(
    examples: dict[str, list[dict]],
    maps: dict[str, list[np.ndarray]],
    class_names: Sequence[str],
    path: str | os.PathLike,
    title: str,
) -> str:
    """A grid of images and heat-map overlays, one row per group of examples.

    Args:
      examples: ``{row label: [ExampleSampler items]}`` (e.g. "correct", "wrong").
      maps: ``{row label: [S x S heat maps in [0, 1]]}``, aligned with ``examples``.
      class_names: names for the captions.
      path: the PNG to write.
      title: the figure title.
    """
    rows = [label for label, items in examples.items()]
    columns = max(1, max((len(items) for items in examples.values()), default=1))
    figure = Figure(figsize=(2.2 * 2 * columns, 2.5 * len(rows) + 0.6))
    axes = np.asarray(figure.subplots(len(rows), 2 * columns, squeeze=False))
    for ax in axes.flat:
        ax.axis("off")
    for r, label in enumerate(rows):
        items = examples[label]
        if not items:
            axes[r, 0].text(0, 0.5, f"{label}: none among the evaluated cells", fontsize=9)
        for j, (item, heat) in enumerate(zip(items, maps[label], strict=True)):
            image = np.asarray(item["image"], np.uint8)
            caption = (
                f"{label}: true {class_names[item['true']]}\n"
                f"pred {class_names[item['pred']]} p={item['prob']:.2f}"
            )
            axes[r, 2 * j].imshow(image)
            axes[r, 2 * j].set_title(caption, fontsize=7)
            axes[r, 2 * j + 1].imshow(image)
            axes[r, 2 * j + 1].imshow(heat, cmap="jet", alpha=0.45, vmin=0, vmax=1)
            name = os.path.basename(item["file_name"]) or "?"
            axes[r, 2 * j + 1].set_title(name[-28:], fontsize=6)
    figure.suptitle(title, fontsize=10)
    return _save(figure, path)
