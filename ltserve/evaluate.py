"""`ltserve evaluate RUN`: every head of a run side by side on val or test, from the feature cache.

For each head in `heads/` (joint after stage 1; crt, tau_norm, lws, ncm, la, ... after stage 2): top-1, top-5,
Many/Medium/Few/All, balanced accuracy, ECE and per-class accuracy (`ltserve.metrics.classification_report` on
`head.logits(features)`). Written to `eval/<split>.json` and `eval/<split>.md`, with PNGs:

    eval/<split>_per_class.png   per-class accuracy of every head against the training count, head to tail
    eval/weight_norms.png        per-class classifier weight norms of every head (the paper's Figure 2, left)

and whatever `ltserve.rebalance.report.extra_plots(run_dir, results)` adds when stage 2 provides it.
`--predictions FILE` (.csv or .jsonl) writes one row per image: index, label, and pred/prob of every head.

Evaluating a model package instead (`ltserve evaluate models/NAME --data ...`) goes through ONNX Runtime:
see `ltserve.package_eval`.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ltserve.errors import ConfigError, RunError
from ltserve.heads import load_head, list_heads
from ltserve.metrics import SHOT_GROUPS, classification_report, format_percent, shot_groups, softmax
from ltserve.rundir import RunPaths, atomic_write_text, read_run, utc_now, write_json

log = logging.getLogger(__name__)

SPLITS = ("val", "test")
_COLUMNS = (("many", "Many"), ("medium", "Medium"), ("few", "Few"), ("top1", "All"), ("top5", "Top-5"),
            ("balanced_accuracy", "Balanced"), ("ece", "ECE"))


def evaluate_run(run_dir: str | Path, split: str = "test", predictions: str | Path | None = None,
                 heads: Sequence[str] | None = None) -> dict[str, Any]:
    """Evaluate every head of a run (or the named ones) on one split, and write `eval/`.

    Args:
        run_dir: a trained run directory.
        split: "val" or "test" ("train" works too, for diagnosis).
        predictions: optional .csv or .jsonl path for per-image predictions of every head.
        heads: head names to evaluate; None for every head found in `heads/`.

    Returns:
        {"run", "split", "n", "class_names", "class_counts", "groups" (class -> shot group), "group_sizes",
         "many_threshold", "few_threshold", "backbone_sha256", "data_fingerprint", "created", "files",
         "heads": {head: classification_report + "temperature"}}.

    Raises:
        RunError: not a run, no such split, or an unknown/missing head (the message lists the available ones).
    """
    from ltserve.features import backbone_sha256, cached_features

    paths = RunPaths(run_dir)
    info = read_run(paths.root)
    names = _heads_to_evaluate(paths, heads)
    features, labels = cached_features(paths.root, split)  # type: ignore[arg-type]
    groups = shot_groups(info.class_counts, info.many_threshold, info.few_threshold)
    results: dict[str, Any] = {
        "run": str(paths.root), "split": split, "n": int(labels.size), "class_names": info.class_names,
        "class_counts": info.class_counts, "groups": groups,
        "group_sizes": {g: sum(1 for x in groups if x == g) for g in SHOT_GROUPS},
        "many_threshold": info.many_threshold, "few_threshold": info.few_threshold,
        "backbone_sha256": backbone_sha256(paths.root), "data_fingerprint": info.data_fingerprint,
        "created": utc_now(), "heads": {}, "files": {},
    }
    logits: dict[str, np.ndarray] = {}
    weights: dict[str, np.ndarray] = {}
    for name in names:
        head = load_head(paths.heads, name)
        logits[name] = head.logits(features)
        weights[name] = head.weight
        report = classification_report(logits[name], labels, info.class_counts, info.many_threshold,
                                       info.few_threshold)
        results["heads"][name] = {**report, "temperature": head.temperature}
    results["files"] = _write_outputs(paths, split, results, weights, labels, logits, predictions)
    write_json(paths.eval / f"{split}.json", results)
    return results


def _heads_to_evaluate(paths: RunPaths, heads: Sequence[str] | None) -> list[str]:
    available = list_heads(paths.heads)
    if not available:
        raise RunError(f"{paths.heads}: no head found; train the run first (`ltserve train CONFIG.yaml --out "
                       f"{paths.root}`)")
    if not heads:
        return available
    missing = [h for h in heads if h not in available]
    if missing:
        raise RunError(f"{paths.heads}: head(s) {', '.join(missing)} not found; available: {', '.join(available)} "
                       f"(fit more with `ltserve rebalance {paths.root} --heads ...`)")
    return list(heads)


def _write_outputs(paths: RunPaths, split: str, results: dict[str, Any], weights: dict[str, np.ndarray],
                   labels: np.ndarray, logits: dict[str, np.ndarray],
                   predictions: str | Path | None) -> dict[str, str]:
    from ltserve import plots

    paths.eval.mkdir(parents=True, exist_ok=True)
    files = {"json": str(paths.eval / f"{split}.json"), "markdown": str(paths.eval / f"{split}.md")}
    atomic_write_text(paths.eval / f"{split}.md", format_markdown(results))
    kw = dict(many_threshold=results["many_threshold"], few_threshold=results["few_threshold"])
    per_class = {h: r["per_class"] for h, r in results["heads"].items()}
    files["per_class_png"] = str(plots.plot_per_class_accuracy(
        paths.eval / f"{split}_per_class.png", results["class_names"], results["class_counts"], per_class,
        title=f"{paths.root.name}: per-class top-1 on {split}, head to tail", **kw))
    files["weight_norms_png"] = str(plots.plot_weight_norms(
        paths.eval / "weight_norms.png", results["class_names"], results["class_counts"], weights,
        title=f"{paths.root.name}: classifier weight norms per class, head to tail", **kw))
    files.update(_extra_plots(paths.root, results))
    if predictions is not None:
        files["predictions"] = str(write_predictions(predictions, labels, logits))
    return files


def _extra_plots(run_dir: Path, results: dict[str, Any]) -> dict[str, str]:
    """Stage 2's figures (tau sweep, norms before/after, joint vs best head), when `ltserve.rebalance.report` exists.

    Contract: `extra_plots(run_dir: Path, results: dict) -> list[Path] | dict[str, Path] | None`, called after the
    built-in figures with the results dict of this evaluation (not yet containing "files").
    """
    try:
        report = importlib.import_module("ltserve.rebalance.report")
    except ModuleNotFoundError as exc:
        if exc.name not in ("ltserve.rebalance.report", "ltserve.rebalance"):
            raise
        return {}
    fn = getattr(report, "extra_plots", None)
    if fn is None:
        return {}
    made = fn(run_dir, results) or []
    if isinstance(made, Mapping):
        return {str(k): str(v) for k, v in made.items()}
    return {Path(p).stem: str(p) for p in made}


def write_predictions(path: str | Path, labels: np.ndarray, logits: Mapping[str, np.ndarray]) -> Path:
    """One row per image: index, label, and `pred_<head>`, `prob_<head>` (softmax probability of the prediction).

    The format follows the suffix: .csv (header row) or .jsonl (one JSON object per line).

    Raises:
        ConfigError: another suffix.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl"):
        raise ConfigError(f"--predictions {path}: use a .csv or .jsonl file name")
    columns: dict[str, np.ndarray] = {"index": np.arange(len(labels)), "label": np.asarray(labels)}
    for head, z in logits.items():
        probs = softmax(z)
        pred = probs.argmax(axis=1)
        columns[f"pred_{head}"] = pred
        columns[f"prob_{head}"] = probs[np.arange(len(pred)), pred]
    names = list(columns)
    rows = ([_py(columns[c][i]) for c in names] for i in range(len(labels)))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        if suffix == ".csv":
            writer = csv.writer(f)
            writer.writerow(names)
            writer.writerows(rows)
        else:
            for row in rows:
                f.write(json.dumps(dict(zip(names, row))) + "\n")
    tmp.replace(path)
    return path


def _py(value: Any) -> Any:
    if isinstance(value, np.floating):
        return round(float(value), 6)
    return int(value)


# ----------------------------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------------------------


def format_table(heads: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown table, one row per head: Many | Medium | Few | All | Top-5 | Balanced (in %) | ECE.

    Args:
        heads: head name -> a dict with many, medium, few, top1, top5, balanced_accuracy, ece (fractions; None
            for an empty shot group, shown as "empty").
    """
    header = "| head | " + " | ".join(title for _, title in _COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(_COLUMNS) + 1)]
    for name, r in heads.items():
        cells = [format_percent(r.get(k)) if k != "ece" else _ece(r.get(k)) for k, _ in _COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ece(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def format_markdown(results: Mapping[str, Any]) -> str:
    """The whole `eval/<split>.md`: summary table, shot groups, and per-class accuracy of every head."""
    sizes = results["group_sizes"]
    heads = list(results["heads"])
    out = [f"# {Path(results['run']).name}: {results['split']} ({results['n']} images)", "",
           f"Shot groups by training count: many > {results['many_threshold']} ({sizes['many']} classes), "
           f"medium ({sizes['medium']}), few < {results['few_threshold']} ({sizes['few']}). Accuracies in %; a "
           "group's accuracy is the mean of its classes' accuracies; All is top-1 over images.", "",
           format_table(results["heads"]), "", "## Per-class top-1 (%), head to tail", "",
           "| class | train images | group | " + " | ".join(heads) + " |",
           "|---|---|---|" + "---|" * len(heads)]
    counts = results["class_counts"]
    for j in np.argsort(-np.asarray(counts), kind="stable"):
        accs = [format_percent(results["heads"][h]["per_class"][j]) for h in heads]
        out.append(f"| {results['class_names'][j]} | {counts[j]} | {results['groups'][j]} | " + " | ".join(accs)
                   + " |")
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------


def cli(argv: Sequence[str] | None = None) -> int:
    """`ltserve evaluate RUN [--split val|test] [--predictions FILE] [--heads H ...]`."""
    parser = argparse.ArgumentParser(
        prog="ltserve evaluate", description="Report every head of a run side by side (Many/Medium/Few/All, top-5, "
        "balanced accuracy, ECE) on cached features; writes RUN/eval/. For a model package use "
        "`ltserve evaluate models/NAME --data ...`.")
    parser.add_argument("run", help="run directory, e.g. runs/fashion_lt")
    parser.add_argument("--split", default="test", choices=("val", "test", "train"))
    parser.add_argument("--predictions", default=None, metavar="FILE",
                        help="write per-image predictions of every head (.csv or .jsonl)")
    parser.add_argument("--heads", nargs="+", default=None, metavar="HEAD", help="only these heads")
    args = parser.parse_args(list(argv) if argv is not None else None)
    results = evaluate_run(args.run, args.split, predictions=args.predictions, heads=args.heads)
    print(f"{results['run']}: {results['split']} ({results['n']} images)")
    print(format_table(results["heads"]))
    for kind, path in results["files"].items():
        print(f"  {kind}: {path}")
    return 0
