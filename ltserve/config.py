"""Typed configuration for every stage, loaded from YAML recipes in `configs/`.

One `Config` holds a section per stage. Unknown keys are rejected with the valid ones listed;
`--set section.field=value` overrides any field (the value is parsed as YAML: `1e-3`, `[1, 2]`, `null`).
The resolved config is saved beside every artefact (`run.json`).

The stage-2 section `rebalance` holds the common settings and one sub-section per registered head method
(`rebalance.crt`, `rebalance.tau_norm`, ...): their schemas and defaults are the methods' own settings classes, read
from the head registry (`ltserve.heads.HEADS`), so a method's defaults live in one place.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from ltserve.errors import ConfigError, unknown_choice
from ltserve.heads.registry import HEADS
from ltserve.preprocess import PreprocessSpec
from ltserve.samplers import SamplerKind


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


LONGTAIL_ORDERS = ("index", "random", "reversed")
"""The keyword values of `data.longtail.order`; the other value is a list of class names, head to tail."""


class LongTailConfig(_Section):
    """Make a long-tailed training set from a balanced one: the i-th class of `order` keeps
    n_i = floor(n_max * rho^(-i/(C-1))) images.

    order: "index" (class 0 largest, class C-1 smallest), "reversed" (class C-1 largest), "random" (a permutation
    seeded by data.split_seed), or the class names head to tail (which classes are rare is the user's choice);
    every class named exactly once, checked against the data set's classes when it is read.
    """

    rho: float = Field(100.0, ge=1.0, description="imbalance ratio n_max / n_min")
    n_max: int = Field(1000, ge=1, description="images kept for the largest class")
    order: Literal["index", "random", "reversed"] | list[str] = Field(
        "index", description="index | reversed | random | class names, head (most images) to tail")
    val_per_class: int = Field(20, ge=0, description="balanced val images per class, from images train did not use")

    @field_validator("order", mode="before")
    @classmethod
    def _check_order(cls, value: Any) -> Any:
        # one message that names the field and the choices, instead of pydantic's error per union member
        field = "data.longtail.order"
        if isinstance(value, str):
            if value not in LONGTAIL_ORDERS:
                raise PydanticCustomError("section", "{msg}", {"msg": unknown_choice(
                    field, value, LONGTAIL_ORDERS) + "; or list the class names, head to tail"})
            return value
        if not isinstance(value, (list, tuple)) or not value:
            raise PydanticCustomError("section", "{msg}", {"msg": f"{field}: expected one of "
                                      f"{', '.join(LONGTAIL_ORDERS)} or a non-empty list of class names, head to "
                                      f"tail (got {value!r})"})
        # label numbers name the classes of a split list without a names file; YAML reads them as ints
        names = [str(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value]
        if not all(isinstance(n, str) and n for n in names):
            raise PydanticCustomError("section", "{msg}", {"msg": f"{field}: class names must be non-empty strings "
                                      f"(got {value!r})"})
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise PydanticCustomError("section", "{msg}", {"msg": f"{field}: {', '.join(map(repr, repeated))} named "
                                      "more than once; name every class exactly once, head to tail"})
        return names


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
    held_out_classes: list[str] = Field(default_factory=list, description="classes kept out of training: removed "
                                        "from train, val and test (the other classes are renumbered in order); "
                                        "their test images are near unknowns for open-set evaluation "
                                        "(`Splits.held_out`)")
    open_set: str | None = Field(None, description="images no class covers (a folder, or a list of paths) for "
                                 "`ltserve evaluate models/NAME --data ...` open-set figures when --open-set is not "
                                 "given")


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
    pretrained: str | None = Field(None, description="local weights file (.safetensors, or .pth read with "
                                   "weights_only), or a hub name: hf-hub:ORG/NAME[@REVISION] or a timm pretrained tag "
                                   "(e.g. resnet18.a1_in1k), downloaded once into huggingface_hub's cache "
                                   "(safetensors only)")
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
    sampler: SamplerKind = "ib"
    cb_images_per_class: int = Field(4, ge=1, description="class-balanced sampler: consecutive images per class")
    seed: int = 0
    num_workers: int = Field(0, ge=0)
    amp: bool = True
    channels_last: bool = True
    device: Literal["auto", "cpu", "cuda"] = "auto"
    eval_batch_size: int = 256


class RebalanceConfig(_Section):
    """Stage 2: re-balance the classifier on cached features of the frozen backbone.

    Besides the fields below, one section per registered method (`crt`, `tau_norm`, `lws`, `ncm`, `la`, ...),
    validated by that method's settings class; a missing section takes the method's defaults.
    """

    model_config = ConfigDict(extra="allow")  # the method sections: checked against the registry below

    heads: list[str] = Field(default_factory=HEADS.stage2)
    calibrate: bool = Field(True, description="fit a temperature on val for every head")
    target_prior: str = Field("uniform", description="uniform | train | path to a file of C class weights, added "
                                                     "as log prior to every head's bias")
    use_cache: bool = True
    cache_dtype: Literal["float16", "float32"] = "float16"
    seed: int = 0

    @model_validator(mode="before")
    @classmethod
    def _legacy_target_prior(cls, raw: Any) -> Any:
        # runs written before the target prior became a common field kept it in the la section
        if isinstance(raw, dict) and isinstance(raw.get("la"), dict) and "target_prior" in raw["la"]:
            la = dict(raw["la"])
            raw = {"target_prior": la.pop("target_prior"), **raw, "la": la}
        return raw

    @model_validator(mode="after")
    def _check(self) -> "RebalanceConfig":
        for name in self.heads:
            if name not in HEADS.stage2():
                raise PydanticCustomError("section", "{msg}", {"msg": unknown_choice("rebalance.heads", name,
                                                                                      HEADS.stage2())})
        sections = HEADS.sections()
        extra = self.__pydantic_extra__ if self.__pydantic_extra__ is not None else {}
        for key in list(extra):
            if key not in sections:
                raise PydanticCustomError("unknown_section", "{msg}", {"msg": _unknown_key_message(
                    "rebalance", key, sorted([*type(self).model_fields, *sections]))})
        for section, settings in sections.items():
            value = extra.get(section)
            if not isinstance(value, settings):
                try:
                    extra[section] = settings.model_validate(value if value is not None else {})
                except ValidationError as exc:
                    raise PydanticCustomError("section", "{msg}", {"msg": "; ".join(
                        _error_lines(f"rebalance.{section}", exc, settings))}) from None
        return self

    def section(self, name: str) -> BaseModel:
        """The settings of section `name` (e.g. "crt")."""
        return getattr(self, name)


class Config(_Section):
    """A whole recipe: data -> preprocess/augment -> model -> stage 1 -> stage 2."""

    name: str = "run"
    data: DataConfig = Field(default_factory=DataConfig)
    preprocess: PreprocessSpec = Field(default_factory=PreprocessSpec)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    rebalance: RebalanceConfig = Field(default_factory=RebalanceConfig)


def _format_validation_error(source: str, err: ValidationError, model: type[BaseModel]) -> str:
    return "\n".join([f"{source}: invalid configuration", *(f"  {line}" for line in _error_lines("", err, model))])


def _error_lines(prefix: str, err: ValidationError, model: type[BaseModel]) -> list[str]:
    """One line per error: where (dotted, after `prefix`), what, and the valid keys for an unknown one."""
    lines = []
    for e in err.errors():
        loc = ".".join(p for p in [prefix, *(str(x) for x in e["loc"])] if p)
        if e["type"] == "extra_forbidden":
            valid = _valid_keys(model, [str(p) for p in e["loc"][:-1]])
            lines.append(_unknown_key_message(loc.rsplit(".", 1)[0], str(e["loc"][-1]), valid))
        elif e["type"] in ("section", "unknown_section"):
            lines.append(e["msg"])
        else:
            lines.append(f"{loc}: {e['msg']} (got {e.get('input')!r})")
    return lines


def _unknown_key_message(where: str, key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{where + '.' if where else ''}{key}: unknown key{hint} (valid keys: {', '.join(valid)})"


def _valid_keys(model: type[BaseModel], path: list[str]) -> list[str]:
    for part in path:
        field = model.model_fields.get(part)
        ann = getattr(field, "annotation", None)
        sub = next((a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)),
                   None)
        if sub is None:
            return []
        model = sub
    extra = sorted(HEADS.sections()) if model is RebalanceConfig else []
    return sorted([*model.model_fields, *extra])


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
