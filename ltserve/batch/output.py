"""Where a job's rows and failures go: the writers, the tally for the summary, and the row shapes."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ltserve.batch.inputs import Item
from ltserve.batch.sinks import CsvSink, JsonlSink, ParquetSink
from ltserve.metrics import group_accuracy, per_class_accuracy
from ltserve.package import ModelJson


@dataclass
class Tally:
    """Counts for the summary: rows per predicted shot group, failures by kind, (pred, true) of labelled rows."""

    meta: ModelJson
    rows: int = 0
    errors: int = 0
    by_group: Counter = field(default_factory=Counter)
    by_error: Counter = field(default_factory=Counter)
    pred: list[int] = field(default_factory=list)
    true: list[int] = field(default_factory=list)
    unadapted: list[int] = field(default_factory=list)  # --adapt-prior: the prediction before the adaptation
    unknown: int = 0  # rows open-set rejection flagged unknown

    def add_row(self, row: dict, unadapted: int | None = None) -> None:
        self.rows += 1
        self.by_group[row["shot_group"]] += 1
        if row.get("unknown") in (True, "True", "true"):
            self.unknown += 1
        if row.get("true_class_index") not in (None, ""):
            # a row rejected as unknown (--open-set reject) has no class: it counts as wrong
            self.pred.append(-1 if row.get("class_index") in (None, "") else int(row["class_index"]))
            self.true.append(int(row["true_class_index"]))
            if unadapted is not None:
                self.unadapted.append(int(unadapted))

    def add_error(self, row: dict) -> None:
        self.errors += 1
        self.by_error[row.get("error", "?")] += 1

    def accuracy(self, unadapted: bool = False) -> dict[str, Any] | None:
        """top1 and many/medium/few (mean per-class accuracy in each group, as `ltserve evaluate`), or None.

        Args:
            unadapted: of the predictions before --adapt-prior shifted them (None when there were none).
        """
        if not self.true or (unadapted and len(self.unadapted) != len(self.true)):
            return None
        pred, true = np.asarray(self.unadapted if unadapted else self.pred), np.asarray(self.true)
        pc = per_class_accuracy(pred, true, len(self.meta.labels))
        return {"n": int(true.size), "top1": float(np.mean(pred == true)), "balanced_accuracy": float(np.nanmean(pc)),
                **group_accuracy(pc, self.meta.shot_groups)}


class Output:
    """The row and error writers of one job, with its tally and progress bar."""

    def __init__(self, rows: JsonlSink | CsvSink | ParquetSink, errors: JsonlSink, tally: Tally, bar: Any) -> None:
        self.rows_sink, self.errors_sink, self.tally, self.bar = rows, errors, tally, bar
        self.new_rows = 0
        self.new_errors = 0
        self.started = time.perf_counter()
        self.ready_at: float | None = None
        self.ended: float | None = None
        self.prior: dict[str, Any] | None = None  # --adapt-prior: the estimate, for the summary

    def ready(self) -> None:
        """Mark the model as loaded: throughput is measured from here."""
        self.ready_at = time.perf_counter()

    def rows(self, rows: list[dict], unadapted: Sequence[int] | None = None) -> None:
        """Write rows; `unadapted`: each row's class before --adapt-prior (for the accuracy without it)."""
        self.rows_sink.write(rows)
        for i, r in enumerate(rows):
            self.tally.add_row(r, None if unadapted is None else unadapted[i])
        self.new_rows += len(rows)

    def errors(self, errors: list[dict]) -> None:
        self.errors_sink.write(errors)
        for e in errors:
            self.tally.add_error(e)
        self.new_errors += len(errors)

    def flush(self, done: int) -> None:
        self.rows_sink.flush()
        self.errors_sink.flush()
        self.bar.update(done)

    def close(self) -> None:
        self.ended = time.perf_counter()
        self.rows_sink.close()
        self.errors_sink.close()


def prediction_row(item: Item, prediction: dict, labels: Sequence[str]) -> dict:
    """One output row: path, the Prediction's fields, and the true label when the list gave one."""
    row = {"path": item.key, **prediction}
    if item.label is not None:
        row["true_label"] = labels[item.label]
        row["true_class_index"] = item.label
    return row


def error_row(item: Item, kind: str, reason: str) -> dict:
    """One errors-file row."""
    return {"path": item.key, "error": kind, "reason": reason}

