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
import os
import subprocess
import sys
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

Runner = Callable[[Sequence[str]], int]
Probe = Callable[[str], str | None]


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
) -> int:
    """Install ``target`` (pip's requirement, e.g. ``.[dev]``) with the wheels of ``torch``;
    returns pip's exit status."""
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
