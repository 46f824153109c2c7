"""The long-tail maker and the seeded splits: which images of a pool go to train, val and test (NumPy only).

    longtail_counts(n_max, rho, C)        n_i = floor(n_max * rho^(-i/(C-1))), the CIFAR-LT protocol
    longtail_order(order, class_names)    data.longtail.order (a keyword or class names) as make_longtail takes it
    make_longtail(labels, counts, order)  draw that many images of each class
    stratified_split / balanced_draw / stratified_subsample
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from ltserve.errors import DataError

log = logging.getLogger(__name__)

def longtail_counts(n_max: int, rho: float, num_classes: int) -> list[int]:
    """Images per class of the CIFAR-LT protocol: n_i = floor(n_max * rho^(-i/(C-1))), i = 0..C-1.

    Computed as n_max * (1/rho)^(i/(C-1)), like the reference CIFAR-LT code, so counts agree with published
    subsets; e.g. (1000, 100, 10) -> [1000, 599, 359, 215, 129, 77, 46, 27, 16, 10].

    Args:
        n_max: images of the largest (first) class.
        rho: imbalance ratio n_max / n_min (>= 1).
        num_classes: C.

    Returns:
        C counts, non-increasing (a count can be 0 when rho > n_max; `load_splits` rejects that).
    """
    if num_classes < 1 or n_max < 1 or rho < 1:
        raise ValueError(f"longtail_counts needs n_max >= 1, rho >= 1, num_classes >= 1 "
                         f"(got {n_max}, {rho}, {num_classes})")
    if num_classes == 1:
        return [int(n_max)]
    inv = 1.0 / float(rho)
    # The tiny relative nudge keeps exact products (1000 * 0.01 = 10) from flooring to 9 through rounding error.
    return [int(np.floor(n_max * inv ** (i / (num_classes - 1)) * (1 + 1e-12))) for i in range(num_classes)]


def longtail_order(order: str | Sequence[str], class_names: Sequence[str]) -> str | list[int]:
    """`data.longtail.order` in the form `make_longtail` takes: a keyword unchanged, class names as class indices.

    Args:
        order: "index", "random", "reversed", or class names from head (most images) to tail.
        class_names: the data set's C class names, in label order.

    Returns:
        the keyword, or C class indices, head to tail.

    Raises:
        DataError: the list names a class the data set does not have, or leaves a class out (the message names the
            field, the bad and the missing names, and the valid ones).
    """
    if isinstance(order, str):
        return order
    index = {name: j for j, name in enumerate(class_names)}
    unknown = [n for n in order if n not in index]
    missing = [n for n in class_names if n not in set(order)]
    if unknown or missing:
        problems = [f"not classes of this data set: {', '.join(map(repr, unknown))}"] if unknown else []
        problems += [f"missing: {', '.join(map(repr, missing))}"] if missing else []
        raise DataError(f"data.longtail.order: {'; '.join(problems)}; name every class exactly once, head (most "
                        f"images) to tail; the classes are {', '.join(map(repr, class_names))}")
    return [index[n] for n in order]


def make_longtail(labels: np.ndarray, counts: list[int] | np.ndarray, order: str | Sequence[int] = "index",
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Draw a long-tailed subset: class j keeps `counts[rank(j)]` images chosen at random (seeded).

    Args:
        labels: (N,) int labels of the balanced pool.
        counts: C counts by rank (largest first), e.g. from `longtail_counts`.
        order: which class gets which count. "index": class i gets counts[i]; "reversed": class C-1-i gets
            counts[i] (class C-1 largest); "random": a seeded permutation of the classes gets the counts; or C class
            indices, head to tail: order[i] gets counts[i] (`longtail_order` turns class names into these).
        seed: seeds the "random" class order and the draw within each class.

    Returns:
        (train_idx, unused_idx): sorted int64 indices into `labels`; together they cover the pool exactly once.

    Raises:
        DataError: a class has fewer images than its count.
        ValueError: an unknown keyword, or indices that are not a permutation of 0..C-1.
    """
    labels = np.asarray(labels, dtype=np.int64)
    num_classes = len(counts)
    rng = np.random.default_rng(seed)
    # perm[i] is the class that gets the i-th largest count. Only "random" draws from rng here, so the other orders
    # draw the same images within each class as "index" does for the same count.
    if isinstance(order, str):
        if order not in ("index", "random", "reversed"):
            raise ValueError(f"order {order!r} is not one of index, random, reversed, or a list of class indices")
        perm = {"index": np.arange(num_classes), "reversed": np.arange(num_classes)[::-1]}.get(order)
        if perm is None:
            perm = rng.permutation(num_classes)
    else:
        perm = np.asarray(order, dtype=np.int64)
        if sorted(perm.tolist()) != list(range(num_classes)):
            raise ValueError(f"order {list(order)} is not a permutation of the {num_classes} class indices")
    count_of_class = np.zeros(num_classes, dtype=np.int64)
    count_of_class[perm] = np.asarray(counts, dtype=np.int64)
    keep: list[np.ndarray] = []
    for cls in range(num_classes):
        want = int(count_of_class[cls])
        members = np.flatnonzero(labels == cls)
        if want > len(members):
            raise DataError(f"long tail: class {cls} needs {want} images but the pool has only {len(members)}; "
                            "lower data.longtail.n_max or use a larger data set")
        keep.append(rng.permutation(members)[:want])
    train_idx = np.sort(np.concatenate(keep)) if keep else np.zeros(0, np.int64)
    unused = np.ones(len(labels), dtype=bool)
    unused[train_idx] = False
    return train_idx.astype(np.int64), np.flatnonzero(unused).astype(np.int64)


def stratified_split(labels: np.ndarray, fraction: float, seed: int, *, name: str = "val",
                     class_names: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Split each class: round(fraction * n_c) images go to the split, at least one always stays in keep.

    Args:
        labels: (N,) int labels.
        fraction: share of each class moved to the split, in [0, 1).
        seed: seeds the draw.
        name: what the split is called in the warning ("val", "test").
        class_names: for the warning; label numbers otherwise.

    Returns:
        (keep_idx, split_idx): sorted int64 indices into `labels`, disjoint and covering.

    Logs a warning naming the classes too small to give the split any image.
    """
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    split: list[np.ndarray] = []
    too_small: list[str] = []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        k = min(int(np.floor(fraction * len(members) + 0.5)), len(members) - 1)
        if fraction > 0 and k <= 0:
            too_small.append(f"{class_names[cls] if class_names else cls} ({len(members)})")
        split.append(members[:max(k, 0)])
    if too_small:
        log.warning("%d class(es) too small to give the %s split an image (%s fraction %.3g keeps >= 1 image per "
                    "class in train): %s", len(too_small), name, name, fraction, ", ".join(too_small[:20])
                    + (" ..." if len(too_small) > 20 else ""))
    split_idx = np.sort(np.concatenate(split)) if split else np.zeros(0, np.int64)
    mask = np.ones(len(labels), dtype=bool)
    mask[split_idx] = False
    return np.flatnonzero(mask).astype(np.int64), split_idx.astype(np.int64)


def balanced_draw(labels: np.ndarray, per_class: int, num_classes: int, seed: int,
                  where: str = "val") -> np.ndarray:
    """`per_class` images of every class 0..C-1 drawn at random (seeded); sorted int64 indices into `labels`.

    Raises:
        DataError: a class has fewer than `per_class` images to draw from.
    """
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    out = []
    for cls in range(num_classes):
        members = np.flatnonzero(labels == cls)
        if len(members) < per_class:
            raise DataError(f"{where}: class {cls} has only {len(members)} images left for a balanced split of "
                            f"{per_class} per class; lower data.longtail.val_per_class or data.longtail.n_max")
        out.append(rng.choice(members, size=per_class, replace=False))
    return np.sort(np.concatenate(out)).astype(np.int64) if out else np.zeros(0, np.int64)


def stratified_subsample(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """About `n` items keeping every class's share (largest remainder) and >= 1 image per class; sorted indices.

    Used for the `max_train_images` / `max_test_images` caps of tiny runs; returns everything when n >= N.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if n >= len(labels):
        return np.arange(len(labels), dtype=np.int64)
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * (n / len(labels))
    take = np.floor(exact).astype(np.int64)
    short = n - int(take.sum())
    if short > 0:
        take[np.argsort(-(exact - take), kind="stable")[:short]] += 1
    take = np.clip(take, 1, counts)
    rng = np.random.default_rng(seed)
    out = [rng.choice(np.flatnonzero(labels == c), size=int(k), replace=False) for c, k in zip(classes, take)]
    return np.sort(np.concatenate(out)).astype(np.int64)

