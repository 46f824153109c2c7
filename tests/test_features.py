"""Frozen-backbone features and the run's feature cache, on the tiny Fashion-MNIST-LT run."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest

from ltserve.errors import RunError
from ltserve.features.cache import cached_features
from ltserve.features.extract import extract_features
from ltserve.rundir import RunPaths, read_run


def test_cache_is_built_once_then_reused(tiny_run, copy_run, caplog):
    run = copy_run(tiny_run)
    paths = RunPaths(run)
    info = read_run(run)
    shutil.rmtree(paths.cache)  # stage 1 left every split's features here; build them again from the backbone
    with caplog.at_level(logging.INFO, logger="ltserve.features.cache"):
        feats, labels = cached_features(run, "train")
    assert "building (no cache yet)" in caplog.text
    assert feats.shape == (info.split_sizes["train"], info.backbone.num_features) and feats.dtype == np.float32
    assert labels.dtype == np.int64 and np.bincount(labels).tolist() == info.class_counts
    meta = json.loads((paths.cache / "train.json").read_text())
    assert meta["dtype"] == "float16" and meta["shape"] == list(feats.shape)
    assert meta["backbone_sha256"] == info.backbone.sha256 and meta["data_fingerprint"] == info.data_fingerprint
    assert meta["preprocess"]["crop"] == 28

    stamp = (paths.cache / "train.safetensors").stat().st_mtime_ns
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ltserve.features.cache"):
        again, labels2 = cached_features(run, "train")
    assert "building" not in caplog.text
    assert (paths.cache / "train.safetensors").stat().st_mtime_ns == stamp  # not rewritten
    np.testing.assert_array_equal(again, feats)
    np.testing.assert_array_equal(labels2, labels)


def test_float16_cache_is_close_to_fresh_float32(tiny_run):
    cached, labels = cached_features(tiny_run, "val")
    fresh, fresh_labels = cached_features(tiny_run, "val", use_cache=False)
    np.testing.assert_array_equal(labels, fresh_labels)
    assert not np.array_equal(cached, fresh)  # the cache really holds float16
    np.testing.assert_allclose(cached, fresh, rtol=2e-3, atol=1e-3 * float(np.abs(fresh).max()))
    np.testing.assert_array_equal(cached, fresh.astype(np.float16).astype(np.float32))


def test_cache_rebuilt_when_the_backbone_changes(tiny_run, copy_run, caplog):
    from safetensors.numpy import load_file, save_file

    run = copy_run(tiny_run)
    paths = RunPaths(run)
    before, _ = cached_features(run, "val")
    state = load_file(str(paths.backbone))
    key = next(k for k in state if k.endswith("weight") and state[k].ndim == 4)
    state[key] = state[key] * np.float32(0.5)
    save_file(state, str(paths.backbone))
    with caplog.at_level(logging.INFO, logger="ltserve.features.cache"):
        after, _ = cached_features(run, "val")
    assert "the backbone changed" in caplog.text
    assert not np.allclose(before, after)
    from ltserve.fileio import sha256_file

    assert json.loads((paths.cache / "val.json").read_text())["backbone_sha256"] == sha256_file(paths.backbone)


def test_cache_rebuilt_when_the_recorded_data_differs(tiny_run, copy_run, caplog):
    run = copy_run(tiny_run)
    meta_path = RunPaths(run).cache / "val.json"
    cached_features(run, "val")
    meta = json.loads(meta_path.read_text())
    meta["data_fingerprint"] = "0" * 16
    meta_path.write_text(json.dumps(meta))
    with caplog.at_level(logging.INFO, logger="ltserve.features.cache"):
        cached_features(run, "val")
    assert "the data changed" in caplog.text
    assert json.loads(meta_path.read_text())["data_fingerprint"] == read_run(run).data_fingerprint


def test_data_on_disk_that_is_not_the_runs_data_is_an_error(tiny_run, copy_run):
    run = copy_run(tiny_run)
    paths = RunPaths(run)
    raw = json.loads(paths.run_json.read_text())
    raw["data_fingerprint"] = "f" * 16
    paths.run_json.write_text(json.dumps(raw))
    with pytest.raises(RunError, match="not the one this run was trained on"):
        cached_features(run, "test")


def test_unknown_split_is_an_error(tiny_run):
    with pytest.raises(RunError, match="not one of train, val, test"):
        cached_features(tiny_run, "holdout", use_cache=False)  # type: ignore[arg-type]


def test_array_fast_path_matches_the_pillow_transform(tiny_run):
    """In-memory 28 px arrays skip Pillow; features equal the transform_image + to_model_input path exactly."""
    from ltserve.features.backbones import load_run_backbone
    from ltserve.features.cache import splits_for
    from ltserve.preprocess import transform_image
    from ltserve.rundir import open_run

    backbone, cfg = load_run_backbone(tiny_run), open_run(tiny_run).config
    images = splits_for(cfg.data).val
    fast = extract_features(backbone, images, cfg.preprocess, batch_size=32)
    slow = extract_features(backbone, images, cfg.preprocess, batch_size=32,
                            transform=lambda img: transform_image(img, cfg.preprocess))
    np.testing.assert_array_equal(fast, slow)
    assert backbone.training is False


def test_train_transform_gives_augmented_features(tiny_run):
    """Stage 2's --no-cache path: the training augmentation through extract_features."""
    from ltserve.data import build_train_transform
    from ltserve.features.backbones import load_run_backbone
    from ltserve.features.cache import splits_for
    from ltserve.rundir import open_run

    backbone, cfg = load_run_backbone(tiny_run), open_run(tiny_run).config
    images = splits_for(cfg.data).val
    plain = extract_features(backbone, images, cfg.preprocess)
    augmented = extract_features(backbone, images, cfg.preprocess, transform=build_train_transform(cfg))
    assert augmented.shape == plain.shape and not np.allclose(augmented, plain)
