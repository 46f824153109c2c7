"""configs/photos.yaml, the recipe for your own RGB photos: an ImageFolder at 224 px on a hub-pretrained timm backbone.

The recipe itself is trained here on a small folder of real photos (scikit-image's and scikit-learn's: one photo a
class, random crops and flips saved as JPEG, long-tailed counts), shrunk through the recipe's own overrides: 32 px,
3 epochs, `model.pretrained: null` (no hub is reachable in tests). The run must finish, score every epoch on val
(metrics.csv), and export a package that classifies a photo.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ltserve.config import load_config
from ltserve.rundir import read_run

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "configs" / "photos.yaml"
COUNTS = {"astronaut": 40, "coffee": 20, "cat": 10, "rocket": 6}
"""Images per class in the folder, head to tail. After the stratified test (20 %) and val (25 %) splits, train keeps
24, 12, 6 and 4 images: with the thresholds below one many-shot (> 20), two medium and one few-shot (< 5) class."""
SHRINK = ["preprocess.resize=40", "preprocess.crop=32", "model.pretrained=null", "train.epochs=3",
          "train.batch_size=16", "train.num_workers=0", "data.val_fraction=0.25", "data.test_fraction=0.2",
          "data.many_threshold=20", "data.few_threshold=5"]


def _photo(name: str) -> Image.Image:
    import skimage.data

    return Image.fromarray({"astronaut": skimage.data.astronaut, "coffee": skimage.data.coffee,
                            "cat": skimage.data.chelsea, "rocket": skimage.data.rocket}[name]())


def _crop(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A random square crop of half to all of the shorter side, maybe mirrored, 48-72 px."""
    w, h = img.size
    side = int(min(w, h) * rng.uniform(0.5, 1.0))
    x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
    out = img.crop((x, y, x + side, y + side)).resize((int(rng.integers(48, 73)),) * 2)
    return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else out


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory) -> Path:
    """data.root/<class>/<image>.jpg with the long-tailed COUNTS."""
    root = tmp_path_factory.mktemp("my-photos")
    rng = np.random.default_rng(0)
    for name, count in COUNTS.items():
        (root / name).mkdir()
        img = _photo(name)
        for j in range(count):
            _crop(img, rng).save(root / name / f"{j:03d}.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def photo_run(tmp_path_factory, photo_folder) -> Path:
    from ltserve.train import train

    cfg = load_config(RECIPE, [f"data.root={photo_folder}", *SHRINK])
    out = tmp_path_factory.mktemp("runs") / "photos"
    train(cfg, out, progress=False)
    return out


def test_the_recipe_as_shipped_is_224_px_rgb_on_a_hub_pretrained_timm_backbone():
    import timm

    from ltserve.features.hub import hub_weights

    cfg = load_config(RECIPE)
    assert cfg.data.source == "imagefolder" and cfg.data.val is None and 0 < cfg.data.val_fraction < 0.5
    assert (cfg.preprocess.crop, cfg.preprocess.channels) == (224, 3) and cfg.preprocess.resize >= 224
    assert timm.is_model(cfg.model.backbone)
    hub = hub_weights(cfg.model.pretrained)  # resolved offline from timm's tag table; nothing is downloaded
    assert hub is not None and hub.repo_id.startswith("timm/") and hub.filename.endswith(".safetensors")
    # the paper's schedule scaled down: cosine SGD, instance-balanced, lr scaled linearly with the batch (0.2 @ 512)
    tc = cfg.train
    assert (tc.schedule, tc.sampler, tc.momentum, tc.weight_decay) == ("cosine", "ib", 0.9, 5e-4)
    assert tc.lr == pytest.approx(0.2 * tc.batch_size / 512) and tc.epochs < 90
    assert cfg.augment.random_resized_crop and cfg.augment.color_jitter == 0.4


def test_photo_run_finishes_and_scores_every_epoch_on_val(photo_run):
    info = read_run(photo_run)
    assert info.finished and info.epochs_done == 3
    assert info.class_names == sorted(COUNTS) and info.backbone.name == "resnet18" and info.backbone.in_chans == 3
    counts = dict(zip(info.class_names, info.class_counts))
    assert [counts[n] for n in COUNTS] == [24, 12, 6, 4]  # the long tail survives the stratified splits
    assert info.split_sizes == {"train": 46, "val": 15, "test": 15}
    with open(photo_run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    for row in rows:
        for col in ("val_top1", "val_balanced", "val_many", "val_medium", "val_few"):
            assert row[col] != "" and 0.0 <= float(row[col]) <= 1.0, (col, row)
        assert float(row["train_loss"]) > 0
    assert (photo_run / "checkpoint" / "epoch-0003.json").is_file()  # metrics.csv sits beside the checkpoints


def test_photo_run_exports_a_package_that_classifies_a_photo(photo_run, photo_folder, tmp_path):
    from ltserve.evaluate.package import evaluate_package
    from ltserve.export import export_package
    from ltserve.runtime import Predictor

    out = tmp_path / "photos-joint"
    export_package(photo_run, "joint", out, progress=False)
    predictor = Predictor(out, threads=1)
    assert predictor.labels == sorted(COUNTS) and predictor.spec.crop == 32 and predictor.spec.channels == 3
    buf = io.BytesIO()
    _crop(_photo("cat"), np.random.default_rng(1)).save(buf, format="JPEG", quality=90)  # a photo never seen
    (pred,) = predictor.classify_bytes([buf.getvalue()], top_k=4)
    assert pred.label in COUNTS and 0.0 < pred.probability <= 1.0
    assert [t.label for t in pred.top_k][0] == pred.label and len(pred.top_k) == 4
    assert sum(t.probability for t in pred.top_k) == pytest.approx(1.0, abs=1e-4)

    # `ltserve evaluate models/NAME --data FOLDER` on the photo folder reports the reliability and confusion numbers
    report, logits, labels = evaluate_package(out, str(photo_folder), threads=1, progress=False)
    assert report["n"] == sum(COUNTS.values()) and report["reliability"]["ece"] == pytest.approx(report["ece"])
    confusion = report["confusion"]
    assert confusion["class_names"] == list(COUNTS)  # head to tail by the training counts
    np.testing.assert_allclose(np.asarray(confusion["matrix"]).sum(axis=1), 1.0, atol=1e-9)
    assert confusion["row_totals"] == list(COUNTS.values())
