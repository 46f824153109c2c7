"""ltserve.data: long-tail maker, splits, readers on real files, Fashion-MNIST (real IDX files, local download)."""

from __future__ import annotations

import gzip
import http.server
import io
import logging
import os
import shutil
import threading
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ltserve.config import DataConfig
from ltserve.data import (
    FASHION_MNIST_FILES,
    ImageSet,
    download_fashion_mnist,
    find_fashion_mnist,
    load_splits,
    longtail_counts,
    make_longtail,
    read_idx,
    read_image_folder,
    read_names_file,
    read_split_list,
    stratified_split,
)
from ltserve.data import __main__ as data_cli
from ltserve.data import fashion_mnist
from ltserve.errors import ConfigError, DataError

# `make test` runs `make data` first: the files are present (Debian's package, or the download in the user cache).
# A missing data set fails here loudly rather than skipping the tests that read it.
SYSTEM_FM = find_fashion_mnist()


# --- long tail and splits ---------------------------------------------------------------------------------------


def test_longtail_counts_formula_with_floor():
    assert longtail_counts(1000, 100, 10) == [1000, 599, 359, 215, 129, 77, 46, 27, 16, 10]
    # CIFAR-10-LT as published (rho 100 and 10, n_max 5000).
    assert longtail_counts(5000, 100, 10) == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert longtail_counts(5000, 10, 10) == [5000, 3871, 2997, 2320, 1796, 1391, 1077, 834, 645, 500]
    assert longtail_counts(7, 1, 3) == [7, 7, 7]
    assert longtail_counts(300, 5, 1) == [300]
    counts = longtail_counts(500, 50, 100)
    assert counts[0] == 500 and counts[-1] == 10 and all(a >= b for a, b in zip(counts, counts[1:]))


def _balanced_labels(per_class: int, num_classes: int) -> np.ndarray:
    return np.random.default_rng(123).permutation(np.repeat(np.arange(num_classes), per_class))


def test_make_longtail_counts_cover_and_seeded():
    labels = _balanced_labels(100, 5)
    counts = [100, 40, 16, 6, 2]
    train, unused = make_longtail(labels, counts, "index", seed=0)
    assert np.bincount(labels[train], minlength=5).tolist() == counts
    assert np.intersect1d(train, unused).size == 0
    assert np.array_equal(np.sort(np.concatenate([train, unused])), np.arange(len(labels)))
    again, _ = make_longtail(labels, counts, "index", seed=0)
    other, _ = make_longtail(labels, counts, "index", seed=1)
    assert np.array_equal(train, again)
    assert not np.array_equal(train, other)


def test_make_longtail_random_order_permutes_classes():
    labels = _balanced_labels(50, 6)
    counts = [50, 30, 18, 11, 6, 4]
    seen = set()
    for seed in range(6):
        train, _ = make_longtail(labels, counts, "random", seed=seed)
        per_class = np.bincount(labels[train], minlength=6)
        assert sorted(per_class.tolist(), reverse=True) == counts
        seen.add(tuple(per_class.tolist()))
    assert len(seen) > 1, "the class order must depend on the seed"


def test_make_longtail_reversed_and_explicit_orders():
    labels = _balanced_labels(50, 4)
    counts = [50, 20, 8, 3]
    train, _ = make_longtail(labels, counts, "reversed", seed=0)
    assert np.bincount(labels[train], minlength=4).tolist() == [3, 8, 20, 50]  # class C-1 is the largest
    train, _ = make_longtail(labels, counts, [2, 0, 3, 1], seed=0)  # class indices, head to tail
    assert np.bincount(labels[train], minlength=4).tolist() == [20, 3, 50, 8]
    with pytest.raises(ValueError, match="permutation"):
        make_longtail(labels, counts, [0, 1, 1, 2], seed=0)


FM = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def _fm_longtail(order) -> DataConfig:
    return DataConfig(source="fashion-mnist", max_test_images=100,
                      longtail={"rho": 100, "n_max": 300, "val_per_class": 5, "order": order})


def test_load_splits_longtail_order_reversed_and_by_class_name():
    counts = longtail_counts(300, 100, 10)
    assert counts == [300, 179, 107, 64, 38, 23, 13, 8, 5, 3]
    index = load_splits(_fm_longtail("index"))
    assert index.class_counts().tolist() == counts
    reversed_ = load_splits(_fm_longtail("reversed"))
    assert reversed_.class_counts().tolist() == counts[::-1]  # Ankle boot (class 9) is the head class
    # the user says which classes are rare: head to tail, every class once
    order = ["Bag", "Sneaker", "Trouser", "Dress", "Coat", "Sandal", "Ankle boot", "Pullover", "T-shirt/top", "Shirt"]
    named = load_splits(_fm_longtail(order))
    assert {FM[j]: int(n) for j, n in enumerate(named.class_counts())} == dict(zip(order, counts))
    assert named.class_names == FM  # the labels keep their meaning; only the counts move
    assert np.bincount(named.val.labels, minlength=10).tolist() == [5] * 10
    fingerprints = {s.fingerprint for s in (index, reversed_, named, load_splits(_fm_longtail("random")))}
    assert len(fingerprints) == 4  # the fingerprint changes with the order
    assert load_splits(_fm_longtail(order)).fingerprint == named.fingerprint  # and only with it


def test_longtail_order_errors_name_the_field_the_bad_names_and_the_valid_ones():
    from ltserve.config import load_config

    wrong = ["Bag", "Sneaker", "Trousers", "Dress", "Coat", "Sandal", "Ankle boot", "Pullover", "T-shirt", "Shirt"]
    with pytest.raises(DataError, match=r"data\.longtail\.order") as err:
        load_splits(_fm_longtail(wrong))
    msg = str(err.value)
    assert "'Trousers'" in msg and "'T-shirt'" in msg  # the unknown names
    assert "'Trouser'" in msg and "'T-shirt/top'" in msg  # the classes they leave out
    assert all(name in msg for name in FM)  # the valid names
    with pytest.raises(DataError, match=r"data\.longtail\.order.*missing.*'Shirt'"):
        load_splits(_fm_longtail(FM[:9]))
    with pytest.raises(ConfigError, match=r"data\.longtail\.order.*'Bag'.*more than once"):
        load_config(None, ["data.longtail={rho: 10, n_max: 100}", "data.longtail.order=[Bag, Coat, Bag]"])
    with pytest.raises(ConfigError, match=r"data\.longtail\.order 'reverse' is not one of index, random, reversed"):
        load_config(None, ["data.longtail={rho: 10, n_max: 100}", "data.longtail.order=reverse"])
    cfg = load_config(None, ["data.longtail={rho: 10, n_max: 100}", "data.longtail.order=[2, 0, 1]"])
    assert cfg.data.longtail.order == ["2", "0", "1"]  # label numbers name the classes of a list without names


def test_make_longtail_too_few_images():
    with pytest.raises(DataError, match="class 1 needs 20 images but the pool has only 10"):
        make_longtail(np.repeat([0, 1], [30, 10]), [30, 20], "index", 0)


def test_stratified_split_keeps_one_per_class_and_warns(caplog):
    labels = np.repeat([0, 1, 2], [20, 8, 1])
    with caplog.at_level(logging.WARNING, logger="ltserve.data.longtail"):
        keep, split = stratified_split(labels, 0.25, seed=0, class_names=["a", "b", "rare"])
    assert np.bincount(labels[split], minlength=3).tolist() == [5, 2, 0]
    assert np.bincount(labels[keep], minlength=3).tolist() == [15, 6, 1]
    assert np.intersect1d(keep, split).size == 0 and len(keep) + len(split) == len(labels)
    assert "rare (1)" in caplog.text
    # A class of 2 with a large fraction still keeps one image in train.
    keep, split = stratified_split(np.array([0, 0, 1, 1, 1]), 0.9, seed=0)
    assert np.bincount(np.array([0, 0, 1, 1, 1])[keep]).tolist() == [1, 1]


# --- Fashion-MNIST: the real files ------------------------------------------------------------------------------


def test_read_real_idx_files():
    train = read_idx(SYSTEM_FM / "train-images-idx3-ubyte.gz")
    labels = read_idx(SYSTEM_FM / "train-labels-idx1-ubyte.gz")
    test = read_idx(SYSTEM_FM / "t10k-images-idx3-ubyte.gz")
    test_labels = read_idx(SYSTEM_FM / "t10k-labels-idx1-ubyte.gz")
    assert train.shape == (60000, 28, 28) and train.dtype == np.uint8
    assert labels.shape == (60000,) and np.bincount(labels).tolist() == [6000] * 10
    assert test.shape == (10000, 28, 28) and np.bincount(test_labels).tolist() == [1000] * 10
    assert 0 < train.mean() < 255


def test_read_idx_raw_and_bad_files(tmp_path):
    raw = tmp_path / "t10k-labels-idx1-ubyte"
    raw.write_bytes(gzip.decompress((SYSTEM_FM / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    assert np.array_equal(read_idx(raw), read_idx(SYSTEM_FM / "t10k-labels-idx1-ubyte.gz"))
    bad = tmp_path / "bad-idx1-ubyte"
    bad.write_bytes(b"\x00\x00\x07\x01" + raw.read_bytes()[4:])
    with pytest.raises(DataError, match=r"bad-idx1-ubyte: not an IDX file \(magic number 00000701"):
        read_idx(bad)
    truncated = tmp_path / "short-idx1-ubyte"
    truncated.write_bytes(raw.read_bytes()[:-10])
    with pytest.raises(DataError, match="short-idx1-ubyte: IDX data is 9990 bytes"):
        read_idx(truncated)
    not_gz = tmp_path / "x.gz"
    not_gz.write_bytes(b"plain")
    with pytest.raises(DataError, match="x.gz: cannot read"):
        read_idx(not_gz)


def _fm_copy(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for stem in FASHION_MNIST_FILES.values():
        os.symlink(SYSTEM_FM / f"{stem}.gz", folder / f"{stem}.gz")
    return folder


def test_find_order_explicit_root_env_and_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("LTSERVE_DATA", raising=False)
    assert find_fashion_mnist() == SYSTEM_FM
    explicit = _fm_copy(tmp_path / "explicit")
    env = _fm_copy(tmp_path / "env" / "fashion-mnist")  # found through the fashion-mnist/ sub-folder
    monkeypatch.setenv("LTSERVE_DATA", str(tmp_path / "env"))
    assert find_fashion_mnist() == env
    assert find_fashion_mnist(explicit) == explicit
    with pytest.raises(DataError, match=f"{tmp_path / 'nowhere'}.*make data"):
        find_fashion_mnist(tmp_path / "nowhere")  # an explicit root is never silently replaced
    # Without $LTSERVE_DATA and the system copy, the user cache ($XDG_CACHE_HOME) is used.
    monkeypatch.delenv("LTSERVE_DATA")
    monkeypatch.setattr(fashion_mnist, "SYSTEM_FASHION_MNIST", tmp_path / "no-system")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(DataError) as err:
        find_fashion_mnist()
    assert str(tmp_path / "no-system") in str(err.value) and str(tmp_path / "cache") in str(err.value)
    assert "make data" in str(err.value)
    cached = _fm_copy(tmp_path / "cache" / "ltserve" / "fashion-mnist")
    assert find_fashion_mnist() == cached


def test_load_splits_fashion_mnist_longtail():
    cfg = DataConfig(source="fashion-mnist", longtail={"rho": 100, "n_max": 300, "val_per_class": 15},
                     max_test_images=500)
    splits = load_splits(cfg)
    assert splits.class_names[0] == "T-shirt/top" and splits.class_names[9] == "Ankle boot"
    assert splits.class_counts().tolist() == longtail_counts(300, 100, 10)
    assert np.bincount(splits.val.labels, minlength=10).tolist() == [15] * 10
    assert np.bincount(splits.test.labels, minlength=10).tolist() == [50] * 10
    assert splits.train.arrays.shape[1:] == (28, 28) and splits.train.paths is None
    # Val comes from images train did not use (Fashion-MNIST's training images are all distinct).
    train_rows = {row.tobytes() for row in splits.train.arrays}
    assert not any(row.tobytes() in train_rows for row in splits.val.arrays)
    # Every train image is a Fashion-MNIST training image with its true label.
    full = read_idx(SYSTEM_FM / "train-images-idx3-ubyte.gz")
    full_labels = read_idx(SYSTEM_FM / "train-labels-idx1-ubyte.gz")
    where = {row.tobytes(): i for i, row in enumerate(full)}
    idx = np.array([where[row.tobytes()] for row in splits.train.arrays])
    assert np.array_equal(full_labels[idx], splits.train.labels)
    img = splits.train.load(0)
    assert img.mode == "L" and img.size == (28, 28)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(splits.train.read_bytes(0)))), splits.train.arrays[0])


def test_load_splits_seeded_and_fingerprint():
    base = dict(source="fashion-mnist", longtail={"rho": 10, "n_max": 100, "val_per_class": 5, "order": "random"},
                max_test_images=200)
    a = load_splits(DataConfig(**base))
    b = load_splits(DataConfig(**base))
    c = load_splits(DataConfig(**base, split_seed=1))
    assert a.fingerprint == b.fingerprint and len(a.fingerprint) == 16
    assert np.array_equal(a.train.arrays, b.train.arrays) and np.array_equal(a.val.labels, b.val.labels)
    assert c.fingerprint != a.fingerprint
    assert not np.array_equal(a.train.arrays[:50], c.train.arrays[:50])
    assert sorted(a.class_counts().tolist()) == sorted(longtail_counts(100, 10, 10))


def test_load_splits_fashion_mnist_plain_caps():
    splits = load_splits(DataConfig(source="fashion-mnist", val_fraction=0.1, max_train_images=1000,
                                    max_test_images=100))
    assert splits.class_counts().tolist() == [100] * 10
    assert len(splits.val) == 6000 and np.bincount(splits.val.labels).tolist() == [600] * 10
    assert len(splits.test) == 100


# --- Fashion-MNIST: download from a local server ----------------------------------------------------------------


@pytest.fixture()
def http_folder(tmp_path):
    """Serve a folder over HTTP on 127.0.0.1: yields (folder, base_url)."""
    folder = tmp_path / "served"
    folder.mkdir()
    handler = partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()
    thread.join(5)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep pytest output clean
        pass


def test_download_verifies_and_loads(http_folder, tmp_path, capsys):
    served, url = http_folder
    for stem in FASHION_MNIST_FILES.values():
        shutil.copyfile(SYSTEM_FM / f"{stem}.gz", served / f"{stem}.gz")
    dest = tmp_path / "dest"
    assert download_fashion_mnist(dest, base_url=url) == dest
    assert sorted(p.name for p in dest.iterdir()) == sorted(f"{s}.gz" for s in FASHION_MNIST_FILES.values())
    assert find_fashion_mnist(dest) == dest
    assert read_idx(dest / "t10k-images-idx3-ubyte.gz").shape == (10000, 28, 28)
    # The CLI finds what is there (no second download: the served files are gone).
    for f in served.iterdir():
        f.unlink()
    assert data_cli.cli(["fetch", "--dest", str(dest), "--base-url", url]) == 0
    assert capsys.readouterr().out.strip() == str(dest)


def test_download_corrupt_file_leaves_nothing(http_folder, tmp_path):
    served, url = http_folder
    for stem in FASHION_MNIST_FILES.values():
        shutil.copyfile(SYSTEM_FM / f"{stem}.gz", served / f"{stem}.gz")
    # Same gzip framing, one changed label byte: decompresses fine, content differs.
    labels = bytearray(gzip.decompress((served / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    labels[100] = (labels[100] + 1) % 10
    (served / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes(labels)))
    dest = tmp_path / "dest"
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.gz: checksum mismatch"):
        download_fashion_mnist(dest, base_url=url)
    assert not dest.exists()
    # Into an existing folder: nothing partial or staged is left there either.
    dest.mkdir()
    (dest / "keep.txt").write_text("x")
    with pytest.raises(DataError, match="checksum mismatch"):
        download_fashion_mnist(dest, base_url=url)
    assert [p.name for p in dest.iterdir()] == ["keep.txt"]
    # A missing file on the server is a download error naming the URL.
    (served / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte.gz: download failed"):
        download_fashion_mnist(tmp_path / "dest2", base_url=url)
    assert not (tmp_path / "dest2").exists()


# --- readers on real image files --------------------------------------------------------------------------------


def _write_image(path: Path, seed: int, size: tuple[int, int] = (12, 10), fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def _tree(root: Path, per_class: dict[str, int], split: str = "train") -> None:
    for c, (name, n) in enumerate(per_class.items()):
        for k in range(n):
            ext = ".png" if k % 2 else ".JPEG"
            _write_image(root / split / name / f"{name}_{k}{ext}", seed=100 * c + k,
                         fmt="PNG" if ext == ".png" else "JPEG")


def test_read_split_list_paper_format(tmp_path):
    jpeg = _write_image(tmp_path / "train/n01440764/n01440764_10026.JPEG", 1, fmt="JPEG")
    _write_image(tmp_path / "train/n01443537/n01443537_2.png", 2)
    lst = tmp_path / "ImageNet_LT_train.txt"
    lst.write_text("train/n01440764/n01440764_10026.JPEG 0\n\ntrain/n01443537/n01443537_2.png 1\n")
    paths, labels, sources = read_split_list(lst, tmp_path)
    assert paths == [str(jpeg), str(tmp_path / "train/n01443537/n01443537_2.png")]
    assert labels.tolist() == [0, 1] and labels.dtype == np.int64
    assert sources == ["ImageNet_LT_train.txt:1", "ImageNet_LT_train.txt:3"]
    # Without a root, paths are relative to the list's folder.
    assert read_split_list(lst, None)[0] == paths


@pytest.mark.parametrize("line", ["a.png", "a.png 1 2", "a.png x", "a.png 1.5", "a.png\t0\textra"])
def test_read_split_list_malformed_line(tmp_path, line):
    _write_image(tmp_path / "a.png", 0)
    lst = tmp_path / "train.txt"
    lst.write_text(f"a.png 0\na.png 1\n{line}\n")
    with pytest.raises(DataError, match=r"train.txt:3: malformed line .*relative/path label"):
        read_split_list(lst, tmp_path)


def test_read_split_list_missing_path_negative_label_empty(tmp_path):
    _write_image(tmp_path / "a.png", 0)
    lst = tmp_path / "val.txt"
    lst.write_text("a.png 0\nmissing/b.png 1\n")
    with pytest.raises(DataError, match=r"val.txt.*1 of 2 image files not found \(val.txt:2: .*missing/b.png"):
        read_split_list(lst, tmp_path)
    lst.write_text("a.png -1\n")
    with pytest.raises(DataError, match=r"val.txt:1: label -1 is negative"):
        read_split_list(lst, tmp_path)
    lst.write_text("\n\n")
    with pytest.raises(DataError, match=r"val.txt: the split list has no entries"):
        read_split_list(lst, tmp_path)
    with pytest.raises(DataError, match=r"nope.txt: split list not found"):
        read_split_list(tmp_path / "nope.txt", tmp_path)


def test_read_names_file(tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("tench\ngoldfish\n\n")
    assert read_names_file(names) == ["tench", "goldfish"]
    names.write_text("tench\n\ngoldfish\n")
    with pytest.raises(DataError, match=r"names.txt:2: blank class name"):
        read_names_file(names)
    names.write_text("tench\ngoldfish\ntench\n")
    with pytest.raises(DataError, match=r"names.txt:3: class name 'tench' repeats line 1"):
        read_names_file(names)


def test_read_image_folder(tmp_path):
    _tree(tmp_path, {"cat": 3, "ant": 2})
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    _write_image(tmp_path / "train" / "ant" / "sub" / "deep.png", 9)
    paths, labels, names = read_image_folder(tmp_path / "train")
    assert names == ["ant", "cat"]
    assert labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert all(Path(p).is_absolute() and not p.endswith(".txt") for p in paths)
    (tmp_path / "train" / "dog").mkdir()
    with pytest.raises(DataError, match=r"dog: class 'dog' has no images"):
        read_image_folder(tmp_path / "train")
    with pytest.raises(DataError, match=r"nowhere: image folder not found"):
        read_image_folder(tmp_path / "nowhere")


def test_image_folder_of_tiff_and_pnm_reads_like_the_service(tmp_path):
    """Training's folder reader takes every extension of the one format list, and loads the pixels `decode` sees."""
    from ltserve import preprocess
    from ltserve.data import readers

    assert readers.IMAGE_EXTENSIONS is preprocess.IMAGE_EXTENSIONS
    files = {"cat/a.tif": ("RGB", "TIFF", {"compression": "tiff_deflate"}), "cat/b.TIFF": ("L", "TIFF", {}),
             "ant/c.ppm": ("RGB", "PPM", {}), "ant/d.pgm": ("L", "PPM", {}), "ant/e.pbm": ("1", "PPM", {}),
             "ant/f.pnm": ("L", "PPM", {})}
    for k, (rel, (mode, fmt, kw)) in enumerate(files.items()):
        pixels = np.random.default_rng(k).integers(0, 256, (10, 12, 3), dtype=np.uint8)
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).convert(mode).save(tmp_path / rel, format=fmt, **kw)
    # 16-bit mid-grey: scaled by the format's range (65535), not by the image's own maximum
    Image.fromarray(np.full((10, 12), 32896, np.uint16)).save(tmp_path / "ant" / "g16.pgm", format="PPM")
    paths, labels, names = read_image_folder(tmp_path)
    assert names == ["ant", "cat"] and len(paths) == len(files) + 1
    spec = preprocess.PreprocessSpec(resize=10, crop=10, mean=(0.5,) * 3, std=(0.5,) * 3, channels=3)
    images = ImageSet(labels=labels, paths=paths)
    for i, path in enumerate(paths):
        served = preprocess.decode(Path(path).read_bytes(), spec)
        assert np.array_equal(preprocess.transform_image(images.load(i), spec), served), path
        if path.endswith("g16.pgm"):
            assert (served == 128).all()


def test_imageset_load_is_lazy_and_names_bad_files(tmp_path):
    _write_image(tmp_path / "good.png", 0)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    lst = tmp_path / "train.txt"
    lst.write_text("good.png 0\nbroken.jpg 1\n")
    splits = load_splits(DataConfig(source="list", root=str(tmp_path), train="train.txt", val_fraction=0.0))
    assert len(splits.train) == 2  # the broken file is only opened when used
    good = splits.train.paths.index(str(tmp_path / "good.png"))
    assert splits.train.load(good).size == (12, 10)
    bad = 1 - good
    with pytest.raises(DataError, match=r"broken.jpg \(train.txt:2\): cannot read the image"):
        splits.train.load(bad)
    assert splits.train.read_bytes(bad).startswith(b"\xff\xd8")
    os.unlink(tmp_path / "good.png")
    with pytest.raises(DataError, match=r"good.png \(train.txt:1\): image file not found"):
        splits.train.load(good)


def test_imageset_load_applies_exif_orientation(tmp_path):
    img = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees to display
    img.save(tmp_path / "rot.jpg", exif=exif)
    s = ImageSet(labels=np.array([0]), paths=[str(tmp_path / "rot.jpg")])
    assert s.load(0).size == (20, 40)


def test_imageset_subset_and_arrays():
    arrays = np.arange(4 * 3 * 2 * 1, dtype=np.uint8).reshape(4, 3, 2, 1)
    s = ImageSet(labels=np.array([0, 1, 1, 0]), arrays=arrays)
    sub = s.subset(np.array([2, 0]))
    assert sub.labels.tolist() == [1, 0] and np.array_equal(sub.arrays, arrays[[2, 0]])
    assert sub.load(0).size == (2, 3) and sub.load(0).mode == "L"
    with pytest.raises(ValueError):
        ImageSet(labels=np.array([0]), arrays=None, paths=None)


# --- load_splits on folders and lists ---------------------------------------------------------------------------


def test_load_splits_imagefolder_stratified_val_test(tmp_path, caplog):
    _tree(tmp_path, {"a": 10, "b": 6, "c": 1})
    cfg = DataConfig(source="imagefolder", root=str(tmp_path), train="train", val_fraction=0.2, test_fraction=0.1)
    with caplog.at_level(logging.WARNING, logger="ltserve.data.longtail"):
        splits = load_splits(cfg)
    assert splits.class_names == ["a", "b", "c"]
    assert splits.class_counts().tolist() == [7, 4, 1]  # 10 -> 1 test, 2 val; 6 -> 1 test, 1 val; c kept
    assert np.bincount(splits.val.labels, minlength=3).tolist() == [2, 1, 0]
    assert np.bincount(splits.test.labels, minlength=3).tolist() == [1, 1, 0]
    all_paths = splits.train.paths + splits.val.paths + splits.test.paths
    assert len(set(all_paths)) == 17
    assert "c (1)" in caplog.text
    assert load_splits(cfg).fingerprint == splits.fingerprint
    assert load_splits(cfg.model_copy(update={"split_seed": 5})).fingerprint != splits.fingerprint


def test_load_splits_imagefolder_given_val_and_errors(tmp_path):
    _tree(tmp_path, {"a": 3, "b": 2})
    _tree(tmp_path, {"b": 2}, split="val")
    splits = load_splits(DataConfig(source="imagefolder", root=str(tmp_path), train="train", val="val"))
    assert splits.val.labels.tolist() == [1, 1] and splits.test is None
    assert splits.class_counts().tolist() == [3, 2]  # nothing moved out of train when val is given
    _tree(tmp_path, {"zebra": 1}, split="val")
    with pytest.raises(DataError, match=r"val: class folder\(s\) 'zebra' are not training classes"):
        load_splits(DataConfig(source="imagefolder", root=str(tmp_path), train="train", val="val"))
    with pytest.raises(DataError, match=r"nowhere.*folder not found"):
        load_splits(DataConfig(source="imagefolder", root=str(tmp_path / "nowhere"), train="train"))


def _list_tree(root: Path, per_class: list[int]) -> Path:
    lines = []
    for c, n in enumerate(per_class):
        for k in range(n):
            rel = f"train/c{c}/img_{k}.png"
            _write_image(root / rel, 10 * c + k, size=(4, 4))
            lines.append(f"{rel} {c}")
    lst = root / "train.txt"
    lst.write_text("\n".join(lines) + "\n")
    return lst


def test_load_splits_list_with_names_longtail_and_val(tmp_path):
    _list_tree(tmp_path, [12, 12, 12])
    (tmp_path / "names.txt").write_text("zero\none\ntwo\n")
    cfg = DataConfig(source="list", root=str(tmp_path), train="train.txt", names="names.txt",
                     longtail={"rho": 4, "n_max": 8, "val_per_class": 2})
    splits = load_splits(cfg)
    assert splits.class_names == ["zero", "one", "two"]
    assert splits.class_counts().tolist() == [8, 4, 2]
    assert np.bincount(splits.val.labels).tolist() == [2, 2, 2]
    assert not set(splits.val.paths) & set(splits.train.paths)
    assert splits.train.sources[0].startswith("train.txt:")


def test_load_splits_list_label_out_of_range_and_empty_class(tmp_path):
    lst = _list_tree(tmp_path, [2, 2, 2])
    (tmp_path / "names.txt").write_text("zero\none\n")
    with pytest.raises(DataError, match=r"train.txt:5: label 2 is out of range for the 2 names in names.txt"):
        load_splits(DataConfig(source="list", root=str(tmp_path), train="train.txt", names="names.txt"))
    (tmp_path / "names.txt").write_text("zero\none\ntwo\nthree\n")
    with pytest.raises(DataError, match=r"1 class\(es\) have no training image: 3 'three'"):
        load_splits(DataConfig(source="list", root=str(tmp_path), train="train.txt", names="names.txt",
                               val_fraction=0.0))
    # A test list whose labels exceed the classes found in train (no names file).
    (tmp_path / "test.txt").write_text(lst.read_text().replace(" 2\n", " 7\n"))
    with pytest.raises(DataError, match=r"test.txt:5: label 7 is out of range for 3 classes"):
        load_splits(DataConfig(source="list", root=str(tmp_path), train="train.txt", test="test.txt"))


def test_fetch_module_cli_finds_ltserve_data_without_torch(tmp_path):
    import subprocess
    import sys

    folder = _fm_copy(tmp_path / "fm")
    env = {**os.environ, "LTSERVE_DATA": str(folder)}
    code = ("import sys, runpy; sys.argv = ['ltserve.data', 'fetch']\n"
            "try:\n    runpy.run_module('ltserve.data', run_name='__main__')\n"
            "except SystemExit as e:\n    assert e.code == 0, e.code\n"
            "assert 'torch' not in sys.modules, 'ltserve.data must not import torch'\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(folder)
