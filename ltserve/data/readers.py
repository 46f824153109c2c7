"""Readers of the file formats a data set comes in: IDX (MNIST / Fashion-MNIST), class-name files, split lists in
the paper's format (`relative/path label`), and image folders (`root/<class>/<image>`)."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from ltserve.errors import DataError
from ltserve.preprocess import IMAGE_EXTENSIONS  # the formats evaluation and serving decode: one list

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
        raise DataError(f"{path}: IDX file not found; fix the path (for Fashion-MNIST: run `make data`)") from None
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

