"""Image sets and splits: what every reader returns and every stage reads images from (NumPy and Pillow only).

`ImageSet` holds images in memory (`arrays`) or as files (`paths`, opened lazily by `load`); `Splits` is train / val /
test of one data set with its class names and a fingerprint of what defines it.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ltserve.errors import DataError, InvalidInput
from ltserve.preprocess import open_image

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

        Files go through `ltserve.preprocess.open_image`, the decoder evaluation and serving use: the same accepted
        formats (`IMAGE_FORMATS`, sniffed from the bytes), the same first page, the same 16-bit handling and pixel
        cap (`DEFAULT_MAX_PIXELS`), so a model never trains on a file that it would refuse or read differently when
        served.

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
            data = Path(path).read_bytes()
        except FileNotFoundError:
            raise DataError(f"{self.describe(i)}: image file not found; fix the path or the list/folder") from None
        except OSError as exc:
            raise DataError(f"{self.describe(i)}: cannot read the file ({exc.strerror or exc})") from None
        try:
            return open_image(data, None)
        except InvalidInput as exc:
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
        held_out: the test images of `data.held_out_classes` (near unknowns), labels indexing `held_out_names`;
            None when no class is held out.
    """

    train: ImageSet
    val: ImageSet
    test: ImageSet | None
    class_names: list[str]
    fingerprint: str
    held_out: ImageSet | None = None
    held_out_names: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def class_counts(self) -> np.ndarray:
        """(C,) int64 number of training images per class."""
        return np.bincount(self.train.labels, minlength=self.num_classes).astype(np.int64)

