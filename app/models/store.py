"""The layout of the model store on disk: model folders, their version folders, fingerprints.

A model folder holds either one manifest (``resnet/model.toml``: one version, numbered 1) or
numbered version folders (``resnet/1/model.toml``, ``resnet/2/model.toml``). Which versions are
served is the ``[version_policy]`` of the newest version's manifest: ``latest = N`` (the default,
N = 1), ``all = true`` or ``specific = [1, 3]``. Folders whose names start with ``.`` or ``_`` are
skipped, so a model can be copied in under ``_name`` and renamed when complete.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

from app.models.manifest import MANIFEST_NAME, PolicyError, VersionPolicy, parse_policy

logger = logging.getLogger(__name__)

UNVERSIONED = 1
"""The version number of a model folder without version folders."""

Fingerprint = tuple[tuple[str, int, int], ...]
"""(relative path, size, modification time in ns) of every file under a folder."""


def hidden(path: Path) -> bool:
    return path.name.startswith((".", "_"))


def model_folders(store: Path) -> list[Path]:
    """The store's model folders, sorted by name (empty when the store does not exist)."""
    if not store.is_dir():
        return []
    return sorted(p for p in store.iterdir() if p.is_dir() and not hidden(p))


def fingerprint(folder: Path) -> Fingerprint:
    """What changes when a file under ``folder`` is added, removed, rewritten or touched."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "_")))
        for name in files:
            if name.startswith("."):
                continue
            path = Path(root) / name
            try:
                stat = path.stat()
            except OSError:  # removed while we looked: the next scan sees the rest
                continue
            found.append((str(path.relative_to(folder)), stat.st_size, stat.st_mtime_ns))
    return tuple(sorted(found))


@dataclass(frozen=True)
class ModelLayout:
    """What one model folder holds."""

    name: str
    folder: Path
    versioned: bool
    versions: dict[int, Path]
    """The served versions' folders, by number (``{1: folder}`` when unversioned)."""
    available: tuple[int, ...]
    """Every version folder found, served or not."""
    policy: VersionPolicy
    problem: str | None = None
    """Why no version can be served at all (empty folder, broken policy)."""


def read_layout(folder: Path) -> ModelLayout:
    """The versions of ``folder`` and which of them its policy serves."""
    numbered = {
        int(p.name): p
        for p in folder.iterdir()
        if p.is_dir() and p.name.isdigit() and int(p.name) >= 1
    }
    if not numbered:
        return ModelLayout(
            folder.name, folder, False, {UNVERSIONED: folder}, (UNVERSIONED,), VersionPolicy()
        )
    newest = numbered[max(numbered)] / MANIFEST_NAME
    policy = VersionPolicy()
    problem = None
    try:
        data = tomllib.loads(newest.read_text(encoding="utf-8"))
        if "version_policy" in data:
            policy = parse_policy(data["version_policy"])
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        pass  # the newest version's own load reports its broken manifest
    except PolicyError as error:
        problem = f"{max(numbered)}/{MANIFEST_NAME}: {error}"
    selected = policy.select(list(numbered))
    if not selected and problem is None:
        problem = (
            f"version_policy ({policy.describe()}) selects none of the versions "
            f"{', '.join(map(str, sorted(numbered)))}"
        )
    return ModelLayout(
        folder.name,
        folder,
        True,
        {n: numbered[n] for n in selected} if problem is None else {},
        tuple(sorted(numbered)),
        policy,
        problem,
    )
