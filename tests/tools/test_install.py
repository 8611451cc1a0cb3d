"""``tools/install.py``: what ``make serve`` and ``make dev`` install, and the CPU wheels'
fallback to the default index when PyTorch's CPU index cannot be reached. Nothing is installed:
``--dry-run`` prints the pip command, or a recording stands in for pip."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tools import install

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def refusing_url() -> Iterator[str]:
    """A loopback URL whose port is held but not listened on: connections are refused."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{held.getsockname()[1]}/whl/cpu"


@pytest.fixture
def answering_url() -> Iterator[str]:
    """A loopback index that answers every page."""

    class Index(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            body = b"<html><body><a href='torch-2.9.0+cpu.whl'>torch</a></body></html>"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Index)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/whl/cpu"
    finally:
        httpd.shutdown()
        httpd.server_close()


def dry_run(*args: str, index: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "tools/install.py", "--dry-run", *args],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", install.CPU_INDEX_ENV: index},
        capture_output=True,
        text=True,
        timeout=60,
    )


def pip_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if " -m pip install " in line]


def test_an_unreachable_cpu_index_falls_back_to_the_default_one(refusing_url: str) -> None:
    done = dry_run("--torch", "cpu", ".", index=refusing_url)
    assert done.returncode == 0, done.stderr
    assert f"PyTorch's CPU index {refusing_url} cannot be reached" in done.stdout
    assert "falling back to the default index" in done.stdout
    (command,) = pip_lines(done.stdout)
    assert command.endswith("-m pip install --disable-pip-version-check -e .")
    assert "--extra-index-url" not in command and "5.6 GB" in done.stdout


def test_a_reachable_cpu_index_gives_the_cpu_wheels(answering_url: str) -> None:
    done = dry_run("--torch", "cpu", ".[dev]", index=answering_url)
    assert done.returncode == 0, done.stderr
    assert "cannot be reached" not in done.stdout
    (command,) = pip_lines(done.stdout)
    assert command.endswith(f"-e .[dev] --extra-index-url {answering_url}")
    assert "1.1 GB" in done.stdout


def test_the_default_says_what_it_installs_and_offers_the_cpu_wheels() -> None:
    done = dry_run(".", index="http://unused.invalid")
    (command,) = pip_lines(done.stdout)
    assert "--extra-index-url" not in command and " -q" not in command  # pip shows its progress
    first = done.stdout.splitlines()[0]
    assert first.startswith("camserve: installing camserve (.)") and "5.6 GB" in first
    assert "TORCH=cpu" in done.stdout


def test_pip_failing_with_the_cpu_index_tries_the_default_one(
    capsys: pytest.CaptureFixture[str],
) -> None:
    ran: list[Sequence[str]] = []

    def pip(command: Sequence[str]) -> int:
        ran.append(command)
        return 1 if len(ran) == 1 else 0

    status = install.install(".", "cpu", run=pip, probe=lambda url: None, cpu_index="http://i/cpu")
    assert status == 0
    assert [c[-2:] for c in ran] == [["--extra-index-url", "http://i/cpu"], ["-e", "."]]
    assert "trying again from the default index" in capsys.readouterr().out


def test_the_probe_names_why_an_index_cannot_be_read(refusing_url: str, answering_url: str) -> None:
    assert "refused" in (install.unreachable(refusing_url) or "")
    assert install.unreachable(answering_url + "/torch/") is None


def test_a_disk_too_small_for_it_is_said_before_pip_starts(
    capsys: pytest.CaptureFixture[str],
) -> None:
    ran: list[Sequence[str]] = []

    def pip(command: Sequence[str]) -> int:
        ran.append(command)
        return 0

    status = install.install(".[dev]", "default", run=pip, free=lambda _: int(2e9), has_torch=False)
    # 2 GB holds neither the venv (6.6 GB) nor, wherever they go, the downloads (3 GB)
    out = capsys.readouterr().out
    assert status == 1 and ran == []
    assert "not enough disk space" in out and "2.0 GB free" in out and "TORCH=cpu" in out


@pytest.mark.parametrize(
    ("target", "torch", "free_gb", "fits"),
    [
        (".", "cpu", 1.5, True),  # 1.1 + 0.3 of downloads
        (".", "cpu", 1.3, False),
        (".[dev]", "cpu", 2.3, False),  # the developer extras add about 1 GB
        (".[dev]", "default", 9.7, True),
        (".", "default", 8.0, False),
    ],
)
def test_the_space_asked_for_follows_the_wheels_and_extras(
    target: str, torch: str, free_gb: float, fits: bool
) -> None:
    free = lambda _: int(free_gb * 1e9)  # noqa: E731
    # pip's temporary folder on the venv's disk: both count there
    problem = install.space_problem(target, torch, free=free, has_torch=False, temp=sys.prefix)
    assert (problem is None) == fits, problem


def test_a_venv_that_holds_torch_already_is_not_asked_for_space() -> None:
    assert install.space_problem(".[dev]", "default", free=lambda _: 0, has_torch=True) is None


def test_downloads_on_another_disk_are_counted_there() -> None:
    other = "/dev/shm"
    if not Path(other).is_dir() or os.stat(other).st_dev == os.stat(sys.prefix).st_dev:
        pytest.skip("no second file system here")
    free = {sys.prefix: int(1.2e9), other: int(0.2e9)}  # the venv fits, the downloads do not
    problem = install.space_problem(".", "cpu", free=free.__getitem__, has_torch=False, temp=other)
    assert problem is not None and problem.startswith(other) and "0.3 GB" in problem
