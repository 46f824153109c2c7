"""Data sets: readers (Fashion-MNIST IDX, image folders, split lists), splits and the long-tail maker.

Everything here is NumPy and Pillow (no torch), so stage 2, evaluation and the batch tools can read data
without the training stack. File-based sets are lazy: `load_splits` checks every path exists but opens no image;
`ImageSet.load(i)` opens one image when it is needed.

Sources (``DataConfig.source``):

- ``fashion-mnist``: the four official IDX files. With ``longtail`` the training set is a long-tailed subset of the
  60,000 training images (class i keeps floor(n_max * rho^(-i/(C-1))) images), val is ``val_per_class`` images per
  class drawn from the training images the subset did not use (balanced), test is the official 10,000 test set.
- ``imagefolder``: ``root/<train>/<class>/<image>``; class names are the sorted folder names.
- ``list``: split list files in the paper's format, one ``relative/path label`` per line (ImageNet_LT_train.txt
  works unchanged), paths joined to ``root``; class names from the optional ``names`` file.

For folders and lists, val and test come from their own folder/list when given, otherwise from seeded stratified
splits of the training pool that keep at least one image per class in train.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import logging
import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from PIL import Image, ImageOps

from ltserve.errors import DataError

if TYPE_CHECKING:
    from ltserve.config import DataConfig

log = logging.getLogger(__name__)

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot"]
"""Fashion-MNIST class names, in label order."""

OFFICIAL_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
"""The official Fashion-MNIST download location (Zalando Research's S3 bucket)."""

FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
"""Role -> file stem; the files are stored as ``<stem>.gz`` (downloads) or raw ``<stem>`` (both are read)."""

# Checksums of the four files. A .gz may be re-compressed or carry a different gzip header (Debian's
# dataset-fashion-mnist strips the embedded file name, so its .gz bytes differ from the S3 ones), so what is
# verified is the sha256 of the decompressed IDX payload, which is the same everywhere. The md5 of the official
# .gz files (Zalando's README, torchvision) is accepted as a fast path.
FASHION_MNIST_CHECKSUMS: dict[str, dict[str, str | int]] = {
    "train-images-idx3-ubyte": {
        "gz_md5": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "sha256": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "size": 47040016,
    },
    "train-labels-idx1-ubyte": {
        "gz_md5": "25c81989df183df01b3e8a0aad5dffbe",
        "sha256": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "size": 60008,
    },
    "t10k-images-idx3-ubyte": {
        "gz_md5": "bef4ecab320f06d8554ea6380940ec79",
        "sha256": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "size": 7840016,
    },
    "t10k-labels-idx1-ubyte": {
        "gz_md5": "bb300cfdad3c16e7a12a480ee83cd310",
        "sha256": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        "size": 10008,
    },
}

SYSTEM_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")
FETCH_HINT = ("run `make data` (or `python -m ltserve.data fetch`) to download it into the user cache, "
              "install the Debian package dataset-fashion-mnist, or set data.root / $LTSERVE_DATA to a folder "
              "holding the four IDX files")


# --------------------------------------------------------------------------------------------------------------
# Image sets and splits
# --------------------------------------------------------------------------------------------------------------


@dataclass
class ImageSet:
    """Images and their labels, either in memory (`arrays`) or as files (`paths`), never both.

    Attributes:
        labels: (N,) int64 class indices.
        arrays: (N, H, W) or (N, H, W, C) uint8 images held in memory (Fashion-MNIST), or None.
        paths: N absolute image paths (opened lazily by `load`), or None.
        sources: N strings saying where each item came from, e.g. "train.txt:12", for error messages, or None.
    """

    labels: np.ndarray
    arrays: np.ndarray | None = None
    paths: list[str] | None = None
    sources: list[str] | None = None

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if (self.arrays is None) == (self.paths is None):
            raise ValueError("ImageSet needs exactly one of arrays or paths")
        n = len(self.labels)
        if self.arrays is not None and len(self.arrays) != n:
            raise ValueError(f"ImageSet: {len(self.arrays)} arrays but {n} labels")
        if self.paths is not None and len(self.paths) != n:
            raise ValueError(f"ImageSet: {len(self.paths)} paths but {n} labels")
        if self.sources is not None and len(self.sources) != n:
            raise ValueError(f"ImageSet: {len(self.sources)} sources but {n} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def describe(self, i: int) -> str:
        """Where item `i` comes from, for messages: "/abs/path (list.txt:12)" or "in-memory image 7"."""
        if self.paths is None:
            return f"in-memory image {i}"
        where = f" ({self.sources[i]})" if self.sources is not None else ""
        return f"{self.paths[i]}{where}"

    def load(self, i: int) -> Image.Image:
        """Image `i` as a decoded Pillow image (EXIF orientation applied; mode as stored: L, RGB, RGBA, ...).

        Raises:
            DataError: the file is missing or not a decodable image (the message names the file and list line).
        """
        if self.arrays is not None:
            arr = self.arrays[i]
            if arr.ndim == 3 and arr.shape[-1] == 1:
                arr = arr[..., 0]
            return Image.fromarray(np.ascontiguousarray(arr))
        path = self.paths[i]  # type: ignore[index]
        try:
            with Image.open(path) as img:
                img.load()
                # exif_transpose returns a copy when it rotates; otherwise keep the loaded image.
                out = ImageOps.exif_transpose(img)
                return out if out is not img else img.copy()
        except FileNotFoundError:
            raise DataError(f"{self.describe(i)}: image file not found; fix the path or the list/folder") from None
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise DataError(f"{self.describe(i)}: cannot read the image ({exc}); replace the file or remove it "
                            "from the list/folder") from None

    def read_bytes(self, i: int) -> bytes:
        """The encoded bytes of image `i`: the file as stored, or a PNG encoding of an in-memory array.

        Raises:
            DataError: the file cannot be read.
        """
        if self.arrays is not None:
            buf = io.BytesIO()
            self.load(i).save(buf, format="PNG")
            return buf.getvalue()
        try:
            return Path(self.paths[i]).read_bytes()  # type: ignore[index]
        except OSError as exc:
            raise DataError(f"{self.describe(i)}: cannot read the file ({exc.strerror})") from None

    def subset(self, indices: np.ndarray) -> "ImageSet":
        """The items at `indices` (any int array), as a new ImageSet sharing nothing mutable with this one."""
        idx = np.asarray(indices, dtype=np.int64)
        return ImageSet(
            labels=self.labels[idx],
            arrays=self.arrays[idx] if self.arrays is not None else None,
            paths=[self.paths[j] for j in idx] if self.paths is not None else None,
            sources=[self.sources[j] for j in idx] if self.sources is not None else None,
        )


@dataclass
class Splits:
    """Train / val / test image sets of one data set and what identifies them.

    Attributes:
        train, val: always present (val may be empty only when asked for with val_fraction 0).
        test: the test set, or None when the data set has none.
        class_names: C names in label order.
        fingerprint: 16 hex digits of a sha256 over what defines the data: item identities (relative paths or
            indices into the official files), labels, class names and the split settings.
    """

    train: ImageSet
    val: ImageSet
    test: ImageSet | None
    class_names: list[str]
    fingerprint: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def class_counts(self) -> np.ndarray:
        """(C,) int64 number of training images per class."""
        return np.bincount(self.train.labels, minlength=self.num_classes).astype(np.int64)


# --------------------------------------------------------------------------------------------------------------
# Long tail and stratified splits
# --------------------------------------------------------------------------------------------------------------


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


def make_longtail(labels: np.ndarray, counts: list[int] | np.ndarray, order: Literal["index", "random"] = "index",
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Draw a long-tailed subset: class j keeps `counts[rank(j)]` images chosen at random (seeded).

    Args:
        labels: (N,) int labels of the balanced pool.
        counts: C counts by rank (largest first), e.g. from `longtail_counts`.
        order: "index": class i gets counts[i]; "random": a seeded permutation of the classes gets the counts.
        seed: seeds both the class order and the draw within each class.

    Returns:
        (train_idx, unused_idx): sorted int64 indices into `labels`; together they cover the pool exactly once.

    Raises:
        DataError: a class has fewer images than its count.
    """
    labels = np.asarray(labels, dtype=np.int64)
    num_classes = len(counts)
    rng = np.random.default_rng(seed)
    # "random": class perm[i] gets the i-th largest count, so which classes are rare is itself seeded.
    perm = np.arange(num_classes) if order == "index" else rng.permutation(num_classes)
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


# --------------------------------------------------------------------------------------------------------------
# File readers
# --------------------------------------------------------------------------------------------------------------

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (the MNIST / Fashion-MNIST format), gzip-compressed (.gz) or raw.

    Returns:
        The array with the shape stored in the header, e.g. (60000, 28, 28) uint8 images or (60000,) uint8 labels.

    Raises:
        DataError: the file is missing, truncated, not gzip when named .gz, or its magic number is not IDX.
    """
    path = Path(path)
    fix = "delete it and run `make data` to download it again"
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: IDX file not found; {FETCH_HINT}") from None
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"{path}: cannot read the IDX file ({exc}); {fix}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise DataError(f"{path}: not an IDX file (magic number {raw[:4].hex() or 'missing'}, expected "
                        f"0000<type><ndim> with type 08..0e); {fix}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: IDX header truncated; {fix}")
    shape = tuple(int.from_bytes(raw[4 + 4 * k: 8 + 4 * k], "big") for k in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(f"{path}: IDX data is {len(raw) - header} bytes but the header {shape} needs {expected}; "
                        f"{fix}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def read_names_file(path: str | Path) -> list[str]:
    """Class names, one per line in label order (blank lines at the end ignored).

    Raises:
        DataError: the file is missing, empty, has a blank line between names, or repeats a name.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: class names file not found; fix data.names") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the class names file ({exc})") from None
    while lines and not lines[-1].strip():
        lines.pop()
    names = [line.strip() for line in lines]
    if not names:
        raise DataError(f"{path}: no class names; write one name per line, in label order")
    for lineno, name in enumerate(names, 1):
        if not name:
            raise DataError(f"{path}:{lineno}: blank class name; write one name per line, in label order")
    seen: dict[str, int] = {}
    for lineno, name in enumerate(names, 1):
        if name in seen:
            raise DataError(f"{path}:{lineno}: class name {name!r} repeats line {seen[name]}; names must be unique")
        seen[name] = lineno
    return names


def read_split_list(path: str | Path, root: str | Path | None) -> tuple[list[str], np.ndarray, list[str]]:
    """Read a split list in the paper's format: one ``relative/path label`` per line (blank lines skipped).

    Args:
        path: the list file, e.g. ImageNet_LT_train.txt.
        root: folder the relative paths are joined to (None: the list file's folder). Absolute paths stay.

    Returns:
        (paths, labels, sources): absolute paths, (N,) int64 labels, "file:line" per item.

    Raises:
        DataError: the file is missing or empty, a line is not exactly "path int", a label is negative, or image
            files are missing (the first few missing ones are named with their lines).
    """
    path = Path(path)
    base = Path(root) if root is not None else path.parent
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: split list not found; fix data.train / data.val / data.test") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the split list ({exc})") from None
    paths: list[str] = []
    labels: list[int] = []
    sources: list[str] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split()
        label = _parse_label(fields[1]) if len(fields) == 2 else None
        if label is None:
            raise DataError(f"{path}:{lineno}: malformed line {line.strip()[:120]!r}; expected 'relative/path label' "
                            "(two fields separated by whitespace, an integer label), e.g. "
                            "'train/n01440764/n01440764_10026.JPEG 0'")
        if label < 0:
            raise DataError(f"{path}:{lineno}: label {label} is negative; labels are 0..C-1")
        paths.append(str((base / fields[0]).absolute()))
        labels.append(label)
        sources.append(f"{path.name}:{lineno}")
    if not paths:
        raise DataError(f"{path}: the split list has no entries; write one 'relative/path label' per line")
    _check_paths_exist(paths, sources, f"{path} (paths joined to {base})")
    return paths, np.asarray(labels, dtype=np.int64), sources


def _parse_label(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def _check_paths_exist(paths: list[str], sources: list[str] | None, where: str) -> None:
    missing = [k for k, p in enumerate(paths) if not os.path.isfile(p)]
    if not missing:
        return
    shown = "; ".join(f"{sources[k]}: {paths[k]}" if sources else paths[k] for k in missing[:5])
    raise DataError(f"{where}: {len(missing)} of {len(paths)} image files not found ({shown}"
                    f"{' ...' if len(missing) > 5 else ''}); fix data.root or the list")


def read_image_folder(root: str | Path) -> tuple[list[str], np.ndarray, list[str]]:
    """Read ``root/<class>/<image>`` (images may sit in sub-folders of a class folder).

    Returns:
        (paths, labels, class_names): sorted absolute paths, (N,) int64 labels, sorted class folder names.

    Raises:
        DataError: root is missing or has no class folders, or a class folder holds no image.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: image folder not found; fix data.root / data.train (expected root/<class>/<image>)")
    class_names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_names:
        raise DataError(f"{root}: no class folders; expected {root}/<class>/<image> files")
    paths: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(class_names):
        found = sorted(_walk_images(root / name))
        if not found:
            raise DataError(f"{root / name}: class {name!r} has no images (extensions {', '.join(IMAGE_EXTENSIONS)}); "
                            "add images or remove the folder")
        paths += found
        labels += [label] * len(found)
    return paths, np.asarray(labels, dtype=np.int64), class_names


def _walk_images(folder: Path) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        out += [str(Path(dirpath, f).absolute()) for f in filenames
                if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)]
    return out


# --------------------------------------------------------------------------------------------------------------
# Fashion-MNIST: find, download
# --------------------------------------------------------------------------------------------------------------


def user_cache_dir() -> Path:
    """Where downloads go: $XDG_CACHE_HOME/ltserve/fashion-mnist, else ~/.cache/ltserve/fashion-mnist."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ltserve" / "fashion-mnist"


def _fashion_file(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def _has_fashion_mnist(folder: Path) -> bool:
    return all(_fashion_file(folder, stem) is not None for stem in FASHION_MNIST_FILES.values())


def fashion_mnist_candidates(root: str | Path | None = None) -> list[Path]:
    """The folders searched for Fashion-MNIST, in order (each also tried with a `fashion-mnist/` sub-folder)."""
    places: list[Path] = []
    if root is not None:
        places.append(Path(root))
    else:
        env = os.environ.get("LTSERVE_DATA")
        if env:
            places.append(Path(env))
        places += [SYSTEM_FASHION_MNIST, user_cache_dir()]
    return places


def find_fashion_mnist(root: str | Path | None = None) -> Path:
    """The folder holding the four Fashion-MNIST IDX files (.gz or raw).

    Search order: `root` when given (and only it: an explicit folder is never silently replaced), else
    $LTSERVE_DATA, /usr/share/datasets/fashion-mnist, then the user cache (~/.cache/ltserve/fashion-mnist,
    honouring $XDG_CACHE_HOME). A folder matches when it holds the files or has a `fashion-mnist/` sub-folder that
    does.

    Raises:
        DataError: no folder holds all four files; the message lists the places and how to get the data.
    """
    tried = []
    for place in fashion_mnist_candidates(root):
        for folder in (place, place / "fashion-mnist"):
            if _has_fashion_mnist(folder):
                return folder
        tried.append(str(place))
    files = ", ".join(s + ".gz" for s in FASHION_MNIST_FILES.values())
    raise DataError(f"Fashion-MNIST not found (looked for {files} in: {'; '.join(tried)}); {FETCH_HINT}")


def _verify_fashion_file(path: Path, stem: str) -> str | None:
    """None when `path` holds the official content of `stem`, else why not."""
    expected = FASHION_MNIST_CHECKSUMS[stem]
    blob = path.read_bytes()
    if hashlib.md5(blob, usedforsecurity=False).hexdigest() == expected["gz_md5"]:
        return None
    try:
        payload = gzip.decompress(blob)
    except (OSError, EOFError) as exc:
        return f"not a valid gzip file ({exc})"
    digest = hashlib.sha256(payload).hexdigest()
    if digest != expected["sha256"]:
        return f"checksum mismatch: sha256 of the content is {digest}, expected {expected['sha256']}"
    return None


def download_fashion_mnist(dest: str | Path, base_url: str = OFFICIAL_URL, timeout: float = 60.0) -> Path:
    """Download the four Fashion-MNIST .gz files into `dest`, verify their checksums, and return `dest`.

    Files already in `dest` that verify are kept. New files are downloaded into a staging folder inside `dest`,
    verified (md5 of the official .gz, else sha256 of the decompressed IDX payload), and only then moved into
    place, so a failed or corrupt download leaves nothing behind.

    Args:
        dest: target folder (created if needed).
        base_url: where the files are, ending with "/" (the official S3 bucket by default).
        timeout: seconds per connection attempt.

    Raises:
        DataError: a download fails or a file does not verify (nothing partial is left in `dest`).
    """
    from tqdm.auto import tqdm

    dest = Path(dest)
    created = not dest.exists()
    dest.mkdir(parents=True, exist_ok=True)
    todo = [s for s in FASHION_MNIST_FILES.values()
            if not ((dest / (s + ".gz")).is_file() and _verify_fashion_file(dest / (s + ".gz"), s) is None)]
    stage = Path(tempfile.mkdtemp(prefix=".download-", dir=dest))
    ok = False
    try:
        for stem in todo:
            url = base_url.rstrip("/") + "/" + stem + ".gz"
            part = stage / (stem + ".gz")
            _fetch(url, part, tqdm, timeout)
            problem = _verify_fashion_file(part, stem)
            if problem:
                raise DataError(f"{url}: {problem}; the download is corrupt or not the official file, nothing was "
                                f"kept in {dest}; try again, or check base_url")
        for stem in todo:
            os.replace(stage / (stem + ".gz"), dest / (stem + ".gz"))
        ok = True
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if not ok and created:
            shutil.rmtree(dest, ignore_errors=True)
    log.info("Fashion-MNIST ready in %s (%d file(s) downloaded)", dest, len(todo))
    return dest


def _fetch(url: str, out: Path, tqdm, timeout: float) -> None:  # noqa: ANN001 (tqdm class)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, open(out, "wb") as fh:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=out.name, disable=None) as bar:
                while chunk := resp.read(1 << 20):
                    fh.write(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise DataError(f"{url}: download failed ({getattr(exc, 'reason', exc)}); check the network or use "
                        "the Debian package dataset-fashion-mnist / $LTSERVE_DATA") from None


def read_fashion_mnist(folder: Path) -> dict[str, np.ndarray]:
    """The four Fashion-MNIST arrays: train_images (60000,28,28) uint8, train_labels (60000,), test_* (10000...)."""
    out = {}
    for role, stem in FASHION_MNIST_FILES.items():
        file = _fashion_file(folder, stem)
        if file is None:
            raise DataError(f"{folder}: {stem}.gz missing; {FETCH_HINT}")
        out[role] = read_idx(file)
    for split in ("train", "test"):
        images, labels = out[f"{split}_images"], out[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"{folder}: {split} images {images.shape} and labels {labels.shape} do not match; "
                            "the files are not Fashion-MNIST; delete them and run `make data`")
        if labels.size and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
            raise DataError(f"{folder}: {split} label {int(labels.max())} out of range 0..9; not Fashion-MNIST")
        out[f"{split}_labels"] = labels.astype(np.int64)
    return out


# --------------------------------------------------------------------------------------------------------------
# load_splits
# --------------------------------------------------------------------------------------------------------------


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
    train_idx, val_idx = _train_val_indices(pool.labels, cfg, names, "Fashion-MNIST train")
    test_idx = np.arange(len(test), dtype=np.int64)
    if cfg.max_test_images is not None:
        test_idx = stratified_subsample(test.labels, cfg.max_test_images, cfg.split_seed + 3)
    splits = Splits(train=pool.subset(train_idx), val=pool.subset(val_idx), test=test.subset(test_idx),
                    class_names=names, fingerprint="")
    _check_no_empty_class(splits, "Fashion-MNIST train")
    splits.fingerprint = _fingerprint(cfg, names, {"train": train_idx, "val": val_idx, "test": test_idx}, splits)
    _log_summary(splits, "fashion-mnist", folder)
    return splits


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
            train_idx, unused_idx = make_longtail(labels, counts, lt.order, cfg.split_seed)
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
    settings = cfg.model_dump(mode="json", exclude={"root", "many_threshold", "few_threshold"})
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


# --------------------------------------------------------------------------------------------------------------
# CLI: `python -m ltserve.data fetch [--dest DIR]` (what `make data` runs), `samples OUT_DIR --count N`
# --------------------------------------------------------------------------------------------------------------


def write_samples(out_dir: str | Path, count: int, split: Literal["train", "test"] = "test",
                  root: str | Path | None = None) -> Path:
    """Write the first `count` Fashion-MNIST images of a split as PNG files, plus their labels.

    Files are named `<split>_<index>.png` (index in the official split); `out_dir/labels.txt` lists them in the
    paper's split-list format (`test_0.png 9` per line), which `ltserve predict` and `ltserve evaluate --data` read.

    Args:
        out_dir: folder to write (created; existing files of the same names are replaced).
        count: number of images, 1..size of the split.
        split: "test" (10,000 images) or "train" (60,000).
        root: Fashion-MNIST folder (default: searched as by `find_fashion_mnist`).

    Returns:
        The path of labels.txt.

    Raises:
        DataError: Fashion-MNIST is not found, or `count` is out of range.
    """
    folder = find_fashion_mnist(root)
    fm = read_fashion_mnist(folder)
    images, labels = fm[f"{split}_images"], fm[f"{split}_labels"]
    if not 1 <= count <= len(images):
        raise DataError(f"--count {count}: the Fashion-MNIST {split} split has {len(images)} images; "
                        f"choose 1..{len(images)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(count):
        name = f"{split}_{i}.png"
        Image.fromarray(images[i]).save(out / name)
        lines.append(f"{name} {int(labels[i])}\n")
    listing = out / "labels.txt"
    listing.write_text("".join(lines), encoding="utf-8")
    return listing


def cli(argv: list[str] | None = None) -> int:
    """`fetch`: make sure Fashion-MNIST is present (find it, else download it) and print its folder.
    `samples OUT_DIR --count N`: write N Fashion-MNIST images as PNG files plus OUT_DIR/labels.txt."""
    parser = argparse.ArgumentParser(prog="python -m ltserve.data", description=cli.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch", help="find Fashion-MNIST, else download it; print its folder")
    fetch.add_argument("--dest", help="folder to use (default: search, then download to the user cache "
                                      f"{user_cache_dir()})")
    fetch.add_argument("--base-url", default=OFFICIAL_URL, help="download location (default: the official one)")
    samples = sub.add_parser("samples", help="write N Fashion-MNIST images as <split>_<index>.png plus "
                                             "OUT_DIR/labels.txt ('name label' lines)")
    samples.add_argument("out_dir", help="folder to write, e.g. samples")
    samples.add_argument("--count", type=int, default=8, help="number of images (the first N of the split; "
                                                               "default 8)")
    samples.add_argument("--split", choices=("test", "train"), default="test", help="official split (default test)")
    samples.add_argument("--root", help="Fashion-MNIST folder (default: searched)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "samples":
        listing = write_samples(args.out_dir, args.count, args.split, args.root)
        print(f"{args.count} images and {listing} written")
        return 0
    try:
        folder = find_fashion_mnist(args.dest)
    except DataError:
        folder = download_fashion_mnist(Path(args.dest) if args.dest else user_cache_dir(), args.base_url)
    print(folder)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(cli())
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
