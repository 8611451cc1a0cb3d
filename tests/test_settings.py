"""Settings come from CAMSERVE_* variables and bad values stop startup with a clear message."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from app.settings import ConfigurationError, Settings, load_settings, warn_renamed


def test_defaults() -> None:
    settings = Settings()
    assert settings.device == "auto"
    assert settings.model_store == Path("model_store")
    assert settings.default_model == "shapes"
    assert (settings.host, settings.port) == ("127.0.0.1", 8000)
    assert settings.api_key is None
    assert settings.cors_origins == []
    assert settings.log_format == "text"


def test_reads_prefixed_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAMSERVE_DEVICE", "CUDA:1")
    monkeypatch.setenv("CAMSERVE_PORT", "9001")
    monkeypatch.setenv("CAMSERVE_CORS_ORIGINS", "http://a.test, http://b.test")
    monkeypatch.setenv("CAMSERVE_API_KEY", "s3cret")
    monkeypatch.setenv("CAMSERVE_LOG_LEVEL", "debug")
    monkeypatch.setenv("CAMSERVE_LOG_FORMAT", "JSON")
    settings = load_settings()
    assert settings.device == "cuda:1"
    assert settings.port == 9001
    assert settings.cors_origins == ["http://a.test", "http://b.test"]
    assert settings.api_key is not None and settings.api_key.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(settings)
    assert (settings.log_level, settings.log_format) == ("DEBUG", "json")


def test_batching_and_output_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = Settings()
    assert (defaults.max_batch_size, defaults.batch_timeout_ms) == (None, 5.0)
    assert defaults.max_output_side == 1024
    monkeypatch.setenv("CAMSERVE_MAX_BATCH_SIZE", "1")
    monkeypatch.setenv("CAMSERVE_BATCH_TIMEOUT_MS", "2.5")
    monkeypatch.setenv("CAMSERVE_MAX_OUTPUT_SIDE", "640")
    settings = load_settings()
    assert (settings.max_batch_size, settings.batch_timeout_ms) == (1, 2.5)
    assert settings.max_output_side == 640
    monkeypatch.setenv("CAMSERVE_MAX_BATCH_SIZE", " ")  # empty: the device's default
    assert load_settings().max_batch_size is None


def test_empty_api_key_means_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAMSERVE_API_KEY", "")
    assert load_settings().api_key is None


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("CAMSERVE_DEVICE", "gpu", "auto, cpu, cuda, cuda:N"),
        ("CAMSERVE_PORT", "70000", "less than or equal to 65535"),
        ("CAMSERVE_PORT", "http", "valid integer"),
        ("CAMSERVE_LOG_FORMAT", "xml", "'text' or 'json'"),
        ("CAMSERVE_LOG_LEVEL", "loud", "'DEBUG'"),
        ("CAMSERVE_MAX_MODEL_SLOTS", "0", "greater than or equal to 1"),
        ("CAMSERVE_MAX_CONCURRENT_JOBS", "0", "greater than or equal to 1"),
        ("CAMSERVE_MAX_IMAGES", "-3", "greater than or equal to 1"),
        ("CAMSERVE_MAX_BATCH_SIZE", "0", "greater than or equal to 1"),
        ("CAMSERVE_BATCH_TIMEOUT_MS", "-1", "greater than or equal to 0"),
        ("CAMSERVE_MAX_OUTPUT_SIDE", "8", "greater than or equal to 16"),
        ("CAMSERVE_REQUEST_TIMEOUT_S", "0", "greater than 0"),
        ("CAMSERVE_MAX_JOBS", "0", "greater than or equal to 1"),
        ("CAMSERVE_JOB_TTL_S", "-5", "greater than 0"),
        ("CAMSERVE_SHUTDOWN_GRACE_S", "-1", "greater than or equal to 0"),
        ("CAMSERVE_MAX_CONNECTIONS", "0", "greater than or equal to 1"),
        ("CAMSERVE_HEADER_TIMEOUT_S", "0", "greater than 0"),
        ("CAMSERVE_BACKGROUND_EVERY", "1", "greater than or equal to 2"),
        ("CAMSERVE_BACKGROUND_SHARE", "1", "less than 1"),
        ("CAMSERVE_BACKGROUND_SHARE", "-0.5", "greater than or equal to 0"),
    ],
)
def test_invalid_value_names_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, expected: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigurationError) as caught:
        load_settings()
    message = str(caught.value)
    assert variable in message
    assert expected in message
    assert repr(value) in message or value.upper() in message


def test_job_and_connection_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = Settings()
    assert defaults.request_timeout_s == 60.0
    assert (defaults.max_jobs, defaults.job_ttl_s, defaults.shutdown_grace_s) == (64, 3600.0, 25.0)
    monkeypatch.setenv("CAMSERVE_REQUEST_TIMEOUT_S", "")
    monkeypatch.setenv("CAMSERVE_MAX_CONNECTIONS", "50")
    monkeypatch.setenv("CAMSERVE_KEEP_ALIVE_S", "2.5")
    settings = load_settings()
    assert settings.request_timeout_s is None  # empty: no deadline
    assert (settings.max_connections, settings.keep_alive_s) == (50, 2.5)


def test_model_slots_read_the_old_variable_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    assert Settings().max_model_slots == 2
    assert Settings(max_model_slots=3).max_model_slots == 3
    monkeypatch.setenv("CAMSERVE_MAX_CONCURRENT_JOBS", "4")
    assert load_settings().max_model_slots == 4
    with caplog.at_level(logging.WARNING, logger="app.settings"):
        warnings = warn_renamed(os.environ)
    assert warnings == [
        "CAMSERVE_MAX_CONCURRENT_JOBS is deprecated: rename it CAMSERVE_MAX_MODEL_SLOTS "
        "(its value is used for now)."
    ]
    assert [r.getMessage() for r in caplog.records] == warnings
    monkeypatch.setenv("CAMSERVE_MAX_MODEL_SLOTS", "5")  # the new name wins
    assert load_settings().max_model_slots == 5
    assert "ignored: CAMSERVE_MAX_MODEL_SLOTS is set too" in warn_renamed(os.environ)[0]


def test_new_names_alone_warn_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAMSERVE_MAX_MODEL_SLOTS", "3")
    assert load_settings().max_model_slots == 3
    assert warn_renamed(os.environ) == []


def test_a_bad_old_variable_names_both(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAMSERVE_MAX_CONCURRENT_JOBS", "0")
    with pytest.raises(ConfigurationError, match="formerly CAMSERVE_MAX_CONCURRENT_JOBS"):
        load_settings()


@pytest.mark.parametrize(
    ("value", "kept"),
    [
        ("memory", "memory"),
        (" Memory ", "memory"),
        ("redis://localhost:6379/0", "redis://localhost:6379/0"),
        ("rediss://:pw@redis.example:6380/2", "rediss://:pw@redis.example:6380/2"),
    ],
)
def test_job_store_takes_memory_or_a_redis_url(value: str, kept: str) -> None:
    assert Settings(job_store=value).job_store == kept


@pytest.mark.parametrize(
    "value", ["http://redis:6379", "redis://", "redis:///0", "postgres://x", "redis://h:6379/٣"]
)
def test_job_store_refuses_anything_else_naming_the_choices(value: str) -> None:
    with pytest.raises(ConfigurationError, match="CAMSERVE_JOB_STORE: must be memory, redis://"):
        load_settings(job_store=value)


def test_refused_values_never_echo_a_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAMSERVE_JOB_STORE", "redis://:hunter2@/0")  # no host: refused
    with pytest.raises(ConfigurationError) as refused:
        load_settings()
    assert "hunter2" not in str(refused.value)
    assert "redis://:***@/0" in str(refused.value)


@pytest.mark.parametrize(
    "value",
    [
        "redis://[::1]:6379/1",
        "redis://redis.example",
        "redis://redis.example:6379/",
        "rediss://redis.example:6380/0?ssl_ca_certs=/etc/ssl/redis-ca.pem",
        "redis://redis.example:6379/0?socket_timeout=2.5",
    ],
)
def test_job_store_takes_any_url_redis_py_connects_with(value: str) -> None:
    assert Settings(job_store=value).job_store == value


@pytest.mark.parametrize("port", ["99999", "65536", "0", "abc"])
def test_job_store_port_must_be_1_to_65535(port: str) -> None:
    with pytest.raises(ConfigurationError) as refused:
        load_settings(job_store=f"redis://:hunter2@127.0.0.1:{port}/0")
    message = str(refused.value)
    assert f"CAMSERVE_JOB_STORE: the port '{port}' is not a number from 1 to 65535" in message
    assert "redis://host:6379/0" in message  # how to write it
    assert "hunter2" not in message and "redis://:***@127.0.0.1" in message


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("redis://h:6379/0?sokcet_timeout=2", "'sokcet_timeout' is not a connection option"),
        ("redis://h:6379/0?ssl_ca_certs=/ca.pem", "the TLS options, such as ssl_ca_certs, need"),
        ("redis://h:6379/0?socket_timeout=soon", "Invalid value for 'socket_timeout'"),
        ("redis://h:6379/zero", "must be memory, redis://host:port/db"),
    ],
)
def test_job_store_options_are_checked_before_startup(value: str, expected: str) -> None:
    with pytest.raises(ConfigurationError, match="CAMSERVE_JOB_STORE: ") as refused:
        load_settings(job_store=value)
    assert expected in str(refused.value)


def test_trusted_modules_are_module_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAMSERVE_TRUSTED_MODULES", " mypkg.models, other ,")
    assert load_settings().trusted_modules == ["mypkg.models", "other"]
    monkeypatch.setenv("CAMSERVE_TRUSTED_MODULES", "mypkg.models, subprocess:run")
    with pytest.raises(ConfigurationError) as error:
        load_settings()
    assert "CAMSERVE_TRUSTED_MODULES: 'subprocess:run' is not a module name" in str(error.value)


@pytest.mark.parametrize(("value", "port"), [(None, 8001), ("9002", 9002), ("", None), (" ", None)])
def test_grpc_port_defaults_to_8001_and_empty_turns_it_off(
    monkeypatch: pytest.MonkeyPatch, value: str | None, port: int | None
) -> None:
    if value is not None:
        monkeypatch.setenv("CAMSERVE_GRPC_PORT", value)
    assert load_settings().grpc_port == port


def test_grpc_port_out_of_range_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAMSERVE_GRPC_PORT", "70000")
    with pytest.raises(ConfigurationError, match="CAMSERVE_GRPC_PORT"):
        load_settings()
