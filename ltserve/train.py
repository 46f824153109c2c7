"""Stage 1: joint training of backbone + linear classifier on the long-tailed training set.

    ltserve train CONFIG.yaml [--set section.field=value ...] --out runs/NAME [--resume]
    torchrun --nproc_per_node N -m ltserve.cli train CONFIG.yaml --out runs/NAME      # DDP (nccl on CUDA, gloo on CPU)

Named steps, as in torchvision's reference `train.py`: `load_data` -> `build_model` -> `train_one_epoch` per epoch
-> `save_checkpoint` + `export_run` (backbone.safetensors, heads/joint.*, run.json) -> `evaluate_run` on val and test.

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
- Evaluation uses exactly `ltserve.preprocess.transform_image` + `to_model_input` (the serving path); training
  augmentation ends in the same `to_model_input` normalisation.
- With `model.trainable: last_block`, BatchNorm layers that have no trainable parameter stay in eval mode (their
  running statistics are part of the frozen representation too).
- AMP (bf16 where supported, else fp16 with a gradient scaler) and channels_last apply on CUDA only.
- Checkpoints are safetensors (model, optimizer tensors) + JSON (epoch, step, optimizer hyper-parameters, RNG
  states, history); the JSON is written last and names the sha256 of its tensor file, so a crash mid-write leaves
  the previous checkpoint valid. No pickle anywhere.
"""

from __future__ import annotations

import argparse
import base64
import gc
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as torch_dist
from PIL import Image, ImageEnhance
from torch import nn
from torch.nn import functional as F

from ltserve.config import AugmentConfig, Config, TrainConfig, config_hash, load_config
from ltserve.errors import ConfigError, RunError
from ltserve.features import arrays_are_model_sized
from ltserve.heads import CalibratedHead, save_head
from ltserve.models import Classifier, create_backbone, set_trainable
from ltserve.preprocess import PreprocessSpec, convert_mode, to_model_input, transform_image
from ltserve.rundir import BackboneInfo, RunInfo, RunPaths, git_commit, read_run, sha256_file, utc_now, write_json, \
    write_run

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
# Config fields that may differ between the interrupted run and `--resume` (they do not change what is learnt).
RESUME_MAY_DIFFER = ("train.num_workers", "train.eval_batch_size", "train.device", "rebalance")


# ----------------------------------------------------------------------------------------------------------------
# Augmentation (NumPy + Pillow; torch only at batch collation)
# ----------------------------------------------------------------------------------------------------------------


class TrainTransform:
    """The training augmentation of `cfg.augment`, producing uint8 (crop, crop, channels) like `transform_image`.

    Order (torchvision's ImageNet / CIFAR recipes): random_resized_crop (else the evaluation resize + centre crop)
    -> pad_crop (zero padding, random crop back) -> hflip (p = 0.5) -> color_jitter (brightness, contrast,
    saturation factors in [1 - j, 1 + j], random order, Pillow's ImageEnhance as torchvision uses for PIL images).
    The result is normalised by `to_model_input(.., spec)`, the same function evaluation and serving use.

    Call it as `transform(img)` (own seeded generator) or `transform(img, rng)`; `load(imageset, i, rng)` takes the
    fast path for in-memory arrays that are already model-sized (Fashion-MNIST at 28 px: no Pillow at all).
    """

    RATIO = (3.0 / 4.0, 4.0 / 3.0)

    def __init__(self, augment: AugmentConfig, spec: PreprocessSpec, seed: int = 0):
        self.augment = augment
        self.spec = spec
        self._rng = np.random.default_rng(seed)

    @property
    def needs_pil(self) -> bool:
        """Whether an already model-sized uint8 array still needs Pillow (resampling or colour arithmetic)."""
        return self.augment.random_resized_crop or self.augment.color_jitter > 0

    def __call__(self, img: Image.Image, rng: np.random.Generator | None = None) -> np.ndarray:
        """Augment one Pillow image. Returns uint8 (crop, crop, channels)."""
        rng = self._rng if rng is None else rng
        spec, aug = self.spec, self.augment
        if aug.random_resized_crop:
            img = convert_mode(img, spec.channels)
            left, top, w, h = _rrc_box(img.size[0], img.size[1], (aug.scale_min, 1.0), self.RATIO, rng)
            # crop then resize, as torchvision's resized_crop does on PIL images
            img = img.crop((left, top, left + w, top + h)).resize(
                (spec.crop, spec.crop), Image.Resampling[spec.interpolation.upper()])
            arr = _as_hwc(np.asarray(img, dtype=np.uint8))
        else:
            arr = transform_image(img, spec)
        return self._finish(arr, rng)

    def from_array(self, arr: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """Augment a uint8 (crop, crop[, C]) array that `transform_image` would return unchanged (fast path)."""
        rng = self._rng if rng is None else rng
        arr = _as_hwc(arr)
        if arr.shape[2] != self.spec.channels:  # grey -> RGB replicates, exactly as Pillow's convert("RGB")
            arr = np.repeat(arr, self.spec.channels, axis=2)
        if self.augment.random_resized_crop:
            return self(Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr), rng)
        return self._finish(arr, rng)

    def load(self, imageset: Any, i: int, rng: np.random.Generator | None = None) -> np.ndarray:
        """Augmented image `i` of an `ltserve.data.ImageSet`, via `from_array` when that is the same arithmetic."""
        if imageset.arrays is not None and arrays_are_model_sized(imageset.arrays, self.spec):
            return self.from_array(imageset.arrays[i], rng)
        return self(imageset.load(i), rng)

    def _finish(self, arr: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        aug = self.augment
        if aug.pad_crop > 0:
            p = aug.pad_crop
            padded = np.pad(arr, ((p, p), (p, p), (0, 0)))
            top, left = (int(v) for v in rng.integers(0, 2 * p + 1, size=2))
            arr = padded[top:top + arr.shape[0], left:left + arr.shape[1]]
        if aug.hflip and rng.random() < 0.5:
            arr = arr[:, ::-1]
        if aug.color_jitter > 0:
            arr = _color_jitter(arr, aug.color_jitter, rng)
        return np.ascontiguousarray(arr)


def build_train_transform(cfg: Config, seed: int | None = None) -> TrainTransform:
    """The training augmentation of a recipe (`cfg.augment` on `cfg.preprocess`), e.g. for stage 2 `--no-cache`."""
    return TrainTransform(cfg.augment, cfg.preprocess, cfg.train.seed if seed is None else seed)


def _as_hwc(arr: np.ndarray) -> np.ndarray:
    return arr[:, :, None] if arr.ndim == 2 else arr


def _rrc_box(width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float],
             rng: np.random.Generator) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box: (left, top, w, h), 10 tries, then the central crop as a fallback."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def _color_jitter(arr: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    img = Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr)
    enhancers = [ImageEnhance.Brightness, ImageEnhance.Contrast]
    if arr.shape[2] == 3:  # saturation is meaningless on grey images
        enhancers.append(ImageEnhance.Color)
    for k in rng.permutation(len(enhancers)):
        factor = float(rng.uniform(max(0.0, 1.0 - strength), 1.0 + strength))
        img = enhancers[int(k)](img).enhance(factor)
    return _as_hwc(np.asarray(img, dtype=np.uint8))


# ----------------------------------------------------------------------------------------------------------------
# Data loading
# ----------------------------------------------------------------------------------------------------------------


class _KeyedSampler(torch.utils.data.Sampler):
    """Yields (index, position) so each item's augmentation seed depends on where it is drawn, not on a global RNG."""

    def __init__(self, sampler: torch.utils.data.Sampler):
        self.sampler = sampler

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for position, index in enumerate(self.sampler):
            yield int(index), position

    def __len__(self) -> int:
        return len(self.sampler)


class _AugmentedSet(torch.utils.data.Dataset):
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


def collate_uint8(spec: PreprocessSpec) -> Callable[[list[tuple[np.ndarray, int]]], tuple[torch.Tensor, torch.Tensor]]:
    """Batch collation: uint8 HWC images -> `to_model_input` float32 NCHW tensor, labels -> int64 tensor."""

    def collate(items: list[tuple[np.ndarray, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        x = to_model_input([a for a, _ in items], spec)
        return torch.from_numpy(x), torch.as_tensor([y for _, y in items], dtype=torch.int64)

    return collate


@dataclass
class _Dist:
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


def _init_distributed(device_pref: str) -> tuple[_Dist, torch.device]:
    """Read torchrun's WORLD_SIZE/RANK/LOCAL_RANK; start the process group (nccl on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dist = _Dist(world, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")))
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


def load_data(cfg: Config):
    """The splits of `cfg.data` (also remembered for `ltserve.features`, so evaluation does not re-read them)."""
    from ltserve.data import load_splits
    from ltserve.features import remember_splits

    splits = load_splits(cfg.data)
    remember_splits(cfg.data, splits)
    return splits


def _make_loader(splits, cfg: Config, dist: _Dist, epoch: int, device: torch.device) -> torch.utils.data.DataLoader:
    from ltserve.samplers import build_sampler

    tc = cfg.train
    # the sampler takes the per-process batch; every process builds the same global sequence and takes its slice
    sampler = build_sampler(tc.sampler, splits.train.labels, batch_size=tc.batch_size // dist.world_size,
                            epoch=epoch, total_epochs=tc.epochs, seed=tc.seed,
                            images_per_class=tc.cb_images_per_class, num_replicas=dist.world_size, rank=dist.rank)
    dataset = _AugmentedSet(splits.train, build_train_transform(cfg), tc.seed, dist.rank)
    dataset.epoch = epoch
    return torch.utils.data.DataLoader(
        dataset, batch_size=tc.batch_size // dist.world_size, sampler=_KeyedSampler(sampler), drop_last=True,
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


def _check_train_config(cfg: Config, source: str) -> None:
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


def _optimizer(model: nn.Module, tc: TrainConfig) -> torch.optim.SGD:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=tc.lr, momentum=tc.momentum, nesterov=tc.nesterov,
                           weight_decay=tc.weight_decay)


def _freeze_frozen_bn(model: nn.Module) -> None:
    # BN layers of a frozen part keep their running statistics: they belong to the frozen representation
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters()):
            m.eval()


# ----------------------------------------------------------------------------------------------------------------
# One epoch
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class _Amp:
    enabled: bool
    dtype: torch.dtype
    scaler: torch.amp.GradScaler | None


def _amp_for(cfg: Config, device: torch.device) -> _Amp:
    if device.type != "cuda" or not cfg.train.amp:
        return _Amp(False, torch.float32, None)
    if torch.cuda.is_bf16_supported():
        return _Amp(True, torch.bfloat16, None)  # bf16 has fp32's range: no loss scaling needed
    return _Amp(True, torch.float16, torch.amp.GradScaler("cuda"))


def train_one_epoch(model: nn.Module, loader: torch.utils.data.DataLoader, optimizer: torch.optim.Optimizer,
                    cfg: Config, epoch: int, first_step: int, steps_per_epoch: int, device: torch.device,
                    amp: _Amp, dist: _Dist) -> dict[str, float]:
    """Train one epoch; returns {"loss": mean CE, "lr": last lr, "images": count (all ranks), "seconds", "img_s"}."""
    from tqdm import tqdm

    model.train()
    _freeze_frozen_bn(model)
    channels_last = device.type == "cuda" and cfg.train.channels_last
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    seen, step, lr = 0, first_step, cfg.train.lr
    start = time.perf_counter()
    bar = tqdm(loader, total=len(loader), desc=f"epoch {epoch + 1}/{cfg.train.epochs}", unit="batch",
               disable=not dist.is_main, leave=False, dynamic_ncols=True)
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


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints (safetensors + JSON, atomic, no pickle)
# ----------------------------------------------------------------------------------------------------------------


def _rng_state(device: torch.device) -> dict[str, Any]:
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode("ascii"),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    if device.type == "cuda":
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state(device).numpy().tobytes()).decode("ascii")
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(torch.from_numpy(np.frombuffer(base64.b64decode(state["torch"]), dtype=np.uint8).copy()))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if device.type == "cuda" and "cuda" in state:
        raw = np.frombuffer(base64.b64decode(state["cuda"]), dtype=np.uint8).copy()
        torch.cuda.set_rng_state(torch.from_numpy(raw), device)


def _split_optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state dict -> (tensors for safetensors, everything else for JSON)."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _join_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    for idx, entry in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(entry)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(paths: RunPaths, model: nn.Module, optimizer: torch.optim.Optimizer, amp: _Amp,
                    cfg: Config, epoch: int, step: int, history: list[dict], rng: dict[str, Any]) -> Path:
    """Write `checkpoint/epoch-NNNN.safetensors` then its `.json` (the commit point), then drop older checkpoints.

    Args:
        epoch: epochs completed. step: optimisation steps completed.
        rng: RNG states of every rank, {"0": {...}, "1": {...}}.
    """
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    opt_tensors, opt_meta = _split_optimizer_state(optimizer)
    tensors.update(opt_tensors)
    stem = f"epoch-{epoch:04d}"
    st_path = paths.checkpoint / f"{stem}.safetensors"
    tmp = st_path.with_name(f".{st_path.name}.tmp")
    save_file(tensors, str(tmp))
    tmp.replace(st_path)
    meta = {
        "format": CHECKPOINT_FORMAT, "epoch": epoch, "step": step, "config_hash": config_hash(cfg),
        "config": cfg.model_dump(mode="json"), "tensors": st_path.name, "tensors_sha256": sha256_file(st_path),
        "optimizer": opt_meta, "scaler": amp.scaler.state_dict() if amp.scaler is not None else None,
        "rng": rng, "history": history, "saved": utc_now(),
    }
    write_json(paths.checkpoint / f"{stem}.json", meta)
    for old in paths.checkpoint.glob("epoch-*"):
        if not old.name.startswith(stem):
            old.unlink(missing_ok=True)
    return st_path


def _latest_checkpoint(paths: RunPaths) -> dict[str, Any] | None:
    """The newest checkpoint whose JSON parses and whose tensor file matches its sha256, or None."""
    for meta_path in sorted(paths.checkpoint.glob("epoch-*.json"), reverse=True):
        try:
            meta = json.loads(meta_path.read_text())
            st_path = paths.checkpoint / meta["tensors"]
            if st_path.is_file() and sha256_file(st_path) == meta["tensors_sha256"]:
                meta["_tensors_path"] = str(st_path)
                return meta
            log.warning("%s: tensor file missing or changed; trying an older checkpoint", meta_path)
        except (OSError, ValueError, KeyError) as exc:
            log.warning("%s: unreadable checkpoint (%s); trying an older one", meta_path, exc)
    return None


def _check_resume_config(meta: dict[str, Any], cfg: Config, paths: RunPaths) -> None:
    old = _flatten(meta["config"])
    new = _flatten(cfg.model_dump(mode="json"))
    diff = [k for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k) and not any(k == p or k.startswith(p + ".") for p in RESUME_MAY_DIFFER)]
    if diff:
        shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:6])
        raise RunError(f"{paths.checkpoint}: cannot resume with a different recipe ({shown}); resume with the "
                       f"recipe in {paths.run_json} or train into a new --out folder")


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _restore(meta: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer, amp: _Amp,
             dist: _Dist, device: torch.device) -> None:
    from safetensors.torch import load_file

    tensors = load_file(meta["_tensors_path"])
    state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise RunError(f"{meta['_tensors_path']}: does not fit the model of this recipe: {exc}") from None
    optimizer.load_state_dict(_join_optimizer_state(tensors, meta["optimizer"]))
    if amp.scaler is not None and meta.get("scaler"):
        amp.scaler.load_state_dict(meta["scaler"])
    rng = meta["rng"].get(str(dist.rank))
    if rng is None:  # resumed with more processes than before: derive this rank's state instead
        log.warning("checkpoint has no RNG state for rank %d; seeding it from train.seed", dist.rank)
        _seed_everything(int(meta["config"]["train"]["seed"]) + 1000 * dist.rank + int(meta["epoch"]))
    else:
        _set_rng_state(rng, device)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _gather_rng(dist: _Dist, device: torch.device) -> dict[str, Any]:
    mine = _rng_state(device)
    if not dist.enabled:
        return {"0": mine}
    everyone: list[Any] = [None] * dist.world_size
    torch_dist.all_gather_object(everyone, mine)
    return {str(r): s for r, s in enumerate(everyone)}


# ----------------------------------------------------------------------------------------------------------------
# The run directory
# ----------------------------------------------------------------------------------------------------------------


def export_run(paths: RunPaths, model: Classifier, cfg: Config, splits, epochs_done: int,
               train_metrics: dict[str, Any], finished: bool) -> RunInfo:
    """Write `backbone.safetensors`, `heads/joint.*` and `run.json` for the current weights."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.backbone.state_dict().items()}
    tmp = paths.backbone.with_name(f".{paths.backbone.name}.tmp")
    save_file(state, str(tmp), metadata={"backbone": cfg.model.backbone})
    tmp.replace(paths.backbone)
    sha = sha256_file(paths.backbone)
    head = CalibratedHead(
        weight=model.fc.weight.detach().cpu().float().numpy(), bias=model.fc.bias.detach().cpu().float().numpy(),
        method="joint",
        meta={"stage": 1, "sampler": cfg.train.sampler, "epochs": epochs_done, "backbone_sha256": sha,
              "data_fingerprint": splits.fingerprint})
    save_head(head, paths.heads)
    counts = splits.class_counts()
    info = RunInfo(
        config=cfg.model_dump(mode="json"), class_names=list(splits.class_names),
        class_counts=[int(c) for c in counts], many_threshold=cfg.data.many_threshold,
        few_threshold=cfg.data.few_threshold,
        split_sizes={"train": len(splits.train), "val": len(splits.val),
                     "test": len(splits.test) if splits.test is not None else 0},
        data_fingerprint=splits.fingerprint,
        backbone=BackboneInfo(name=cfg.model.backbone, in_chans=cfg.preprocess.channels,
                              num_features=int(model.backbone.num_features), sha256=sha),
        git_commit=git_commit(), created=_created(paths), finished=finished, epochs_done=epochs_done,
        train_metrics=train_metrics)
    write_run(paths.root, info)
    return info


def _created(paths: RunPaths) -> str:
    if paths.run_json.is_file():
        try:
            return read_run(paths.root).created or utc_now()
        except RunError:
            pass
    return utc_now()


def _prepare_out(paths: RunPaths, resume: bool, create: bool) -> None:
    if not resume and (paths.run_json.exists() or any(paths.checkpoint.glob("epoch-*.json"))):
        raise RunError(f"{paths.root}: already holds a run; add --resume to continue it, or choose another --out")
    if create:
        paths.make()


def _summary(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    keys = ("top1", "top5", "many", "medium", "few", "balanced_accuracy", "ece", "n")
    return {head: {k: r.get(k) for k in keys} for head, r in results["heads"].items()}


# ----------------------------------------------------------------------------------------------------------------
# train()
# ----------------------------------------------------------------------------------------------------------------


def train(cfg: Config, out: str | Path, resume: bool = False, *, stop_after_epochs: int | None = None,
          evaluate: bool = True) -> RunInfo:
    """Stage 1: train backbone + linear head with `cfg.train.sampler`; write the run directory `out`.

    Args:
        cfg: the resolved recipe.
        out: run directory (created). An existing run needs `resume=True`.
        resume: continue from the newest valid checkpoint in `out/checkpoint/` (from scratch when there is none).
            The recipe must match the checkpoint's, except num_workers, eval_batch_size, device and rebalance.
        stop_after_epochs: stop once this many epochs are done in total (a deliberate interruption: the run stays
            resumable; used by tests and time-boxed jobs).
        evaluate: evaluate every head on val and test at the end (`ltserve.evaluate.evaluate_run`).

    Returns:
        the RunInfo written to `out/run.json`; `train_metrics` holds per-epoch loss/lr/img/s, wall time,
        throughput and (when evaluated) the val/test summary.

    Raises:
        ConfigError: an inconsistent recipe. RunError: `out` holds a run and resume is False, or the checkpoint's
            recipe differs. DataError: the data set cannot be read.
    """
    paths = RunPaths(out)
    dist, device = _init_distributed(cfg.train.device)
    try:
        return _train(cfg, paths, resume, stop_after_epochs, evaluate, dist, device)
    finally:
        if dist.enabled and torch_dist.is_initialized():
            # The DDP wrapper keeps the process group alive through reference cycles; a group that outlives
            # destroy_process_group is torn down at interpreter exit with gloo's threads still running, which
            # aborts the process ("terminate called without an active exception"). Collect it first.
            gc.collect()
            torch_dist.destroy_process_group()


def _train(cfg: Config, paths: RunPaths, resume: bool, stop_after_epochs: int | None, evaluate: bool,
           dist: _Dist, device: torch.device) -> RunInfo:
    tc = cfg.train
    _check_train_config(cfg, cfg.name)
    if tc.batch_size % dist.world_size:
        raise ConfigError(f"train.batch_size {tc.batch_size} is the global batch and must divide by the "
                          f"{dist.world_size} processes")
    _prepare_out(paths, resume, create=dist.is_main)  # every rank checks, so none waits on a failed rank 0
    dist.barrier()
    _seed_everything(tc.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    splits = load_data(cfg)
    steps_per_epoch = max(1, len(splits.train) // tc.batch_size)  # the samplers' epoch length
    model = build_model(cfg, splits.num_classes).to(device)
    if device.type == "cuda" and tc.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = _optimizer(model, tc)
    amp = _amp_for(cfg, device)
    start_epoch, history = 0, []
    meta = _latest_checkpoint(paths) if resume else None
    if meta is not None:
        _check_resume_config(meta, cfg, paths)
        _restore(meta, model, optimizer, amp, dist, device)
        start_epoch, history = int(meta["epoch"]), list(meta["history"])
        log.info("resuming %s from epoch %d/%d", paths.root, start_epoch, tc.epochs)
    elif resume:
        log.info("%s: no checkpoint to resume from; starting at epoch 0", paths.checkpoint)
    net: nn.Module = nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None) if dist.enabled else model
    log.info("training %s on %s: %s, %d classes, %d images, %d steps/epoch x %d epochs, sampler %s, world %d",
             cfg.name, device, cfg.model.backbone, splits.num_classes, len(splits.train), steps_per_epoch,
             tc.epochs, tc.sampler, dist.world_size)
    last = tc.epochs if stop_after_epochs is None else min(tc.epochs, stop_after_epochs)
    info = None
    for epoch in range(start_epoch, last):
        loader = _make_loader(splits, cfg, dist, epoch, device)
        stats = train_one_epoch(net, loader, optimizer, cfg, epoch, epoch * steps_per_epoch, steps_per_epoch,
                                device, amp, dist)
        history.append(stats)
        rng = _gather_rng(dist, device)
        if dist.is_main:
            log.info("epoch %d/%d: loss %.4f, lr %.4g, %.0f img/s, %.1f s", epoch + 1, tc.epochs, stats["loss"],
                     stats["lr"], stats["img_s"], stats["seconds"])
            save_checkpoint(paths, model, optimizer, amp, cfg, epoch + 1, (epoch + 1) * steps_per_epoch, history,
                            rng)
            info = export_run(paths, model, cfg, splits, epoch + 1, _train_metrics(history, dist, device),
                              finished=False)
        dist.barrier()
    del net  # only rank 0 goes on, with the bare model
    if dist.is_main:
        info = _finish_on_main(cfg, paths, model, splits, history, info, evaluate, dist, device)
    # Every rank stays in the group until rank 0 has evaluated and written run.json: a rank that tears its end
    # of the group down while a peer still holds it can abort either process.
    dist.barrier()
    return info if info is not None else read_run(paths.root)


def _finish_on_main(cfg: Config, paths: RunPaths, model: Classifier, splits: Any, history: list[dict],
                    info: RunInfo | None, evaluate: bool, dist: _Dist, device: torch.device) -> RunInfo:
    """Rank 0 after the last epoch: evaluate (when the run is complete) and write the final run.json."""
    tc = cfg.train
    if info is None:  # nothing left to train (resumed a finished run, or stop_after_epochs already reached)
        info = export_run(paths, model, cfg, splits, len(history), _train_metrics(history, dist, device),
                          finished=False)
    if len(history) < tc.epochs:
        log.info("stopped after epoch %d/%d; continue with --resume", len(history), tc.epochs)
        return info
    metrics = _train_metrics(history, dist, device)
    if evaluate:
        from ltserve.evaluate import evaluate_run

        metrics["eval"] = {}
        for split in ("val", "test"):
            if info.split_sizes.get(split, 0) > 0:
                metrics["eval"][split] = _summary(evaluate_run(paths.root, split))
    info = export_run(paths, model, cfg, splits, len(history), metrics, finished=True)
    log.info("finished %s: %d epochs in %.1f s (%.0f img/s)", paths.root, len(history), metrics["train_seconds"],
             metrics["images_per_second"])
    return info


def _train_metrics(history: list[dict], dist: _Dist, device: torch.device) -> dict[str, Any]:
    seconds = sum(h["seconds"] for h in history)
    images = sum(h["images"] for h in history)
    return {"epochs": history, "train_seconds": seconds, "images_per_second": images / max(seconds, 1e-9),
            "final_loss": history[-1]["loss"] if history else None, "world_size": dist.world_size,
            "device": str(device.type), "torch_threads": torch.get_num_threads()}


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------


def cli(argv: Sequence[str] | None = None) -> int:
    """`ltserve train CONFIG.yaml [--set section.field=value ...] --out runs/NAME [--resume]`."""
    parser = argparse.ArgumentParser(
        prog="ltserve train", description="Stage 1: joint training of backbone + linear head (instance-balanced "
        "by default). Multi-GPU: torchrun --nproc_per_node N -m ltserve.cli train ...")
    parser.add_argument("config", help="recipe YAML, e.g. configs/fashion_lt.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override a config field (repeatable), e.g. --set train.epochs=5")
    parser.add_argument("--out", required=True, help="run directory to write, e.g. runs/fashion_lt")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    parser.add_argument("--stop-after-epochs", type=int, default=None, metavar="N",
                        help="stop (resumably) once N epochs are done, e.g. for time-boxed jobs")
    parser.add_argument("--no-eval", action="store_true", help="skip the val/test evaluation at the end")
    args = parser.parse_args(list(argv) if argv is not None else None)
    cfg = load_config(args.config, args.overrides)
    info = train(cfg, args.out, resume=args.resume, stop_after_epochs=args.stop_after_epochs,
                 evaluate=not args.no_eval)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    m = info.train_metrics
    print(f"run {args.out}: {info.epochs_done}/{cfg.train.epochs} epochs, {m.get('train_seconds', 0):.1f} s, "
          f"{m.get('images_per_second', 0):.0f} img/s, final loss {m.get('final_loss') or float('nan'):.4f}")
    if "eval" in m:
        from ltserve.evaluate import format_table

        for split, heads in m["eval"].items():
            print(f"\n{split} ({next(iter(heads.values()))['n']} images)")
            print(format_table(heads))
    return 0
