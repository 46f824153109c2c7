"""What the stages hand each other: stage 1 leaves every split's features in the cache, computed with the backbone
it has just trained, so stage 2, evaluation and `export --head best` neither read the data set nor rebuild the
backbone; and a stage that is given a `Run` uses it instead of reading run.json again."""

from __future__ import annotations

import pytest

from ltserve.features import backbones, cache
from ltserve.rundir import open_run


@pytest.fixture()
def no_data_no_backbone(monkeypatch):
    """Reading the data set or building the run's backbone from disk fails from here on."""

    def refuse(*args, **kwargs):
        raise AssertionError("the data set or the backbone was read again")

    monkeypatch.setattr(cache, "splits_for", refuse)
    monkeypatch.setattr(backbones, "load_run_backbone", refuse)


def test_stage2_evaluation_and_selection_start_from_the_cache(tiny_run, copy_run, no_data_no_backbone):
    from ltserve.evaluate import best_head, evaluate_run
    from ltserve.rebalance import rebalance

    run = open_run(copy_run(tiny_run))
    heads = rebalance(run, heads="tau_norm,ncm,la", progress=False)
    assert set(heads) == {"tau_norm", "ncm", "la"}
    results = evaluate_run(run, "test", plots=False)
    assert set(results["heads"]) == {"joint", "tau_norm", "ncm", "la"}
    assert best_head(run) in results["heads"]


def test_end_of_training_features_come_from_the_trained_model(tiny_config, tmp_path, monkeypatch):
    """Stage 1 never reloads backbone.safetensors to fill the cache (and the cache holds train, val and test)."""
    from ltserve.train import train

    def refuse(*args, **kwargs):
        raise AssertionError("the backbone was rebuilt from disk")

    monkeypatch.setattr(backbones, "load_run_backbone", refuse)
    cfg = tiny_config.model_copy(update={"train": tiny_config.train.model_copy(update={"epochs": 1})})
    info = train(cfg, tmp_path / "run", progress=False)
    assert info.finished and set(info.train_metrics["eval"]) == {"val", "test"}
    for split in ("train", "val", "test"):
        assert (tmp_path / "run" / "cache" / f"{split}.safetensors").is_file()
