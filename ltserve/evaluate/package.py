"""A model package on a data set, through the serving path (no torch): `ltserve evaluate models/NAME --data ...`.

    ltserve evaluate models/fashion-lt --data fashion-mnist:test [--limit 2000] [--out eval.json]
    ltserve evaluate models/NAME --data LIST.txt --root DIR      # lines "relative/path label"
    ltserve evaluate models/NAME --data IMAGEFOLDER              # DIR/<class name>/<image>

Images go through exactly what the service runs: files are read as bytes and `decode`d; in-memory Fashion-MNIST
arrays go through PIL -> `transform_image` (the same arithmetic `decode` applies to a PNG of the array). The
package's ONNX graph runs through the `Predictor`. Reports top-1, top-5, balanced accuracy, ECE and the
Many/Medium/Few/All accuracies (shot groups from the package's `shot_groups`) as a printed table and JSON.

    ltserve evaluate models/NAME --data fashion-mnist:test --open-set UNKNOWN_DIR_OR_LIST

adds open-set rejection (`ltserve.open_set`): images no class covers against the known images of --data, with the
package's score: AUROC, AUPR (unknown positive), FPR at 95 % TPR; at the package's thresholds, known images rejected
per shot group, accuracy on accepted known images, unknown images rejected, OLTR's F-measure; and the threshold-free
figures of every score the package can compute (logit scores only for a package without features).
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from ltserve import data as ltdata
from ltserve.errors import DataError, InvalidInput
from ltserve.evaluate.diagnostics import confusion_entry, confusion_matrix, reliability_curve
from ltserve.evaluate.tables import heads_table
from ltserve.metrics import SHOT_GROUPS, classification_report, group_accuracy, per_class_accuracy, softmax
from ltserve.open_set import LOGIT_SCORES, aupr, auroc, fpr_at_tpr, open_set_report, scores
from ltserve.preprocess import DEFAULT_MAX_PIXELS, PreprocessSpec, decode, transform_image
from ltserve.progress import progress_bar
from ltserve.runtime import Predictor

logger = logging.getLogger(__name__)

FASHION_PREFIX = "fashion-mnist"


@dataclass
class EvalData:
    """A data set to evaluate on: its images, labels in the package's label order, and a description."""

    images: Any  # ltserve.data.ImageSet
    description: str


def load_eval_data(data: str, labels: Sequence[str], root: str | None = None, limit: int | None = None,
                   seed: int = 0) -> EvalData:
    """Read the data set named by `--data`, with labels mapped to the package's label order.

    Args:
        data: "fashion-mnist[:test|:train]", a split list file ("relative/path label" lines), or an image folder
            (`DIR/<class>/<image>`; class folders match package labels by name, with '/' in a label written as
            '_' or '-', or by decimal index).
        labels: the package's class names.
        root: Fashion-MNIST folder, or the folder list paths are relative to (default: the list's folder).
        limit: evaluate about this many images, a seeded stratified subsample (every class kept).
        seed: seed of that subsample.

    Raises:
        DataError: the data set is missing, malformed, or its classes do not match the package's.
    """
    if data == FASHION_PREFIX or data.startswith(FASHION_PREFIX + ":"):
        split = data.split(":", 1)[1] if ":" in data else "test"
        if split not in ("train", "test"):
            raise DataError(f"--data {data!r}: Fashion-MNIST splits are 'train' and 'test' (e.g. fashion-mnist:test)")
        folder = ltdata.find_fashion_mnist(root)
        stem = ltdata.FASHION_MNIST_FILES[f"{split}_images"]
        images = ltdata.read_idx(_idx_file(folder, stem))
        targets = ltdata.read_idx(_idx_file(folder, ltdata.FASHION_MNIST_FILES[f"{split}_labels"])).astype(np.int64)
        if len(labels) != len(ltdata.FASHION_MNIST_CLASSES):
            raise DataError(f"--data {data}: Fashion-MNIST has 10 classes but the package has {len(labels)}")
        if list(labels) != ltdata.FASHION_MNIST_CLASSES:
            logger.warning("package labels %s differ from the Fashion-MNIST class names; labels are matched by index",
                           list(labels))
        imageset = ltdata.ImageSet(labels=targets, arrays=images)
        description = f"Fashion-MNIST {split} ({folder})"
    else:
        path = Path(data)
        if path.is_dir():
            paths, found_labels, names = ltdata.read_image_folder(path)
            mapping = [_match_class(n, labels, path) for n in names]
            imageset = ltdata.ImageSet(labels=np.asarray([mapping[j] for j in found_labels]), paths=paths)
            description = f"image folder {path}"
        elif path.is_file():
            paths, found_labels, sources = ltdata.read_split_list(path, root)
            bad = np.flatnonzero(found_labels >= len(labels))
            if bad.size:
                k = int(bad[0])
                raise DataError(f"{sources[k]}: label {int(found_labels[k])} is out of range for the package's "
                                f"{len(labels)} classes (0..{len(labels) - 1})")
            imageset = ltdata.ImageSet(labels=found_labels, paths=paths, sources=sources)
            description = f"split list {path}"
        else:
            raise DataError(f"--data {data!r}: not 'fashion-mnist[:test|:train]', nor an existing list file or "
                            "image folder")
    if limit is not None and limit < len(imageset):
        imageset = imageset.subset(ltdata.stratified_subsample(imageset.labels, limit, seed))
        description += f", {len(imageset)} images (stratified subsample, seed {seed})"
    return EvalData(images=imageset, description=description)


def _idx_file(folder: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    raise DataError(f"{folder}: {stem}.gz not found")


def _match_class(name: str, labels: Sequence[str], folder: Path) -> int:
    for j, label in enumerate(labels):
        if name in (label, label.replace("/", "_"), label.replace("/", "-")):
            return j
    if name.isdigit() and int(name) < len(labels):
        return int(name)
    raise DataError(f"{folder / name}: class folder {name!r} is not one of the package's labels "
                    f"({', '.join(labels)}); rename the folder")


def prepare(imageset: Any, i: int, spec: PreprocessSpec, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Image `i` of an ImageSet as uint8 (crop, crop, C), the way the service would see it.

    Files are `decode`d from their bytes; in-memory arrays go PIL -> `transform_image` (what `decode` does to a
    PNG of the array).

    Raises:
        DataError: the file cannot be read or decoded (names it).
    """
    if imageset.arrays is not None:
        arr = imageset.arrays[i]
        arr = arr[..., 0] if arr.ndim == 3 and arr.shape[-1] == 1 else arr
        return transform_image(Image.fromarray(np.ascontiguousarray(arr)), spec)
    try:
        return decode(imageset.read_bytes(i), spec, max_pixels)
    except InvalidInput as exc:
        raise DataError(f"{imageset.describe(i)}: {exc}; replace the file or remove it from the data set") from None


def predict_imageset(predictor: Predictor, imageset: Any, batch_size: int = 64, workers: int | None = None,
                     progress: bool = True, with_features: bool = False) -> Any:
    """Logits (N, C) of every image, in order, with a progress bar. Files are decoded by a thread pool.

    With `with_features`: (logits, features (N, D) or None when the runner gives none)."""
    n = len(imageset)
    out = np.empty((n, predictor.num_classes), dtype=np.float32)
    feats: list[np.ndarray | None] = []
    workers = workers or min(8, os.cpu_count() or 1)
    with cf.ThreadPoolExecutor(workers) as pool, progress_bar(total=n, unit="img", desc="evaluate",
                                                               enabled=progress) as bar:
        for start in range(0, n, batch_size):
            idx = range(start, min(n, start + batch_size))
            if imageset.arrays is not None:  # cheap: no pool round trip
                images = [prepare(imageset, i, predictor.spec) for i in idx]
            else:
                images = list(pool.map(lambda i: prepare(imageset, i, predictor.spec), idx))
            if not with_features:
                out[start:start + len(images)] = predictor.predict(predictor.preprocess(images))
            else:
                out[start:start + len(images)], f = predictor.predict_outputs(predictor.preprocess(images))
                feats.append(f)
            bar.update(len(images))
    if not with_features:
        return out
    return out, (None if not feats or any(f is None for f in feats) else np.concatenate(feats))


def load_open_set(path: str, root: str | None = None) -> Any:
    """Images no class covers: a folder (every image under it, recursively) or a list file (one path per line, a
    trailing label ignored; relative paths joined to `root`, default the list's folder).

    Raises:
        DataError: missing, or no image found.
    """
    p = Path(path)
    if p.is_dir():
        paths = sorted(str(f) for f in p.rglob("*") if f.is_file() and f.suffix.lower() in ltdata.IMAGE_EXTENSIONS)
        sources = None
    elif p.is_file():
        base = Path(root) if root else p.parent
        lines = [(i, ln.split()[0]) for i, ln in enumerate(p.read_text().splitlines(), 1) if ln.strip()]
        paths = [str(base / rel) if not Path(rel).is_absolute() else rel for _, rel in lines]
        sources = [f"{p}:{i}" for i, _ in lines]
    else:
        raise DataError(f"--open-set {path!r}: not an image folder nor a list file")
    if not paths:
        raise DataError(f"--open-set {path}: no image found ({', '.join(sorted(ltdata.IMAGE_EXTENSIONS))})")
    return ltdata.ImageSet(labels=np.zeros(len(paths), dtype=np.int64), paths=paths, sources=sources)


def open_set_evaluation(predictor: Predictor, known_logits: np.ndarray, known_features: np.ndarray | None,
                        labels: np.ndarray, unknown: Any, description: str, batch_size: int = 64,
                        progress: bool = True) -> dict[str, Any]:
    """The open-set figures of a package: known images (their logits and features) against `unknown` images."""
    meta = predictor.meta
    u_logits, u_features = predict_imageset(predictor, unknown, batch_size=batch_size, progress=progress,
                                            with_features=True)
    stats = predictor.feature_stats
    names = [*LOGIT_SCORES, *(stats.scores() if stats is not None and known_features is not None
                              and u_features is not None else ())]
    every = {}
    for name in names:
        k = scores(name, known_logits, known_features, stats)
        u = scores(name, u_logits, u_features, stats)
        every[name] = {"auroc": auroc(k, u), "aupr": aupr(k, u), "fpr_at_95_tpr": fpr_at_tpr(k, u)}
    report: dict[str, Any] = {"data": description, "n_unknown": int(len(unknown)), "scores": every}
    if meta.open_set is not None and meta.open_set.score in names:
        name = meta.open_set.score
        report.update({"score": name, "target": meta.open_set.target, **open_set_report(
            scores(name, known_logits, known_features, stats), known_logits.argmax(1), labels,
            scores(name, u_logits, u_features, stats), u_logits.argmax(1), meta.shot_groups, meta.open_set.thresholds)})
    else:
        report["score"] = None
        report["note"] = ("the package has no open-set thresholds (exported before open-set rejection): "
                          "threshold-free figures of the logit scores only")
    return report


def evaluate_package(model_dir: str | Path, data: str, root: str | None = None, limit: int | None = None,
                     batch_size: int = 64, providers: Sequence[str] | None = None, threads: int | None = None,
                     seed: int = 0, progress: bool = True,
                     open_set: str | None = None) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """Evaluate a model package on a data set through the Predictor.

    Args:
        open_set: a folder or list of images no class covers: adds report["open_set"] (`open_set_evaluation`).

    Returns:
        (report, logits (N, C), labels (N,)); the report holds n, top1, top5, balanced_accuracy, many, medium, few
        (None when a group has no class), all (= top1), ece, per_class, labels, class_groups, reliability
        (`diagnostics.reliability_curve`), confusion (`diagnostics.confusion_entry`, classes head to tail by the
        package's training counts), and model and data descriptions.
    """
    predictor = Predictor(model_dir, providers=providers, threads=threads, max_batch_size=batch_size)
    meta = predictor.meta
    ev = load_eval_data(data, meta.labels, root=root, limit=limit, seed=seed)
    logits, features = predict_imageset(predictor, ev.images, batch_size=batch_size, progress=progress,
                                        with_features=True)
    labels = ev.images.labels
    report = classification_report(logits, labels, meta.class_counts, meta.shot_thresholds.many,
                                   meta.shot_thresholds.few, temperature=meta.head.temperature)
    # the package's recorded shot groups are the definition (they came from the training counts at export)
    report.update(group_accuracy(per_class_accuracy(logits.argmax(1), labels, len(meta.labels)), meta.shot_groups))
    report["all"] = report["top1"]
    report["model"] = {"path": str(model_dir), "name": meta.name, "head": meta.head.name,
                       "providers": predictor.providers}
    report["data"] = ev.description
    report["labels"] = list(meta.labels)
    report["class_groups"] = {g: [meta.labels[j] for j, s in enumerate(meta.shot_groups) if s == g]
                              for g in SHOT_GROUPS}
    # the numbers of a run evaluation's reliability diagram and confusion matrix, for the package's head; the
    # package's logits already hold the head's temperature: these are the served probabilities
    order = np.argsort(-np.asarray(meta.class_counts), kind="stable")
    report["reliability"] = reliability_curve(softmax(logits), labels)
    report["confusion"] = confusion_entry(*confusion_matrix(logits.argmax(1), labels, order), order, meta.labels)
    if open_set is not None:
        report["open_set"] = open_set_evaluation(predictor, logits, features, labels, load_open_set(open_set, root),
                                                 f"--open-set {open_set}", batch_size, progress)
    return report, logits, labels


def format_report(report: dict[str, Any]) -> str:
    """The printed result: the heads table's row for this package, and the size of each shot group."""
    counts = ", ".join(f"{g} {len(report['class_groups'][g])}" for g in SHOT_GROUPS)
    lines = [f"{report['model']['name']} ({report['model']['head']}) on {report['data']}: "
             f"{report['n']} images; classes per shot group: {counts}", "",
             heads_table({report["model"]["head"]: report})]
    o = report.get("open_set")
    if o:
        lines += ["", f"open set: {o['n_unknown']} unknown images ({o['data']})"]
        lines += [f"  {name:<12} AUROC {r['auroc']:.4f}  AUPR {r['aupr']:.4f}  FPR@95%TPR {r['fpr_at_95_tpr']:.4f}"
                  + ("   <- the package's score" if name == o.get("score") else "") for name, r in o["scores"].items()]
        if o.get("score"):
            pct = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
            lines += [f"  at the package's thresholds ({o['score']}, target {o['target']:.0%} known accepted): "
                      f"unknown rejected {pct(o['unknown_rejected'])} %, F-measure {o['f_measure']:.4f}",
                      "  known rejected %: " + ", ".join(f"{g} {pct(v)}" for g, v in o["known_rejected"].items()),
                      "  accuracy on accepted known images %: " + ", ".join(
                          f"{g} {pct(v)} (all {pct(o['accuracy_all'][g])})" for g, v in o["accuracy_accepted"].items())]
        else:
            lines.append(f"  {o['note']}")
    return "\n".join(lines)
