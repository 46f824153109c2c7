"""JPEG draft decoding, decided at export (`ltserve.export.draft`): checked per shot group, recorded, and served.

A small image-folder data set of real photos (scikit-learn's and scikit-image's; one photo a class, random crops
saved as JPEG at quality 90 with a shorter side of 80-160 px, so every image is at least twice the 32 px resize that
draft decoding needs) trains a tiny run in seconds. Its packages: `--jpeg-draft auto` (the check passes: draft on,
recorded, and run by the Predictor), a bound no draft can meet (-100 points: a gain is demanded) keeps it off in auto
and refuses the export in on; the Fashion-MNIST package (28 x 28 in-memory images) records that no image is affected.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ltserve.cli import main
from ltserve.cli.inspect import describe
from ltserve.errors import ConfigError, PackageError
from ltserve.export import JpegDraftOptions, export_package
from ltserve.export.draft import NO_IMAGE_AFFECTED
from ltserve.package import load_package, read_model_json
from ltserve.preprocess import decode, jpeg_draft_applies
from ltserve.rundir import open_run
from ltserve.runtime import Predictor

COUNTS = {"train": [40, 24, 14, 8, 5], "val": [4] * 5, "test": [20] * 5}
"""Images per class (one photo a class): many (> 20), medium (10-20) and few-shot (< 10) classes."""


def _photos() -> list[np.ndarray]:
    import skimage.data
    from sklearn.datasets import load_sample_images

    return [*load_sample_images().images, skimage.data.astronaut(), skimage.data.coffee(), skimage.data.rocket()]


@pytest.fixture(scope="module")
def photo_run(tmp_path_factory, tiny_config) -> Path:
    """A trained run of configs/tiny.yaml's recipe on the photo folder (classes "china", "flower", ... one photo
    each), 32 px RGB."""
    from ltserve.train import train

    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    names = ["china", "flower", "astronaut", "coffee", "rocket"]
    for name, photo in zip(names, _photos()):
        img = Image.fromarray(photo)
        for split, counts in COUNTS.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for j in range(counts[names.index(name)]):
                w, h = img.size
                side = int(min(w, h) * rng.uniform(0.5, 0.8))
                x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
                short = int(rng.integers(80, 161))
                crop = img.crop((x, y, x + side, y + side)).resize((short, int(short * rng.uniform(1.0, 1.3))))
                crop.save(folder / f"{j:03d}.jpg", quality=90)
    overrides = {"data": {"source": "imagefolder", "root": str(root), "train": "train", "val": "val", "test": "test",
                          "longtail": None, "max_test_images": None, "many_threshold": 20, "few_threshold": 10},
                 "preprocess": {"resize": 32, "crop": 32, "interpolation": "bilinear", "mean": [0.485, 0.456, 0.406],
                                "std": [0.229, 0.224, 0.225], "channels": 3},
                 "train": {"epochs": 15, "batch_size": 16}}
    base = tiny_config.model_dump()
    cfg = tiny_config.model_validate({**base, **{k: {**base[k], **v} for k, v in overrides.items()}})
    out = tmp_path_factory.mktemp("runs") / "photos"
    train(cfg, out)
    return out


@pytest.fixture(scope="module")
def auto_package(photo_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("models") / "photos-auto"
    export_package(photo_run, "joint", out, progress=False)  # jpeg_draft="auto" is the default
    return out


def test_auto_turns_draft_on_when_every_group_holds_and_records_why(auto_package, photo_run):
    meta = load_package(auto_package)
    r = meta.verification["jpeg_draft"]
    assert meta.preprocess.allow_draft is True and r["decision"] == "on" and r["mode"] == "auto" and r["passed"]
    assert r["split"] == "test" and r["images"] == r["images_affected"] == sum(COUNTS["test"])
    assert r["max_accuracy_drop"] == {"many": 0.003, "medium": 0.003, "few": 0.003, "top1": 0.003}
    assert r["images_per_group"] == {"many": 40, "medium": 20, "few": 40}
    assert set(r["accuracy_exact"]) >= {"many", "medium", "few", "top1"}
    assert all(d is None or d >= -0.003 for d in r["accuracy_change"].values())
    assert r["accuracy_exact"]["top1"] > 0.6  # the run learnt the photos: the check compares a real classifier
    assert 0.0 < r["mean_abs_pixel_diff"] < 8.0  # draft changes the pixels, a little
    assert "every group within 0.30 points" in r["reason"]
    assert any(line.startswith("  JPEG draft decoding: on (--jpeg-draft auto)") for line in describe(meta))

    predictor = Predictor(auto_package)
    info = predictor.info()
    assert info["jpeg_draft"]["on"] is True and info["preprocess"]["allow_draft"] is True
    assert info["jpeg_draft"]["images_affected"] == r["images_affected"]
    root = Path(open_run(photo_run).config.data.root)
    data = next((root / "test" / "china").glob("*.jpg")).read_bytes()
    assert jpeg_draft_applies(data, 32)
    served = predictor.decode(data)
    assert np.array_equal(served, decode(data, meta.preprocess))  # the Predictor decodes in draft mode
    assert not np.array_equal(served, decode(data, meta.preprocess.model_copy(update={"allow_draft": False})))


def test_a_bound_no_draft_meets_keeps_it_off_in_auto_and_refuses_in_on(photo_run, tmp_path, capsys):
    impossible = JpegDraftOptions(mode="auto", max_drop=-1.0)  # demands a gain of 100 points in every group
    out = tmp_path / "photos-strict"
    meta = export_package(photo_run, "joint", out, jpeg_draft=impossible, progress=False)
    r = meta.verification["jpeg_draft"]
    assert meta.preprocess.allow_draft is False and r["decision"] == "off" and r["passed"] is False
    assert "All accuracy" in r["reason"] and r["images_affected"] == sum(COUNTS["test"])
    assert Predictor(out).info()["jpeg_draft"]["on"] is False

    refused = tmp_path / "photos-on"
    argv = ["export", str(photo_run), "--head", "joint", "--out", str(refused), "--jpeg-draft", "on",
            "--jpeg-draft-max-drop", "-100", "--no-progress"]
    assert main(argv) == 3  # a quality gate refused (ltserve.cli.common.EXIT_REFUSED)
    err = capsys.readouterr().err
    assert "--jpeg-draft on refused" in err and "draft vs exact" in err and "Few (n=40)" in err
    assert not refused.exists()  # nothing written


def test_fashion_mnist_package_records_that_no_image_is_affected(tiny_package, tiny_rebalanced_run, tmp_path):
    meta = load_package(tiny_package)
    r = meta.verification["jpeg_draft"]
    assert meta.preprocess.allow_draft is False and r["decision"] == "off" and r["mode"] == "auto"
    assert r["images_affected"] == 0 and r["images"] > 0 and r["reason"].startswith(NO_IMAGE_AFFECTED)
    assert "accuracy_exact" not in r  # nothing to compare
    assert Predictor(tiny_package).info()["jpeg_draft"] == {"on": False, "mode": "auto", "reason": r["reason"],
                                                             "images_affected": 0}
    with pytest.raises(PackageError, match="cannot verify draft decoding"):
        export_package(tiny_rebalanced_run, "tau_norm", tmp_path / "on", jpeg_draft="on", progress=False)
    assert not (tmp_path / "on").exists()
    with pytest.raises(ConfigError, match="did you mean 'auto'"):
        JpegDraftOptions(mode="autoo")


def test_old_packages_load_and_a_hand_edited_switch_is_refused(tiny_package, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(tiny_package, old)
    meta = json.loads((old / "model.json").read_text())
    del meta["verification"]["jpeg_draft"]  # as written before the check existed
    (old / "model.json").write_text(json.dumps(meta))
    assert Predictor(old).info()["jpeg_draft"] == {"on": False,
                                                   "reason": "not checked: exported before ltserve checked it"}
    meta["verification"]["jpeg_draft"] = load_package(tiny_package).verification["jpeg_draft"]
    meta["preprocess"]["allow_draft"] = True  # on, although the check said off
    (old / "model.json").write_text(json.dumps(meta))
    with pytest.raises(PackageError, match="verification.jpeg_draft decided 'off'"):
        read_model_json(old)
