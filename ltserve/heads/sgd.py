"""The stage-2 training loop shared by crt and lws: a small module on frozen features, class-balanced batches.

Batches are index batches from `ltserve.samplers.build_sampler` over the training labels, so the same sampler that
stage 1 uses draws stage 2's batches; the features of a batch come from a `FeatureSource`: the cache (rows of one
(N, D) tensor) or, with `--no-cache`, augmented images sent through the frozen backbone
(`ltserve.rebalance.augmented`).
SGD with momentum, lr cosine-annealed per step to 0 (no epoch at lr 0, unlike the official scheduler), one val
evaluation per epoch; the best epoch on val wins (ties go to the earlier epoch).

torch is imported inside the functions that run: the settings classes and the registry that lists crt and lws are
read by `ltserve.config`, which must stay cheap to import and free of torch.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Protocol

import numpy as np
from pydantic import Field

from ltserve.heads.common import HeadFitter, MethodSettings, ValScorer, check_features, class_counts, recorded
from ltserve.heads.head import CalibratedHead
from ltserve.samplers import SamplerKind, build_sampler

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)


class FeatureSource(Protocol):
    """Where the training batches' features come from."""

    num_features: int
    kind: str  # "cached" or "augmented"

    def iter_epoch(self, batches: list[np.ndarray], epoch: int) -> Iterator[torch.Tensor]:
        """Features (B, D) float32 on the training device for each index batch of epoch `epoch`, in order."""
        ...


class CachedSource:
    """Rows of the cached (N, D) training features, held once on the device as float32."""

    kind = "cached"

    def __init__(self, features: np.ndarray, device: torch.device | str = "cpu"):
        import torch

        self.features = torch.as_tensor(np.asarray(features, dtype=np.float32), device=device)
        self.num_features = int(self.features.shape[1])

    def iter_epoch(self, batches: list[np.ndarray], epoch: int) -> Iterator[torch.Tensor]:
        import torch

        for idx in batches:
            yield self.features[torch.as_tensor(idx, device=self.features.device)]


def as_source(train_features: Any, device: torch.device | str) -> FeatureSource:
    """A FeatureSource as is, or an (N, D) array wrapped as the cached source."""
    if hasattr(train_features, "iter_epoch") and hasattr(train_features, "num_features"):
        return train_features
    return CachedSource(train_features, device)


def epoch_batches(labels: np.ndarray, *, sampler: str, batch_size: int, epoch: int, total_epochs: int, seed: int,
                  images_per_class: int) -> list[np.ndarray]:
    """The index batches of one epoch from `ltserve.samplers.build_sampler`: max(1, floor(N / batch)) batches.

    Returns:
        a list of (batch_size,) int64 index arrays into the training set.
    """
    s = build_sampler(sampler, np.asarray(labels), batch_size=batch_size, epoch=epoch, total_epochs=total_epochs,
                      seed=seed, images_per_class=images_per_class)
    return list(s.batches())


def cosine_lr(base_lr: float, step: int, total_steps: int) -> float:
    """lr at `step` (0-based) of `total_steps`, annealed from base_lr towards 0 by a half cosine."""
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * step / max(total_steps, 1)))


def train_on_features(model: nn.Module, source: FeatureSource, labels: np.ndarray, val_features: torch.Tensor,
                      scorer: ValScorer, *, epochs: int, lr: float, batch_size: int, weight_decay: float,
                      momentum: float, sampler: str, images_per_class: int, seed: int, desc: str,
                      progress: bool = True) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]], int]:
    """Train `model` (features -> logits) and keep its best epoch on val.

    Args:
        model: maps (B, D) features to (B, C) logits; its trainable parameters are optimised.
        source: training features by index.
        labels: (N,) training labels.
        val_features: (M, D) float32 val features on the training device.
        scorer: scores val logits (selection score and Many/Medium/Few/All).
        epochs, lr, batch_size, weight_decay, momentum: the optimiser recipe (cosine lr per step).
        sampler: the stage-2 sampler ("cb" in the paper).
        images_per_class: consecutive images per drawn class (class-balanced sampler).
        seed: the sampler seed (epoch e uses its own permutation of it).
        desc: progress bar label.

    Returns:
        (best state_dict, per-epoch curve, best epoch (1-based)); the curve has one dict per epoch
        {epoch, train_loss, lr, score, top1, balanced_accuracy, many, medium, few}.
    """
    import torch
    from torch.nn import functional as F
    from ltserve.progress import progress_bar

    device = val_features.device
    y_all = torch.as_tensor(np.asarray(labels, dtype=np.int64), device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    plan = [epoch_batches(labels, sampler=sampler, batch_size=batch_size, epoch=e, total_epochs=epochs, seed=seed,
                          images_per_class=images_per_class) for e in range(epochs)]
    total = sum(len(p) for p in plan)
    curve: list[dict[str, Any]] = []
    best_state: dict[str, torch.Tensor] = {}
    best_score, best_epoch, step = -math.inf, 0, 0
    bar = progress_bar(total=total, desc=desc, unit="step", enabled=progress)  # none redrawn into logs
    for epoch, batches in enumerate(plan):
        model.train()
        losses = []
        for idx, x in zip(batches, source.iter_epoch(batches, epoch)):
            for group in opt.param_groups:
                group["lr"] = cosine_lr(lr, step, total)
            loss = F.cross_entropy(model(x), y_all[torch.as_tensor(idx, device=device)])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            step += 1
            bar.update(1)
        model.eval()
        with torch.no_grad():
            val_logits = model(val_features).float().cpu().numpy()
        point = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "lr": opt.param_groups[0]["lr"],
                 **scorer(val_logits)}
        curve.append(point)
        if point["score"] > best_score:
            best_score, best_epoch = point["score"], epoch + 1
            best_state = copy.deepcopy({k: v.detach() for k, v in model.state_dict().items()})
        bar.set_postfix(val=f"{point['score']:.3f}", best=best_epoch)
    bar.close()
    return best_state, curve, best_epoch


def resolve_device(device: str | torch.device | None) -> torch.device:
    """"auto"/None -> cuda when available else cpu; anything else as given."""
    import torch

    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class SgdSettings(MethodSettings):
    """Settings of the heads trained with SGD on features (crt, lws).

    Attributes:
        epochs: training epochs; each has floor(N / batch_size) steps.
        lr: initial lr, cosine-annealed per step to 0.
        batch_size: images per step.
        weight_decay, momentum: SGD settings.
        sampler: stage-2 sampler ("cb", class-balanced, in the paper).
        images_per_class: consecutive images per drawn class for "cb".
    """

    epochs: int = Field(10, ge=1)
    lr: float = Field(0.2, gt=0.0)
    batch_size: int = Field(512, ge=1)
    weight_decay: float = 5e-4
    momentum: float = 0.9
    sampler: SamplerKind = Field("cb", description="stage-2 sampler (the paper: class-balanced)")
    images_per_class: int = Field(4, ge=1, description="class-balanced sampler: consecutive images per class")


class SgdFitter(HeadFitter):
    """A head method that trains a small torch module on features with `SgdSettings` (crt, lws)."""

    Settings = SgdSettings

    def fit_module(self, model: nn.Module, train_features: Any, train_labels: np.ndarray, base_head: Any,
                   val: tuple[np.ndarray, np.ndarray]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Check the inputs, train `model` (features (N, D) -> logits (N, C)) with this recipe, keep its best epoch.

        Args:
            model: the trainable head; C and D come from `base_head.weight` (C, D).
            train_features: (N, D) cached features, or a FeatureSource (`--no-cache`).
            train_labels: (N,) labels.
            val: (features (M, D), labels (M,)); picks the best epoch.

        Returns:
            (the best epoch's state dict, meta: recipe, seed, best_epoch, selection_metric, epochs_curve, features,
            fit_seconds).
        """
        import torch

        start = time.perf_counter()
        c, d = base_head.weight.shape
        device = resolve_device(self.device)
        if isinstance(train_features, np.ndarray):
            train_features, train_labels = check_features(train_features, train_labels, c, d, "train")
        counts = class_counts(train_labels, c)
        vx, vy = check_features(*val, num_classes=c, num_features=d, where="val")
        scorer = ValScorer(vy, counts, self.many_threshold, self.few_threshold)
        source = as_source(train_features, device)
        recipe = self.settings
        state, curve, best = train_on_features(
            model.to(device), source, train_labels, torch.as_tensor(vx, device=device), scorer, epochs=recipe.epochs,
            lr=recipe.lr, batch_size=recipe.batch_size, weight_decay=recipe.weight_decay, momentum=recipe.momentum,
            sampler=recipe.sampler, images_per_class=recipe.images_per_class, seed=self.seed, desc=self.name,
            progress=self.progress)
        log.info("%s: best epoch %d/%d, val %s %.4f (%s features)", self.name, best, recipe.epochs, scorer.metric,
                 curve[best - 1]["score"], source.kind)
        meta = {**recipe.model_dump(mode="json"), "seed": self.seed, "best_epoch": best,
                "selection_metric": scorer.metric, "epochs_curve": curve, "features": source.kind,
                "fit_seconds": time.perf_counter() - start}
        return state, meta


def params(head: CalibratedHead) -> dict[str, Any]:
    """model.json's record of a head trained on features (crt, lws): its best epoch and the val metric that chose it."""
    return recorded(head, ("best_epoch", "selection_metric"))


def chosen(meta: Mapping[str, Any]) -> list[str]:
    """What val chose, in words: ["epoch 8/10"]."""
    return [f"epoch {meta['best_epoch']}/{meta['epochs']}"] if "best_epoch" in meta else []
