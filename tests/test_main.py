"""``python -m app`` (and ``make serve``) on a port that is taken: one line that names the port
and CAMSERVE_PORT, a non-zero exit, and no model loaded."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.fixtures_models import FIXTURE_MODULE, build_tiny, write_model
from tests.http.test_server import environment, start_server

TRUSTED = f"{FIXTURE_MODULE},{__name__}"
"""The modules this store's manifest may name (CAMSERVE_TRUSTED_MODULES)."""


def build_marking(marker: str) -> nn.Module:
    """The tiny model, leaving ``marker`` behind: the model was built, so loading began."""
    Path(marker).touch()
    return build_tiny()


@pytest.fixture
def marking_store(tmp_path: Path) -> tuple[Path, Path]:
    """A store whose one model leaves a file behind when the service builds it."""
    marker = tmp_path / "loaded"
    torch.manual_seed(0)
    write_model(
        tmp_path / "store",
        "tiny",
        build_tiny(),
        architecture="tests.test_main:build_marking",
        kwargs=f'kwargs = {{ marker = "{marker}" }}',
        num_classes=3,
        input_size=32,
        target_layers=["features"],
    )
    return tmp_path / "store", marker


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
