"""Install camserve into a virtual environment, as ``make serve`` and ``make dev`` do.

It says what it installs, about how big and how long, before it starts, and lets pip show its
progress. ``--torch cpu`` (``make serve TORCH=cpu``) takes PyTorch's CPU wheels from PyTorch's
CPU index (``CAMSERVE_TORCH_INDEX``, else https://download.pytorch.org/whl/cpu), which carry
no CUDA libraries; when that index cannot be reached, or pip fails with it, the install goes on
from pip's default index, and says so.

Runs under the venv's own Python with the standard library only (nothing is installed yet).
``--dry-run`` prints the pip command instead of running it (the index is still probed).

    python tools/install.py [--torch default|cpu] [--dry-run] [TARGET]   # TARGET: . or '.[dev]'
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence

CPU_INDEX = "https://download.pytorch.org/whl/cpu"
CPU_INDEX_ENV = "CAMSERVE_TORCH_INDEX"
PROBE_TIMEOUT_S = 10.0
# Measured: a fresh venv with `pip install -e .` holds 5.6 GB, 5.2 GB of it torch (1.2 GB), its
# CUDA libraries (nvidia-*, 3.2 GB) and triton (0.9 GB); it took 5 min 45 s from a local wheel
# mirror on 2 busy cores. torch's CPU wheel is a 0.2 GB download that unpacks to 0.7 GB.
SIZES = {
    "default": "PyTorch with its CUDA libraries, about 5.6 GB on disk (about 3 GB to download; "
    "5 to 10 minutes on a fast connection)",
    "cpu": "PyTorch's CPU wheels, about 1.1 GB on disk (about 0.3 GB to download; a few minutes)",
}
# What the install writes, in GB: the venv (the developer extras add about 1 GB: a dev venv holds
# 6.6 GB) and pip's downloads, unpacked in the temporary folder while it installs.
ON_DISK_GB = {"default": 5.6, "cpu": 1.1}
EXTRAS_GB = 1.0
DOWNLOAD_GB = {"default": 3.0, "cpu": 0.3}

Runner = Callable[[Sequence[str]], int]
Probe = Callable[[str], str | None]
Free = Callable[[str], int]
"""Free bytes on the file system that holds a path."""


def free_bytes(path: str) -> int:
    return shutil.disk_usage(path).free


def space_problem(
    target: str,
    torch: str,
    *,
    free: Free = free_bytes,
    has_torch: bool | None = None,
    temp: str | None = None,
) -> str | None:
    """Why the install cannot fit on disk, or None. pip stops half way with "No space left on
    device" otherwise, minutes in and with a venv half written. A venv that already holds torch
    (a reinstall after pyproject.toml changed) keeps it, so it needs little and is not checked."""
    if has_torch is None:
        has_torch = importlib.util.find_spec("torch") is not None
    if has_torch:
        return None
    venv_gb = ON_DISK_GB[torch] + (EXTRAS_GB if "[" in target else 0.0)
    need = {sys.prefix: venv_gb}
    temp = temp or tempfile.gettempdir()
    if os.stat(temp).st_dev == os.stat(sys.prefix).st_dev:
        need[sys.prefix] += DOWNLOAD_GB[torch]
    else:
        need[temp] = DOWNLOAD_GB[torch]
    for path, gb in need.items():
        have = free(path) / 1e9
        if have < gb:
            return (
                f"{path} has {have:.1f} GB free and this install needs about {gb:.1f} GB there "
                "(the venv, and pip's downloads when the temporary folder is on the same disk). "
                "Free some space, point TMPDIR at another disk for the downloads, or install "
                "PyTorch's CPU wheels (`make serve TORCH=cpu`: 4.5 GB less)."
            )
    return None


def say(message: str) -> None:
    print(f"camserve: {message}", flush=True)


def unreachable(url: str) -> str | None:
    """Why ``url`` cannot be read (within PROBE_TIMEOUT_S), or None when it answers."""
    try:
        with urllib.request.urlopen(url, timeout=PROBE_TIMEOUT_S) as response:  # noqa: S310 (an https index, or one the user set)
            response.read(1)
    except (urllib.error.URLError, OSError, ValueError) as error:
        return str(getattr(error, "reason", error)) or type(error).__name__
    return None


def pip_command(target: str, index: str | None) -> list[str]:
    command = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-e", target]
    if index is not None:
        # Beside the default index, as the Dockerfile does: pip prefers torch's +cpu local
        # version of the same release, and takes everything else from the default index.
        command += ["--extra-index-url", index]
    return command


def install(
    target: str,
    torch: str,
    *,
    dry_run: bool = False,
    run: Runner = subprocess.call,
    probe: Probe = unreachable,
    cpu_index: str | None = None,
    free: Free = free_bytes,
    has_torch: bool | None = None,
) -> int:
    """Install ``target`` (pip's requirement, e.g. ``.[dev]``) with the wheels of ``torch``;
    returns pip's exit status (1 before pip when the disk cannot hold it)."""
    index, asked = None, torch
    if torch == "cpu":
        index = cpu_index or os.environ.get(CPU_INDEX_ENV) or CPU_INDEX
        reason = probe(f"{index.rstrip('/')}/torch/")
        if reason is not None:
            say(
                f"PyTorch's CPU index {index} cannot be reached ({reason}); falling back to the "
                "default index (set CAMSERVE_TORCH_INDEX to a mirror of it to keep the CPU wheels)."
            )
            index, torch = None, "default"
    where = "" if index is None else f", torch from {index}"
    say(f"installing camserve ({target}) and its dependencies{where}: {SIZES[torch]}.")
    if asked == "default":
        say("no NVIDIA GPU here? `make serve TORCH=cpu` installs the CPU wheels (4.5 GB less).")
    problem = space_problem(target, torch, free=free, has_torch=has_torch)
    if problem is not None:
        say(f"not enough disk space: {problem}")
        return 1
    status = _run(pip_command(target, index), run, dry_run)
    if status != 0 and index is not None:
        say(f"pip failed with PyTorch's CPU index {index}; trying again from the default index.")
        status = _run(pip_command(target, None), run, dry_run)
    return status


def _run(command: list[str], run: Runner, dry_run: bool) -> int:
    if dry_run:
        print(" ".join(command), flush=True)
        return 0
    return run(command)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("target", nargs="?", default=".", help="what to install: . or '.[dev]'")
    parser.add_argument(
        "--torch",
        choices=["default", "cpu"],
        default="default",
        help="default: PyTorch from pip's index (with CUDA on Linux); cpu: PyTorch's CPU wheels",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print the pip command instead of running it"
    )
    args = parser.parse_args(argv)
    return install(args.target, args.torch, dry_run=args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
