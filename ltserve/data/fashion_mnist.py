"""Fashion-MNIST: where it is (Debian's dataset-fashion-mnist, $LTSERVE_DATA, the user cache), the verified official
download, reading the four IDX files, and writing some of its images as PNG files with a labels list."""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from ltserve.data.readers import read_idx
from ltserve.errors import DataError

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
FETCH_HINT = ("run `make data` (or `python -m ltserve.data fetch`) to download it into the user cache, "
              "install the Debian package dataset-fashion-mnist, or set data.root / $LTSERVE_DATA to a folder "
              "holding the four IDX files")





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

