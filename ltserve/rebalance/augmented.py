"""`--no-cache`: feed crt and lws augmented training images through the frozen backbone every epoch.

This is how the official code feeds stage 2 (a full forward pass per step), except that ltserve's backbone stays in
eval mode with BN statistics frozen, so the features differ from the cached ones only by the augmentation
(`ltserve.data.build_train_transform`: the run's `augment` section) and every head keeps one backbone.
Each image's augmentation is seeded by (rebalance.seed, epoch, position in the epoch): two runs see the same images.
"""

from __future__ import annotations

import logging
from typing import Any, Iterator

import numpy as np
import torch

from ltserve.config import Config
from ltserve.data import build_train_transform
from ltserve.features.backbones import load_run_backbone
from ltserve.features.cache import run_splits
from ltserve.features.extract import collate_uint8
from ltserve.heads.sgd import resolve_device
from ltserve.rundir import Run

log = logging.getLogger(__name__)


class _AugmentedItems(torch.utils.data.Dataset):
    """Key (index, position) -> uint8 HWC augmented image; the generator is seeded by (seed, epoch, position)."""

    def __init__(self, imageset: Any, transform: Any, seed: int, epoch: int):
        self.imageset, self.transform, self.seed, self.epoch = imageset, transform, seed, epoch

    def __len__(self) -> int:
        return len(self.imageset)

    def __getitem__(self, key: tuple[int, int]) -> tuple[np.ndarray, int]:
        index, position = key
        rng = np.random.default_rng((self.seed, self.epoch, position))
        return self.transform.load(self.imageset, index, rng), int(self.imageset.labels[index])


class AugmentedSource:
    """Training features computed on the fly: augmented images -> frozen backbone (eval mode, no grad).

    Args:
        backbone: the run's backbone (`ltserve.features.backbones.load_run_backbone`), moved to `device` and put
            in eval mode.
        imageset: the run's training `ltserve.data.ImageSet`.
        cfg: the run's config (augment, preprocess, train.num_workers, rebalance.seed).
        device: where the backbone runs.
    """

    kind = "augmented"

    def __init__(self, backbone: torch.nn.Module, imageset: Any, cfg: Config, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.backbone = backbone.to(self.device).eval()
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.imageset = imageset
        self.transform = build_train_transform(cfg, seed=cfg.rebalance.seed)
        self.collate = collate_uint8(cfg.preprocess)
        self.seed = cfg.rebalance.seed
        self.num_workers = cfg.train.num_workers
        self.num_features = int(backbone.num_features)

    @classmethod
    def from_run(cls, run: Run, cfg: Config, device: str | torch.device = "auto") -> "AugmentedSource":
        """The source of a run: its backbone and its training images (the data set must match run.json); `cfg` is
        the stage-2 config (augmentation, seed, workers).

        Raises:
            RunError: the data set on disk is not the one the run was trained on.
        """
        device = resolve_device(device)
        splits = run_splits(run)
        log.info("--no-cache: crt/lws see augmented images through the frozen backbone every epoch (%d images)",
                 len(splits.train))
        return cls(load_run_backbone(run, device), splits.train, cfg, device)

    def iter_epoch(self, batches: list[np.ndarray], epoch: int) -> Iterator[torch.Tensor]:
        """(B, D) float32 features of each index batch, augmented for `epoch`, in order."""
        keyed = [[(int(i), b * len(batch) + k) for k, i in enumerate(batch)] for b, batch in enumerate(batches)]
        loader = torch.utils.data.DataLoader(
            _AugmentedItems(self.imageset, self.transform, self.seed, epoch), batch_sampler=keyed,
            num_workers=self.num_workers, collate_fn=self.collate, pin_memory=self.device.type == "cuda")
        for x, _ in loader:
            # no_grad must not span the yield: the caller trains on these features with autograd on
            with torch.no_grad():
                x = x.to(self.device, non_blocking=True)
                feats = self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True).float()
            yield feats
