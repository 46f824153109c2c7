"""Stage-2 figures and tables: the tau sweep (the paper's Figure 2, right), weight norms before and after
re-balancing, per-class accuracy of joint against the best head, and a Markdown table of heads.

Every plot function takes plain values (head meta, heads, classification reports) and writes one PNG with matplotlib's
Agg backend (imported lazily, so importing this module is cheap). `evaluate.py` calls them for a run's eval/ folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ltserve.heads import CalibratedHead
from ltserve.metrics import format_percent

GROUP_STYLE = {"many": ("Many", "tab:blue"), "medium": ("Medium", "tab:orange"), "few": ("Few", "tab:green"),
               "top1": ("All", "black")}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def sweep_of(head_or_meta: CalibratedHead | Mapping[str, Any]) -> tuple[str, list[dict[str, Any]], float | None]:
    """(knob name, sweep curve, chosen value) from a tau_norm / la head or its meta.

    Raises:
        ValueError: the head recorded no sweep (crt, lws, ncm).
    """
    meta = head_or_meta.meta if isinstance(head_or_meta, CalibratedHead) else head_or_meta
    curve = meta.get("sweep")
    if not curve:
        raise ValueError("this head recorded no sweep (only tau_norm, la, tau_norm+la and lws+la have one)")
    knob = "tau" if "tau" in curve[0] else "tau_la"
    return knob, list(curve), meta.get(knob)


def plot_tau_sweep(head_or_meta: CalibratedHead | Mapping[str, Any], path: str | Path,
                   title: str | None = None) -> Path:
    """Many/Medium/Few/All val accuracy against tau (or tau_la), the chosen value marked.

    Args:
        head_or_meta: a head with a sweep in its meta (tau_norm, la, tau_norm+la, lws+la), or that meta.
        path: the PNG to write.
        title: figure title (default: "<method>: val accuracy against <knob>").

    Returns:
        the PNG path.
    """
    knob, curve, chosen = sweep_of(head_or_meta)
    method = head_or_meta.method if isinstance(head_or_meta, CalibratedHead) else head_or_meta.get("method", "")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    x = [p[knob] for p in curve]
    for key, (label, colour) in GROUP_STYLE.items():
        y = [np.nan if p.get(key) is None else 100.0 * p[key] for p in curve]
        if not np.all(np.isnan(y)):
            ax.plot(x, y, marker="o", markersize=3, label=label, color=colour, lw=2 if key == "top1" else 1.5)
    if chosen is not None:
        ax.axvline(chosen, color="grey", ls="--", lw=1, label=f"chosen {knob}={chosen:g}")
    ax.set_xlabel(knob)
    ax.set_ylabel("val accuracy (%)")
    ax.set_title(title or f"{method}: val accuracy against {knob}".strip(": "))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def weight_norms(head: CalibratedHead) -> np.ndarray:
    """||W_j|| of every class row (C,) float64 (temperature not applied: the re-balanced classifier itself)."""
    return np.linalg.norm(head.weight.astype(np.float64), axis=1)


def plot_weight_norms(heads: Mapping[str, CalibratedHead], class_counts: Sequence[int], path: str | Path,
                      relative: bool = True) -> Path:
    """Per-class weight norms of several heads (joint, tau_norm, lws, ...), classes sorted by training count.

    Args:
        heads: {name: head}, e.g. joint, tau_norm and lws.
        class_counts: training count of each class (C,).
        path: the PNG to write.
        relative: divide each head's norms by their mean, so heads of different scale share one axis.

    Returns:
        the PNG path.
    """
    order = np.argsort(-np.asarray(class_counts), kind="stable")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, head in heads.items():
        norms = weight_norms(head)[order]
        ax.plot(np.arange(len(order)), norms / norms.mean() if relative else norms, marker="o", markersize=3,
                label=name)
    ax.set_xlabel("class, sorted by training count (many -> few)")
    ax.set_ylabel("||w_j|| / mean" if relative else "||w_j||")
    ax.set_title("classifier weight norms")
    if len(order) <= 30:
        ax.set_xticks(np.arange(len(order)), [str(int(class_counts[j])) for j in order], rotation=90, fontsize=7)
        ax.set_xlabel("class training count (sorted)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_per_class_accuracy(reports: Mapping[str, Mapping[str, Any]], class_counts: Sequence[int],
                            path: str | Path) -> Path:
    """Per-class accuracy of several heads (typically joint and the best head), classes sorted by training count.

    Args:
        reports: {head name: classification_report} (needs "per_class"); drawn in the given order.
        class_counts: training count of each class (C,).
        path: the PNG to write.

    Returns:
        the PNG path.
    """
    order = np.argsort(-np.asarray(class_counts), kind="stable")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(len(reports), 1)
    for k, (name, rep) in enumerate(reports.items()):
        acc = np.array([np.nan if v is None else 100.0 * v for v in rep["per_class"]])[order]
        if len(order) <= 50:
            ax.bar(np.arange(len(order)) + (k - (len(reports) - 1) / 2) * width, acc, width, label=name)
        else:
            ax.plot(np.arange(len(order)), acc, lw=1, label=name)
    ax.set_xlabel("class, sorted by training count (many -> few)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("per-class accuracy")
    if len(order) <= 30:
        ax.set_xticks(np.arange(len(order)), [str(int(class_counts[j])) for j in order], rotation=90, fontsize=7)
        ax.set_xlabel("class training count (sorted)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return _save(fig, path)


def best_head(results: Mapping[str, Mapping[str, Any]], metric: str = "top1",
              exclude: Sequence[str] = ("joint",)) -> str:
    """The head with the highest `metric` among `results` (joint excluded by default; ties: the first listed)."""
    candidates = [(name, r.get(metric)) for name, r in results.items() if name not in exclude]
    candidates = [(n, v) for n, v in candidates if v is not None]
    if not candidates:
        raise ValueError(f"no head besides {', '.join(exclude)} has {metric!r}")
    return max(candidates, key=lambda nv: nv[1])[0]


def heads_table(results: Mapping[str, Mapping[str, Any]], columns: Sequence[str] = ("many", "medium", "few", "top1"),
                extra: Sequence[str] = ("chosen", "temperature")) -> str:
    """A Markdown table, one row per head: Many/Medium/Few/All in % ("empty" for an empty shot group).

    Args:
        results: {head name: classification_report-like dict}; rows in the given order.
        columns: metric keys shown as percentages (top1 is headed "All").
        extra: further keys shown when some row has them (strings as is, floats with 3 digits).

    Returns:
        the table as Markdown text (no trailing newline).
    """
    titles = {"many": "Many", "medium": "Medium", "few": "Few", "top1": "All", "balanced_accuracy": "Balanced",
              "top5": "Top-5", "ece": "ECE", "chosen": "chosen on val", "temperature": "T"}
    shown_extra = [k for k in extra if any(k in r for r in results.values())]
    header = ["head"] + [titles.get(c, c) for c in columns] + [titles.get(k, k) for k in shown_extra]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for name, r in results.items():
        cells = [name] + [format_percent(r.get(c)) if c in r else "-" for c in columns]
        for k in shown_extra:
            v = r.get(k, "")
            cells.append(f"{v:.3f}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def extra_plots(run_dir: str | Path, results: Mapping[str, Any]) -> dict[str, Path]:
    """Stage 2's figures for `ltserve evaluate` (called by `ltserve.evaluate` after its own figures).

    Writes into `run_dir/eval/`, for the heads present in `heads/`:
        sweep_<head>.png                 val accuracy against tau / tau_la (tau_norm, la, tau_norm+la, lws+la)
        weight_norms_rebalanced.png      ||w_j|| of joint, tau_norm and lws (before and after re-balancing)
        <split>_joint_vs_best.png        per-class accuracy of joint against the best other head on this split

    Args:
        run_dir: the run directory.
        results: the evaluation's results dict ("heads": {name: classification_report}, "class_counts", "split").

    Returns:
        {figure key: PNG path} of the figures written (empty when stage 2 has not run).
    """
    from ltserve.heads import list_heads, load_head
    from ltserve.rundir import RunPaths

    paths = RunPaths(run_dir)
    present = list_heads(paths.heads)
    files: dict[str, Path] = {}
    loaded = {name: load_head(paths.heads, name) for name in present if name in
              ("joint", "tau_norm", "lws", "la", "tau_norm+la", "lws+la")}
    for name in ("tau_norm", "la", "tau_norm+la", "lws+la"):
        if name in loaded and loaded[name].meta.get("sweep"):
            slug = name.replace("+", "_")
            files[f"sweep_{slug}_png"] = plot_tau_sweep(loaded[name], paths.eval / f"sweep_{slug}.png")
    norm_heads = {n: loaded[n] for n in ("joint", "tau_norm", "lws") if n in loaded}
    if len(norm_heads) > 1:
        files["weight_norms_rebalanced_png"] = plot_weight_norms(norm_heads, results["class_counts"],
                                                                 paths.eval / "weight_norms_rebalanced.png")
    reports = results.get("heads", {})
    if "joint" in reports and len(reports) > 1:
        best = best_head(reports)
        split = results.get("split", "test")
        files["joint_vs_best_png"] = plot_per_class_accuracy(
            {"joint": reports["joint"], best: reports[best]}, results["class_counts"],
            paths.eval / f"{split}_joint_vs_best.png")
    return files
