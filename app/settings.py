"""Service configuration, read once from ``CAMSERVE_*`` environment variables."""

from __future__ import annotations

import hmac
import ipaddress
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import SplitResult, urlsplit

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ENV_PREFIX = "CAMSERVE_"
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")
_MODULE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
#: An allowed host: a name or address (IPv6 without brackets), ``*.`` and a domain, or ``*``.
_HOST_RE = re.compile(r"^(\*|(\*\.)?[a-z0-9_-]+(\.[a-z0-9_-]+)*\.?|[0-9a-f:.]*:[0-9a-f:.]*)$")
_KEY_NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
DEFAULT_KEY_NAME = "default"
"""The name of ``CAMSERVE_API_KEY`` among the named keys."""
_JOB_STORE_RE = re.compile(r"^rediss?://[^/?#\s]+(/[0-9]{0,5})?(\?\S*)?$")
_JOB_STORE_SHAPE = (
    "must be memory, redis://host:port/db or rediss://host:port/db (TLS); a password may be in "
    "the URL (redis://:password@host:6379/0) or in CAMSERVE_JOB_STORE_PASSWORD"
)
_UNKNOWN_OPTION_RE = re.compile(r"keyword argument '([^']+)'")

logger = logging.getLogger(__name__)

RENAMED = {"max_model_slots": "MAX_CONCURRENT_JOBS"}
"""Fields whose variable was renamed -> the old variable's name (without the prefix): it is still
read, when the new one is not set, with a deprecation warning in the log."""


def _new_or_old(field: str) -> AliasChoices:
    """Read ``field`` from its own variable, else from its old one (a keyword argument may name
    the field)."""
    return AliasChoices(f"{ENV_PREFIX}{field.upper()}", f"{ENV_PREFIX}{RENAMED[field]}")


class ConfigurationError(RuntimeError):
    """A setting or the environment it describes is unusable; the service must not start."""


class Settings(BaseSettings):
    """Every knob of the service; each field maps to ``CAMSERVE_<FIELD>``."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="ignore",
        frozen=True,
        protected_namespaces=(),
        populate_by_name=True,
    )

    device: str = Field(
        "auto",
        description="`auto` picks the CUDA device with the most free memory, else the CPU. Asking "
        "for a CUDA device that does not exist stops startup. The device is decided once, logged, "
        "and reported by `/health`.",
        json_schema_extra={"allowed": "`auto`, `cpu`, `cuda`, `cuda:N`"},
    )
    image_lane: Literal["device", "cpu"] = Field(
        "device",
        description="Where the image work (decode, resize, crop, normalise, drawing) runs: "
        "`device` follows the model's device (nvJPEG and the GPU on CUDA, Pillow on CPU); `cpu` "
        "keeps it on the CPU decode and render threads whatever the device.",
    )
    model_store: Path = Field(Path("model_store"), description="One subfolder per model.")
    default_model: str = Field(
        "shapes",
        min_length=1,
        description="Used when a request names no model.",
        json_schema_extra={"allowed": "a folder name"},
    )
    host: str = Field(
        "127.0.0.1",
        min_length=1,
        description="Where `python -m app` binds. Use `0.0.0.0` in a container.",
        json_schema_extra={"allowed": "an address"},
    )
    port: int = Field(8000, ge=1, le=65535, description="The port `python -m app` binds.")
    grpc_port: int | None = Field(
        8001,
        ge=1,
        le=65535,
        description="The port of the Open Inference Protocol's gRPC service (and the standard "
        "gRPC health service), on `CAMSERVE_HOST`, in the same process as HTTP. Empty: no gRPC.",
    )
    max_upload_bytes: int = Field(
        10 * 1024 * 1024, ge=1024, le=1024**3, description="Largest file part (default 10 MiB)."
    )
    max_image_pixels: int = Field(
        40_000_000, ge=64, le=500_000_000, description="Largest width x height."
    )
    max_images: int = Field(16, ge=1, le=256, description="Most files in one request.")
    max_model_slots: int = Field(
        2,
        ge=1,
        le=32,
        validation_alias=_new_or_old("max_model_slots"),
        description="Model slots: model work (forward + CAM) running at once. Work on the same "
        "model also takes turns on that model's lock.",
    )
    queue_size: int = Field(
        32,
        ge=0,
        le=10_000,
        description="Requests allowed to wait for a model slot. Beyond that the answer is 503 "
        "with `Retry-After`, unless another client holds at least two more places than the "
        "newcomer's: then that client's newest request still waiting gives its place up (503).",
    )
    max_cam_forwards: int = Field(
        20_000,
        ge=1,
        le=10_000_000,
        description="Budget for the methods that run extra forwards: masked ones (Score-CAM "
        "family, Ablation-CAM: images x target-layer channels x `num_samples`) and noisy ones "
        "(SmoothGradCAMpp: images x `num_samples`), and the guided methods' guided pass (images x "
        "classes) in one request, all its methods together. "
        "Beyond it the answer is 422 `over_budget`. (ScoreCAM on resnet18's `layer4` costs 512 "
        "forwards per image.)",
    )
    max_output_side: int = Field(
        1024,
        ge=16,
        le=16_384,
        description="Longest side of overlays and heatmaps when a request sends no `size`; larger "
        "uploads get smaller pictures, aspect kept.",
    )
    max_render_pixels: int = Field(
        16 * 1024 * 1024,
        ge=1024,
        le=10_000_000_000,
        description="Most pixels one request may have drawn: images x methods x classes x maps "
        "x pictures (`overlay`, `heatmap`) x each picture's area, summed over a KServe request's "
        "instances too. Beyond it the answer is 422 `over_budget` before any pixel is decoded. "
        "The default draws one 4096-px picture, or 16 at 1024 px.",
    )
    max_render_maps: int = Field(
        64,
        ge=1,
        le=100_000,
        description="Most maps one request may have drawn or sent raw: images x methods x "
        "classes x maps (one per target layer, plus the fused one for several layers). Beyond "
        "it the answer is 422 `over_budget`.",
    )
    render_budget_bytes: int = Field(
        768 * 1024**2,
        ge=16 * 1024**2,
        le=1024**4,
        description="Memory all requests and jobs together may hold while their pictures are "
        "drawn (the largest picture's working set and the answer's pictures); a request waits "
        "for its share, and one needing more than all of it is refused (422 `over_budget`).",
    )
    render_processes: int = Field(
        0,
        ge=0,
        le=16,
        description="Processes that draw the heavy pictures (a request drawing over a quarter of "
        "`CAMSERVE_MAX_RENDER_PIXELS`), niced and outside the service's GIL, so that they do not "
        "hold up the other requests. Each is spawned by the first heavy drawing and then holds "
        "about 390 MB of its own at rest (torch imported), 250 MB more while it draws a 4096-px "
        "picture. `0` (the default) draws them on a niced thread of the service instead: on 2 "
        "idle cores the hostile mix's good clients fared worse beside a drawing process "
        "(bench/hostile_mix.py; docs/hardening.md).",
    )
    max_batch_size: int | None = Field(
        None,
        ge=1,
        le=256,
        description="Most images one cross-request batch holds. `1` turns batching off. Unset: by "
        "device, `8` on CPU and `32` on CUDA.",
    )
    batch_timeout_ms: float = Field(
        5.0,
        ge=0,
        le=1000,
        description="How long a batch that is already forming waits for more requests after its "
        "first one arrived. A request on an idle model never waits.",
    )
    request_timeout_s: float | None = Field(
        60.0,
        gt=0,
        le=86_400,
        description="Deadline of a synchronous `/predict` or `/explain`: past it the work stops "
        "and the answer is 504 `timeout`. Empty: no deadline. Jobs have none.",
    )
    max_jobs: int = Field(
        64,
        ge=1,
        le=100_000,
        description="Jobs queued or running at once. Beyond it `POST /jobs` answers 503 "
        "`too_many_jobs`; finished jobs never block it (the oldest are forgotten to make room).",
    )
    job_ttl_s: float = Field(
        3600.0,
        gt=0,
        le=7 * 86_400,
        description="How long a finished job (and its result) is kept.",
    )
    shutdown_grace_s: float = Field(
        25.0,
        ge=0,
        le=3600,
        description="After SIGTERM, how long work in flight may still take. Then it is cut with "
        "503 `shutting_down`. Keep it under the orchestrator's grace period (Kubernetes: 30 s).",
    )
    max_connections: int = Field(
        1000,
        ge=1,
        le=1_000_000,
        description="Open connections and requests uvicorn allows; more get 503 (logged). The "
        "open-file limit is raised to fit. gRPC calls in flight have the same cap (beyond it: "
        "UNAVAILABLE, with `retry-after`; health checks have `CAMSERVE_PROBE_CONNECTIONS` more), "
        "and gRPC connections another (more are closed at once).",
    )
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        le=600,
        description="Time a connection has to send a request's headers. Then 408 and the "
        "connection is closed. A gRPC connection's HTTP/2 handshake and a gRPC health check's "
        "request too (DEADLINE_EXCEEDED).",
    )
    body_timeout_s: float = Field(
        60.0,
        gt=0,
        le=3600,
        description="Time a client has to send a request's whole body, from its headers on. "
        "Then 408. A gRPC call's message too (DEADLINE_EXCEEDED).",
    )
    keep_alive_s: float = Field(
        5.0,
        gt=0,
        le=600,
        description="How long an idle keep-alive connection stays open. Clients that pool "
        "connections should drop idle ones sooner (httpx's default is also 5 s, which races: see "
        "the soak benchmark). A gRPC connection without calls is closed (GOAWAY) after it too; "
        "its client's channel connects again at its next call.",
    )
    api_key: SecretStr | None = Field(
        None,
        description="When set, `/models`, `/predict`, `/explain`, `/jobs` and the protocol routes "
        "need `X-API-Key`. It is checked on the headers, before the body is read. `/health`, "
        "`/ready`, `/metrics`, `/v2/health/*`, `/v2`, `/docs`, `/redoc` and the page at `/` "
        "(which then asks for the key) stay open.",
        json_schema_extra={"allowed": "any string"},
    )
    api_keys: SecretStr | None = Field(
        None,
        description="Named API keys, `name:key` pairs separated by commas (each client its own "
        "key). Any of them opens the routes that `CAMSERVE_API_KEY` guards; per-client caps and "
        "metrics count by the key's name, and a job is visible only to the key that made it. "
        "Combines with `CAMSERVE_API_KEYS_FILE` and `CAMSERVE_API_KEY` (named `default`).",
        json_schema_extra={"allowed": "`name:key,name:key` (names: letters, digits, `._-`)"},
    )
    api_keys_file: Path | None = Field(
        None,
        description="A file of named API keys, one `name:key` a line (`#` starts a comment), "
        "read at startup, like `CAMSERVE_API_KEYS`.",
        json_schema_extra={"allowed": "a path"},
    )
    forwarded_allow_ips: str = Field(
        "",
        description="The proxies trusted to name the client in `X-Forwarded-For` (and the "
        "scheme in `X-Forwarded-Proto`): their addresses or networks, or `*` for any. Behind "
        "a gateway, set it to the gateway's address so that per-client caps count end clients. "
        "Empty: no proxy is trusted, the client is the peer's address.",
        json_schema_extra={"allowed": "comma-separated addresses or CIDR networks, or `*`"},
    )
    max_header_bytes: int = Field(
        64 * 1024,
        ge=4096,
        le=16 * 1024 * 1024,
        description="Most bytes of a request's line and headers; past it 431 and the "
        "connection is closed.",
    )
    max_header_fields: int = Field(
        100,
        ge=16,
        le=10_000,
        description="Most header fields in one request; past it 431.",
    )
    max_event_streams: int = Field(
        256,
        ge=1,
        le=100_000,
        description="Job event streams (`GET /jobs/{id}/events`) open at once on this replica; "
        "more get 429 with `Retry-After`. With Redis, its connection pool is sized above it.",
    )
    max_event_streams_per_client: int = Field(
        16,
        ge=1,
        le=100_000,
        description="Job event streams one client (API key, or address without one) may have "
        "open at once on this replica; more get 429 with `Retry-After`.",
    )
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Host names the service answers to besides IP addresses and the loopback "
        "names (`localhost`, `*.localhost`): a request whose `Host` names another gets 403 "
        "`host_not_allowed`, so that a site whose name was made to resolve to this machine "
        "(DNS rebinding) cannot use the service from its visitors' browsers. Empty: only those "
        "when `CAMSERVE_HOST` is a loopback address, any name otherwise. `*`: any name. Behind "
        "a gateway on the same machine that passes its own name in `Host`, list that name.",
        json_schema_extra={
            "allowed": "comma-separated host names (`*.example.com`: its subdomains), or `*`"
        },
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Origins a browser page may call from.",
        json_schema_extra={"allowed": "comma-separated origins or `*`"},
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field(
        "INFO", description="The least severe log lines written."
    )
    log_format: Literal["text", "json"] = Field(
        "text",
        description="`json` writes one object per line, with the traceback as a field.",
    )
    metrics: bool = Field(True, description="Serve Prometheus metrics on `GET /metrics`.")
    ui: bool = Field(True, description="Serve the page for people at `GET /`.")
    model_control: Literal["none", "poll", "explicit"] = Field(
        "none",
        description="How models change without a restart: `none` (load the store once), `poll` "
        "(re-scan it every `CAMSERVE_MODEL_POLL_S`) or `explicit` (only the repository API).",
    )
    model_poll_s: float = Field(
        15.0, gt=0, le=86_400, description="Seconds between two scans of the store in `poll` mode."
    )
    trusted_modules: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Python modules (each with its submodules) whose factories a manifest may "
        'name as `architecture = "package.module:factory"`, beyond torchvision, `timm:NAME` '
        "and the service's own `app.models.zoo`. A manifest naming any other module is refused "
        "before that module is imported: list only code you trust as much as the service.",
        json_schema_extra={"allowed": "comma-separated module names, e.g. `mypkg.models`"},
    )
    allow_links_out_of_store: bool = Field(
        False,
        description="Serve model folders and files that are symbolic links to places outside "
        "`CAMSERVE_MODEL_STORE` (links inside it always work).",
    )
    model_load_stall_s: float = Field(
        600.0,
        gt=0,
        le=86_400,
        description="Seconds a model may stay `loading` before `/ready` answers 503 (a load "
        "that hangs, e.g. on a download).",
    )
    admin_key: SecretStr | None = Field(
        None,
        description=(
            "Key of the repository API (`X-Admin-Key` over HTTP, `x-admin-key` metadata over "
            "gRPC). Unset: that API is off (403; PERMISSION_DENIED over gRPC)."
        ),
    )
    body_min_rate: float = Field(
        1024.0,
        ge=0,
        le=1024**3,
        description="Slowest average pace, in bytes per second, of a request body once "
        "`CAMSERVE_BODY_GRACE_S` has passed (408 below it; 0: only the whole-body deadline).",
    )
    body_grace_s: float = Field(
        10.0, ge=0, le=3600, description="Time a request body may take before its pace counts."
    )
    probe_connections: int = Field(
        8,
        ge=1,
        le=1000,
        description="Requests to `/health`, `/ready` and `/metrics` (and gRPC health checks) "
        "answered beyond `CAMSERVE_MAX_CONNECTIONS`, so that probes pass while the service is "
        "full. Also the most gRPC health Watch streams open at once.",
    )
    max_jobs_per_client: int = Field(
        16,
        ge=1,
        le=100_000,
        description="Most jobs one client (API key, or address without one) may have queued "
        "or running.",
    )
    max_request_pixels: int = Field(
        64_000_000,
        ge=64,
        le=10_000_000_000,
        description="Most pixels the images of one request may decode to, summed (a large "
        "JPEG counts at the reduced scale it is decoded at); read from the headers (413).",
    )
    decode_budget_bytes: int = Field(
        1024**3,
        ge=1024**2,
        le=1024**4,
        description="Memory all requests and jobs together may hold in decoded images; a "
        "request waits for its share, and one needing more than all of it is refused (413).",
    )
    body_budget_bytes: int = Field(
        256 * 1024**2,
        ge=1024**2,
        le=1024**4,
        description="Request bodies all requests together may be sending or holding at once "
        "(503 with `Retry-After` beyond it). The gRPC messages that calls hold have a budget of "
        "this size of their own (UNAVAILABLE with `retry-after`).",
    )
    job_upload_budget_bytes: int = Field(
        256 * 1024**2,
        ge=1024**2,
        le=1024**4,
        description="Upload bytes that queued and running jobs may keep, in all (503 "
        "`too_many_jobs` beyond it).",
    )
    job_store: str = Field(
        "memory",
        description="Where jobs live: `memory` (this process) or `redis://host:port/db`, "
        "`rediss://host:port/db` for TLS (shared by every replica).",
        json_schema_extra={
            "allowed": "`memory`, `redis://...`, `rediss://...` (port 1 to 65535, options that "
            "redis-py knows)"
        },
    )
    workers: int = Field(
        1,
        ge=1,
        le=64,
        description="Service processes on the one port (`python -m app --workers N` sets it "
        "too): each loads its own copy of every model on the same device, and the kernel "
        "spreads the connections over them (SO_REUSEPORT). More than 1 needs a Redis job store, "
        "so that every process sees every job.",
    )
    job_store_password: SecretStr | None = Field(
        None, description="The Redis password, when the URL of `CAMSERVE_JOB_STORE` has none."
    )
    job_lease_s: float = Field(
        30.0,
        ge=1,
        le=3600,
        description="With Redis: a running job whose replica gave no sign of life for this long "
        "is run again by another replica.",
    )
    job_max_attempts: int = Field(
        3, ge=1, le=100, description="With Redis: most times a job is started before it fails."
    )
    job_max_result_bytes: int = Field(
        8 * 1024 * 1024,
        ge=1024,
        le=512 * 1024 * 1024,
        description="Largest result a job may keep, on either store; a job whose result could "
        "be larger is refused when it is created (413 `result_too_large`).",
    )
    background_every: int = Field(
        3,
        ge=2,
        le=1000,
        description="While `/jobs` short passes wait for a model that an interactive long pass "
        "(Score-CAM `/explain`) holds, at least one turn (its chunk or a short pass) in every N "
        "goes to them.",
    )
    background_share: float = Field(
        0.85,
        ge=0.0,
        lt=1.0,
        description="While a `/jobs` long pass (Score-CAM family, Ablation-CAM, SmoothGrad-CAM++) "
        "holds a model and its own client's interactive requests wait for it, the job keeps at "
        "least this share of the model's time, counted in seconds; the requests run at its "
        "pauses in between (0.85: it runs 5.7 times as long as they did). Against other "
        "clients' requests a job keeps at most half. Lower: requests wait less, jobs take longer.",
    )
    pause_in_forwards: bool = Field(
        True,
        description="Short passes on a model run inside a long pass's chunk forwards, before "
        "each leaf module (they wait for one layer, not a whole chunk); off: between chunks "
        "only. Turn off for a model whose forward keeps per-call state on its modules.",
    )
    fit_pass_threads: bool = Field(
        True,
        description="A pass on the CPU takes an intra-op thread team only as wide as the cores "
        "that the service's other CPU work in flight (decoding, drawing, other passes) leaves "
        "free, at least one; off: every pass keeps torch's threads (`OMP_NUM_THREADS`), which "
        "suits a replica that serves throughput rather than latency under mixed load.",
    )
    cache_mb: int = Field(
        128,
        ge=0,
        le=1024 * 1024,
        description="Memory of the explanation cache, in MiB: an explanation asked for again "
        "(the same image bytes, model build, method and parameters) is answered from it "
        "without the model; the least recently used answers go first. An answer over a "
        "quarter of it is not kept. `0`: no cache. The default holds a few hundred answers "
        "with 512-px pictures, a small share beside the decode and render budgets.",
    )
    cache_ttl_s: float = Field(
        3600.0,
        ge=0,
        le=30 * 86_400,
        description="How long a cached explanation is answered after it was computed. With a "
        "Redis job store (`CAMSERVE_JOB_STORE=redis://...`) the cache is also kept in that "
        "Redis, shared by every replica, each entry for this long. `0`: no expiry in memory, "
        "and no shared cache in Redis.",
    )

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        value = value.strip().lower()
        if not _DEVICE_RE.match(value):
            raise ValueError("must be one of auto, cpu, cuda, cuda:N (N a device index)")
        return value

    @field_validator(
        "api_key",
        "api_keys",
        "api_keys_file",
        "max_batch_size",
        "request_timeout_s",
        "job_store_password",
        "grpc_port",
        mode="before",
    )
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _check_hosts(cls, value: object) -> object:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, list | tuple):
            value = [v.lower().strip("[]") if isinstance(v, str) else v for v in value]
            bad = [str(v) for v in value if not (isinstance(v, str) and _HOST_RE.fullmatch(v))]
            if bad:
                raise ValueError(
                    f"{', '.join(bad)}: a host name, an IP address, `*.` and a domain, or `*`"
                )
        return value

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("trusted_modules", mode="before")
    @classmethod
    def _split_modules(cls, value: object) -> object:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, list | tuple):
            bad = [str(v) for v in value if not (isinstance(v, str) and _MODULE_RE.fullmatch(v))]
            if bad:
                raise ValueError(
                    f"{', '.join(map(repr, bad))} is not a module name; give dotted Python "
                    "module names such as mypkg.models, separated by commas"
                )
        return value

    @field_validator("job_store", mode="before")
    @classmethod
    def _check_job_store(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        value = value.strip()
        if value.lower() == "memory":
            return "memory"
        problem = redis_url_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value

    @field_validator("forwarded_allow_ips", mode="before")
    @classmethod
    def _check_forwarded(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        parts = [part.strip() for part in value.split(",") if part.strip()]
        for part in parts:
            if part == "*":
                continue
            try:
                ipaddress.ip_network(part, strict=False)
            except ValueError:
                raise ValueError(
                    f"{part!r} is not an address or a network; give the gateway's address "
                    "(10.0.0.5), a network (10.0.0.0/8), or * for any proxy"
                ) from None
        return ",".join(parts)

    @model_validator(mode="after")
    def _check_workers(self) -> Settings:
        if self.workers > 1 and self.job_store == "memory":
            raise ValueError(
                f"CAMSERVE_WORKERS={self.workers} needs a shared job store: with "
                "CAMSERVE_JOB_STORE=memory each process would keep its own jobs, and a job's "
                "status or result would be found only by the process that took it. Set "
                "CAMSERVE_JOB_STORE=redis://host:port/db, or CAMSERVE_WORKERS=1"
            )
        return self

    @model_validator(mode="after")
    def _check_api_keys(self) -> Settings:
        named_api_keys(self)  # refuses a bad file or pair at startup
        return self

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

    @field_validator("admin_key", "model_control", mode="before")
    @classmethod
    def _blank_admin_fields(cls, value: object, info: ValidationInfo) -> object:
        if not isinstance(value, str):
            return value
        if info.field_name == "model_control":
            return value.strip().lower()
        return value if value.strip() else None


def redis_url_problem(url: str) -> str | None:
    """What is wrong with ``url`` as ``CAMSERVE_JOB_STORE``, and how to write it instead; None
    when redis-py can connect with it (whether a server answers there is not asked here)."""
    if not _JOB_STORE_RE.match(url):
        return _JOB_STORE_SHAPE
    parts = urlsplit(url)
    if not parts.hostname:
        return _JOB_STORE_SHAPE
    return _redis_port_problem(parts) or _redis_option_problem(url)


def _redis_port_problem(parts: SplitResult) -> str | None:
    """Why the URL's port is none (a number from 1 to 65535, 6379 when left out)."""
    try:
        port = parts.port
    except ValueError:  # not a number, or past 65535
        port = None
    else:
        if port is None or 1 <= port <= 65535:
            return None
    text = parts.netloc.rpartition("@")[2].rpartition("]")[2].rpartition(":")[2]
    return (
        f"the port {text!r} is not a number from 1 to 65535; write the port Redis listens on "
        "(6379 unless it was changed), as in redis://host:6379/0, or leave it out for 6379"
    )


def _redis_option_problem(url: str) -> str | None:
    """Why an option of the URL's query string (``?ssl_ca_certs=...``) would make redis-py fail
    at the first connection: a value it cannot read, or a name it does not know."""
    if "?" not in url:
        return None
    from redis.asyncio.connection import Connection, parse_url  # redis-py only when asked for

    try:
        options: dict[str, Any] = dict(parse_url(url))
        connection_class = options.pop("connection_class", Connection)
        connection_class(**options)  # no I/O: it only checks the names
    except ValueError as error:
        return f"{str(error).rstrip('.')}: fix that option of the query string, or remove it"
    except TypeError as error:
        found = _UNKNOWN_OPTION_RE.search(str(error))
        name = repr(found.group(1)) if found else "an option"
        return (
            f"{name} is not a connection option that redis-py knows here; fix its name or remove "
            "it (the TLS options, such as ssl_ca_certs, need rediss://)"
        )
    return None


def api_key_matches(sent: bytes | None, expected: str) -> bool:
    """The one comparison of a sent API key with a configured key, for every transport (HTTP's
    gate and routes, gRPC): the raw bytes sent against the key's UTF-8 bytes, in constant time."""
    return sent is not None and hmac.compare_digest(sent, expected.encode("utf-8"))


class ApiKeys:
    """The named API keys the service takes (``named_api_keys``); none: calls are open and a
    client is its address."""

    def __init__(self, keys: Mapping[str, str]) -> None:
        self._keys = dict(keys)

    @classmethod
    def from_settings(cls, settings: Settings) -> ApiKeys:
        return cls(named_api_keys(settings))

    @property
    def required(self) -> bool:
        return bool(self._keys)

    def name_of(self, sent: bytes | None) -> str | None:
        """The name of the key ``sent`` (raw bytes), or None. Every key is compared, so the time
        taken does not tell which one came close."""
        found = None
        for name, key in self._keys.items():
            if api_key_matches(sent, key):
                found = name
        return found


def named_api_keys(settings: Settings) -> dict[str, str]:
    """Every API key the service takes, by name: ``CAMSERVE_API_KEY`` (named ``default``), the
    pairs of ``CAMSERVE_API_KEYS`` and the lines of ``CAMSERVE_API_KEYS_FILE``. Empty: the
    routes are open. ValueError naming the variable for a bad pair, a repeated name or key, or
    a file that cannot be read."""
    keys: dict[str, str] = {}

    def add(name: str, key: str, where: str) -> None:
        if not _KEY_NAME_RE.match(name):
            raise ValueError(
                f"{where}: key name {name[:40]!r} must be 1 to 64 letters, digits, '.', '_' or '-'"
            )
        if not key:
            raise ValueError(f"{where}: key {name!r} is empty; write name:key")
        if name in keys:
            raise ValueError(f"{where}: the name {name!r} is given twice; each key its own name")
        if key in keys.values():
            raise ValueError(f"{where}: key {name!r} repeats another key; each name its own key")
        keys[name] = key

    def add_pair(pair: str, where: str) -> None:
        name, colon, key = pair.partition(":")
        if not colon:
            raise ValueError(f"{where}: {pair[:3]!r}... is not name:key")
        add(name.strip(), key.strip(), where)

    if settings.api_key is not None:
        add(DEFAULT_KEY_NAME, settings.api_key.get_secret_value(), f"{ENV_PREFIX}API_KEY")
    if settings.api_keys is not None:
        for pair in settings.api_keys.get_secret_value().split(","):
            if pair.strip():
                add_pair(pair.strip(), f"{ENV_PREFIX}API_KEYS")
    if settings.api_keys_file is not None:
        where = f"{ENV_PREFIX}API_KEYS_FILE ({settings.api_keys_file})"
        try:
            lines = settings.api_keys_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"{where}: cannot be read ({error.__class__.__name__})") from None
        for number, line in enumerate(lines, 1):
            text = line.strip()
            if text and not text.startswith("#"):
                add_pair(text, f"{where} line {number}")
    return keys


def describe_validation_error(error: ValidationError) -> str:
    """Turn pydantic's report into lines naming the environment variable and what is allowed."""
    lines = []
    for item in error.errors():
        message = item["msg"].removeprefix("Value error, ")
        if not item["loc"]:  # a check over several fields names its variable itself
            lines.append(message)
            continue
        field = str(item["loc"][0]).upper()
        field = field.removeprefix(ENV_PREFIX)  # a renamed field reports its variable's name
        old = RENAMED.get(field.lower())
        name = f"{ENV_PREFIX}{field}" + (f" (formerly {ENV_PREFIX}{old})" if old else "")
        shown = _shown(item.get("input"))
        lines.append(f"{name}: {message}{shown}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def _shown(value: object) -> str:
    """The refused value for the message, without the password a URL may hold
    (``redis://:***@host``)."""
    if isinstance(value, dict):
        return ""
    if isinstance(value, str):
        value = re.sub(r"(://[^:/@\s]*:)[^@/\s]*@", r"\1***@", value)
    return f" (got {value!r})"


def load_settings(**overrides: Any) -> Settings:
    """Read the settings from the environment, raising ConfigurationError with a clear message."""
    try:
        return Settings(**overrides)
    except ValidationError as error:
        raise ConfigurationError(describe_validation_error(error)) from None


def warn_renamed(environ: Mapping[str, str]) -> list[str]:
    """Log a deprecation warning for each old variable name set in ``environ``; returns the
    warnings. Called once logging is set up (the settings are read before it)."""
    present = {name.upper() for name in environ}
    warnings = []
    for field, old_name in RENAMED.items():
        old, new = f"{ENV_PREFIX}{old_name}", f"{ENV_PREFIX}{field.upper()}"
        if old not in present:
            continue
        if new in present:
            warnings.append(f"{old} is deprecated and ignored: {new} is set too; unset {old}.")
        else:
            warnings.append(f"{old} is deprecated: rename it {new} (its value is used for now).")
    for warning in warnings:
        logger.warning(warning)
    return warnings
