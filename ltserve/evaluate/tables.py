"""The results tables: one Markdown renderer, and the heads table every report prints.

    markdown_table(header, rows)        the renderer (benchmarks use it too)
    heads_table(results)                one row per head: Many | Medium | Few | All | Top-5 | Balanced | ECE raw | ECE
    format_markdown(results)            a run's whole eval/<split>.md
    chosen_value(name, meta)            what val chose for a head, in words (its registry entry's `chosen`)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ltserve.heads import HEADS
from ltserve.metrics import format_percent

HEAD_COLUMNS = ("many", "medium", "few", "top1", "top5", "balanced_accuracy", "ece_raw", "ece")
TITLES = {"many": "Many", "medium": "Medium", "few": "Few", "top1": "All", "top5": "Top-5",
          "balanced_accuracy": "Balanced", "ece_raw": "ECE raw", "ece": "ECE", "chosen": "chosen on val",
          "temperature": "T"}
"""Column titles. "ECE raw" is the ECE before the head's calibration temperature, "ECE" after it (the head's
probabilities as served); a head that kept T = 1 (calibration did not lower its val ECE) shows the same number."""
ECE_KEYS = ("ece_raw", "ece")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table (no trailing newline); cells are written with str()."""
    lines = ["| " + " | ".join(str(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(key: str, value: Any) -> str:
    if key in ECE_KEYS:
        return "n/a" if value is None else f"{value:.3f}"
    if key in TITLES and key not in ("chosen", "temperature"):
        return format_percent(value)
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def heads_table(results: Mapping[str, Mapping[str, Any]], columns: Sequence[str] = HEAD_COLUMNS,
                extra: Sequence[str] = ()) -> str:
    """One row per head: accuracies in % ("empty" for an empty shot group), ECE raw and ECE with 3 digits ("n/a" when
    a report has none, e.g. no ece_raw in a report made without the head's temperature).

    Args:
        results: {head name: a classification_report-like dict}; rows in the given order.
        columns: metric keys (top1 is headed "All").
        extra: further keys shown when some row has them (strings as is, floats with 3 digits), e.g. "chosen".
    """
    shown = [k for k in extra if any(k in r for r in results.values())]
    header = ["head"] + [TITLES.get(k, k) for k in (*columns, *shown)]
    rows = [[name, *(_cell(k, r.get(k)) for k in columns), *(_cell(k, r.get(k, "")) for k in shown)]
            for name, r in results.items()]
    return markdown_table(header, rows)


def format_markdown(results: Mapping[str, Any]) -> str:
    """The whole `eval/<split>.md`: summary table, shot groups, and per-class accuracy of every head."""
    sizes = results["group_sizes"]
    heads = list(results["heads"])
    counts = results["class_counts"]
    per_class = [[results["class_names"][j], counts[j], results["groups"][j],
                  *(format_percent(results["heads"][h]["per_class"][j]) for h in heads)]
                 for j in np.argsort(-np.asarray(counts), kind="stable")]
    out = [f"# {Path(results['run']).name}: {results['split']} ({results['n']} images)", "",
           f"Shot groups by training count: many > {results['many_threshold']} ({sizes['many']} classes), "
           f"medium ({sizes['medium']}), few < {results['few_threshold']} ({sizes['few']}). Accuracies in %; a "
           "group's accuracy is the mean of its classes' accuracies; All is top-1 over images.", "",
           heads_table(results["heads"]), "", "## Per-class top-1 (%), head to tail", "",
           markdown_table(["class", "train images", "group", *heads], per_class)]
    return "\n".join(out) + "\n"


def chosen_value(name: str, meta: Mapping[str, Any]) -> str:
    """What val chose for head `name`, in words, as its method says (`HeadMethod.chosen`): "tau=0.7", "epoch 8/10",
    "tau=0.7, tau_la=0.4", "" for ncm."""
    return ", ".join(HEADS.get(name).chosen(meta))
