"""What a manifest in the model store may reach: which code it may run, which files it may read.

Whoever can write the store chooses the manifests, so a manifest is treated as untrusted input:

- ``architecture = "package.module:factory"`` imports a module and calls a function of it with
  the manifest's kwargs. Only modules the operator trusts may be named: torchvision's models,
  the service's own zoo (``app.models.zoo``) and those listed in ``CAMSERVE_TRUSTED_MODULES``.
  The check is on the name, before anything is imported; the factory must then be defined in
  that module (a name it merely imports, such as ``subprocess.run``, is refused too).
- Files a manifest names (``weights``, ``labels``) are paths inside its own folder: no absolute
  path, no ``..``, nothing the scans pass over (``watched``). The files read (the manifest too)
  must also lie inside the store once symbolic links are followed, unless
  ``CAMSERVE_ALLOW_LINKS_OUT_OF_STORE`` is on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

BUILTIN_MODULES = ("torchvision.models", "app.models.zoo")
"""Modules trusted without being listed: they ship with torchvision and with the service."""

TRUST_SETTING = "CAMSERVE_TRUSTED_MODULES"
LINKS_SETTING = "CAMSERVE_ALLOW_LINKS_OUT_OF_STORE"
_MODULE_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_ATTRIBUTE_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


SKIPPED_FILES = (".",)
SKIPPED_FOLDERS = (".", "_")
"""Name prefixes of the files and folders that the store's scans pass over
(``app.models.store.fingerprint``): staging copies, editor files."""


def watched(relative: PurePosixPath) -> bool:
    """Whether the scans see the file at ``relative`` (under a model folder) change."""
    *folders, name = relative.parts
    return not name.startswith(SKIPPED_FILES) and not any(
        folder.startswith(SKIPPED_FOLDERS) for folder in folders
    )


class AccessError(ValueError):
    """A manifest names code or a file it may not reach; the message says which and why."""


def within(module: str, parent: str) -> bool:
    """Whether ``module`` is ``parent`` or one of its submodules (``a.bc`` is not in ``a.b``)."""
    return module == parent or module.startswith(parent + ".")


@dataclass(frozen=True)
class StoreAccess:
    """The rules a store's manifests are held to."""

    root: Path | None = None
    """The store: files must resolve inside it. None: a folder read on its own (tools, tests),
    where only the lexical rule holds."""
    trusted_modules: tuple[str, ...] = ()
    """``CAMSERVE_TRUSTED_MODULES``, beyond ``BUILTIN_MODULES``."""
    links_out: bool = False
    """``CAMSERVE_ALLOW_LINKS_OUT_OF_STORE``."""

    @property
    def trusted(self) -> tuple[str, ...]:
        return BUILTIN_MODULES + self.trusted_modules

    def check_architecture(self, architecture: str) -> None:
        """Refuse a ``module:factory`` whose module is not trusted, before it is imported."""
        if ":" not in architecture or architecture.startswith("timm:"):
            return  # a torchvision builder name, or timm.create_model: no module is imported
        module, _, attribute = architecture.partition(":")
        if not _MODULE_RE.fullmatch(module) or not _ATTRIBUTE_RE.fullmatch(attribute):
            raise AccessError(
                f"architecture {architecture!r} is not package.module:factory "
                "(dotted module name, a colon, a function name)"
            )
        if not any(within(module, parent) for parent in self.trusted):
            listed = ", ".join(self.trusted_modules) or "nothing"
            raise AccessError(
                f"architecture {architecture!r}: module {module} is not trusted, so it is not "
                f"imported. Manifests may use torchvision names, timm:NAME and factories of "
                f"{', '.join(BUILTIN_MODULES)} and of the modules {TRUST_SETTING} lists (now: "
                f"{listed}). If you trust {module} as much as the service's own code, add it to "
                f"{TRUST_SETTING}."
            )

    def inside(self, folder: Path, relative: str, what: str) -> Path:
        """``folder / relative``, once sure it stays in ``folder`` as written and in the store
        once links are followed; AccessError naming ``what`` otherwise."""
        written = PurePosixPath(relative)
        if not relative or written.is_absolute() or ".." in written.parts or "\0" in relative:
            raise AccessError(
                f"{what} {relative!r} must be a path inside the model's folder (no absolute "
                "path, no '..')"
            )
        if not watched(written):
            raise AccessError(
                f"{what} {relative!r} is hidden from the scans that see a model's files change "
                "(a file name that starts with '.', a folder that starts with '.' or '_'): a "
                "reload would keep the old file's contents. Rename it"
            )
        path = folder / written
        self.check_resolved(path, what)
        return path

    def check_resolved(self, path: Path, what: str) -> None:
        """Refuse ``path`` when a symbolic link takes it out of the store."""
        if self.root is None or self.links_out:
            return
        root = self.root.resolve()
        try:
            resolved = path.resolve()
        except (OSError, RuntimeError) as error:  # a loop of links
            raise AccessError(f"{what} cannot be resolved: {error.__class__.__name__}") from None
        if resolved != root and root not in resolved.parents:
            raise AccessError(
                f"{what} leads outside the model store through a symbolic link; links out of "
                f"the store are refused unless {LINKS_SETTING}=true"
            )


def factory_defined_in(module: str, factory: Any) -> bool:
    """Whether ``factory`` comes from ``module`` (or a submodule), not from a name the module
    imported from elsewhere."""
    return within(str(getattr(factory, "__module__", "") or ""), module)
