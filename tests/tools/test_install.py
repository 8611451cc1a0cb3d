"""``tools/install.py``: what ``make serve`` and ``make dev`` install, and the CPU wheels'
fallback to the default index when PyTorch's CPU index cannot be reached. Nothing is installed:
``--dry-run`` prints the pip command, or a recording stands in for pip."""

from __future__ import annotations

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
