"""The one rule that picks a run's best head: the highest accuracy on the validation split.

The score is balanced accuracy on val (= top-1 on a balanced val split, the paper's protocol); top-1 when some head
has no balanced accuracy recorded. The joint head competes too. Ties go to the earlier head in registry order
(joint, crt, tau_norm, ...). The test split never chooses anything. `ltserve export --head best`, the demo and the
"joint vs best" figure of every evaluation all use this rule, so they always name the same head.

A head's val metrics come from its meta (`meta["val"]`, written by stage 2), else from `eval/val.json` (written by
`ltserve evaluate --split val`), else they are computed from the cached val features.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

from ltserve.errors import RunError
from ltserve.features.cache import cached_features
from ltserve.heads import HEADS
from ltserve.metrics import classification_report
from ltserve.rundir import Run, open_run

log = logging.getLogger(__name__)


def recorded_metrics(run: Run, split: str, head: str) -> dict[str, Any] | None:
    """The head's entry in `eval/<split>.json` (written by `ltserve evaluate`), if there is one."""
    path = run.paths.eval / f"{split}.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except ValueError:
        log.warning("%s: not valid JSON; its metrics are left out", path)
        return None
    entry = (data.get("heads") if isinstance(data.get("heads"), dict) else data).get(head)
    return entry if isinstance(entry, dict) else None


def val_metrics(run: Run | str | Path, heads: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """{head: val classification report} of the run's heads (or the named ones), in registry order."""
    run = open_run(run)
    names = run.head_names() if heads is None else list(heads)
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        meta_val = run.head(name).meta.get("val")
        out[name] = meta_val if isinstance(meta_val, dict) else (recorded_metrics(run, "val", name)
                                                                  or _computed(run, name))
    return out


def _computed(run: Run, name: str) -> dict[str, Any]:
    x, y = cached_features(run, "val")
    info = run.info
    log.info("%s has no recorded val metrics; computed them on %d cached val features", name, len(y))
    head = run.head(name)
    return classification_report(head.logits(x), y, info.class_counts, info.many_threshold, info.few_threshold,
                                 temperature=head.temperature)


def best_of(scores: dict[str, dict[str, Any]]) -> tuple[str, str]:
    """(best head, the metric that decided) among {head: val report}, by the rule above.

    Raises:
        ValueError: no head.
    """
    if not scores:
        raise ValueError("no head to choose from")
    key = "balanced_accuracy" if all(v.get("balanced_accuracy") is not None for v in scores.values()) else "top1"
    order = HEADS.names()

    def rank(name: str) -> tuple[float, int]:
        return float(scores[name].get(key) or 0.0), -(order.index(name) if name in order else len(order))

    return max(scores, key=rank), key


def best_head(run: Run | str | Path) -> str:
    """The run's head with the highest val accuracy (see the module docstring).

    Raises:
        RunError: the run has no head.
    """
    run = open_run(run)
    scores = val_metrics(run)
    if not scores:
        raise RunError(f"{run.paths.heads}: no heads; train the run first (`ltserve train CONFIG --out {run.root}`)")
    best, key = best_of(scores)
    log.info("best head by val %s: %s (%s)", key, best,
             ", ".join(f"{n} {float(v.get(key) or 0):.4f}" for n, v in scores.items()))
    return best
