"""The service's settings: LTSERVE_<FIELD> environment variables, or a YAML file named by LTSERVE_CONFIG."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from ltserve.errors import ConfigError
from ltserve.preprocess import DEFAULT_MAX_PIXELS

ENV_PREFIX = "LTSERVE_"
CLASSIFY_ROUTE = "/classify"
BATCH_ROUTE = "/classify_batch"
MODEL_ROUTE = "/model"
UPLOAD_FIELDS = {CLASSIFY_ROUTE: "image", BATCH_ROUTE: "images"}
PROTECTED_ROUTES = (CLASSIFY_ROUTE, BATCH_ROUTE, MODEL_ROUTE)


class ServiceSettings(BaseModel):
    """Service configuration: LTSERVE_<FIELD> environment variables, or LTSERVE_CONFIG (a YAML file of these fields).

    Attributes:
        model: model package folder, relative to the working directory (LTSERVE_MODEL).
        top_k: classes listed per image (LTSERVE_TOP_K).
        max_upload_bytes: largest request body; larger answers 413 (LTSERVE_MAX_UPLOAD_BYTES).
        max_pixels: largest image, width * height, checked before decoding; larger answers 413 (LTSERVE_MAX_PIXELS).
        max_batch_images: most images in one /classify_batch request; more answers 413 (LTSERVE_MAX_BATCH_IMAGES).
        timeout_s: a request taking longer answers 504 (LTSERVE_TIMEOUT_S).
        providers: ONNX Runtime providers, comma separated, best first, e.g. "cuda,cpu" (LTSERVE_PROVIDERS;
            default: the best available).
        backend: "onnxruntime" (default) or "torch": the package's model.pt2 through PyTorch, for GPU machines
            without onnxruntime-gpu (LTSERVE_BACKEND; bentofile.torch.yaml sets it).
        torch_device: the torch backend's device: auto, cpu or cuda (LTSERVE_TORCH_DEVICE).
        torch_precision: auto (fp16 on CUDA, fp32 on CPU), fp32 or fp16 (LTSERVE_TORCH_PRECISION).
        torch_cuda_graphs: capture one CUDA graph per batch bucket (LTSERVE_TORCH_CUDA_GRAPHS).
        threads: ONNX Runtime CPU threads (LTSERVE_THREADS; default: all cores).
        max_batch_size: most images per model call across concurrent requests; 1 turns adaptive batching off
            (LTSERVE_MAX_BATCH_SIZE).
        max_latency_ms: longest a request waits in the queue for companions (LTSERVE_MAX_LATENCY_MS).
        decode_threads: threads decoding uploads (LTSERVE_DECODE_THREADS; default: every core when the model runs
            on a GPU, whose cores have nothing else to run; else min(4, cores), leaving the rest to inference).
        api_key: when set, /classify, /classify_batch and /model need `Authorization: Bearer <key>`
            (LTSERVE_API_KEY). Health and metrics routes stay open for probes and scrapers.
        cors_origins: origins allowed by CORS, comma separated; empty = CORS off (LTSERVE_CORS_ORIGINS).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: Path = Path("models/fashion-lt")
    top_k: int = Field(5, ge=1, le=1000)
    max_upload_bytes: int = Field(10 * 2**20, ge=1024)
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1)
    max_batch_images: int = Field(64, ge=1)
    timeout_s: float = Field(30.0, gt=0)
    providers: list[str] | None = None
    backend: Literal["onnxruntime", "torch"] = "onnxruntime"
    torch_device: Literal["auto", "cpu", "cuda"] = "auto"
    torch_precision: Literal["auto", "fp32", "fp16"] = "auto"
    torch_cuda_graphs: bool = True
    threads: int | None = Field(None, ge=1)
    max_batch_size: int = Field(32, ge=1, le=1024)
    max_latency_ms: float = Field(5.0, ge=0, le=10_000)
    decode_threads: int | None = Field(None, ge=1, le=1024)
    api_key: SecretStr | None = None
    cors_origins: list[str] = Field(default_factory=list)

    @field_validator("providers", "cors_origins", mode="before")
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_none(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> "ServiceSettings":
        """Settings from LTSERVE_CONFIG (YAML) overlaid with LTSERVE_<FIELD> variables.

        Raises:
            ConfigError: the YAML file is missing or invalid, or a value is invalid (names the variable or key).
        """
        env = dict(os.environ if environ is None else environ)
        raw: dict[str, Any] = {}
        source = "environment"
        if env.get(ENV_PREFIX + "CONFIG"):
            path = Path(env[ENV_PREFIX + "CONFIG"])
            source = f"{path} and environment"
            try:
                raw = yaml.safe_load(path.read_text()) or {}
            except FileNotFoundError:
                raise ConfigError(f"LTSERVE_CONFIG={path}: file not found") from None
            except (OSError, yaml.YAMLError) as exc:
                raise ConfigError(f"LTSERVE_CONFIG={path}: cannot read it as YAML: {exc}") from None
            if not isinstance(raw, dict):
                raise ConfigError(f"LTSERVE_CONFIG={path}: expected a mapping of settings "
                                  f"({', '.join(cls.model_fields)})")
        for name in cls.model_fields:
            value = env.get(ENV_PREFIX + name.upper())
            if value is not None and value != "":
                raw[name] = value
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            lines = [f"invalid service settings ({source}):"]
            for e in exc.errors():
                key = str(e["loc"][0]) if e["loc"] else "?"
                where = f"{ENV_PREFIX}{key.upper()} / {key}" if key in cls.model_fields else key
                valid = "" if key in cls.model_fields else f" (valid: {', '.join(cls.model_fields)})"
                lines.append(f"  {where}: {e['msg']}{valid}")
            raise ConfigError("\n".join(lines)) from None

    def torch_options(self) -> dict[str, Any]:
        """The torch runner's options (used with backend "torch")."""
        return {"device": self.torch_device, "precision": self.torch_precision, "cuda_graphs": self.torch_cuda_graphs}

    def model_path(self) -> Path:
        """The model package folder, absolute (relative paths are resolved from the working directory)."""
        return self.model.expanduser().resolve()
