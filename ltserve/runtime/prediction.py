"""What a prediction is: the top-1 class of one image and its ranked top-k, one schema for HTTP and batch output,
and `postprocess`, which turns logits into predictions (NumPy and pydantic only)."""

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

    label: str
    class_index: int
    probability: float = Field(description="softmax probability of the top-1 class")
    shot_group: ShotGroup
    top_k: list[TopKEntry] = Field(description="the k most probable classes, most probable first (top-1 included)")


def postprocess(logits: np.ndarray, labels: Sequence[str], shot_groups: Sequence[ShotGroup],
                top_k: int = 5, answer: type[Prediction] = Prediction, **fields: Any) -> list[Prediction]:
    """Softmax (float64, then float) and the top-k classes of every row.

    Args:
        logits: (N, C).
        labels, shot_groups: C class names and shot groups (the package's).
        top_k: classes to list per image (clipped to C); >= 1.
        answer, fields: a subclass of Prediction to build and the values of its extra fields (the service's
            `LivePrediction` and its `adapted`), in the one construction each answer pays anyway.

    Returns:
        N `answer`s, in row order; ties go to the lower class index (the class argmax picks).
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    k = min(int(top_k), len(labels))
    probs = softmax(np.asarray(logits))
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    out = []
    for row, idx in zip(probs, order):
        entries = [TopKEntry(label=labels[j], class_index=int(j), probability=float(row[j]),
                             shot_group=shot_groups[j]) for j in idx]
        top = entries[0]
        out.append(answer(label=top.label, class_index=top.class_index, probability=top.probability,
                          shot_group=top.shot_group, top_k=entries, **fields))
    return out
