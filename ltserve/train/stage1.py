"""`train(cfg, out)`: stage 1 from start to finish (data, model, epochs, checkpoints, the end-of-training evaluation).

Decisions worth knowing:
- `train.batch_size` is the GLOBAL batch; each of N DDP processes takes batch_size / N. Every epoch has
  floor(N_train / batch_size) steps whatever the sampler (the paper's convention). The learning rate is used as given
  (no automatic linear scaling with the batch size: scale `train.lr` yourself when you change `train.batch_size`).
- The lr schedule is evaluated per step: linear warm-up over `warmup_epochs`, then cosine to 0 (never exactly 0 in
  a step that trains) or step decay (lr * gamma^(number of milestones reached), milestones in epochs).
- Augmentation randomness comes from a NumPy generator derived from (seed, epoch, rank, position in the epoch), not
  from a global RNG: results do not depend on `num_workers`, and resuming reproduces the same images exactly.
  Sampler order is derived from seed + epoch (`ltserve.samplers`). The torch, NumPy and Python RNG states (dropout,
  DataLoader seeds) are saved in every checkpoint and restored on `--resume`, so on CPU an interrupted and resumed
  run ends with bit-identical weights.
- At the end, the trained backbone (still in memory) extracts the features of train, val and test into the run's
  feature cache, the joint head gets its calibration temperature on val (`ltserve.heads.calibrate`, as every
  stage-2 head does; `rebalance.calibrate` switches it off for both stages), and it is scored on val and test from
  them: stage 2 and `ltserve evaluate` then start from the cache without reading the data set or rebuilding the
  backbone. With `evaluate=False` only the val features are extracted, for the calibration. Stage 2 never rewrites
  the joint head.
- After every epoch, rank 0 scores the joint head (the model's own layer) on val: top-1, balanced accuracy and
  Many/Medium/Few, in the epoch's log line, in `train_metrics["epochs"][i]["val"]` and in `RUN/metrics.csv`
  (`ltserve.train.val_metrics`).
- Evaluation uses exactly `ltserve.preprocess.transform_image` + `to_model_input` (the serving path); training
  augmentation ends in the same `to_model_input` normalisation.
- With `model.trainable: last_block`, BatchNorm layers that have no trainable parameter stay in eval mode (their
  running statistics are part of the frozen representation too).
- AMP (bf16 where supported, else fp16 with a gradient scaler) and channels_last apply on CUDA only.
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist
from torch import nn

from ltserve.config import Config
from ltserve.data import Splits, load_splits
from ltserve.errors import ConfigError
from ltserve.features.backbones import Classifier
from ltserve.features.cache import cached_features, remember_splits
from ltserve.heads import CalibratedHead
from ltserve.heads.calibrate import calibrate
from ltserve.metrics import classification_report
from ltserve.rundir import Run, RunInfo, RunPaths, read_run
from ltserve.train.checkpoint import (check_resume_config, gather_rng, latest_checkpoint, restore_checkpoint,
                                      save_checkpoint, seed_everything)
from ltserve.train.loop import (Dist, amp_for, build_model, check_train_config, init_distributed, make_loader,
                                make_optimizer, train_one_epoch)
from ltserve.train.run_files import check_out_folder, created_at, export_run, joint_head
from ltserve.train.val_metrics import describe_val, epoch_val_metrics, write_metrics_csv

log = logging.getLogger(__name__)

SUMMARY_KEYS = ("top1", "top5", "many", "medium", "few", "balanced_accuracy", "ece_raw", "ece", "n")


def train(cfg: Config, out: str | Path, resume: bool = False, *, stop_after_epochs: int | None = None,
          evaluate: bool = True, progress: bool = True) -> RunInfo:
    """Stage 1: train backbone + linear head with `cfg.train.sampler`; write the run directory `out`.

    Args:
        cfg: the resolved recipe.
        out: run directory, created only once the recipe, the data and the model have been checked (a refused run
            creates nothing; an existing run is not touched). An existing run needs `resume=True`.
        resume: continue from the newest valid checkpoint in `out/checkpoint/` (from scratch when there is none).
            The recipe must match the checkpoint's, except num_workers, eval_batch_size, device and rebalance.
        stop_after_epochs: stop once this many epochs are done in total (a deliberate interruption: the run stays
            resumable; used by tests and time-boxed jobs).
        evaluate: at the end, cache the features of every split with the trained backbone and score the (calibrated)
            joint head on val and test (`train_metrics["eval"]`). The joint head's temperature is fitted on val
            either way (unless `rebalance.calibrate` is false or there is no val split).
        progress: show progress bars (on a terminal).

    Returns:
        the RunInfo written to `out/run.json`; `train_metrics` holds per-epoch loss/lr/img/s/val accuracy, wall time,
        throughput and (when evaluated) the val/test summary of the joint head.

    Raises:
        ConfigError: an inconsistent recipe. RunError: `out` holds a run and resume is False, or the checkpoint's
            recipe differs. DataError: the data set cannot be read.
    """
    paths = RunPaths(out)
    dist, device = init_distributed(cfg.train.device)
    try:
        return _train(cfg, paths, resume, stop_after_epochs, evaluate, progress, dist, device)
    finally:
        if dist.enabled and torch_dist.is_initialized():
            # The DDP wrapper keeps the process group alive through reference cycles; a group that outlives
            # destroy_process_group is torn down at interpreter exit with gloo's threads still running, which
            # aborts the process ("terminate called without an active exception"). Collect it first.
            gc.collect()
            torch_dist.destroy_process_group()


def load_data(cfg: Config) -> Splits:
    """The splits of `cfg.data`, remembered for the feature cache (so it does not read the data set again)."""
    splits = load_splits(cfg.data)
    remember_splits(cfg.data, splits)
    return splits


def _train(cfg: Config, paths: RunPaths, resume: bool, stop_after_epochs: int | None, evaluate: bool,
           progress: bool, dist: Dist, device: torch.device) -> RunInfo:
    tc = cfg.train
    check_train_config(cfg, cfg.name)
    if tc.batch_size % dist.world_size:
        raise ConfigError(f"train.batch_size {tc.batch_size} is the global batch and must divide by the "
                          f"{dist.world_size} processes")
    # Everything that can refuse the run (the out folder, the data, the model and its weights, the resumed
    # recipe) is checked before the run folder is created: a refused `ltserve train` leaves nothing behind.
    # Every rank checks, so that no rank waits at a barrier for a rank 0 that has failed.
    check_out_folder(paths, resume)
    seed_everything(tc.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    splits = load_data(cfg)
    created = created_at(paths)
    steps_per_epoch = max(1, len(splits.train) // tc.batch_size)  # the samplers' epoch length
    model = build_model(cfg, splits.num_classes).to(device)
    if device.type == "cuda" and tc.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, tc)
    amp = amp_for(cfg, device)
    start_epoch, history = 0, []
    meta = latest_checkpoint(paths) if resume else None
    if meta is not None:
        check_resume_config(meta, cfg, paths)
        restore_checkpoint(meta, model, optimizer, amp, dist, device)
        start_epoch, history = int(meta["epoch"]), list(meta["history"])
        log.info("resuming %s from epoch %d/%d", paths.root, start_epoch, tc.epochs)
    elif resume:
        log.info("%s: no checkpoint to resume from; starting at epoch 0", paths.checkpoint)
    if dist.is_main:  # rank 0 writes the run; the others wait until its folders exist
        paths.make()
    dist.barrier()
    net: nn.Module = nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None) if dist.enabled else model
    log.info("training %s on %s: %s, %d classes, %d images, %d steps/epoch x %d epochs, sampler %s, world %d",
             cfg.name, device, cfg.model.backbone, splits.num_classes, len(splits.train), steps_per_epoch,
             tc.epochs, tc.sampler, dist.world_size)
    last = tc.epochs if stop_after_epochs is None else min(tc.epochs, stop_after_epochs)
    class_counts = splits.class_counts().tolist()
    info = None
    for epoch in range(start_epoch, last):
        loader = make_loader(splits, cfg, dist, epoch, device)
        stats = train_one_epoch(net, loader, optimizer, cfg, epoch, epoch * steps_per_epoch, steps_per_epoch,
                                device, amp, dist, progress)
        if dist.is_main:
            # before the RNG states are gathered: a resumed run then continues from the same states as a straight
            # one (reading val files through a DataLoader draws a seed from torch's generator)
            stats["val"] = epoch_val_metrics(model, splits.val, cfg, class_counts, device)
        history.append(stats)
        rng = gather_rng(dist, device)
        if dist.is_main:
            log.info("epoch %d/%d: loss %.4f, lr %.4g, %.0f img/s, %.1f s; %s", epoch + 1, tc.epochs, stats["loss"],
                     stats["lr"], stats["img_s"], stats["seconds"], describe_val(stats["val"]))
            save_checkpoint(paths, model, optimizer, amp, cfg, epoch + 1, (epoch + 1) * steps_per_epoch, history,
                            rng)
            write_metrics_csv(paths, history)
            info = export_run(paths, model, cfg, splits, epoch + 1, _train_metrics(history, dist, device),
                              finished=False, created=created)
        dist.barrier()
    del net  # only rank 0 goes on, with the bare model
    if dist.is_main:
        info = _finish_on_main(cfg, paths, model, splits, history, info, evaluate, progress, created, dist, device)
    # Every rank stays in the group until rank 0 has evaluated and written run.json: a rank that tears its end
    # of the group down while a peer still holds it can abort either process.
    dist.barrier()
    return info if info is not None else read_run(paths.root)


def _finish_on_main(cfg: Config, paths: RunPaths, model: Classifier, splits: Splits, history: list[dict],
                    info: RunInfo | None, evaluate: bool, progress: bool, created: str, dist: Dist,
                    device: torch.device) -> RunInfo:
    """Rank 0 after the last epoch: cache features, calibrate and score the joint head (when the run is complete),
    and write the final run.json and heads/joint.*."""
    metrics = _train_metrics(history, dist, device)
    if info is None:  # nothing left to train (resumed a finished run, or stop_after_epochs already reached)
        info = export_run(paths, model, cfg, splits, len(history), metrics, finished=False, created=created)
    if len(history) < cfg.train.epochs:
        log.info("stopped after epoch %d/%d; continue with --resume", len(history), cfg.train.epochs)
        return info
    evaluation, joint = _end_of_training(Run(paths, info, cfg), model, evaluate, progress, device)
    if evaluation is not None:
        metrics["eval"] = evaluation
    info = export_run(paths, model, cfg, splits, len(history), metrics, finished=True, created=created, joint=joint)
    log.info("finished %s: %d epochs in %.1f s (%.0f img/s)", paths.root, len(history), metrics["train_seconds"],
             metrics["images_per_second"])
    return info


def _end_of_training(run: Run, model: Classifier, evaluate: bool, progress: bool,
                     device: torch.device) -> tuple[dict[str, dict[str, Any]] | None, CalibratedHead]:
    """The final joint head, calibrated on val, and (with `evaluate`) its val and test summary.

    The trained backbone extracts the features of every split into the cache (only val without `evaluate`: the
    calibration needs them); the joint head's temperature is fitted on val and kept only when it lowers the val ECE
    (`ltserve.heads.calibrate`; skipped with `rebalance.calibrate: false` or without a val split).

    Returns:
        ({split: {"joint": {top1, top5, many, medium, few, balanced_accuracy, ece_raw, ece, n}}} for val and test,
        or None without `evaluate`; the joint head to save).
    """
    info, cfg = run.info, run.config
    joint = joint_head(model, cfg, info.epochs_done, info.backbone.sha256, info.data_fingerprint)
    features: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split in ("train", "val", "test") if evaluate else ("val",):
        if info.split_sizes.get(split, 0) > 0:
            x, y = cached_features(run, split, device=device, backbone=model.backbone, progress=progress)
            if split != "train":  # train's are only cached, for stage 2: not held in memory here
                features[split] = (x, y)
    if cfg.rebalance.calibrate and "val" in features:
        joint = calibrate(joint, *features["val"])
    if not evaluate:
        return None, joint
    out: dict[str, dict[str, Any]] = {}
    for split in ("val", "test"):
        if split in features:
            x, y = features[split]
            report = classification_report(joint.logits(x), y, info.class_counts, info.many_threshold,
                                           info.few_threshold, temperature=joint.temperature)
            out[split] = {"joint": {k: report.get(k) for k in SUMMARY_KEYS}}
    return out, joint


def _train_metrics(history: list[dict], dist: Dist, device: torch.device) -> dict[str, Any]:
    seconds = sum(h["seconds"] for h in history)
    images = sum(h["images"] for h in history)
    return {"epochs": history, "train_seconds": seconds, "images_per_second": images / max(seconds, 1e-9),
            "final_loss": history[-1]["loss"] if history else None, "world_size": dist.world_size,
            "device": str(device.type), "torch_threads": torch.get_num_threads()}
