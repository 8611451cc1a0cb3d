"""Service configuration, read once from ``CAMSERVE_*`` environment variables."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ENV_PREFIX = "CAMSERVE_"
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


class ConfigurationError(RuntimeError):
    """A setting or the environment it describes is unusable; the service must not start."""


class Settings(BaseSettings):
    """Every knob of the service; each field maps to ``CAMSERVE_<FIELD>``."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="ignore", frozen=True, protected_namespaces=()
    )

    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    model_store: Path = Field(Path("model_store"), description="folder with one folder per model")
    default_model: str = Field("shapes", min_length=1, description="model used when none is named")
    host: str = Field("127.0.0.1", min_length=1, description="address `python -m app` binds")
    port: int = Field(8000, ge=1, le=65535, description="port `python -m app` binds")
    max_upload_bytes: int = Field(
        10 * 1024 * 1024, ge=1024, le=1024**3, description="largest accepted file part"
    )
    max_image_pixels: int = Field(
        40_000_000, ge=64, le=500_000_000, description="largest accepted width x height"
    )
    max_images: int = Field(16, ge=1, le=256, description="most images in one request")
    max_concurrent_jobs: int = Field(
        2, ge=1, le=32, description="model jobs (forward + CAM) running at once"
    )
    queue_size: int = Field(
        32, ge=0, le=10_000, description="jobs allowed to wait; more are refused with 503"
    )
    max_cam_forwards: int = Field(
        20_000,
        ge=1,
        le=10_000_000,
        description="most masked forwards (images x channels x samples) of one Score-CAM request",
    )
    max_output_side: int = Field(
        1024,
        ge=16,
        le=16_384,
        description="longest side of overlays and heatmaps when `size` is not sent; "
        "larger uploads get smaller pictures, aspect kept",
    )
    max_batch_size: int | None = Field(
        None,
        ge=1,
        le=256,
        description="most images one cross-request batch holds; 1 turns batching off; "
        "default by device type: 8 on CPU, 32 on CUDA",
    )
    batch_timeout_ms: float = Field(
        5.0,
        ge=0,
        le=1000,
        description="how long a batch that is already forming waits for more requests",
    )
    request_timeout_s: float | None = Field(
        60.0,
        gt=0,
        le=86_400,
        description="deadline of a synchronous /predict or /explain (504 past it; empty: none); "
        "longer work goes through /jobs",
    )
    max_jobs: int = Field(
        64, ge=1, le=100_000, description="most jobs kept at once, queued, running or finished"
    )
    job_ttl_s: float = Field(
        3600.0, gt=0, le=7 * 86_400, description="how long a finished job's result is kept"
    )
    shutdown_grace_s: float = Field(
        25.0,
        ge=0,
        le=3600,
        description="after SIGTERM, how long in-flight work may take before it is cut with 503",
    )
    max_connections: int = Field(
        1000,
        ge=1,
        le=1_000_000,
        description="open connections and in-flight requests uvicorn allows; more get 503",
    )
    header_timeout_s: float = Field(
        10.0, gt=0, le=600, description="time a client has to send a request's headers"
    )
    body_timeout_s: float = Field(
        30.0, gt=0, le=3600, description="longest wait for the next piece of a request body"
    )
    keep_alive_s: float = Field(
        5.0, gt=0, le=600, description="how long an idle keep-alive connection stays open"
    )
    api_key: SecretStr | None = Field(None, description="if set, required in X-API-Key")
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated origins allowed by CORS, or *"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    log_format: Literal["text", "json"] = "text"
    metrics: bool = Field(True, description="serve Prometheus metrics on GET /metrics")
    ui: bool = Field(True, description="serve the explanation page at GET /")
    background_every: int = Field(
        4,
        ge=2,
        le=1000,
        description="while /jobs work waits for a model that interactive requests keep busy, "
        "at least one turn (a chunk or a short pass) in every N goes to it",
    )

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        value = value.strip().lower()
        if not _DEVICE_RE.match(value):
            raise ValueError("must be one of auto, cpu, cuda, cuda:N (N a device index)")
        return value

    @field_validator("api_key", "max_batch_size", "request_timeout_s", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _normalise_case(cls, value: object) -> object:
        return value.strip() if isinstance(value, str) else value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("log_format", mode="before")
    @classmethod
    def _lower_format(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value


def describe_validation_error(error: ValidationError) -> str:
    """Turn pydantic's report into lines naming the environment variable and what is allowed."""
    lines = []
    for item in error.errors():
        field = str(item["loc"][0]) if item["loc"] else "?"
        value = item.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        message = item["msg"].removeprefix("Value error, ")
        lines.append(f"{ENV_PREFIX}{field.upper()}: {message}{shown}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def load_settings(**overrides: Any) -> Settings:
    """Read the settings from the environment, raising ConfigurationError with a clear message."""
    try:
        return Settings(**overrides)
    except ValidationError as error:
        raise ConfigurationError(describe_validation_error(error)) from None
