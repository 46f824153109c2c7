"""Stage 1: a real (tiny) training run on Fashion-MNIST-LT, resume, DDP through torchrun, recipes, augmentation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ltserve.config import load_config
from ltserve.errors import ConfigError, DataError, RunError
from ltserve.heads import load_head
from ltserve.fileio import sha256_file
from ltserve.rundir import RunPaths, read_run

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))

# A 3-epoch recipe small enough to train three times in a test: ~250 images, batch 32.
SMALL = ["train.epochs=3", "train.batch_size=32", "data.longtail.n_max=100", "data.longtail.val_per_class=5",
         "data.max_test_images=100"]


def test_tiny_run_lowers_the_loss_and_writes_a_loadable_run(tiny_run, tiny_config):
    from ltserve.config import config_from_dict
    from ltserve.features.backbones import load_run_backbone

    info = read_run(tiny_run)
    assert info.finished and info.epochs_done == tiny_config.train.epochs
    losses = [e["loss"] for e in info.train_metrics["epochs"]]
    assert len(losses) == tiny_config.train.epochs
    assert losses[-1] < 0.8 * losses[0]
    assert config_from_dict(info.config) == tiny_config  # the resolved recipe round-trips
    assert info.class_counts == sorted(info.class_counts, reverse=True) and info.class_counts[0] == 200
    assert info.split_sizes["train"] == sum(info.class_counts)
    assert len(info.data_fingerprint) == 16 and info.ltserve_version

    paths = RunPaths(tiny_run)
    backbone = load_run_backbone(tiny_run)
    assert info.backbone.sha256 == sha256_file(paths.backbone)
    assert info.backbone.num_features == backbone.num_features and info.backbone.in_chans == 1
    head = load_head(paths.heads, "joint")
    assert head.weight.shape == (10, backbone.num_features) and head.method == "joint"
    assert head.meta["backbone_sha256"] == info.backbone.sha256
    # evaluated at the end: above chance on the balanced test set, and the many-shot classes well above it
    test = info.train_metrics["eval"]["test"]["joint"]
    assert test["top1"] > 0.15 and test["many"] > 0.5
    # the trained backbone left every split's features in the cache: stage 2 and evaluation start from there
    assert all((paths.cache / f"{split}.safetensors").is_file() for split in ("train", "val", "test"))
    assert not [p for p in paths.root.rglob("*") if p.suffix in (".pt", ".pth", ".pkl", ".pickle")]


def test_joint_head_is_calibrated_on_val_at_the_end_of_training(tiny_run):
    """Like every stage-2 head, the joint head gets a temperature fitted on val (kept only when it lowers the val
    ECE), and the end-of-training summary reports the ECE before and after it."""
    from ltserve.features.cache import cached_features
    from ltserve.heads.calibrate import fit_temperature
    from ltserve.metrics import expected_calibration_error, softmax

    info = read_run(tiny_run)
    joint = load_head(RunPaths(tiny_run).heads, "joint")
    assert "calibration" in joint.meta, "stage 1 left the joint head uncalibrated"
    cal = joint.meta["calibration"]
    vx, vy = cached_features(tiny_run, "val")
    raw = joint.uncalibrated_logits(vx)
    assert cal["fitted_temperature"] == pytest.approx(fit_temperature(raw, vy), rel=1e-6)
    assert cal["fitted_temperature"] != 1.0
    assert joint.temperature == cal["temperature"] == (cal["fitted_temperature"] if cal["applied"] else 1.0)
    assert cal["val_ece_before"] == pytest.approx(expected_calibration_error(softmax(raw), vy))
    assert cal["val_ece_after"] <= cal["val_ece_before"]
    summary = info.train_metrics["eval"]
    assert summary["val"]["joint"]["ece_raw"] == pytest.approx(cal["val_ece_before"], abs=1e-6)
    assert summary["val"]["joint"]["ece"] == pytest.approx(cal["val_ece_after"], abs=1e-6)
    tx, ty = cached_features(tiny_run, "test")
    assert summary["test"]["joint"]["ece_raw"] == pytest.approx(
        expected_calibration_error(softmax(joint.uncalibrated_logits(tx)), ty), abs=1e-6)
    assert summary["test"]["joint"]["ece"] == pytest.approx(
        expected_calibration_error(softmax(joint.logits(tx)), ty), abs=1e-6)


def test_joint_head_on_backbone_features_reproduces_the_trained_classifier(tiny_run):
    """backbone.safetensors + heads/joint give the logits of the model that was trained (decoupled checkpoint)."""
    import torch

    from ltserve.config import config_from_dict
    from ltserve.data import load_splits
    from ltserve.features.backbones import Classifier, load_run_backbone
    from ltserve.features.extract import extract_features
    from ltserve.preprocess import to_model_input

    backbone = load_run_backbone(tiny_run)
    head = load_head(RunPaths(tiny_run).heads, "joint")
    cfg = config_from_dict(read_run(tiny_run).config)
    images = load_splits(cfg.data).val.subset(np.arange(16))
    feats = extract_features(backbone, images, cfg.preprocess)
    model = Classifier(backbone, 10).eval()
    model.fc.weight.data = torch.from_numpy(head.weight)
    model.fc.bias.data = torch.from_numpy(head.bias)
    with torch.no_grad():
        logits = model(torch.from_numpy(to_model_input(list(images.arrays[..., None]), cfg.preprocess))).numpy()
    # the saved layer is the trained one; its calibration temperature (fitted after training) only divides it
    np.testing.assert_allclose(head.uncalibrated_logits(feats), logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(head.logits(feats) * head.temperature, logits, rtol=1e-5, atol=1e-5)


def _small(tmp_path: Path, *extra: str):
    return load_config(REPO / "configs" / "tiny.yaml", SMALL + list(extra))


def test_resume_after_interruption_gives_bit_identical_weights(tmp_path, caplog):
    import logging
    import re

    from ltserve.train import train

    cfg = _small(tmp_path)
    with caplog.at_level(logging.INFO, logger="ltserve.train"):
        straight = train(cfg, tmp_path / "straight", evaluate=False, progress=False)
    # one log line per epoch, with its val scores (what a log file or CI shows, without progress bars)
    lines = [r.getMessage() for r in caplog.records if re.match(r"epoch \d+/3: ", r.getMessage())]
    assert len(lines) == 3 and all(re.search(r"; val top1 [\d.]+ %, balanced [\d.]+ % \(many ", m) for m in lines)
    stopped = train(cfg, tmp_path / "resumed", stop_after_epochs=2, evaluate=False)
    assert stopped.epochs_done == 2 and not stopped.finished
    ckpt = sorted(p.name for p in (tmp_path / "resumed" / "checkpoint").iterdir())
    assert ckpt == ["epoch-0002.json", "epoch-0002.safetensors"]  # older checkpoints are dropped
    meta = json.loads((tmp_path / "resumed" / "checkpoint" / "epoch-0002.json").read_text())
    assert set(meta["rng"]["0"]) >= {"torch", "numpy", "python"}
    assert meta["epoch"] == 2 and meta["step"] == 2 * meta["history"][0]["images"] // 32

    resumed = train(cfg, tmp_path / "resumed", resume=True, evaluate=False)
    assert resumed.finished and resumed.epochs_done == 3
    assert "eval" not in resumed.train_metrics  # not evaluated, but the joint head is calibrated on val all the same
    assert "calibration" in load_head(tmp_path / "resumed" / "heads", "joint").meta
    for rel in ("backbone.safetensors", "heads/joint.safetensors"):
        a, b = (tmp_path / "straight" / rel).read_bytes(), (tmp_path / "resumed" / rel).read_bytes()
        assert a == b, f"{rel} differs after resume"
    losses = [e["loss"] for e in straight.train_metrics["epochs"]]
    assert losses == [e["loss"] for e in resumed.train_metrics["epochs"]]
    # metrics.csv keeps the epochs before the interruption (they live in the checkpoint's history), and the
    # per-epoch val metrics, taken on the same weights, are the same
    keep = ("epoch", "train_loss", "val_top1", "val_balanced", "val_many", "val_medium", "val_few")
    rows = {name: [{k: r[k] for k in keep} for r in _metrics_csv(tmp_path / name)] for name in ("straight", "resumed")}
    assert len(rows["resumed"]) == 3 and rows["resumed"] == rows["straight"]


def _metrics_csv(run: Path) -> list[dict[str, str]]:
    import csv

    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_every_epoch_is_scored_on_val_in_metrics_csv_and_run_json(tiny_run, tiny_config):
    """Stage 1 scores the joint head on val after each epoch: top-1, balanced accuracy and Many/Medium/Few with the
    run's shot groups, one metrics.csv row per epoch beside the checkpoints."""
    from ltserve.train.val_metrics import CSV_COLUMNS

    info = read_run(tiny_run)
    rows = _metrics_csv(tiny_run)
    assert tuple(rows[0]) == CSV_COLUMNS
    assert [int(r["epoch"]) for r in rows] == list(range(1, tiny_config.train.epochs + 1))
    epochs = info.train_metrics["epochs"]
    for row, epoch in zip(rows, epochs):
        assert float(row["train_loss"]) == pytest.approx(epoch["loss"], rel=1e-5)
        for col in ("val_top1", "val_balanced", "val_many", "val_medium", "val_few"):
            assert 0.0 <= float(row[col]) <= 1.0, (col, row)
        assert float(row["val_seconds"]) > 0 and float(row["seconds"]) > 0
        val = epoch["val"]
        assert val["n"] == info.split_sizes["val"] and float(row["val_top1"]) == pytest.approx(val["top1"], abs=1e-5)
        # the val split is balanced (10 images per class): balanced accuracy is top-1
        assert val["balanced_accuracy"] == pytest.approx(val["top1"])
    # the last epoch's score is the trained joint head's (from the float16 feature cache: allow a few flips)
    final = info.train_metrics["eval"]["val"]["joint"]
    assert float(rows[-1]["val_top1"]) == pytest.approx(final["top1"], abs=0.05)
    assert float(rows[-1]["val_balanced"]) > 0.2  # 10 classes: twice chance after 12 epochs


def test_existing_run_needs_resume_and_resume_needs_the_same_recipe(tmp_path):
    from ltserve.train import train

    cfg = _small(tmp_path, "train.epochs=2")
    train(cfg, tmp_path / "run", stop_after_epochs=1, evaluate=False)
    with pytest.raises(RunError, match="--resume"):
        train(cfg, tmp_path / "run", evaluate=False)
    changed = _small(tmp_path, "train.epochs=2", "train.lr=0.05")
    with pytest.raises(RunError, match=r"train\.lr"):
        train(changed, tmp_path / "run", resume=True, evaluate=False)


def _listing(root: Path) -> dict[str, str]:
    """Every path under root with its sha256 (files) and modification time: what "untouched" means."""
    return {str(p.relative_to(root)): (sha256_file(p) if p.is_file() else "dir") + f" {p.stat().st_mtime_ns}"
            for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("override, error", [
    ("data.root=/nonexistent/fashion-mnist", DataError),  # a bad data root
    ("data.longtail.n_max=7000", DataError),  # a data error: Fashion-MNIST has 6000 training images per class
    ("model.backbone=resnet_nope", ConfigError),  # invalid recipes found only when the model is built
    ("model.pretrained=/nonexistent/weights.safetensors", ConfigError),
])
def test_refused_training_creates_nothing(tmp_path, override, error):
    from ltserve.train import train

    with pytest.raises(error):
        train(_small(tmp_path, override), tmp_path / "runs" / "new", evaluate=False)
    assert not (tmp_path / "runs").exists()  # no run-folder skeleton, not even the parent
    (tmp_path / "empty").mkdir()  # an --out the user made beforehand stays empty
    with pytest.raises(error):
        train(_small(tmp_path, override), tmp_path / "empty", evaluate=False)
    assert list((tmp_path / "empty").iterdir()) == []


def test_refused_cli_train_leaves_no_folder_and_an_existing_run_untouched(tmp_path, capsys):
    from ltserve.cli import main
    from ltserve.train import train

    out = tmp_path / "runs" / "shop"
    argv = ["train", str(REPO / "configs" / "tiny.yaml"), "--out", str(out), "--set", "data.source=imagefolder",
            "--set", f"data.root={tmp_path / 'no-such-folder'}"]
    assert main(argv) == 2
    assert "no-such-folder" in capsys.readouterr().err and not (tmp_path / "runs").exists()

    run = tmp_path / "run"
    cfg = _small(tmp_path, "train.epochs=2")
    train(cfg, run, stop_after_epochs=1, evaluate=False)
    before = _listing(run)
    with pytest.raises(DataError):
        train(_small(tmp_path, "train.epochs=2", "data.root=/nonexistent/fashion-mnist"), run, resume=True)
    with pytest.raises(RunError, match=r"train\.lr"):
        train(_small(tmp_path, "train.epochs=2", "train.lr=0.05"), run, resume=True)
    with pytest.raises(RunError, match="--resume"):
        train(cfg, run)
    assert _listing(run) == before
    assert train(cfg, run, resume=True, evaluate=False).finished  # and it still resumes


def test_cli_override_sampler_and_step_schedule(tmp_path, capsys):
    """`ltserve train` through the dispatcher: --set switches the stage-1 sampler (the ablation) and the schedule."""
    from ltserve.cli import main

    out = tmp_path / "cb"
    argv = ["train", str(REPO / "configs" / "tiny.yaml"), "--out", str(out), "--no-eval"]
    for s in SMALL + ["train.epochs=2", "train.sampler=cb", "train.schedule=step", "train.milestones=[1]",
                      "train.gamma=0.1", "train.warmup_epochs=1"]:
        argv += ["--set", s]
    assert main(argv) == 0
    info = read_run(out)
    assert info.config["train"]["sampler"] == "cb" and info.finished
    lrs = [e["lr"] for e in info.train_metrics["epochs"]]
    assert lrs == pytest.approx([0.1, 0.01])  # warm-up ends at the base lr; x0.1 from milestone epoch 1
    assert "2/2 epochs" in capsys.readouterr().out


def test_torchrun_two_process_gloo_run(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    out = tmp_path / "ddp"
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "ltserve.cli", "train",
           str(REPO / "configs" / "tiny.yaml"), "--out", str(out)]
    for s in SMALL + ["train.epochs=1"]:
        cmd += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = read_run(out)
    assert info.finished and info.train_metrics["world_size"] == 2
    # 2 processes x 16 images per step, floor(N / 32) steps: one global epoch, not two
    assert info.train_metrics["epochs"][0]["images"] == (info.split_sizes["train"] // 32) * 32
    assert info.config["train"]["epochs"] == 1 and info.config["train"]["batch_size"] == 32
    assert (out / "eval" / "test.json").is_file()
    assert "test (100 images)" in proc.stdout and proc.stdout.count("| joint |") == 2  # printed once (rank 0)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads_and_validates(path):
    from ltserve.train.loop import check_train_config

    cfg = load_config(path)
    check_train_config(cfg, str(path))
    assert cfg.name == path.stem


def test_unknown_config_key_is_rejected_with_the_valid_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"did you mean 'epochs'.*valid keys: .*batch_size"):
        load_config(REPO / "configs" / "fashion_lt.yaml", ["train.epoch=3"])


def test_paper_recipes_say_what_the_paper_says():
    x50 = load_config(REPO / "configs" / "imagenet_lt_resnext50.yaml")
    assert (x50.train.epochs, x50.train.batch_size, x50.train.lr, x50.train.weight_decay) == (90, 512, 0.2, 5e-4)
    assert x50.augment.random_resized_crop and x50.augment.color_jitter == 0.4
    assert (x50.preprocess.resize, x50.preprocess.crop) == (256, 224)
    assert load_config(REPO / "configs" / "inat2018_resnet50.yaml").augment.color_jitter == 0.0
    places = load_config(REPO / "configs" / "places_lt_resnet152.yaml")
    assert places.model.trainable == "last_block" and places.model.pretrained


def test_cifar_step_schedule_arithmetic():
    """CIFAR-LT: 5-epoch warm-up, then x0.01 at epoch 160 and x0.0001 (of the base lr) at 180."""
    from ltserve.train.loop import lr_at

    tc = load_config(REPO / "configs" / "cifar10_lt_resnet32.yaml").train
    spe = 97
    assert lr_at(0, tc, spe) == pytest.approx(0.1 / (5 * spe))
    assert lr_at(5 * spe - 1, tc, spe) == pytest.approx(0.1)
    assert lr_at(159 * spe + spe - 1, tc, spe) == pytest.approx(0.1)
    assert lr_at(160 * spe, tc, spe) == pytest.approx(0.1 * 0.01)
    assert lr_at(180 * spe, tc, spe) == pytest.approx(0.1 * 1e-4)
    assert lr_at(200 * spe - 1, tc, spe) == pytest.approx(1e-5)


def test_cosine_schedule_decays_to_near_zero():
    from ltserve.train.loop import lr_at

    tc = load_config(REPO / "configs" / "fashion_lt.yaml").train
    lrs = [lr_at(s, tc, 10) for s in range(tc.epochs * 10)]
    assert lrs[0] == pytest.approx(tc.lr) and 0 < lrs[-1] < 1e-3 * tc.lr
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_bad_milestones_are_rejected():
    from ltserve.train.loop import check_train_config

    cfg = load_config(REPO / "configs" / "cifar10_lt_resnet32.yaml", ["train.milestones=[180, 160]"])
    with pytest.raises(ConfigError, match="milestones"):
        check_train_config(cfg, "cifar10")


def test_array_fast_path_is_the_same_arithmetic_as_pillow():
    """Fashion-MNIST arrays skip Pillow: same pixels as transform_image + the same augmentation."""
    from ltserve.config import AugmentConfig
    from ltserve.preprocess import PreprocessSpec
    from ltserve.data import TrainTransform

    rng = np.random.default_rng(0)
    spec = PreprocessSpec(resize=28, crop=28, mean=(0.3,), std=(0.35,), channels=1)
    t = TrainTransform(AugmentConfig(pad_crop=2, hflip=True), spec)
    for k in range(20):
        arr = rng.integers(0, 256, (28, 28), dtype=np.uint8)
        fast = t.from_array(arr, np.random.default_rng(k))
        slow = t(Image.fromarray(arr), np.random.default_rng(k))
        np.testing.assert_array_equal(fast, slow)
        assert fast.shape == (28, 28, 1) and fast.dtype == np.uint8
    # pad_crop shifts the image by at most 2 px with zero fill; hflip mirrors it
    arr = np.arange(28 * 28, dtype=np.uint8).reshape(28, 28) | 1
    shifted = [t.from_array(arr, np.random.default_rng(k))[..., 0] for k in range(30)]
    assert any(not np.array_equal(s, arr) for s in shifted)
    assert all((s == 0).sum() <= 4 * 28 + 4 * 28 for s in shifted)
    rgb = TrainTransform(AugmentConfig(pad_crop=0, hflip=False), spec.model_copy(
        update={"channels": 3, "mean": (0.5,) * 3, "std": (0.5,) * 3}))
    np.testing.assert_array_equal(rgb.from_array(arr), np.asarray(Image.fromarray(arr).convert("RGB")))


def test_imagenet_style_augmentation_shapes_and_determinism():
    from ltserve.config import AugmentConfig
    from ltserve.preprocess import PreprocessSpec
    from ltserve.data import TrainTransform

    spec = PreprocessSpec(resize=40, crop=32, mean=(0.5,) * 3, std=(0.5,) * 3, channels=3)
    t = TrainTransform(AugmentConfig(random_resized_crop=True, color_jitter=0.4, hflip=True), spec)
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (60, 90, 3), dtype=np.uint8))
    a, b = t(img, np.random.default_rng(5)), t(img, np.random.default_rng(5))
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, t(img, np.random.default_rng(6)))
