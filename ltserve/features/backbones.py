"""Backbones that expose pooled features, and the linear head on top.

Every backbone mirrors timm's interface: `forward_features(x)` (unpooled maps), `forward_head(x, pre_logits=True)`
(pooled (N, D) features: what stage 2 fits on), `num_features` (D). The classifier is a separate `nn.Linear`, so the
representation (`backbone.safetensors`) and the head (`heads/*.safetensors`) are saved apart: the decoupled checkpoint.

Names: the CIFAR-style ResNets for 28-32 px images (`resnet8_cifar`, `resnet20_cifar`, `resnet32_cifar`), the paper's
`resnet10` (BasicBlock [1, 1, 1, 1], 512-d), and any timm architecture by name (`resnet50`, `resnext50_32x4d`, ...).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from ltserve.errors import ConfigError, RunError, unknown_choice
from ltserve.features.hub import HUB_NAME_FORMS, download_weights, hub_weights
from ltserve.rundir import Run, open_run

log = logging.getLogger(__name__)


class _CifarBlock(nn.Module):
    """3x3-3x3 residual block; a 1x1 projection shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for small images (He et al. 2016, CIFAR variant): 3 stages of widths 16/32/64, D = 64 * width.

    Input (N, in_chans, H, W) with H, W around 28-32; features (N, 64 * width).
    """

    def __init__(self, blocks_per_stage: int, in_chans: int = 3, width: int = 1, drop_rate: float = 0.0):
        super().__init__()
        widths = [16 * width, 32 * width, 64 * width]
        self.stem = nn.Sequential(nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU(inplace=True))
        stages, cin = [], widths[0]
        for i, cout in enumerate(widths):
            blocks = []
            for b in range(blocks_per_stage):
                blocks.append(_CifarBlock(cin, cout, stride=2 if (i > 0 and b == 0) else 1))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.num_features = widths[-1]
        self.drop_rate = drop_rate
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = True) -> torch.Tensor:
        # adaptive pooling: any input size works (the official code's AvgPool2d(7) hard-wired 224 px)
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return F.dropout(x, self.drop_rate, self.training) if self.drop_rate else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def last_block(self) -> nn.Module:
        return self.stages[-1]


def _cifar(n: int) -> Callable[..., nn.Module]:
    return lambda in_chans, drop_rate: CifarResNet(n, in_chans=in_chans, drop_rate=drop_rate)


def _resnet10(in_chans: int, drop_rate: float) -> nn.Module:
    from timm.models.resnet import BasicBlock, ResNet

    return ResNet(block=BasicBlock, layers=(1, 1, 1, 1), num_classes=0, in_chans=in_chans, drop_rate=drop_rate)


BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "resnet8_cifar": _cifar(1),
    "resnet20_cifar": _cifar(3),
    "resnet32_cifar": _cifar(5),
    "resnet10": _resnet10,
}
"""ltserve's own backbones; any other name is looked up in timm."""


def create_backbone(name: str, in_chans: int = 3, pretrained: str | Path | None = None,
                    drop_rate: float = 0.0) -> nn.Module:
    """Build a feature extractor by name.

    Args:
        name: one of `BACKBONES` or a timm architecture name.
        in_chans: input channels (1 for grey images).
        pretrained: a local weights file (.safetensors, or .pth/.pt read with `torch.load(weights_only=True)`), or
            a hub name (`hf-hub:ORG/NAME[@REVISION]` or a timm pretrained tag such as `resnet18.a1_in1k`) whose
            safetensors file is downloaded into huggingface_hub's cache (`ltserve.features.hub`).
        drop_rate: dropout on the pooled features.

    Returns:
        a module with `num_features`, `forward_features`, `forward_head(x, pre_logits=True) -> (N, num_features)`.

    Raises:
        ConfigError: unknown name (lists ltserve's names and how to list timm's), unreadable weights, or a hub
            that cannot be reached for weights not yet in the cache.
    """
    if name in BACKBONES:
        model = BACKBONES[name](in_chans, drop_rate)
    else:
        import timm

        if not timm.is_model(name):
            raise ConfigError(unknown_choice("model.backbone", name, list(BACKBONES))
                              + " (or any timm architecture: python -c 'import timm; print(timm.list_models())')")
        # pretrained=False: timm's own loader may unpickle .pth files; load_pretrained reads safetensors itself
        model = timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_chans, drop_rate=drop_rate)
    if pretrained:
        load_pretrained(model, pretrained)
    return model


def _read_state_dict(path: Path, name: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ConfigError(f"model.pretrained: {name}: no such file, and not {HUB_NAME_FORMS}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"model.pretrained: cannot read {name} ({exc}); give a .safetensors file or a .pth holding "
                          "a plain state dict (loaded with weights_only=True, no pickled objects)") from exc
    for key in ("state_dict", "model", "state_dict_ema"):  # common checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise ConfigError(f"model.pretrained: {name} does not hold a state dict")
    if all(k.startswith("module.") for k in state):  # DataParallel/DDP prefix, stripped whole (not filtered)
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_pretrained(model: nn.Module, path: str | Path) -> tuple[list[str], list[str]]:
    """Load weights into `model`, reporting missing and unexpected keys instead of hiding them.

    Classifier weights in the file (fc.*, head.*, classifier.*) show up as unexpected: ltserve's head is separate.

    Args:
        model: the backbone.
        path: a local file, or a hub name (`ltserve.features.hub`: downloaded once, then read from the cache; hub
            weights are safetensors only).

    Returns:
        (missing keys, unexpected keys).

    Raises:
        ConfigError: unreadable weights, shapes that do not fit the model, or a hub problem (see `download_weights`).
    """
    hub = hub_weights(str(path))
    file = download_weights(hub) if hub is not None else Path(path)
    state = _read_state_dict(file, str(path))
    own = model.state_dict()
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if mismatched:
        raise ConfigError(f"model.pretrained: {path}: shape mismatch for {', '.join(mismatched[:5])}"
                          f"{' ...' if len(mismatched) > 5 else ''} (wrong architecture or in_chans?)")
    result = model.load_state_dict(state, strict=False)
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if missing:
        log.warning("pretrained %s: %d missing keys (left at init): %s", path, len(missing), ", ".join(missing[:8]))
    if unexpected:
        log.warning("pretrained %s: %d unexpected keys (ignored): %s", path, len(unexpected),
                    ", ".join(unexpected[:8]))
    log.info("pretrained %s: loaded %d tensors", path, len(state) - len(unexpected))
    return missing, unexpected


def last_block(backbone: nn.Module) -> nn.Module:
    """The backbone's last stage (trained alone with `model.trainable: last_block`, the Places-LT recipe)."""
    if hasattr(backbone, "last_block"):
        return backbone.last_block()
    if isinstance(getattr(backbone, "layer4", None), nn.Module):  # timm ResNet / ResNeXt
        return backbone.layer4
    stages = getattr(backbone, "stages", None)  # timm ConvNeXt, RegNet, ...
    if isinstance(stages, nn.Sequential):
        return stages[-1]
    raise ConfigError(f"model.trainable: last_block is not supported for {type(backbone).__name__}; use 'all'")


def set_trainable(backbone: nn.Module, trainable: str) -> None:
    """Freeze all backbone parameters except the last block when `trainable == "last_block"`."""
    if trainable == "all":
        return
    keep = {id(p) for p in last_block(backbone).parameters()}
    for p in backbone.parameters():
        p.requires_grad_(id(p) in keep)


class Classifier(nn.Module):
    """Backbone + linear head: logits = fc(pooled features). Input NCHW float, output (N, C)."""

    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.fc = nn.Linear(backbone.num_features, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C_in, H, W) -> (N, D) pooled features."""
        return self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def load_run_backbone(run: Run | str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The frozen stage-1 backbone of a run, in eval mode (BN statistics frozen).

    Raises:
        RunError: run.json or backbone.safetensors missing, or the weights do not fit the architecture.
    """
    from safetensors.torch import load_file

    run = open_run(run)
    path = run.paths.backbone
    if not path.is_file():
        raise RunError(f"{path}: not found; the run has not finished an epoch "
                       f"(resume it with `ltserve train ... --out {run.root} --resume`)")
    info = run.info.backbone
    backbone = create_backbone(info.name, in_chans=info.in_chans)
    result = backbone.load_state_dict(load_file(str(path)), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise RunError(f"{path}: does not match backbone {info.name!r} "
                       f"(missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]})")
    return backbone.to(device).eval()
