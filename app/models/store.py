"""The layout of the model store on disk: model folders, their version folders, fingerprints.

A model folder holds either one manifest (``resnet/model.toml``: one version, numbered 1) or
numbered version folders (``resnet/1/model.toml``, ``resnet/2/model.toml``). Which versions are
served is the ``[version_policy]`` of the newest version's manifest: ``latest = N`` (the default,
N = 1), ``all = true`` or ``specific = [1, 3]``. A version folder's name is a number written with
ASCII digits and no leading zero (``²`` or ``01`` are other folders). Folders whose names start
with ``.`` or ``_`` are skipped, so a model can be copied in under ``_name`` and renamed when
complete.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import stat as stat_mode
from dataclasses import dataclass
from pathlib import Path

from app.errors import InvalidModelName, clip
from app.models.access import SKIPPED_FILES, SKIPPED_FOLDERS, StoreAccess
from app.models.manifest import (
    MANIFEST_NAME,
    ManifestError,
    PolicyError,
    VersionPolicy,
    parse_policy,
    read_manifest_data,
)

logger = logging.getLogger(__name__)

UNVERSIONED = 1
"""The version number of a model folder without version folders."""

Fingerprint = tuple[tuple[str, int, int], ...]
"""(relative path, size, modification time in ns) of every regular file under a folder."""

MAX_NAME_BYTES = 255
"""The longest file name most file systems allow (NAME_MAX), in UTF-8 bytes."""
_VERSION_RE = re.compile(r"[1-9][0-9]{0,17}")


def check_name(name: str) -> None:
    """Refuse a model name that no folder can have, before any file system call: a longer one
    would fail with ENAMETOOLONG, one with ``/`` would name another folder."""
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        size = -1
    if not 0 < size <= MAX_NAME_BYTES or "/" in name or "\0" in name:
        raise InvalidModelName(
            f"Model name {clip(name)} is not a folder name: a model name has 1 to "
            f"{MAX_NAME_BYTES} bytes (UTF-8) and no '/' or NUL. GET /models lists the models.",
            details={"max_bytes": MAX_NAME_BYTES},
        )


def version_number(name: str) -> int | None:
    """The version a folder called ``name`` holds, or None when it is no version folder."""
    return int(name) if _VERSION_RE.fullmatch(name) else None


def hidden(path: Path) -> bool:
    return path.name.startswith(SKIPPED_FOLDERS)


def model_folders(store: Path) -> list[Path]:
    """The store's model folders, sorted by name (empty when the store does not exist). A
    folder whose name is not UTF-8 is skipped (and logged once): no request can name it and no
    JSON answer can carry its name."""
    if not store.is_dir():
        return []
    return sorted(p for p in store.iterdir() if p.is_dir() and not hidden(p) and _named(p))


def _named(folder: Path) -> bool:
    try:
        folder.name.encode("utf-8")
    except UnicodeEncodeError:
        _skip_unnamed(folder)
        return False
    return True


@functools.cache
def _skip_unnamed(folder: Path) -> None:
    logger.warning(
        "model folder %r in %s is skipped: its name is not UTF-8, so no request can name it "
        "and no answer can show it; rename it with a UTF-8 name",
        os.fsencode(folder.name),
        folder.parent,
    )


def fingerprint(folder: Path, store: Path | None = None) -> Fingerprint:
    """What changes when a file under ``folder`` is added, removed, rewritten or touched. A
    link to a folder is listed with its target and followed while it stays inside ``store``
    (None: never), each real folder once: a loop of links ends, a link out is not walked."""
    found: list[tuple[str, int, int]] = []
    walk = _Walk(folder, store.resolve() if store is not None else None, found)
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = [d for d in sorted(dirs) if walk.enters(Path(root) / d)]
        for name in files:
            if name.startswith(SKIPPED_FILES):
                continue
            path = Path(root) / name
            try:
                stat = path.stat()
            except OSError:  # removed while we looked: the next scan sees the rest
                continue
            if not stat_mode.S_ISREG(stat.st_mode):
                _skip_special(path, stat.st_mode)
                continue
            found.append((str(path.relative_to(folder)), stat.st_size, stat.st_mtime_ns))
    return tuple(sorted(found))


@functools.cache
def _skip_special(path: Path, mode: int) -> None:
    logger.warning(
        "%s is skipped: it is no regular file (a %s), so it is no part of a model; reading a "
        "FIFO would wait for a writer forever, a device such as /dev/zero never ends",
        path,
        _KINDS.get(stat_mode.S_IFMT(mode), "special file"),
    )


_KINDS = {
    stat_mode.S_IFIFO: "FIFO",
    stat_mode.S_IFSOCK: "socket",
    stat_mode.S_IFCHR: "character device",
    stat_mode.S_IFBLK: "block device",
}


_READ = 1 << 20


def content_digest(folder: Path, print_: Fingerprint) -> str:
    """A BLAKE2b digest of the bytes of the files ``print_`` lists under ``folder``: what tells
    apart two builds whose files agree in names, sizes and times (a reproducible image fixes
    every file's time, and new weights of one architecture have the old ones' size). A file
    that cannot be read, or is no regular file by the time it is opened, counts by its name
    alone (opened without blocking, so a FIFO put in a file's place is never waited on)."""
    digest = hashlib.blake2b(digest_size=32)
    for relative, _, _ in print_:
        digest.update(relative.encode() + b"\0")
        try:
            descriptor = os.open(folder / relative, os.O_RDONLY | os.O_NONBLOCK)
        except OSError:
            digest.update(b"\0unreadable")
            continue
        with os.fdopen(descriptor, "rb") as file:
            try:
                if not stat_mode.S_ISREG(os.fstat(descriptor).st_mode):
                    raise OSError("no regular file")
                while chunk := file.read(_READ):
                    digest.update(chunk)
            except OSError:
                digest.update(b"\0unreadable")
    return digest.hexdigest()


class _Walk:
    """Which subfolders a fingerprint goes into (``fingerprint``)."""

    def __init__(self, folder: Path, store: Path | None, found: list[tuple[str, int, int]]):
        self.folder = folder
        self.store = store
        self.found = found
        self.visited = {_identity(folder)}

    def enters(self, path: Path) -> bool:
        if path.name.startswith(SKIPPED_FOLDERS):
            return False
        try:
            if path.is_symlink():
                target = os.readlink(path)
                self.found.append((f"{path.relative_to(self.folder)} -> {target}", 0, 0))
                if not self._inside_store(path):
                    return False
        except OSError:  # removed while we looked: the next scan sees the rest
            return False
        identity = _identity(path)
        if identity is None or identity in self.visited:
            return False
        self.visited.add(identity)
        return True

    def _inside_store(self, path: Path) -> bool:
        if self.store is None:
            return False
        try:
            resolved = path.resolve()
        except (OSError, RuntimeError):  # a loop of links
            return False
        return resolved == self.store or self.store in resolved.parents


def _identity(path: Path) -> tuple[int, int] | None:
    """The real folder ``path`` leads to (device, inode); None when it cannot be read."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


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


def read_layout(
    folder: Path, access: StoreAccess | None = None, fallback: VersionPolicy | None = None
) -> ModelLayout:
    """The versions of ``folder`` and which of them its policy serves; OSError when the folder
    cannot be listed. When the newest version's manifest cannot be read, its policy is unknown:
    ``fallback`` (the policy the serving versions were chosen by) chooses, so that a broken
    newest manifest does not drop the versions a policy serves; without one, the default."""
    numbered: dict[int, Path] = {}
    for path in folder.iterdir():
        number = version_number(path.name)
        if number is not None and path.is_dir():
            numbered[number] = path
    if not numbered:
        return ModelLayout(
            folder.name, folder, False, {UNVERSIONED: folder}, (UNVERSIONED,), VersionPolicy()
        )
    policy = VersionPolicy()
    problem = None
    try:
        data = read_manifest_data(numbered[max(numbered)], access or StoreAccess())
        if "version_policy" in data:
            policy = parse_policy(data["version_policy"])
    except ManifestError:
        # The newest version's own load reports its broken manifest.
        policy = fallback or policy
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
