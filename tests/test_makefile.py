"""The Makefile's targets for a newcomer, run for real on a venv whose install stamps are
fresh (so nothing is installed): ``make shell`` puts ``camserve`` on the PATH, and ``make serve``
on a busy port stops with the service's one line."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.http.test_server import environment

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


@pytest.fixture
def venv(tmp_path: Path) -> Path:
    """A venv that make takes as installed: this one's bin/, and both stamps newer than
    pyproject.toml."""
    venv = tmp_path / "venv"
    venv.mkdir()
    (venv / "bin").symlink_to(VENV_BIN)
    for stamp in (".camserve-installed", ".camserve-serve-installed"):
        (venv / stamp).touch()
    return venv


def make(venv: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:  # type: ignore[type-arg]
    command = ["make", "--no-print-directory", "-C", str(ROOT), f"VENV={venv}", *args]
    # Run from `make test`, the outer make's flags and overrides must not reach this one.
    outer = {"MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES"}
    env = {k: v for k, v in (os.environ if env is None else env).items() if k not in outer}
    planned = subprocess.run([*command, "-n"], capture_output=True, text=True, env=env, check=True)
    assert "tools/install.py" not in planned.stdout  # never install into this venv's python
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)


def test_make_shell_puts_camserve_on_the_path(venv: Path) -> None:
    env = {**os.environ, "PATH": "/usr/bin:/bin"}
    found = make(venv, "shell", "CMD=command -v camserve && camserve --help", env=env)
    assert found.returncode == 0, found.stderr
    assert found.stdout.splitlines()[0] == f"{venv}/bin/camserve"
    assert "Usage: camserve" in found.stdout and "explain" in found.stdout


def test_camserve_runs_as_the_docs_write_it() -> None:
    # docs/shell.md and the README: activate the venv, or call .venv/bin/camserve.
    env = {**os.environ, "PATH": "/usr/bin:/bin"}
    for line in (". .venv/bin/activate && camserve --help", ".venv/bin/camserve --help"):
        done = subprocess.run(
            ["bash", "-c", line], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0 and "Usage: camserve" in done.stdout, (line, done.stderr)


def test_make_serve_on_a_busy_port_stops_with_one_line(venv: Path, store: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        env = environment(store, CAMSERVE_PORT=str(port), CAMSERVE_HOST="127.0.0.1")
        done = make(venv, "serve", env=env)
    assert done.returncode != 0
    ours = [line for line in done.stderr.splitlines() if line.startswith("camserve:")]
    assert len(ours) == 1 and f"port {port}" in ours[0] and "CAMSERVE_PORT" in ours[0]
    assert "Errno" not in done.stderr and "Traceback" not in done.stderr
