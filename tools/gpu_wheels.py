"""Fill ``.whl/`` with the wheels a GPU machine lacks for ``tools/gpu_lanes_check.sh``.

    python tools/gpu_wheels.py            # download into .whl/ (about 15 MB), then check them
    python tools/gpu_wheels.py --check    # only check what .whl/ holds

The device machines (docs: the device tool's KINDS.md) run Python 3.12 with PyTorch, torchvision,
numpy, Pillow, OpenCV, httpx, grpcio and protobuf among others, but not the web stack of the
service or the peer's CAM library; nothing can be fetched there. This downloads, for CPython 3.12
on manylinux x86-64, each package below at the version this machine's environment runs (the one
the suite passed with), or at the newest release for the peer's packages, which camserve never
imports. ``--no-deps``: the list is the whole set; the check below proves it complete.

The check installs the wheels into a temporary folder with a Python 3.12 (``--python``, found
through pyenv if ``python3.12`` is not on PATH) and imports every module the service needs that
does not import torch, so that a missing dependency shows here, not in the minutes of a device
session. Keep ``.whl/`` out of git (``echo /.whl/ >> .git/info/exclude``); the device tool carries
it with ``carry: [".whl"]``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDER = ROOT / ".whl"

#: What the service needs beyond the device image (at this environment's versions).
SERVICE = (
    "fastapi",
    "starlette",
    "annotated-doc",
    "opentelemetry-api",  # fastapi 0.16x imports it
    "uvicorn",
    "httptools",
    "pydantic",
    "pydantic-core",
    "pydantic-settings",
    "python-dotenv",
    "python-multipart",
    "fastapi-offline",
    "typing-inspection",
    "annotated-types",
    "typing-extensions",
    "anyio",
    "redis",
    "httpx-sse",
    "prometheus-client",
    # Bounded together in pyproject.toml; the image's own may be newer than those bounds.
    "grpcio",
    "grpcio-health-checking",
    "protobuf",
)
#: The peer of bench/gpu_pipeline.py (FastAPI + pytorch-grad-cam); its other needs (OpenCV,
#: scikit-learn, matplotlib, tqdm) are in the image.
PEER = ("grad-cam", "ttach")
#: In the device image already: installed beside the wheels for the check only (from a cache
#: folder, never carried), so that the modules below import as they will there.
DEVICE_HAS = ("httpx", "httpcore", "h11", "idna", "certifi", "click", "numpy")
#: Imported by the check: every module of the service's stack that loads without torch.
MODULES = (
    "fastapi",
    "starlette",
    "uvicorn",
    "httptools",
    "pydantic",
    "pydantic_settings",
    "multipart",
    "fastapi_offline",
    "redis",
    "httpx_sse",
    "prometheus_client",
    "grpc",
    "grpc_health.v1.health_pb2_grpc",
    "google.protobuf",
)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


def pinned(name: str) -> str:
    """``name`` at the version this environment runs (the one the suite passed with)."""
    try:
        return f"{name}=={version(name)}"
    except PackageNotFoundError:
        sys.exit(f"{name} is not installed here: run `make dev` first (its version is the pin)")


def download(packages: list[str], folder: Path = FOLDER) -> None:
    folder.mkdir(exist_ok=True)
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            "3.12",
            "--implementation",
            "cp",
            *platforms,
            "-d",
            str(folder),
            *packages,
        ],
        check=True,
    )


def python312(given: str | None) -> str:
    if given:
        return given
    found = shutil.which("python3.12")
    if found:
        probe = subprocess.run([found, "--version"], capture_output=True, text=True)
        if probe.returncode == 0:
            return found
    pyenv = shutil.which("pyenv")
    if pyenv:
        versions = subprocess.run(
            [pyenv, "versions", "--bare"], capture_output=True, text=True
        ).stdout.split()
        for name in sorted(versions, reverse=True):
            if name.startswith("3.12"):
                root = subprocess.run(
                    [pyenv, "root"], capture_output=True, text=True
                ).stdout.strip()
                return str(Path(root) / "versions" / name / "bin" / "python3.12")
    sys.exit("no Python 3.12 found to check the wheels with: pass --python PATH")


def check(python: str) -> None:
    wheels = sorted(FOLDER.glob("*.whl"))
    names = [w.name.split("-")[0].lower().replace("_", "-") for w in wheels]
    twice = {n for n in names if names.count(n) > 1}
    if twice:
        sys.exit(f".whl/ holds two versions of {', '.join(sorted(twice))}: keep one of each")
    image = Path(tempfile.gettempdir()) / "camserve-device-image-wheels"
    if not list(image.glob("*.whl")):
        download([pinned(name) for name in DEVICE_HAS], image)
    with tempfile.TemporaryDirectory() as target:
        subprocess.run(
            [python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
            + ["--target", target, *map(str, wheels), *map(str, image.glob("*.whl"))],
            check=True,
        )
        code = "import importlib\n" + "".join(
            f"importlib.import_module({module!r})\n" for module in MODULES
        )
        # -I: none of this machine's own packages (PYTHONPATH, user site) take part
        script = f"import sys\nsys.path.insert(0, {target!r})\n{code}"
        if subprocess.run([python, "-I", "-c", script]).returncode != 0:
            sys.exit("a module did not import from .whl/ (above): add the package it names")
    size = sum(w.stat().st_size for w in wheels) / 2**20
    print(f".whl/: {len(wheels)} wheels, {size:.1f} MiB; every module imports on {python}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only check .whl/")
    parser.add_argument("--python", help="a Python 3.12 to check with (default: found)")
    args = parser.parse_args()
    if not args.check:
        download([pinned(name) for name in SERVICE])
        download(list(PEER))  # the newest releases
    check(python312(args.python))


if __name__ == "__main__":
    main()
