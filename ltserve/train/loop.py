"""One epoch of stage 1 and what it needs: the process group, the data loader, the model, the lr schedule, AMP.

Named steps, as in torchvision's reference `train.py`: `init_distributed`, `make_loader`, `build_model`, `lr_at`,
`train_one_epoch`.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as torch_dist
from torch import nn
from torch.nn import functional as F

from ltserve.config import Config, TrainConfig
from ltserve.data import TrainTransform, build_train_transform
from ltserve.errors import ConfigError
from ltserve.features.backbones import Classifier, create_backbone, set_trainable
from ltserve.features.extract import collate_uint8
from ltserve.progress import progress_bar
from ltserve.samplers import build_sampler

log = logging.getLogger(__name__)


class KeyedSampler(torch.utils.data.Sampler):
    """Yields (index, position) so each item's augmentation seed depends on where it is drawn, not on a global RNG."""

    def __init__(self, sampler: torch.utils.data.Sampler):
        self.sampler = sampler

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for position, index in enumerate(self.sampler):
            yield int(index), position

    def __len__(self) -> int:
        return len(self.sampler)


class AugmentedSet(torch.utils.data.Dataset):
    """Items (uint8 HWC image, label) of an ImageSet, augmented with a generator seeded by (seed, epoch, rank, pos)."""

    def __init__(self, imageset: Any, transform: TrainTransform, seed: int, rank: int):
        self.imageset, self.transform, self.seed, self.rank = imageset, transform, seed, rank
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.imageset)

    def __getitem__(self, key: tuple[int, int]) -> tuple[np.ndarray, int]:
        index, position = key
        rng = np.random.default_rng((self.seed, self.epoch, self.rank, position))
        return self.transform.load(self.imageset, index, rng), int(self.imageset.labels[index])



@dataclass
class Dist:
    """This process's place in a (possibly single-process) job."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            torch_dist.barrier()


def init_distributed(device_pref: str) -> tuple[Dist, torch.device]:
    """Read torchrun's WORLD_SIZE/RANK/LOCAL_RANK; start the process group (nccl on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dist = Dist(world, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")))
    use_cuda = device_pref == "cuda" or (device_pref == "auto" and torch.cuda.is_available())
    if device_pref == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device 'cuda': no CUDA device is visible; use 'auto' or 'cpu'")
    if use_cuda:
        torch.cuda.set_device(dist.local_rank if dist.enabled else torch.cuda.current_device())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        if dist.enabled and "OMP_NUM_THREADS" not in os.environ:
            # N processes on one machine: share the cores instead of each taking all of them
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if dist.enabled and not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if use_cuda else "gloo")
    return dist, device



def make_loader(splits, cfg: Config, dist: Dist, epoch: int, device: torch.device) -> torch.utils.data.DataLoader:
    tc = cfg.train
    # the sampler takes the per-process batch; every process builds the same global sequence and takes its slice
    sampler = build_sampler(tc.sampler, splits.train.labels, batch_size=tc.batch_size // dist.world_size,
                            epoch=epoch, total_epochs=tc.epochs, seed=tc.seed,
                            images_per_class=tc.cb_images_per_class, num_replicas=dist.world_size, rank=dist.rank)
    dataset = AugmentedSet(splits.train, build_train_transform(cfg), tc.seed, dist.rank)
    dataset.epoch = epoch
    return torch.utils.data.DataLoader(
        dataset, batch_size=tc.batch_size // dist.world_size, sampler=KeyedSampler(sampler), drop_last=True,
        num_workers=tc.num_workers, collate_fn=collate_uint8(cfg.preprocess), pin_memory=device.type == "cuda",
        persistent_workers=False)


# ----------------------------------------------------------------------------------------------------------------
# Model, optimiser, schedule
# ----------------------------------------------------------------------------------------------------------------


def build_model(cfg: Config, num_classes: int) -> Classifier:
    """Backbone of `cfg.model` (+ pretrained file, trainable part) with a fresh linear head of `num_classes`."""
    backbone = create_backbone(cfg.model.backbone, in_chans=cfg.preprocess.channels,
                               pretrained=cfg.model.pretrained, drop_rate=cfg.model.drop_rate)
    set_trainable(backbone, cfg.model.trainable)
    return Classifier(backbone, num_classes)


def lr_at(step: int, tc: TrainConfig, steps_per_epoch: int) -> float:
    """Learning rate of optimisation step `step` (0-based, counted over the whole run).

    Warm-up: lr * (step + 1) / warmup_steps. Cosine: 0.5 lr (1 + cos(pi t)), t = (step - warmup) / (total - warmup).
    Step: lr * gamma^k, k = milestones reached by the step's epoch (e.g. [160, 180], gamma 0.01: x0.01 from epoch
    160, x0.0001 from epoch 180).
    """
    total = tc.epochs * steps_per_epoch
    warm = tc.warmup_epochs * steps_per_epoch
    if step < warm:
        return tc.lr * (step + 1) / warm
    if tc.schedule == "cosine":
        t = (step - warm) / max(1, total - warm)
        return 0.5 * tc.lr * (1.0 + math.cos(math.pi * t))
    epoch = step // steps_per_epoch
    return tc.lr * tc.gamma ** sum(epoch >= m for m in tc.milestones)


def check_train_config(cfg: Config, source: str) -> None:
    tc = cfg.train
    if tc.warmup_epochs >= tc.epochs:
        raise ConfigError(f"{source}: train.warmup_epochs ({tc.warmup_epochs}) must be below train.epochs "
                          f"({tc.epochs})")
    if tc.schedule == "step":
        if sorted(tc.milestones) != list(tc.milestones) or any(m <= 0 or m >= tc.epochs for m in tc.milestones):
            raise ConfigError(f"{source}: train.milestones {tc.milestones} must increase and lie in 1..epochs-1 "
                              f"(epochs {tc.epochs})")
        if not tc.milestones:
            log.warning("%s: train.schedule 'step' without train.milestones keeps the lr constant", source)


def make_optimizer(model: nn.Module, tc: TrainConfig) -> torch.optim.SGD:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=tc.lr, momentum=tc.momentum, nesterov=tc.nesterov,
                           weight_decay=tc.weight_decay)


def freeze_frozen_bn(model: nn.Module) -> None:
    # BN layers of a frozen part keep their running statistics: they belong to the frozen representation
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters()):
            m.eval()


# ----------------------------------------------------------------------------------------------------------------
# One epoch
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Amp:
    enabled: bool
    dtype: torch.dtype
    scaler: torch.amp.GradScaler | None


def amp_for(cfg: Config, device: torch.device) -> Amp:
    if device.type != "cuda" or not cfg.train.amp:
        return Amp(False, torch.float32, None)
    if torch.cuda.is_bf16_supported():
        return Amp(True, torch.bfloat16, None)  # bf16 has fp32's range: no loss scaling needed
    return Amp(True, torch.float16, torch.amp.GradScaler("cuda"))


def train_one_epoch(model: nn.Module, loader: torch.utils.data.DataLoader, optimizer: torch.optim.Optimizer,
                    cfg: Config, epoch: int, first_step: int, steps_per_epoch: int, device: torch.device,
                    amp: Amp, dist: Dist, progress: bool = True) -> dict[str, float]:
    """Train one epoch; returns {"loss": mean CE, "lr": last lr, "images": count (all ranks), "seconds", "img_s"}."""
    model.train()
    freeze_frozen_bn(model)
    channels_last = device.type == "cuda" and cfg.train.channels_last
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    seen, step, lr = 0, first_step, cfg.train.lr
    start = time.perf_counter()
    bar = progress_bar(loader, total=len(loader), desc=f"epoch {epoch + 1}/{cfg.train.epochs}", unit="batch",
                       enabled=progress and dist.is_main)
    for x, y in bar:
        lr = lr_at(step, cfg.train, steps_per_epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp.dtype, enabled=amp.enabled):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        if amp.scaler is not None:
            amp.scaler.scale(loss).backward()
            amp.scaler.step(optimizer)
            amp.scaler.update()
        else:
            loss.backward()
            optimizer.step()
        loss_sum += loss.detach().double() * y.shape[0]
        seen += y.shape[0]
        step += 1
        if dist.is_main and (step - first_step) % 5 == 0:
            rate = seen * dist.world_size / max(time.perf_counter() - start, 1e-9)
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.3g}", img_s=f"{rate:.0f}", refresh=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    totals = torch.stack([loss_sum, torch.tensor(float(seen), dtype=torch.float64, device=device)])
    if dist.enabled:
        torch_dist.all_reduce(totals)
    images = int(totals[1].item())
    return {"epoch": epoch + 1, "loss": float(totals[0].item() / max(images, 1)), "lr": lr, "images": images,
            "seconds": seconds, "img_s": images / max(seconds, 1e-9)}

