"""`evaluate_run(run, split)`: every head of a run side by side on val or test, from the feature cache.

For each head in `heads/`: top-1, top-5, Many/Medium/Few/All, balanced accuracy, ECE before and after the head's
calibration temperature (ece_raw, ece) and per-class accuracy (`ltserve.metrics.classification_report` on
`head.logits(features)`). Written to `eval/<split>.json` and
`eval/<split>.md`, with PNGs (unless `plots=False`):

    eval/<split>_per_class.png       per-class accuracy of every head against the training count, head to tail
    eval/weight_norms.png            per-class classifier weight norms of every head (the paper's Figure 2, left)
    eval/sweep_<head>.png            val accuracy against tau / tau_la, for every head that recorded a sweep
    eval/<split>_joint_vs_best.png   per-class accuracy of joint against the best head (`selection.best_head`)
    eval/<split>_reliability.png     reliability diagram of every head (accuracy against confidence, ECE per panel)
    eval/<split>_confusion.png       row-normalised confusion matrix, classes head to tail: joint and the best head
                                     by val when both are evaluated, else the first head evaluated

The numbers of the last two are in the JSON too (`diagnostics`): "reliability" {head: bins} and "confusion"
{head: rows in head-to-tail order, each summing to 1}.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ltserve.errors import RunError
from ltserve.evaluate import figures
from ltserve.evaluate.diagnostics import RELIABILITY_BINS, confusion_entry, confusion_matrix, reliability_curve
from ltserve.evaluate.predictions import write_predictions
from ltserve.evaluate.selection import best_head
from ltserve.evaluate.tables import format_markdown
from ltserve.features.cache import backbone_sha256, cached_features
from ltserve.fileio import atomic_write_text, write_json
from ltserve.heads import head_sha256
from ltserve.metrics import SHOT_GROUPS, classification_report, shot_groups, softmax
from ltserve.rundir import Run, open_run, utc_now

log = logging.getLogger(__name__)


def evaluate_run(run: Run | str | Path, split: str = "test", predictions: str | Path | None = None,
                 heads: Sequence[str] | None = None, plots: bool = True) -> dict[str, Any]:
    """Evaluate every head of a run (or the named ones) on one split, and write `eval/`.

    Args:
        run: a trained run (a `Run`, or its directory).
        split: "val" or "test" ("train" works too, for diagnosis).
        predictions: optional .csv or .jsonl path for per-image predictions of every head.
        heads: head names to evaluate; None for every head found in `heads/`.
        plots: draw the PNG figures (most of the time an evaluation takes).

    Returns:
        {"run", "split", "n", "class_names", "class_counts", "groups" (class -> shot group), "group_sizes",
         "many_threshold", "few_threshold", "backbone_sha256", "data_fingerprint", "created", "files",
         "heads": {head: `head_report`: classification_report (with ece_raw, before calibration), "temperature",
         "head_sha256"}, "reliability": {head: `diagnostics.reliability_curve` of its served probabilities},
         "confusion": {head: `diagnostics.confusion_entry`} for joint and the best head (see the module docstring)}.

    Raises:
        RunError: not a run, no such split, or an unknown/missing head (the message lists the available ones).
    """
    run = open_run(run)
    info = run.info
    names = _heads_to_evaluate(run, heads)
    features, labels = cached_features(run, split)  # type: ignore[arg-type]
    groups = shot_groups(info.class_counts, info.many_threshold, info.few_threshold)
    results: dict[str, Any] = {
        "run": str(run.root), "split": split, "n": int(labels.size), "class_names": info.class_names,
        "class_counts": info.class_counts, "groups": groups,
        "group_sizes": {g: sum(1 for x in groups if x == g) for g in SHOT_GROUPS},
        "many_threshold": info.many_threshold, "few_threshold": info.few_threshold,
        "backbone_sha256": backbone_sha256(run), "data_fingerprint": info.data_fingerprint,
        "created": utc_now(), "heads": {}, "files": {},
    }
    logits: dict[str, np.ndarray] = {}
    for name in names:
        logits[name] = run.head(name).logits(features)
        results["heads"][name] = head_report(run, name, features, labels, logits[name])
    # the head's logits are already divided by its temperature: these are the probabilities the package serves
    results["reliability"] = {name: reliability_curve(softmax(logits[name]), labels) for name in names}
    order = figures.head_to_tail(info.class_counts)
    matrices = {name: confusion_matrix(logits[name].argmax(1), labels, order)
                for name in _confusion_heads(run, names)}
    results["confusion"] = {name: confusion_entry(m, totals, order, info.class_names)
                            for name, (m, totals) in matrices.items()}
    eval_dir = run.paths.eval
    results["files"] = {"json": str(eval_dir / f"{split}.json"), "markdown": str(eval_dir / f"{split}.md")}
    atomic_write_text(eval_dir / f"{split}.md", format_markdown(results))
    if plots:
        results["files"].update(draw_figures(run, split, results, {h: m for h, (m, _) in matrices.items()}))
    if predictions is not None:
        results["files"]["predictions"] = str(write_predictions(predictions, labels, logits))
    write_json(eval_dir / f"{split}.json", results)
    return results


def head_report(run: Run, name: str, features: np.ndarray, labels: np.ndarray,
                logits: np.ndarray | None = None) -> dict[str, Any]:
    """One head's numbers on one split: what `eval/<split>.json` holds per head, and what export records when no
    evaluation did.

    Args:
        run: the run.
        name: the head.
        features: (N, D) the split's cached features.
        labels: (N,) its labels.
        logits: (N, C) the head's logits on `features` when already computed.

    Returns:
        `classification_report` (with ece_raw) + "temperature" + "head_sha256" (the head files it was computed on,
        `ltserve.heads.head_sha256`, so a later reader can tell whether the head has changed since).
    """
    head, info = run.head(name), run.info
    logits = head.logits(features) if logits is None else logits
    report = classification_report(logits, labels, info.class_counts, info.many_threshold, info.few_threshold,
                                   temperature=head.temperature)
    return {**report, "temperature": head.temperature, "head_sha256": head_sha256(run.paths.heads, name)}


def _heads_to_evaluate(run: Run, heads: Sequence[str] | None) -> list[str]:
    available = run.head_names()
    if not available:
        raise RunError(f"{run.paths.heads}: no head found; train the run first (`ltserve train CONFIG.yaml --out "
                       f"{run.root}`)")
    if not heads:
        return available
    missing = [h for h in heads if h not in available]
    if missing:
        raise RunError(f"{run.paths.heads}: head(s) {', '.join(missing)} not found; available: "
                       f"{', '.join(available)} (fit more with `ltserve rebalance {run.root} --heads ...`)")
    return list(heads)


def _confusion_heads(run: Run, names: Sequence[str]) -> list[str]:
    """Whose confusion matrix is drawn: joint and the best head by val (what `export --head best` ships) when both
    are evaluated, else joint alone, else the first head evaluated."""
    if "joint" not in names:
        return [names[0]]
    best = best_head(run) if len(names) > 1 else "joint"
    return ["joint", best] if best != "joint" and best in names else ["joint"]


def draw_figures(run: Run, split: str, results: dict[str, Any],
                 confusion: dict[str, np.ndarray] | None = None) -> dict[str, str]:
    """The evaluation's PNGs in `eval/` (see the module docstring); {figure key: path}.

    Args:
        confusion: head -> (C, C) row-normalised confusion matrix in head-to-tail order, to draw (None: not drawn).
    """
    eval_dir, name = run.paths.eval, run.root.name
    reports = results["heads"]
    common = dict(class_names=results["class_names"], class_counts=results["class_counts"],
                  many_threshold=results["many_threshold"], few_threshold=results["few_threshold"])
    files = {
        "per_class_png": figures.plot_per_class_accuracy(
            eval_dir / f"{split}_per_class.png", per_class={h: r["per_class"] for h, r in reports.items()},
            title=f"{name}: per-class top-1 on {split}, head to tail", **common),
        "weight_norms_png": figures.plot_weight_norms(
            eval_dir / "weight_norms.png", weights={h: run.head(h).weight for h in reports},
            title=f"{name}: classifier weight norms per class, head to tail", **common),
    }
    for head in reports:
        meta = run.head(head).meta
        if meta.get("sweep"):
            slug = head.replace("+", "_")
            files[f"sweep_{slug}_png"] = figures.plot_tau_sweep(eval_dir / f"sweep_{slug}.png", meta,
                                                                title=f"{head}: val accuracy")
    if "joint" in reports and len(reports) > 1:
        best = best_head(run)
        if best != "joint" and best in reports:
            files["joint_vs_best_png"] = figures.plot_per_class_accuracy(
                eval_dir / f"{split}_joint_vs_best.png",
                per_class={"joint": reports["joint"]["per_class"], best: reports[best]["per_class"]},
                title=f"{name}: joint against the best head by val ({best}), {split}", **common)
    if results.get("reliability"):
        files["reliability_png"] = figures.plot_reliability(
            eval_dir / f"{split}_reliability.png", results["reliability"],
            title=f"{name}: reliability on {split} (probabilities as served, {RELIABILITY_BINS} bins)")
    if confusion:
        files["confusion_png"] = figures.plot_confusion(
            eval_dir / f"{split}_confusion.png", matrices=confusion,
            title=f"{name}: confusion on {split}, rows = true class (each sums to 1), classes head to tail", **common)
    return {k: str(v) for k, v in files.items()}
