"""The PNG figures of an evaluation (matplotlib, Agg canvas: no display, no global pyplot state).

    plot_per_class_accuracy   per-class accuracy of several heads against the training count (all heads, or joint
                              against the best head)
    plot_weight_norms         ||w_j|| per class, one panel per head (the paper's Figure 2, left)
    plot_tau_sweep            val Many/Medium/Few/All against tau or tau_la, the chosen value marked (Figure 2, right)

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
    """(knob name, sweep curve, chosen value) from a head's meta (tau_norm, la and the +la heads record one).

    Raises:
        ValueError: the head recorded no sweep.
    """
    curve = meta.get("sweep")
    if not curve:
        raise ValueError("this head recorded no sweep (tau_norm, la, tau_norm+la and lws+la have one)")
    knob = "tau" if "tau" in curve[0] else "tau_la"
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
