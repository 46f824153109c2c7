"""Frozen-backbone features: images -> model input -> pooled (N, D) features, in eval mode, without gradients.

Images go through exactly `ltserve.preprocess.transform_image` + `to_model_input` (what the model package serves);
for in-memory arrays that are already model-sized (Fashion-MNIST at 28 px) that transform is the identity and is
skipped.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
from torch import nn

from ltserve.preprocess import PreprocessSpec, arrays_are_model_sized, to_model_input, transform_image
from ltserve.progress import progress_bar

if TYPE_CHECKING:
    from ltserve.data import ImageSet

class _ImagesForModel(torch.utils.data.Dataset):
    """Item i -> uint8 (crop, crop, C): `transform_image(load(i))`, or a custom transform (e.g. training augment)."""

    def __init__(self, imageset: "ImageSet", spec: PreprocessSpec, transform: Callable | None):
        self.imageset, self.spec, self.transform = imageset, spec, transform

    def __len__(self) -> int:
        return len(self.imageset)

    def __getitem__(self, i: int) -> np.ndarray:
        if self.transform is None:
            return transform_image(self.imageset.load(i), self.spec)
        if hasattr(self.transform, "load"):  # ltserve.data.TrainTransform: takes the in-memory fast path itself
            return self.transform.load(self.imageset, i)
        return self.transform(self.imageset.load(i))


def _batches(imageset: "ImageSet", spec: PreprocessSpec, batch_size: int, transform: Callable | None,
             num_workers: int):
    """Float32 NCHW model-input batches of the whole image set, in order."""
    n = len(imageset)
    if transform is None and imageset.arrays is not None and arrays_are_model_sized(imageset.arrays, spec):
        # transform_image is the identity here (same size, grey -> grey or replicated RGB): skip Pillow
        for start in range(0, n, batch_size):
            chunk = imageset.arrays[start:start + batch_size]
            if chunk.ndim == 3:
                chunk = chunk[..., None]
            if chunk.shape[3] != spec.channels:
                chunk = np.repeat(chunk, spec.channels, axis=3)
            yield torch.from_numpy(to_model_input(chunk, spec))
        return
    loader = torch.utils.data.DataLoader(
        _ImagesForModel(imageset, spec, transform), batch_size=batch_size, shuffle=False, num_workers=num_workers,
        collate_fn=functools.partial(_stack, spec=spec))
    yield from loader


def _stack(items: list[np.ndarray], spec: PreprocessSpec) -> torch.Tensor:
    return torch.from_numpy(to_model_input(items, spec))



def collate_uint8(spec: PreprocessSpec) -> Callable[[list[tuple[np.ndarray, int]]], tuple[torch.Tensor, torch.Tensor]]:
    """Batch collation of (uint8 HWC image, label) items: `to_model_input` float32 NCHW tensor, int64 labels."""

    def collate(items: list[tuple[np.ndarray, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        return _stack([a for a, _ in items], spec), torch.as_tensor([y for _, y in items], dtype=torch.int64)

    return collate


@torch.no_grad()
def extract_features(backbone: nn.Module, imageset: "ImageSet", spec: PreprocessSpec, batch_size: int = 256,
                     device: str | torch.device = "cpu", transform: Callable | None = None,
                     num_workers: int = 0, progress: bool = True) -> np.ndarray:
    """Pooled features of every image of `imageset`, in order, with the backbone in eval mode.

    Args:
        backbone: a module with `forward_features` and `forward_head(x, pre_logits=True)` (ltserve.features.backbones).
        imageset: an `ltserve.data.ImageSet`.
        spec: the run's preprocessing (resize, crop, mean/std, channels).
        batch_size: images per forward pass.
        device: where the backbone runs (it is moved there).
        transform: PIL image -> uint8 (crop, crop, C) instead of `transform_image` (e.g.
            `ltserve.data.build_train_transform(cfg)` for augmented features); None for the serving transform.
        num_workers: DataLoader processes decoding files (0: in this process).
        progress: show a progress bar (on a terminal).

    Returns:
        (N, D) float32 features.
    """
    device = torch.device(device)
    was_training = backbone.training
    backbone = backbone.to(device).eval()
    out: list[np.ndarray] = []
    total = -(-len(imageset) // batch_size)
    try:
        for x in progress_bar(_batches(imageset, spec, batch_size, transform, num_workers), total=total,
                              unit="batch", desc="features", enabled=progress and total >= 2):
            x = x.to(device, non_blocking=True)
            feats = backbone.forward_head(backbone.forward_features(x), pre_logits=True)
            out.append(feats.float().cpu().numpy())
    finally:
        backbone.train(was_training)
    if not out:
        return np.zeros((0, int(getattr(backbone, "num_features", 0))), dtype=np.float32)
    return np.ascontiguousarray(np.concatenate(out), dtype=np.float32)
