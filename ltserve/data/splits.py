"""`load_splits(cfg.data)`: train / val / test of the configured data set, and the fingerprint that identifies them.

Sources (``DataConfig.source``):

- ``fashion-mnist``: the four official IDX files. With ``longtail`` the training set is a long-tailed subset of the
  60,000 training images (class i keeps floor(n_max * rho^(-i/(C-1))) images), val is ``val_per_class`` images per
  class drawn from the training images the subset did not use (balanced), test is the official 10,000 test set.
- ``imagefolder``: ``root/<train>/<class>/<image>``; class names are the sorted folder names.
- ``list``: split list files in the paper's format, one ``relative/path label`` per line (ImageNet_LT_train.txt
  works unchanged), paths joined to ``root``; class names from the optional ``names`` file.

For folders and lists, val and test come from their own folder/list when given, otherwise from seeded stratified
splits of the training pool that keep at least one image per class in train. File-based sets are lazy: every path
is checked to exist but no image is opened here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ltserve.data.fashion_mnist import FASHION_MNIST_CLASSES, find_fashion_mnist, read_fashion_mnist
from ltserve.data.imageset import ImageSet, Splits
from ltserve.data.longtail import (balanced_draw, longtail_counts, longtail_order, make_longtail,
                                   stratified_split, stratified_subsample)
from ltserve.data.readers import read_image_folder, read_names_file, read_split_list
from ltserve.errors import DataError

if TYPE_CHECKING:
    from ltserve.config import DataConfig

log = logging.getLogger(__name__)

def load_splits(cfg: "DataConfig") -> Splits:
    """Build train / val / test of the configured data set (see the module docstring for the rules).

    File-based images are not opened here (only checked to exist); Fashion-MNIST is read into memory (~55 MB).

    Raises:
        DataError: a file is missing or malformed, a label is out of range, a class has no training image, or
            a long-tail count cannot be met; messages name the file, line and fix.
    """
    if cfg.source == "fashion-mnist":
        return _load_fashion_mnist(cfg)
    return _load_files(cfg)


def _load_fashion_mnist(cfg: "DataConfig") -> Splits:
    folder = find_fashion_mnist(cfg.root)
    fm = read_fashion_mnist(folder)
    names = list(FASHION_MNIST_CLASSES)
    pool = ImageSet(labels=fm["train_labels"], arrays=fm["train_images"])
    test = ImageSet(labels=fm["test_labels"], arrays=fm["test_images"])
    kept, held = held_out_split(names, cfg.held_out_classes)
    held_test = None
    if held:
        pool, _ = hold_out(pool, kept)
        test, held_test = hold_out(test, kept, held)
        names = [names[j] for j in kept]
    train_idx, val_idx = _train_val_indices(pool.labels, cfg, names, "Fashion-MNIST train")
    test_idx = np.arange(len(test), dtype=np.int64)
    if cfg.max_test_images is not None:
        test_idx = stratified_subsample(test.labels, cfg.max_test_images, cfg.split_seed + 3)
    splits = Splits(train=pool.subset(train_idx), val=pool.subset(val_idx), test=test.subset(test_idx),
                    class_names=names, fingerprint="", held_out=held_test,
                    held_out_names=[FASHION_MNIST_CLASSES[j] for j in held])
    _check_no_empty_class(splits, "Fashion-MNIST train")
    splits.fingerprint = _fingerprint(cfg, names, {"train": train_idx, "val": val_idx, "test": test_idx}, splits)
    _log_summary(splits, "fashion-mnist", folder)
    return splits


def held_out_split(names: list[str], held_out: list[str]) -> tuple[list[int], list[int]]:
    """(kept class indices, held-out class indices) for `data.held_out_classes`.

    Raises:
        DataError: a name that is not a class, or every class held out.
    """
    unknown = [n for n in held_out if n not in names]
    if unknown:
        raise DataError(f"data.held_out_classes: {', '.join(map(repr, unknown))} not classes of this data set; the "
                        f"classes are {', '.join(map(repr, names))}")
    held = [j for j, n in enumerate(names) if n in held_out]
    kept = [j for j in range(len(names)) if j not in held]
    if len(kept) < 2:
        raise DataError("data.held_out_classes: at least two classes must stay in training")
    return kept, held


def hold_out(images: ImageSet, kept: list[int], held: list[int] | None = None) -> tuple[ImageSet, ImageSet | None]:
    """The images of the kept classes (labels renumbered 0..K-1 in order) and, with `held`, those of the held-out
    classes (labels indexing `held`)."""
    remap = np.full(max([*kept, *(held or [])]) + 1, -1, dtype=np.int64)
    remap[kept] = np.arange(len(kept))
    keep = np.flatnonzero(np.isin(images.labels, kept))
    out = images.subset(keep)
    out.labels = remap[out.labels]
    if not held:
        return out, None
    hidx = np.flatnonzero(np.isin(images.labels, held))
    other = images.subset(hidx)
    hmap = np.full(remap.size, -1, dtype=np.int64)
    hmap[held] = np.arange(len(held))
    other.labels = hmap[other.labels]
    return out, other


def _train_val_indices(labels: np.ndarray, cfg: "DataConfig", names: list[str],
                       where: str, need_val: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Train and val indices into a training pool: long tail + balanced val from unused, or stratified val."""
    num_classes = len(names)
    lt = cfg.longtail
    if lt is not None:
        counts = longtail_counts(lt.n_max, lt.rho, num_classes)
        if min(counts) < 1:
            raise DataError(f"data.longtail: rho {lt.rho} with n_max {lt.n_max} leaves class(es) with 0 images "
                            f"(counts {counts}); lower rho or raise n_max")
        try:
            train_idx, unused_idx = make_longtail(labels, counts, longtail_order(lt.order, names), cfg.split_seed)
        except DataError as exc:
            raise DataError(f"{where}: {exc}") from None
        if need_val and lt.val_per_class > 0:
            picked = balanced_draw(labels[unused_idx], lt.val_per_class, num_classes, cfg.split_seed + 1,
                                   where=f"{where} (images the long tail did not use)")
            val_idx = unused_idx[picked]
        elif need_val:
            keep, val = stratified_split(labels[train_idx], cfg.val_fraction, cfg.split_seed + 1, name="val",
                                         class_names=names)
            train_idx, val_idx = train_idx[keep], train_idx[val]
        else:
            val_idx = np.zeros(0, np.int64)
    else:
        train_idx = np.arange(len(labels), dtype=np.int64)
        val_idx = np.zeros(0, np.int64)
        if need_val:
            keep, val = stratified_split(labels, cfg.val_fraction, cfg.split_seed + 1, name="val",
                                         class_names=names)
            train_idx, val_idx = keep, val
    if cfg.max_train_images is not None:
        train_idx = train_idx[stratified_subsample(labels[train_idx], cfg.max_train_images, cfg.split_seed + 2)]
    return train_idx, val_idx


def _check_no_empty_class(splits: Splits, where: str) -> None:
    counts = splits.class_counts()
    empty = [f"{j} {splits.class_names[j]!r}" for j in np.flatnonzero(counts == 0)]
    if empty:
        raise DataError(f"{where}: {len(empty)} class(es) have no training image: {', '.join(empty[:10])}"
                        f"{' ...' if len(empty) > 10 else ''}; add images, remove the class from the names file, "
                        "or renumber the labels")


def _fingerprint(cfg: "DataConfig", names: list[str], ids: dict[str, list[str] | np.ndarray],
                 splits: Splits) -> str:
    # The root is left out on purpose: the same data mounted elsewhere is the same data. In-memory images are
    # hashed by content (cheap: at most ~55 MB), file-based ones by their paths relative to the data root.
    # open_set names evaluation images, not training data; held_out_classes is left out when empty, so that runs
    # from before the field keep their fingerprint
    settings = cfg.model_dump(mode="json", exclude={"root", "many_threshold", "few_threshold", "open_set",
                                                    *(() if cfg.held_out_classes else ("held_out_classes",))})
    h = hashlib.sha256()
    h.update(json.dumps({"settings": settings, "classes": names}, sort_keys=True).encode())
    for split in ("train", "val", "test"):
        imageset = getattr(splits, split)
        h.update(f"\n[{split}]\n".encode())
        if imageset is None:
            continue
        item_ids = ids[split]
        if isinstance(item_ids, np.ndarray):
            h.update(np.ascontiguousarray(item_ids, dtype="<i8").tobytes())
        else:
            h.update("\n".join(item_ids).encode())
        h.update(np.ascontiguousarray(imageset.labels, dtype="<i8").tobytes())
        if imageset.arrays is not None:
            h.update(np.ascontiguousarray(imageset.arrays).tobytes())
    return h.hexdigest()[:16]


def _log_summary(splits: Splits, source: str, where: Path | str) -> None:
    counts = splits.class_counts()
    log.info("data %s (%s): %d classes, train %d (per class %d..%d), val %d, test %s; fingerprint %s", source,
             where, splits.num_classes, len(splits.train), int(counts.min()), int(counts.max()), len(splits.val),
             len(splits.test) if splits.test is not None else "none", splits.fingerprint)


# --- folders and lists -----------------------------------------------------------------------------------------


def _resolve(root: str | None, rel: str) -> Path:
    """A config path: absolute as is; else under `root` when there; else relative to the working directory."""
    p = Path(rel)
    if p.is_absolute():
        return p
    if root is not None and (Path(root) / p).exists():
        return Path(root) / p
    if p.exists() or root is None:
        return p
    return Path(root) / p  # missing either way: report it under root, where it was expected


def _read_source(cfg: "DataConfig", split: str, names: list[str] | None) -> tuple[ImageSet, list[str], list[str]]:
    """Read one split's folder or list. Returns (imageset, class_names, item ids for the fingerprint)."""
    rel = getattr(cfg, split)
    field = f"data.{split}"
    if cfg.root is not None and not Path(cfg.root).is_dir():
        raise DataError(f"data.root {cfg.root!r}: folder not found; fix data.root")
    if cfg.source == "imagefolder":
        folder = _resolve(cfg.root, rel) if rel is not None else Path(cfg.root or ".")
        paths, labels, found = read_image_folder(folder)
        if names is not None:
            unknown = [n for n in found if n not in names]
            if unknown:
                raise DataError(f"{folder}: class folder(s) {', '.join(map(repr, unknown[:10]))} are not training "
                                "classes; rename or remove them (class names come from the training folder)")
            labels = np.asarray([names.index(found[j]) for j in labels], dtype=np.int64)
        else:
            names = found
        ids = [os.path.relpath(p, folder) for p in paths]
        return ImageSet(labels=labels, paths=paths, sources=None), names, ids
    if rel is None:
        raise DataError(f"{field}: a split list file is needed for data.source 'list'")
    list_file = _resolve(cfg.root, rel)
    paths, labels, sources = read_split_list(list_file, cfg.root)
    if names is None:
        names = read_names_file(_resolve(cfg.root, cfg.names)) if cfg.names else \
            [str(j) for j in range(int(labels.max()) + 1)]
    bad = np.flatnonzero(labels >= len(names))
    if bad.size:
        k = int(bad[0])
        ref = f"the {len(names)} names in {cfg.names}" if cfg.names else f"{len(names)} classes"
        raise DataError(f"{list_file}:{sources[k].rsplit(':', 1)[1]}: label {int(labels[k])} is out of range for "
                        f"{ref} (labels are 0..{len(names) - 1}); fix the label or the names file "
                        f"({bad.size} line(s) affected)")
    base = Path(cfg.root) if cfg.root is not None else list_file.parent
    ids = [os.path.relpath(p, base) for p in paths]
    return ImageSet(labels=labels, paths=paths, sources=sources), names, ids


def _load_files(cfg: "DataConfig") -> Splits:
    if cfg.root is None and cfg.train is None:
        raise DataError(f"data.source {cfg.source!r} needs data.root and/or data.train")
    if cfg.held_out_classes:
        raise DataError(f"data.held_out_classes: supported for data.source fashion-mnist only (not {cfg.source!r}); "
                        "leave the classes out of the folder or list instead and name their images in data.open_set")
    pool, names, pool_ids = _read_source(cfg, "train", None)
    test: ImageSet | None = None
    test_ids: list[str] = []
    if cfg.test is not None:
        test, _, test_ids = _read_source(cfg, "test", names)
    elif cfg.test_fraction > 0:
        keep, held = stratified_split(pool.labels, cfg.test_fraction, cfg.split_seed + 4, name="test",
                                      class_names=names)
        test, test_ids = pool.subset(held), [pool_ids[j] for j in held]
        pool, pool_ids = pool.subset(keep), [pool_ids[j] for j in keep]
    if test is not None and cfg.max_test_images is not None:
        capped = stratified_subsample(test.labels, cfg.max_test_images, cfg.split_seed + 3)
        test, test_ids = test.subset(capped), [test_ids[j] for j in capped]
    has_val = cfg.val is not None
    train_idx, val_idx = _train_val_indices(pool.labels, cfg, names, f"data.train {cfg.train or cfg.root}",
                                            need_val=not has_val)
    if has_val:
        val, _, val_ids = _read_source(cfg, "val", names)
    else:
        val, val_ids = pool.subset(val_idx), [pool_ids[j] for j in val_idx]
    splits = Splits(train=pool.subset(train_idx), val=val, test=test, class_names=names, fingerprint="")
    _check_no_empty_class(splits, f"data.train {cfg.train or cfg.root}")
    splits.fingerprint = _fingerprint(cfg, names, {"train": [pool_ids[j] for j in train_idx], "val": val_ids,
                                                   "test": test_ids}, splits)
    _log_summary(splits, cfg.source, cfg.root or cfg.train or ".")
    return splits

