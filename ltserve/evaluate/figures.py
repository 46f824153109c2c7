"""The PNG figures of an evaluation (matplotlib, Agg canvas: no display, no global pyplot state).

    plot_per_class_accuracy   per-class accuracy of several heads against the training count (all heads, or joint
                              against the best head)
    plot_weight_norms         ||w_j|| per class, one panel per head (the paper's Figure 2, left)
    plot_tau_sweep            val Many/Medium/Few/All against tau or tau_la, the chosen value marked (Figure 2, right)
    plot_reliability          accuracy against confidence in bins, one panel per head, ECE in each panel's title
    plot_confusion            row-normalised confusion matrices, classes head to tail, shot groups marked

One function per figure; each takes plain values and a path, writes the PNG atomically and returns the path.
Classes are always drawn head to tail (training count, descending), the order in which long-tailed effects show.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ltserve.fileio import atomic_write
from ltserve.metrics import shot_groups

_GROUP_COLOURS = {"many": "#e8f0fb", "medium": "#fdf3e1", "few": "#fbe9e9"}


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path) -> Path:
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", bbox_inches="tight"))


def head_to_tail(class_counts: Sequence[int]) -> np.ndarray:
    """Class indices sorted by training count, largest first (stable for ties). (C,) -> (C,) int."""
    return np.argsort(-np.asarray(class_counts), kind="stable")


def _shade_groups(ax, counts_sorted: np.ndarray, many_threshold: int, few_threshold: int) -> None:
    groups = shot_groups(counts_sorted.tolist(), many_threshold, few_threshold)
    start = 0
    for i in range(1, len(groups) + 1):
        if i == len(groups) or groups[i] != groups[start]:
            ax.axvspan(start - 0.5, i - 0.5, color=_GROUP_COLOURS[groups[start]], zorder=0, lw=0)
            ax.text((start + i - 1) / 2, 1.0, groups[start], ha="center", va="bottom", fontsize=8,
                    transform=ax.get_xaxis_transform(), color="#555555")
            start = i


def _class_ticks(ax, names: Sequence[str], order: np.ndarray) -> None:
    if len(order) <= 40:
        ax.set_xticks(range(len(order)))
        ax.set_xticklabels([names[j] for j in order], rotation=45, ha="right", fontsize=8)
    else:
        ax.set_xlabel("classes, head to tail")


def plot_per_class_accuracy(path: str | Path, class_names: Sequence[str], class_counts: Sequence[int],
                            per_class: Mapping[str, Sequence[float | None]], title: str = "",
                            many_threshold: int = 100, few_threshold: int = 20) -> Path:
    """Per-class top-1 accuracy of every head against the class's training count, classes head to tail.

    Args:
        path: the PNG to write.
        class_names, class_counts: C names and training counts.
        per_class: head name -> C accuracies in [0, 1] (None for a class without test images).
        title: figure title.
        many_threshold, few_threshold: shot-group boundaries, shaded in the background.
    """
    order = head_to_tail(class_counts)
    counts = np.asarray(class_counts)[order]
    fig = _figure(max(6.0, min(16.0, 0.45 * len(order) + 3)), 4.2)
    ax = fig.add_subplot(1, 1, 1)
    twin = ax.twinx()  # drawn below `ax`: group shading, then the count bars, then the accuracy lines on top
    _shade_groups(twin, counts, many_threshold, few_threshold)
    twin.bar(range(len(order)), counts, color="#999999", alpha=0.45, width=0.8, zorder=1)
    twin.set_yscale("log")
    twin.set_ylabel("training images (log)")
    ax.set_zorder(twin.get_zorder() + 1)
    ax.patch.set_visible(False)
    for name, acc in per_class.items():
        values = np.array([np.nan if a is None else 100.0 * a for a in acc], dtype=np.float64)[order]
        ax.plot(range(len(order)), values, marker="o", ms=3, lw=1.2, label=name)
    ax.set_ylim(0, 100)
    ax.set_xlim(-0.5, len(order) - 0.5)
    ax.set_ylabel("per-class top-1 accuracy (%)")
    _class_ticks(ax, class_names, order)
    ax.legend(loc="lower left", fontsize=8, ncol=min(4, max(1, len(per_class))))
    ax.set_title(title or "per-class accuracy, head to tail", fontsize=10, pad=14)
    return _save(fig, path)


def plot_weight_norms(path: str | Path, class_names: Sequence[str], class_counts: Sequence[int],
                      weights: Mapping[str, np.ndarray], title: str = "", many_threshold: int = 100,
                      few_threshold: int = 20) -> Path:
    """L2 norm of each class's classifier weight row, classes head to tail, one panel per head.

    The paper's Figure 2 (left): joint training leaves head classes with larger norms; re-balancing flattens them.

    Args:
        path: the PNG to write.
        class_names, class_counts: C names and training counts.
        weights: head name -> (C, D) weight matrix (rows = classes).
    """
    order = head_to_tail(class_counts)
    counts = np.asarray(class_counts)[order]
    names = list(weights)
    cols = min(3, max(1, len(names)))
    rows = math.ceil(len(names) / cols) if names else 1
    fig = _figure(max(5.0, min(16.0, (0.3 * len(order) + 2.5) * cols)), 3.2 * rows)
    for k, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, k + 1)
        _shade_groups(ax, counts, many_threshold, few_threshold)
        norms = np.linalg.norm(np.asarray(weights[name], dtype=np.float64), axis=1)[order]
        ax.bar(range(len(order)), norms, color="#3b75af", width=0.8, zorder=2)
        ax.set_xlim(-0.5, len(order) - 0.5)
        ax.set_title(name, fontsize=9, pad=12)
        ax.set_ylabel("||w_j||")
        _class_ticks(ax, class_names, order)
    fig.suptitle(title or "classifier weight norms per class, head to tail", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


GROUP_STYLE = {"many": ("Many", "tab:blue"), "medium": ("Medium", "tab:orange"), "few": ("Few", "tab:green"),
               "top1": ("All", "black")}


def sweep_of(meta: Mapping[str, Any]) -> tuple[str, list[dict[str, Any]], float | None]:
    """(knob name, sweep curve, chosen value) from a head's meta (tau_norm, la and the +la heads record one; the
    knob is whatever the method swept, named by the curve's points).

    Raises:
        ValueError: the head recorded no sweep.
    """
    curve = meta.get("sweep")
    if not curve:
        raise ValueError("this head recorded no sweep (tau_norm, la, tau_norm+la and lws+la have one)")
    knob = next(iter(curve[0]))  # each point starts with the knob's value (`ltserve.heads.common.sweep`)
    return knob, list(curve), meta.get(knob)


def plot_tau_sweep(path: str | Path, meta: Mapping[str, Any], title: str = "") -> Path:
    """Many/Medium/Few/All val accuracy against tau (or tau_la), the chosen value marked.

    Args:
        path: the PNG to write.
        meta: the meta of a head with a sweep (tau_norm, la, tau_norm+la, lws+la).
        title: figure title (default: "<knob>: val accuracy").
    """
    knob, curve, chosen = sweep_of(meta)
    fig = _figure(6.0, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    x = [p[knob] for p in curve]
    for key, (label, colour) in GROUP_STYLE.items():
        y = [np.nan if p.get(key) is None else 100.0 * p[key] for p in curve]
        if not np.all(np.isnan(y)):
            ax.plot(x, y, marker="o", markersize=3, label=label, color=colour, lw=2 if key == "top1" else 1.5)
    if chosen is not None:
        ax.axvline(chosen, color="grey", ls="--", lw=1, label=f"chosen {knob}={chosen:g}")
    ax.set_xlabel(knob)
    ax.set_ylabel("val accuracy (%)")
    ax.set_title(title or f"val accuracy against {knob}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_reliability(path: str | Path, curves: Mapping[str, Mapping[str, Any]], title: str = "") -> Path:
    """Reliability diagram: accuracy against confidence in equal-width bins, one panel per head, ECE in each title.

    Bars are each bin's accuracy at its mean confidence's bin; the diagonal is perfect calibration; the gap (red)
    between a bar and the diagonal is what the ECE sums, weighted by the bin's share of images (shown in grey).

    Args:
        path: the PNG to write.
        curves: head name -> `diagnostics.reliability_curve` (edges, count, confidence, accuracy, ece, n).
        title: figure title.
    """
    names = list(curves)
    cols = min(4, max(1, len(names)))
    rows = math.ceil(len(names) / cols) if names else 1
    fig = _figure(3.2 * cols, 3.3 * rows)
    for k, name in enumerate(names):
        curve = curves[name]
        edges = np.asarray(curve["edges"], dtype=np.float64)
        width = float(edges[1] - edges[0])
        centres = (edges[:-1] + edges[1:]) / 2
        acc = np.array([np.nan if a is None else a for a in curve["accuracy"]], dtype=np.float64)
        conf = np.array([np.nan if c is None else c for c in curve["confidence"]], dtype=np.float64)
        share = np.asarray(curve["count"], dtype=np.float64) / max(int(curve["n"]), 1)
        ax = fig.add_subplot(rows, cols, k + 1)
        ax.bar(centres, share, width=width, color="#cccccc", zorder=1, label="images (share)")
        ax.bar(centres, np.nan_to_num(acc), width=width, color="#3b75af", edgecolor="white", lw=0.5, zorder=2,
               label="accuracy")
        gap = np.where(np.isnan(acc), 0.0, conf - acc)
        ax.bar(centres, gap, bottom=np.nan_to_num(acc), width=width, color="#d62728", alpha=0.35, zorder=3,
               label="gap to confidence")
        ax.plot([0, 1], [0, 1], color="black", lw=1, ls="--", zorder=4)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence (top-1 probability)")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{name}: ECE {curve['ece']:.3f}", fontsize=9)
        if k == 0:
            ax.legend(loc="upper left", fontsize=7)
    fig.suptitle(title or "reliability diagram", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_confusion(path: str | Path, class_names: Sequence[str], class_counts: Sequence[int],
                   matrices: Mapping[str, np.ndarray], title: str = "", many_threshold: int = 100,
                   few_threshold: int = 20) -> Path:
    """Row-normalised confusion matrices (true class down, predicted across), classes head to tail, one panel per
    head: a head biased toward frequent classes puts the tail rows' mass in the left columns.

    Args:
        path: the PNG to write.
        class_names, class_counts: C names and training counts (in class-index order).
        matrices: head name -> (C, C) row-normalised matrix already in head-to-tail order
            (`diagnostics.confusion_matrix` with `head_to_tail(class_counts)`).
        many_threshold, few_threshold: shot-group boundaries, drawn as lines between the groups.
    """
    order = head_to_tail(class_counts)
    names = [class_names[j] for j in order]
    groups = shot_groups(np.asarray(class_counts)[order].tolist(), many_threshold, few_threshold)
    cuts = [i - 0.5 for i in range(1, len(groups)) if groups[i] != groups[i - 1]]
    side = max(3.5, min(12.0, 0.3 * len(order) + 2.0))
    fig = _figure(side * len(matrices) + 0.8, side + 0.6)
    fig.set_layout_engine("constrained")  # keeps the colour bar, the tick labels and the title clear of each other
    image = None
    for k, (head, matrix) in enumerate(matrices.items()):
        ax = fig.add_subplot(1, len(matrices), k + 1)
        image = ax.imshow(np.nan_to_num(np.asarray(matrix, dtype=np.float64)), vmin=0.0, vmax=1.0, cmap="Blues",
                          interpolation="nearest")
        for cut in cuts:
            ax.axhline(cut, color="#d62728", lw=0.8)
            ax.axvline(cut, color="#d62728", lw=0.8)
        if len(order) <= 40:
            ax.set_xticks(range(len(order)))
            ax.set_xticklabels(names, rotation=90, fontsize=7)
            ax.set_yticks(range(len(order)))
            ax.set_yticklabels(names if k == 0 else [], fontsize=7)
        ax.set_xlabel("predicted class" + ("" if len(order) <= 40 else ", head to tail"))
        if k == 0:
            ax.set_ylabel("true class" + ("" if len(order) <= 40 else ", head to tail"))
        ax.set_title(head, fontsize=9)
    if image is not None:
        fig.colorbar(image, ax=fig.axes, shrink=0.8, label="share of the true class's images")
    fig.suptitle(title or "confusion matrix (rows sum to 1), classes head to tail", fontsize=10)
    return _save(fig, path)
