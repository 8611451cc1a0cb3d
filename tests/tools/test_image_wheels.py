"""What a wheel folder lacks for another Python: markers evaluated for the image, not the host."""

from __future__ import annotations

import zipfile
from pathlib import Path

from packaging.markers import default_environment

from tools.image_wheels import environment, missing


def wheel(folder: Path, name: str, version: str, *requires: str) -> None:
    lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    lines += [f"Requires-Dist: {line}" for line in requires]
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{name}-{version}.dist-info/METADATA", "\n".join(lines) + "\n")


def env(full_version: str) -> dict[str, str]:
    return {**default_environment(), "python_full_version": full_version}


def test_the_environment_is_the_one_packaging_evaluates_markers_in() -> None:
    assert environment() == default_environment()


def test_a_dependency_only_the_images_older_python_needs_is_missing(tmp_path: Path) -> None:
    # redis 8 asks for async-timeout below Python 3.11.3; the host has 3.11.7, the image 3.11.2.
    wheel(tmp_path, "redis", "8.2.0", 'async-timeout>=4.0.3; python_full_version < "3.11.3"')
    assert missing(tmp_path, ["redis>=5.0"], env("3.11.7")) == []
    assert missing(tmp_path, ["redis>=5.0"], env("3.11.2")) == ["async-timeout>=4.0.3"]
    wheel(tmp_path, "async_timeout", "5.0.1")
    assert missing(tmp_path, ["redis>=5.0"], env("3.11.2")) == []


def test_extras_markers_and_versions_are_followed(tmp_path: Path) -> None:
    wheel(tmp_path, "uvicorn", "0.55.0", "h11>=0.8", 'uvloop>=0.15; extra == "standard"')
    wheel(tmp_path, "h11", "0.16.0")
    wheel(tmp_path, "uvloop", "0.10.0")  # too old for the extra's bound
    requirements = ["uvicorn>=0.27", "", 'tomli>=2; python_version < "3.11"']
    assert missing(tmp_path, requirements, env("3.11.2")) == []
    assert missing(tmp_path, ["uvicorn[standard]>=0.27"], env("3.11.2")) == ["uvloop>=0.15"]
    assert missing(tmp_path, ["uvicorn>=0.60"], env("3.11.2")) == ["uvicorn>=0.60"]
