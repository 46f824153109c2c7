"""The service's one settings object: LTSERVE_<FIELD> environment variables over a YAML file named by LTSERVE_CONFIG.

`ServiceSettings` is a pydantic-settings `BaseSettings`, and this module is the only place in `ltserve/` that reads
the service's environment: the service builds one `ServiceSettings.from_env()` at import and hands plain values to
the library (`Predictor`, `AsyncPredictor`, `RequestGuard`), which never reads variables itself.

Sources, highest priority first: keyword arguments (tests), the environment (`LTSERVE_<FIELD>`, case-insensitive,
empty values ignored), the YAML file named by `LTSERVE_CONFIG` (keys are the field names), the defaults. Comma
lists (`LTSERVE_PROVIDERS=cuda,cpu`, `LTSERVE_CORS_ORIGINS=a,b`) are split here; the YAML file may give a list or
the same comma string.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict, SettingsError,
                               YamlConfigSettingsSource)

from ltserve.errors import ConfigError, unknown_choice
from ltserve.preprocess import DEFAULT_MAX_PIXELS, IMAGE_MEDIA_TYPES
from ltserve.runtime.prior import EstimatorSettings
from ltserve.serve.batcher import INLINE_MODEL_MS

ENV_PREFIX = "LTSERVE_"
CLASSIFY_ROUTE = "/classify"
BATCH_ROUTE = "/classify_batch"
RAW_ROUTE = "/classify_raw"
MODEL_ROUTE = "/model"
PRIOR_ROUTE = "/prior"
PRIOR_RESET_ROUTE = "/prior/reset"
UPLOAD_FIELDS = {CLASSIFY_ROUTE: "image", BATCH_ROUTE: "images"}
RAW_MEDIA_TYPES = (*IMAGE_MEDIA_TYPES, "application/octet-stream")
"""What a raw-body request (RAW_ROUTE) may declare as its Content-Type; the format is sniffed from the bytes."""
V2_SERVER_ROUTE = "/v2"
V2_MODEL_ROUTE = "/v2/models/{model}"
V2_MODEL_READY_ROUTE = "/v2/models/{model}/ready"
V2_INFER_ROUTE = "/v2/models/{model}/infer"
V2_HEALTH_ROUTES = ("/v2/health/live", "/v2/health/ready")
PROTECTED_ROUTES = (CLASSIFY_ROUTE, BATCH_ROUTE, RAW_ROUTE, MODEL_ROUTE, PRIOR_ROUTE, PRIOR_RESET_ROUTE,
                    V2_SERVER_ROUTE, V2_MODEL_ROUTE, V2_MODEL_READY_ROUTE, V2_INFER_ROUTE)

_ESTIMATOR = EstimatorSettings()

# The secret is never echoed back in an error message.
_SECRET_FIELDS = frozenset({"api_key"})


class ServiceSettings(BaseSettings):
    """Service configuration: LTSERVE_<FIELD> environment variables over LTSERVE_CONFIG (a YAML file of these
    fields, without `config`).

    Attributes:
        config: the YAML file the other fields are read from, below the environment (LTSERVE_CONFIG).
        model: model package folder, relative to the working directory (LTSERVE_MODEL).
        top_k: classes listed per image (LTSERVE_TOP_K).
        max_upload_bytes: largest request body; larger answers 413 (LTSERVE_MAX_UPLOAD_BYTES).
        max_pixels: largest image, width * height, checked before decoding; larger answers 413 (LTSERVE_MAX_PIXELS).
        max_request_pixels: the decode budget of one request: most pixels of all its images together, checked from
            their headers before any is decoded; more answers 413 (LTSERVE_MAX_REQUEST_PIXELS).
        max_batch_images: most images in one /classify_batch request; more answers 413 (LTSERVE_MAX_BATCH_IMAGES).
        timeout_s: a request taking longer answers 504 (LTSERVE_TIMEOUT_S).
        receive_timeout_s: seconds a connection has to send a whole request, headers and body, from when it is
            ready for one; then it is closed, after a 408 if it sent part of one (LTSERVE_RECEIVE_TIMEOUT_S).
        max_connections: open connections per worker; beyond it the oldest connection that has not sent its request
            is dropped, and while all are busy requests answer 503, health and metrics routes excepted
            (LTSERVE_MAX_CONNECTIONS).
        providers: ONNX Runtime providers, comma separated, best first, e.g. "cuda,cpu" (LTSERVE_PROVIDERS;
            default: the best available).
        backend: "onnxruntime" (default) or "torch": the package's model.pt2 through PyTorch, for GPU machines
            without onnxruntime-gpu (LTSERVE_BACKEND; `ltserve bento --backend torch` sets it).
        torch_device: the torch backend's device: auto, cpu or cuda (LTSERVE_TORCH_DEVICE).
        torch_precision: auto (fp16 on CUDA, fp32 on CPU), fp32 or fp16 (LTSERVE_TORCH_PRECISION); the same default
            as `TorchRunner`'s.
        torch_cuda_graphs: capture one CUDA graph per batch bucket (LTSERVE_TORCH_CUDA_GRAPHS).
        torch_device_preprocess: hand the torch runner uint8 pixels and normalise them on its device, inside the
            CUDA graph (LTSERVE_TORCH_DEVICE_PREPROCESS; off by default until a GPU session has measured it). The
            Predictor checks it against the host's normalisation at start-up; `GET /model` says which path runs.
        workers: worker processes, each with its own copy of the model (LTSERVE_WORKERS; default: 2 when the model
            runs on CPU and the machine has 2 or more cores, so that a worker's crash leaves one answering; 1 when
            it runs on a GPU or on one core). See `ltserve.serve.worker.worker_count`.
        threads: ONNX Runtime CPU threads per worker (LTSERVE_THREADS; default: the cores divided among the workers).
        max_batch_size: most images per model call across concurrent requests; 1 turns adaptive batching off
            (LTSERVE_MAX_BATCH_SIZE).
        max_latency_ms: longest a request waits in the queue for companions (LTSERVE_MAX_LATENCY_MS).
        inline_model_ms: a lone request whose model call took at most this long at warm-up runs on the event loop,
            as a plain server would: a thread hop costs more than such a model; 0 sends every batch through the
            model thread (LTSERVE_INLINE_MODEL_MS).
        decode_threads: threads decoding uploads (LTSERVE_DECODE_THREADS; default: every core when the model runs
            on a GPU, whose cores have nothing else to run; else min(4, cores), leaving the rest to inference).
        api_key: when set, the classify routes, /model and /prior need `Authorization: Bearer <key>`
            (LTSERVE_API_KEY). Health and metrics routes stay open for probes and scrapers.
        cors_origins: origins allowed by CORS, comma separated; empty = CORS off (LTSERVE_CORS_ORIGINS).
        metrics_dir: the Prometheus multiprocess directory of this server's workers (LTSERVE_METRICS_DIR; default: a
            new private directory per server, removed when it stops). `bentoml serve` empties BentoML's shared one
            at every start, which would reset the counters of a server already running on the host.
        open_set: open-set rejection: off; flag (every answer carries `unknown` and `ood_score`); reject (an unknown
            image also answers `label: null`) (LTSERVE_OPEN_SET; default: flag when the package has open-set
            thresholds, else off; flag or reject on a package without them stops start-up).
        prior_adapt: live label shift: off; report (estimate the traffic's class prior, GET /prior, gauges); apply
            (also shift every answer's logits to it) (LTSERVE_PRIOR_ADAPT).
        prior_method: auto (bbse when model.json records a usable val confusion matrix, else em; resolved once at
            start, reported by GET /prior and GET /model), em (EM over the posteriors) or bbse (needs the val
            confusion matrix in model.json) (LTSERVE_PRIOR_METHOD).
        prior_window: images the estimate is computed from, the newest across all workers (LTSERVE_PRIOR_WINDOW).
        prior_half_life: images; > 0 weighs older images of the window down (LTSERVE_PRIOR_HALF_LIFE; 0 = off).
        prior_min_samples: below this many images the estimate is the target prior and nothing is adapted
            (LTSERVE_PRIOR_MIN_SAMPLES).
        prior_max_shift: cap on the shift added to any logit, nats (LTSERVE_PRIOR_MAX_SHIFT).
        prior_dead_band: total variation from the package's prior within which nothing is adapted
            (LTSERVE_PRIOR_DEAD_BAND).
        prior_state_dir: the server's live prior state (one file per worker, reset marker)
            (LTSERVE_PRIOR_STATE_DIR; default: <temp dir>/ltserve-prior-<uid>/<package>-<sha>, which outlives
            restarts but not a reboot; one folder per server).
        prior_persist_s: longest time between two writes of a worker's state (LTSERVE_PRIOR_PERSIST_S).
    """

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_ignore_empty=True, extra="forbid", frozen=True)

    config: Path | None = None
    model: Path = Path("models/fashion-lt")
    top_k: int = Field(5, ge=1, le=1000)
    max_upload_bytes: int = Field(10 * 2**20, ge=1024)
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1)
    # 100 MP: two images at the per-image cap, or 64 images of 1.5 MP; ~0.4 s of one core for blank PNGs
    max_request_pixels: int = Field(100_000_000, ge=1)
    max_batch_images: int = Field(64, ge=1)
    timeout_s: float = Field(30.0, gt=0)
    # 30 s: a 10 MiB upload (the default max_upload_bytes) needs 2.8 Mbit/s; slower clients belong behind a proxy
    receive_timeout_s: float = Field(30.0, gt=0)
    max_connections: int = Field(1024, ge=1)
    # NoDecode: pydantic-settings would read a list variable as JSON; these take "a,b" (split below)
    providers: Annotated[list[str] | None, NoDecode] = None
    backend: Literal["onnxruntime", "torch"] = "onnxruntime"
    torch_device: Literal["auto", "cpu", "cuda"] = "auto"
    torch_precision: Literal["auto", "fp32", "fp16"] = "auto"
    torch_cuda_graphs: bool = True
    torch_device_preprocess: bool = False
    workers: int | None = Field(None, ge=1, le=64)
    threads: int | None = Field(None, ge=1)
    max_batch_size: int = Field(32, ge=1, le=1024)
    max_latency_ms: float = Field(5.0, ge=0, le=10_000)
    inline_model_ms: float = Field(INLINE_MODEL_MS, ge=0, le=1000)
    decode_threads: int | None = Field(None, ge=1, le=1024)
    api_key: SecretStr | None = None
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    metrics_dir: Path | None = None
    open_set: Literal["off", "flag", "reject"] | None = None
    prior_adapt: Literal["off", "report", "apply"] = "report"
    prior_method: Literal["auto", "em", "bbse"] = _ESTIMATOR.method  # type: ignore[assignment]
    # defaults: the estimator's own (ltserve.runtime.prior)
    prior_window: int = Field(_ESTIMATOR.window, ge=1, le=10_000_000)
    prior_half_life: float = Field(_ESTIMATOR.half_life, ge=0)
    prior_min_samples: int = Field(_ESTIMATOR.min_samples, ge=1)
    prior_max_shift: float = Field(_ESTIMATOR.max_shift, ge=0, le=50)
    prior_dead_band: float = Field(_ESTIMATOR.dead_band, ge=0, lt=1)
    prior_state_dir: Path | None = None
    prior_persist_s: float = Field(5.0, gt=0)

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
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Keyword arguments, then the environment, then the LTSERVE_CONFIG file (no .env or secrets files)."""
        return init_settings, env_settings, _ConfigFile(settings_cls)

    @classmethod
    def from_env(cls, **overrides: Any) -> "ServiceSettings":
        """The settings of this process: `overrides`, then LTSERVE_<FIELD> variables, then the LTSERVE_CONFIG file.

        Args:
            overrides: field values that win over every other source (tests, embedding).

        Raises:
            ConfigError: the YAML file is missing, not a mapping, or has an unknown key (the valid keys are
                listed), or a value is invalid (the message names the variable, LTSERVE_<FIELD>, and the problem).
        """
        try:
            return cls(**overrides)
        except ValidationError as exc:
            raise ConfigError(_explain(exc, overrides)) from None
        except SettingsError as exc:  # a source could not parse a value (names the field)
            raise ConfigError(f"invalid service settings: {exc}") from None

    def torch_options(self) -> dict[str, Any]:
        """The torch runner's options (used with backend "torch")."""
        return {"device": self.torch_device, "precision": self.torch_precision, "cuda_graphs": self.torch_cuda_graphs,
                "device_preprocess": self.torch_device_preprocess}

    def model_path(self) -> Path:
        """The model package folder, absolute (relative paths are resolved from the working directory)."""
        return self.model.expanduser().resolve()


def env_name(field: str) -> str:
    """The environment variable of a settings field: "top_k" -> "LTSERVE_TOP_K"."""
    return ENV_PREFIX + field.upper()


class _ConfigFile(PydanticBaseSettingsSource):
    """The YAML file named by the `config` field, as found by the sources above it (LTSERVE_CONFIG).

    pydantic-settings' `YamlConfigSettingsSource` reads it; this wrapper finds its path, which is itself a setting,
    and turns what that source would skip or pass on unexplained (a missing file, a list, unreadable YAML) into a
    `ConfigError` naming the file.
    """

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ returns the whole file

    def __call__(self) -> dict[str, Any]:
        value = self.current_state.get("config")
        if value in (None, ""):
            return {}
        path = Path(value).expanduser()
        where = f"{env_name('config')}={path}"
        if not path.is_file():
            raise ConfigError(f"{where}: file not found")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise ConfigError(f"{where}: cannot read it as YAML: {exc}") from None
        valid = ", ".join(f for f in self.settings_cls.model_fields if f != "config")
        if raw is not None and not isinstance(raw, dict):
            raise ConfigError(f"{where}: expected a mapping of settings ({valid}), got {type(raw).__name__}")
        if raw and "config" in raw:
            raise ConfigError(f"{where}: key 'config' is not allowed in the file (it cannot name another file)")
        return YamlConfigSettingsSource(self.settings_cls, yaml_file=path)()


def _explain(exc: ValidationError, overrides: dict[str, Any]) -> str:
    """A ValidationError of ServiceSettings as lines naming the variable (or the YAML key), where the value came
    from, and the problem."""
    env = {k.upper(): v for k, v in os.environ.items() if k.upper().startswith(ENV_PREFIX) and v != ""}
    config = overrides.get("config") or env.get(env_name("config"))
    fields = [f for f in ServiceSettings.model_fields if f != "config"]
    lines = ["invalid service settings:"]
    for e in exc.errors():
        key = str(e["loc"][0]) if e["loc"] else "?"
        if key in ServiceSettings.model_fields:
            origin = ("argument" if key in overrides else "environment" if env_name(key) in env
                      else f"{env_name('config')}={config}" if config else "default")
            got = "" if key in _SECRET_FIELDS or "input" not in e else f" (got {e['input']!r})"
            lines.append(f"  {env_name(key)} / {key} [{origin}]: {e['msg']}{got}")
        elif e["type"] == "extra_forbidden":
            where = f"{env_name('config')}={config}" if config and key not in overrides else "argument"
            lines.append(f"  {where}: {unknown_choice('key', key, fields)}")
        else:
            lines.append(f"  {key}: {e['msg']}")
    return "\n".join(lines)
