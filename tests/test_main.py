"""``python -m app`` (and ``make serve``) on a port that is taken: one line that names the port
and CAMSERVE_PORT, a non-zero exit, and no model loaded. The same for a job store URL that
cannot be right, or a Redis that refuses the service."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.fixtures_models import FIXTURE_MODULE, build_tiny, write_model
from tests.http.test_server import environment, spawn_server, start_server, stop_server
from tests.redis_server import RedisServer, free_port

TRUSTED = f"{FIXTURE_MODULE},{__name__}"
"""The modules this store's manifest may name (CAMSERVE_TRUSTED_MODULES)."""


def build_marking(marker: str) -> nn.Module:
    """The tiny model, leaving ``marker`` behind: the model was built, so loading began."""
    Path(marker).touch()
    return build_tiny()


def write_built_by(store: Path, factory: str, **kwargs: Path) -> None:
    """The tiny model as ``store/tiny``, built by ``factory`` of this module with ``kwargs``."""
    torch.manual_seed(0)
    write_model(
        store,
        "tiny",
        build_tiny(),
        architecture=f"tests.test_main:{factory}",
        kwargs="kwargs = { " + ", ".join(f'{k} = "{v}"' for k, v in kwargs.items()) + " }",
        num_classes=3,
        input_size=32,
        target_layers=["features"],
    )


@pytest.fixture
def marking_store(tmp_path: Path) -> tuple[Path, Path]:
    """A store whose one model leaves a file behind when the service builds it."""
    marker = tmp_path / "loaded"
    write_built_by(tmp_path / "store", "build_marking", marker=marker)
    return tmp_path / "store", marker


def build_stuck(marker: str, fifo: str) -> nn.Module:
    """A model whose load never ends by itself: it reads a FIFO that nobody writes (as a load
    from a hung network mount would wait)."""
    Path(marker).touch()
    with open(fifo, "rb") as stuck:  # blocks until a writer opens it
        stuck.read()
    return build_tiny()


def test_sigterm_ends_the_service_while_a_load_is_stuck(tmp_path: Path) -> None:
    # The lifespan awaited the load and joined the model threads: SIGTERM never ended the
    # process ("Waiting for application shutdown." for ever).
    marker, fifo = tmp_path / "loading", tmp_path / "never.fifo"
    os.mkfifo(fifo)
    write_built_by(tmp_path / "store", "build_stuck", marker=marker, fifo=fifo)
    process, _ = spawn_server(
        tmp_path / "store", CAMSERVE_TRUSTED_MODULES=TRUSTED, CAMSERVE_SHUTDOWN_GRACE_S="0"
    )
    try:
        deadline = time.monotonic() + 60
        while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.exists(), "the load never began"
        output = stop_server(process)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
        with contextlib.suppress(OSError):  # let the stuck reader go, if it is still there
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert process.returncode == 0, output
    assert "still busy" in output and "tiny" in output


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback port that another socket listens on."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def test_a_busy_port_is_one_line_and_no_model_is_loaded(
    marking_store: tuple[Path, Path], busy_port: int
) -> None:
    store, marker = marking_store
    done = subprocess.run(
        [sys.executable, "-m", "app"],
        cwd=Path(__file__).resolve().parents[1],
        env=environment(
            store,
            CAMSERVE_PORT=str(busy_port),
            CAMSERVE_HOST="127.0.0.1",
            CAMSERVE_TRUSTED_MODULES=TRUSTED,
        ),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert line.startswith("camserve: ") and f"port {busy_port}" in line and "CAMSERVE_PORT" in line
    assert not marker.exists()


def test_on_a_free_port_the_same_store_loads_its_model(marking_store: tuple[Path, Path]) -> None:
    # What the test above relies on: this store does leave its file once the service loads it.
    store, marker = marking_store
    process, _ = start_server(store, CAMSERVE_TRUSTED_MODULES=TRUSTED)
    try:
        assert marker.exists()
    finally:
        process.terminate()
        process.communicate(timeout=30)


def test_the_check_names_other_reasons_too(busy_port: int) -> None:
    from app.__main__ import port_refusal

    assert port_refusal("127.0.0.1", 0) is None
    assert "CAMSERVE_HOST" in (port_refusal("host.invalid", 8000) or "")
    assert "already in use" in (port_refusal("localhost", busy_port) or "")  # every address


def run_app(store: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m app`` with these settings, run to its end."""
    return subprocess.run(
        [sys.executable, "-m", "app"],
        cwd=Path(__file__).resolve().parents[1],
        env=environment(store, CAMSERVE_TRUSTED_MODULES=TRUSTED, **env),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_job_store_port_out_of_range_is_refused_with_the_settings(
    marking_store: tuple[Path, Path],
) -> None:
    store, marker = marking_store
    done = run_app(store, CAMSERVE_JOB_STORE="redis://127.0.0.1:99999/0")
    assert done.returncode == 2 and done.stdout == ""
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith("camserve: invalid configuration:")
    assert "CAMSERVE_JOB_STORE: the port '99999' is not a number from 1 to 65535" in done.stderr
    assert not marker.exists()


def test_a_redis_without_the_database_stops_startup_before_any_model_loads(
    marking_store: tuple[Path, Path], redis_server: RedisServer
) -> None:
    store, marker = marking_store
    port = str(free_port())
    done = run_app(store, CAMSERVE_JOB_STORE=redis_server.url(99), CAMSERVE_PORT=port)
    assert done.returncode != 0
    refusal = "cannot start: CAMSERVE_JOB_STORE: the Redis server at"
    lines = [line for line in (done.stdout + done.stderr).splitlines() if refusal in line]
    assert len(lines) == 1 and "has no database 99" in lines[0], done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr  # the line, not uvicorn's traceback
    assert not marker.exists()


# The service's first import of torch, reported and ended there: what OpenMP will read.
_POLICY_AT_TORCH = """
import builtins, os, sys
real = builtins.__import__
def spy(name, *args, **kwargs):
    if name.split(".")[0] == "torch" and "torch" not in sys.modules:
        print("policy:", os.environ.get("OMP_WAIT_POLICY"), flush=True)
        os._exit(0)
    return real(name, *args, **kwargs)
builtins.__import__ = spy
from app.__main__ import cli
sys.exit(cli([]))
"""


@pytest.mark.parametrize(("given", "read"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_openmp_threads_wait_passively_unless_the_environment_says(
    tmp_path: Path, given: str | None, read: str
) -> None:
    # Passive, set before torch loads (OpenMP reads it then); an operator's choice is kept.
    env = environment(tmp_path, CAMSERVE_PORT=str(free_port()))
    env.pop("OMP_WAIT_POLICY", None)  # tests/__init__.py sets it for the test processes
    if given is not None:
        env["OMP_WAIT_POLICY"] = given
    done = subprocess.run(
        [sys.executable, "-c", _POLICY_AT_TORCH],
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.stdout.strip() == f"policy: {read}", done.stdout + done.stderr
