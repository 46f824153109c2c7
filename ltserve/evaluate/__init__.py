"""Evaluation and reports: a run's heads side by side, a model package on a data set, the best-head rule.

    run.py          evaluate_run(run, split): every head on cached features -> eval/<split>.json, .md, PNGs
    package.py      evaluate_package(model_dir, data): a package through the Predictor (no torch)
    selection.py    best_head(run): the one rule (highest val accuracy)
    tables.py       the heads table and the Markdown renderer
    figures.py      the PNG figures
    diagnostics.py  the numbers of the reliability diagram and the confusion matrix
    predictions.py  per-image predictions (CSV or JSONL)

Reporting reads files (heads, eval/, the cache) and the head registry; it imports nothing from stage 2.
"""

from ltserve.evaluate.run import evaluate_run
from ltserve.evaluate.selection import best_head
from ltserve.evaluate.tables import heads_table

__all__ = ["best_head", "evaluate_run", "heads_table"]
