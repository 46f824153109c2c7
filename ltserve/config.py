"""Typed configuration for every stage, loaded from YAML recipes in `configs/`.

One `Config` holds a section per stage. Unknown keys are rejected with the valid ones listed;
`--set section.field=value` overrides any field (the value is parsed as YAML: `1e-3`, `[1, 2]`, `null`).
The resolved config is saved beside every artefact (`run.json`).
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ltserve.errors import ConfigError
from ltserve.preprocess import PreprocessSpec

HEAD_NAMES = ("joint", "crt", "tau_norm", "lws", "ncm", "la", "tau_norm+la", "lws+la")
"""Every head name, exactly as used by the CLI, files, reports and model packages."""

STAGE2_HEADS = HEAD_NAMES[1:]

SamplerName = Literal["ib", "cb", "sr", "pb"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LongTailConfig(_Section):
    """Make a long-tailed training set from a balanced one: n_i = floor(n_max * rho^(-i/(C-1)))."""

    rho: float = Field(100.0, ge=1.0, description="imbalance ratio n_max / n_min")
    n_max: int = Field(1000, ge=1, description="images kept for the largest class")
    order: Literal["index", "random"] = "index"
    val_per_class: int = Field(20, ge=0, description="balanced val images per class, from images train did not use")


class DataConfig(_Section):
    """Where the images come from and how they are split.

    source:
      - fashion-mnist: IDX files looked for in `root`, $LTSERVE_DATA, /usr/share/datasets/fashion-mnist, user cache.
      - imagefolder: `train` (and optional `val`, `test`) are folders `<class>/<image>`, relative to `root`.
      - list: `train` (and optional `val`, `test`) are split list files `relative/path label`, paths joined to
        `root`; class names from the optional `names` file (one per line, in label order).
    """

    source: Literal["fashion-mnist", "imagefolder", "list"] = "fashion-mnist"
    root: str | None = None
    train: str | None = None
    val: str | None = None
    test: str | None = None
    names: str | None = None
    longtail: LongTailConfig | None = None
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="stratified val split when no val is given")
    test_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="stratified test split when no test is given")
    split_seed: int = 0
    many_threshold: int = Field(100, description="many-shot: more than this many training images")
    few_threshold: int = Field(20, description="few-shot: fewer than this many training images")
    max_train_images: int | None = Field(None, description="cap on training images (tiny runs and tests)")
    max_test_images: int | None = Field(None, description="cap on test images, stratified (tiny runs and tests)")


class AugmentConfig(_Section):
    """Training-time augmentation (evaluation always uses `preprocess` exactly)."""

    random_resized_crop: bool = False
    scale_min: float = 0.08
    pad_crop: int = Field(0, ge=0, description="pad by this many pixels, then random crop back (CIFAR style)")
    hflip: bool = True
    color_jitter: float = Field(0.0, ge=0.0)


class ModelConfig(_Section):
    """The backbone (pooled features) and its linear head."""

    backbone: str = "resnet8_cifar"
    pretrained: str | None = Field(None, description="local weights file: .safetensors, or .pth (weights_only)")
    trainable: Literal["all", "last_block"] = "all"
    drop_rate: float = 0.0


class TrainConfig(_Section):
    """Stage 1: joint training of backbone and linear head."""

    epochs: int = Field(30, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(0.1, gt=0.0)
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: Literal["cosine", "step"] = "cosine"
    milestones: list[int] = Field(default_factory=list, description="step decay: epochs at which lr *= gamma")
    gamma: float = 0.1
    warmup_epochs: int = Field(0, ge=0)
    sampler: SamplerName = "ib"
    cb_images_per_class: int = Field(4, ge=1, description="class-balanced sampler: consecutive images per class")
    seed: int = 0
    num_workers: int = Field(0, ge=0)
    amp: bool = True
    channels_last: bool = True
    device: Literal["auto", "cpu", "cuda"] = "auto"
    eval_batch_size: int = 256


class CrtConfig(_Section):
    epochs: int = 10
    lr: float = 0.2
    batch_size: int = 512
    weight_decay: float = 5e-4
    momentum: float = 0.9
    sampler: SamplerName = Field("cb", description="stage-2 sampler (the paper: class-balanced)")
    images_per_class: int = Field(4, ge=1, description="class-balanced sampler: consecutive images per class")


class LwsConfig(_Section):
    epochs: int = 5
    lr: float = 0.2
    batch_size: int = 512
    weight_decay: float = 5e-4
    momentum: float = 0.9
    sampler: SamplerName = Field("cb", description="stage-2 sampler (the paper: class-balanced)")
    images_per_class: int = Field(4, ge=1, description="class-balanced sampler: consecutive images per class")


class TauNormConfig(_Section):
    tau: float | None = Field(None, description="fixed tau; None sweeps tau_grid on val")
    tau_grid: list[float] = Field(default_factory=lambda: [round(0.1 * i, 1) for i in range(21)])
    keep_bias: bool = False


class NcmConfig(_Section):
    metric: Literal["euclidean", "cosine"] = "euclidean"


class LaConfig(_Section):
    tau_la: float | None = Field(None, description="fixed tau_la; None sweeps tau_grid on val")
    tau_grid: list[float] = Field(default_factory=lambda: [round(0.1 * i, 1) for i in range(31)])
    target_prior: str = Field("uniform", description="uniform | train | path to a file of C class weights")


class RebalanceConfig(_Section):
    """Stage 2: re-balance the classifier on cached features of the frozen backbone."""

    heads: list[str] = Field(default_factory=lambda: list(STAGE2_HEADS))
    calibrate: bool = Field(True, description="fit a temperature on val for every head")
    use_cache: bool = True
    cache_dtype: Literal["float16", "float32"] = "float16"
    seed: int = 0
    crt: CrtConfig = Field(default_factory=CrtConfig)
    lws: LwsConfig = Field(default_factory=LwsConfig)
    tau_norm: TauNormConfig = Field(default_factory=TauNormConfig)
    ncm: NcmConfig = Field(default_factory=NcmConfig)
    la: LaConfig = Field(default_factory=LaConfig)

    @model_validator(mode="after")
    def _check_heads(self) -> "RebalanceConfig":
        for name in self.heads:
            if name not in STAGE2_HEADS:
                raise ValueError(unknown_choice("rebalance.heads", name, STAGE2_HEADS))
        return self


class Config(_Section):
    """A whole recipe: data -> preprocess/augment -> model -> stage 1 -> stage 2."""

    name: str = "run"
    data: DataConfig = Field(default_factory=DataConfig)
    preprocess: PreprocessSpec = Field(default_factory=PreprocessSpec)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    rebalance: RebalanceConfig = Field(default_factory=RebalanceConfig)


def unknown_choice(field: str, value: str, choices: tuple[str, ...] | list[str]) -> str:
    """Message for a value outside its choices, with the closest valid one suggested."""
    msg = f"{field} {value!r} is not one of {', '.join(choices)}"
    close = difflib.get_close_matches(value, list(choices), n=1)
    return msg + (f"; did you mean {close[0]!r}?" if close else "")


def _format_validation_error(source: str, err: ValidationError, model: type[BaseModel]) -> str:
    lines = [f"{source}: invalid configuration"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            valid = _valid_keys(model, [str(p) for p in e["loc"][:-1]])
            key = str(e["loc"][-1])
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            lines.append(f"  {loc}: unknown key{hint} (valid keys: {', '.join(valid)})")
        else:
            lines.append(f"  {loc}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def _valid_keys(model: type[BaseModel], path: list[str]) -> list[str]:
    for part in path:
        field = model.model_fields.get(part)
        ann = getattr(field, "annotation", None)
        sub = next((a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)),
                   None)
        if sub is None:
            return []
        model = sub
    return sorted(model.model_fields)


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one `section.field=value` override to a raw config dict, in place."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected section.field=value, e.g. train.epochs=5")
    key, value = assignment.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {assignment!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(value) if value.strip() else None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Load a YAML recipe, apply `--set` overrides, validate.

    Args:
        path: a YAML file, or None for the defaults.
        overrides: `section.field=value` strings.

    Raises:
        ConfigError: the file is missing or not YAML, or a key or value is invalid (the message lists valid keys).
    """
    raw: dict[str, Any] = {}
    source = str(path) if path else "<defaults>"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found (recipes are in configs/, e.g. configs/fashion_lt.yaml)")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections (data, model, train, ...)")
    for assignment in overrides or []:
        apply_override(raw, assignment)
    return config_from_dict(raw, source)


def config_from_dict(raw: dict[str, Any], source: str = "<dict>") -> Config:
    """Validate a raw dict (e.g. `run.json`'s resolved config) into a `Config`."""
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(source, exc, Config)) from None


def config_hash(cfg: Config) -> str:
    """sha256 of the resolved config's canonical JSON (first 16 hex digits)."""
    blob = json.dumps(cfg.model_dump(mode="json"), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
