"""What a prediction is: the top-1 class of one image and its ranked top-k, one schema for HTTP and batch output,
and `postprocess`, which turns logits into predictions (NumPy and pydantic only).

Open-set fields (`ltserve.open_set`): `unknown` and `ood_score` are None when open-set rejection is off (and in
answers from before it); with "flag" every answer carries them; with "reject" an unknown image answers label,
class_index, probability and shot_group null, its `top_k` still ranking the closest known classes."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from pydantic import BaseModel, Field

from ltserve.metrics import ShotGroup, softmax


class TopKEntry(BaseModel):
    """One ranked class of a prediction."""

    label: str
    class_index: int
    probability: float = Field(description="softmax probability in [0, 1] (of the calibrated logits)")
    shot_group: ShotGroup = Field(description="many / medium / few: how often the class was seen in training")


class Prediction(BaseModel):
    """The top-1 class of one image and its ranked top-k (top-1 first): one schema for HTTP and batch output."""

    label: str | None = Field(description="the top-1 class; null only when open-set rejection (reject mode) found "
                              "the image unknown")
    class_index: int | None = Field(description="index of the top-1 class in the package's labels (null when "
                                    "rejected as unknown)")
    probability: float | None = Field(description="softmax probability of the top-1 class (null when rejected as "
                                      "unknown)")
    shot_group: ShotGroup | None = Field(description="many / medium / few of the top-1 class (null when rejected "
                                         "as unknown)")
    top_k: list[TopKEntry] = Field(description="the k most probable classes, most probable first (top-1 included); "
                                   "for an image rejected as unknown, the closest known classes")
    unknown: bool | None = Field(None, description="open-set rejection: true when the image looks like none of the "
                                 "training classes (its ood_score exceeds the threshold of its top-1 class, calibrated "
                                 "to accept 95 % of known images in every shot group); null when open-set is off")
    ood_score: float | None = Field(None, description="the package's open-set score (model.json open_set.score, "
                                    "e.g. mahalanobis or energy): higher means less like the training classes; null "
                                    "when open-set is off")


def postprocess(logits: np.ndarray, labels: Sequence[str], shot_groups: Sequence[ShotGroup],
                top_k: int = 5, answer: type[Prediction] = Prediction, *, ood_score: np.ndarray | None = None,
                unknown: np.ndarray | None = None, reject: bool = False, **fields: Any) -> list[Prediction]:
    """Softmax (float64, then float) and the top-k classes of every row.

    Args:
        logits: (N, C).
        labels, shot_groups: C class names and shot groups (the package's).
        top_k: classes to list per image (clipped to C); >= 1.
        answer, fields: a subclass of Prediction to build and the values of its extra fields (the service's
            `LivePrediction` and its `adapted`), in the one construction each answer pays anyway.
        ood_score, unknown: (N,) open-set scores and decisions (`Predictor.open_set_scores`), or None (open-set off).
        reject: answer label, class_index, probability and shot_group null for the unknown rows.

    Returns:
        N `answer`s, in row order; ties go to the lower class index (the class argmax picks).
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    k = min(int(top_k), len(labels))
    probs = softmax(np.asarray(logits))
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    scores = [None] * len(probs) if ood_score is None else np.asarray(ood_score, dtype=np.float64).tolist()
    flags = [None] * len(probs) if unknown is None else np.asarray(unknown, dtype=bool).tolist()
    out = []
    for row, idx, score, flag in zip(probs, order, scores, flags):
        entries = [TopKEntry(label=labels[j], class_index=int(j), probability=float(row[j]),
                             shot_group=shot_groups[j]) for j in idx]
        if reject and flag:
            out.append(answer(label=None, class_index=None, probability=None, shot_group=None, top_k=entries,
                              unknown=True, ood_score=score, **fields))
            continue
        top = entries[0]
        out.append(answer(label=top.label, class_index=top.class_index, probability=top.probability,
                          shot_group=top.shot_group, top_k=entries, unknown=flag, ood_score=score, **fields))
    return out
