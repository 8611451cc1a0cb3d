"""The model store: discover its models, load, reload and unload them, look them up by name.

Loading is copy-on-write: a (re)load builds and warms the new versions beside the serving ones,
then swaps one new ``ModelEntry`` in. A request holds the ``LoadedModel`` it got from ``get`` for
its whole run, so it finishes on the model it started on; the old model is freed when the last
such request lets go of it. A reload that fails keeps the old version serving and records why.

Each model loads in its own guard: whatever one folder holds (an unreadable folder, a manifest
that is not TOML, a link out of the store), that model shows ``failed`` with the reason, once in
the log, and the others load.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch

from app.cam.names import close_matches
from app.errors import ModelBusy, ModelNotFound, ModelUnavailable, clip
from app.models.access import AccessError, StoreAccess
from app.models.loading import LoadedModel, load_model
from app.models.manifest import ManifestError, ModelSpec, VersionPolicy, parse_manifest
from app.models.store import (
    Fingerprint,
    ModelLayout,
    check_name,
    content_digest,
    fingerprint,
    hidden,
    model_folders,
    read_layout,
)
from app.settings import Settings

logger = logging.getLogger(__name__)

Status = Literal["loading", "ready", "failed", "unloaded"]
Control = Literal["none", "poll", "explicit"]

_FIX_HINT: dict[str, str] = {
    "none": "Fix its folder in the model store and restart the service.",
    "poll": "Fix its folder in the model store; it is reloaded at the next scan.",
    "explicit": "Fix its folder in the model store, then POST /models/{name}/load.",
}


@dataclass
class ModelVersion:
    """One version of a model and how far its loading got."""

    number: int
    status: Status = "loading"
    spec: ModelSpec | None = None
    error: str | None = None
    """Why it failed to load (status ``failed``)."""
    reload_error: str | None = None
    """Why its last reload failed while the previous load goes on serving (status ``ready``)."""
    model: LoadedModel | None = None
    load_seconds: float | None = None
    fingerprint: Fingerprint = ()
    content: str = ""
    """The digest of its files' bytes (``content_digest``), read before the load: the
    explanation cache tells builds apart by it."""


@dataclass
class ModelEntry:
    """One folder of the store: its versions, and whether it is loaded at all."""

    name: str
    versions: dict[int, ModelVersion] = field(default_factory=dict)
    versioned: bool = False
    problem: str | None = None
    """Why no version could be tried (an empty folder, a broken ``[version_policy]``)."""
    unloaded: bool = False
    fingerprint: Fingerprint = ()
    """Of the whole folder when it was last (re)loaded: the poll compares it with the disk."""
    reload_problem: str | None = None
    """Why the last reload could not read the folder while the previous load goes on serving."""
    policy: VersionPolicy | None = None
    """The ``[version_policy]`` its versions were chosen by: a reload whose newest manifest
    cannot be read keeps choosing by it (``read_layout``'s ``fallback``)."""
    since: float = field(default_factory=time.monotonic)
    """When this state began (``time.monotonic``): how long a model has been loading."""

    @property
    def serving(self) -> ModelVersion | None:
        """The newest ready version (the one ``model=name`` gets), or None."""
        ready = [v for v in self.versions.values() if v.status == "ready"]
        return max(ready, key=lambda v: v.number) if ready else None

    @property
    def newest(self) -> ModelVersion | None:
        return self.versions[max(self.versions)] if self.versions else None

    @property
    def status(self) -> Status:
        if self.unloaded:
            return "unloaded"
        if self.serving is not None:
            return "ready"
        if self.problem is None and (
            not self.versions or any(v.status == "loading" for v in self.versions.values())
        ):
            return "loading"
        return "failed"

    @property
    def shown(self) -> ModelVersion | None:
        """The version ``/models`` describes: the serving one, else the newest."""
        return self.serving or self.newest

    @property
    def spec(self) -> ModelSpec | None:
        shown = self.shown
        return shown.spec if shown else None

    @property
    def model(self) -> LoadedModel | None:
        serving = self.serving
        return serving.model if serving else None

    @property
    def error(self) -> str | None:
        """Why the model cannot serve (None while a version serves)."""
        if self.problem is not None:
            return self.problem
        if self.serving is not None or self.unloaded:
            return None
        failed = [f"version {v.number}: {v.error}" for v in self.versions.values() if v.error]
        if not self.versioned:
            return self.newest.error if self.newest else None
        return "; ".join(failed) or None

    @property
    def reload_error(self) -> str | None:
        """Why the last reload failed while older loads keep serving."""
        failed = [
            (f"version {v.number}: " if self.versioned else "") + v.reload_error
            for v in self.versions.values()
            if v.reload_error
        ]
        if self.reload_problem:
            failed.insert(0, self.reload_problem)
        return "; ".join(failed) or None

    @property
    def load_seconds(self) -> float | None:
        shown = self.shown
        return shown.load_seconds if shown else None


def close_first(name: str, candidates: list[str] | tuple[str, ...]) -> list[str]:
    """All candidates, the ones that look like ``name`` first."""
    close = close_matches(name, candidates, n=5, cutoff=0.5)
    return close + sorted(c for c in candidates if c not in close)


class ModelRegistry:
    """Models of one store, keyed by folder name; a broken model never hides the others."""

    def __init__(
        self,
        store: Path,
        device: torch.device,
        default_model: str,
        control: Control = "none",
        *,
        access: StoreAccess | None = None,
        stall_s: float = 600.0,
    ) -> None:
        self.store = store
        self.device = device
        self.default_model = default_model
        self.control = control
        self.access = access or StoreAccess(root=store)
        """What the store's manifests may import and read."""
        self.stall_s = stall_s
        """How long a model may stay loading before the registry stops being ready."""
        self.entries: dict[str, ModelEntry] = {}
        """Replaced, never changed in place, by a (re)load: readers iterate a stable dict."""
        self._loaded = threading.Event()
        self._busy: set[str] = set()
        self._busy_lock = threading.Lock()
        self._entries_lock = threading.Lock()
        """Held while ``entries`` is copied and replaced: two swaps never lose one another."""
        self._stall_reported: set[str] = set()

    @classmethod
    def from_settings(cls, settings: Settings, device: torch.device) -> ModelRegistry:
        """The registry of ``CAMSERVE_MODEL_STORE`` with the settings' rules for it."""
        return cls(
            settings.model_store,
            device,
            settings.default_model,
            settings.model_control,
            access=StoreAccess(
                root=settings.model_store,
                trusted_modules=tuple(settings.trusted_modules),
                links_out=settings.allow_links_out_of_store,
            ),
            stall_s=settings.model_load_stall_s,
        )

    # ------------------------------------------------------------------ startup

    def discover(self) -> None:
        """List the store's folders; every folder is a model entry, loading."""
        if not self.store.is_dir():
            logger.error("model store %s does not exist; no models are served", self.store)
            self._loaded.set()
            return
        try:
            folders = model_folders(self.store)
        except OSError as error:
            logger.error(
                "cannot list the model store %s: %s; no models are served", self.store, error
            )
            self._loaded.set()
            return
        self.entries = {folder.name: ModelEntry(folder.name) for folder in folders}
        if self.default_model not in self.entries:
            logger.warning(
                "default model %r is not in %s (found: %s)",
                self.default_model,
                self.store,
                ", ".join(self.entries) or "nothing",
            )

    def load_all(self) -> None:
        """Load every discovered model, each in its own guard; record failures, never raise."""
        try:
            for name in list(self.entries):
                try:
                    with self.claim(name):
                        if self._unloaded_meanwhile(name):
                            continue
                        self.load(name)
                except ModelBusy:  # the repository API got to it first
                    continue
                except Exception as error:  # one folder must not stop the others
                    self._fail(name, error)
        finally:
            self._loaded.set()

    def _unloaded_meanwhile(self, name: str) -> bool:
        """Whether the repository API unloaded ``name`` (or it went away) before the first
        scan came to it: that scan must not load it again."""
        entry = self.entries.get(name)
        return entry is None or entry.unloaded

    def _fail(self, name: str, error: Exception) -> None:
        """Show ``name`` as failed with why, when its load broke outside a version's guard."""
        reason = self._relative(_reason(error))
        logger.error("model %s failed to load: %s", name, reason, exc_info=error)
        try:
            print_ = self._print(self.store / name)
        except (OSError, ValueError):
            print_ = ()
        self._put(ModelEntry(name, problem=reason, fingerprint=print_))

    def _print(self, folder: Path) -> Fingerprint:
        """The folder's fingerprint; a folder that leads out of the store (refused) is not
        walked, so that a link to ``/`` costs a scan nothing."""
        try:
            self.access.check_resolved(folder, folder.name)
        except AccessError:
            return ((f"{folder.name} -> outside the store", 0, 0),)
        return fingerprint(folder, self.store)

    # ------------------------------------------------------------------ changes

    @contextmanager
    def claim(self, name: str) -> Iterator[None]:
        """Hold ``name`` for one load or unload in this block; ModelBusy (409) while another
        holds it."""
        self.acquire(name)
        try:
            yield
        finally:
            self.release(name)

    def acquire(self, name: str) -> None:
        """Hold ``name`` until ``release``; ModelBusy (409) while a load or unload holds it."""
        with self._busy_lock:
            if name in self._busy:
                raise ModelBusy(
                    f"Model {clip(name)} is being loaded or unloaded already; retry once that "
                    f"is done (GET /models/{name} shows its state).",
                    headers={"Retry-After": "1"},
                )
            self._busy.add(name)

    def release(self, name: str) -> None:
        with self._busy_lock:
            self._busy.discard(name)

    def changes(self) -> tuple[list[str], list[str]]:
        """What a poll should do: (folders new or changed since their load, entries whose
        folder is gone). OSError when the store itself is no folder now: a store that is
        unmounted or swapped for a moment does not unload every model."""
        if not self.store.is_dir():
            raise OSError(
                "it is not a folder now (removed, renamed or unmounted); the models loaded go "
                "on serving, and the first scan that finds it again compares their folders"
            )
        on_disk = {folder.name: self._print(folder) for folder in model_folders(self.store)}
        changed = [
            name
            for name, print_ in on_disk.items()
            if name not in self.entries or self.entries[name].fingerprint != print_
        ]
        gone = [name for name in self.entries if name not in on_disk]
        return changed, gone

    def load(self, name: str) -> ModelEntry:
        """(Re)load the folder ``name``: new and changed versions are built and warmed beside
        the serving ones, then swapped in; unchanged ones are kept. Call it under ``claim``."""
        check_name(name)
        folder = self.store / name
        if not _is_model_folder(folder, name):
            raise self._not_found(name, in_store=True)
        before = self.entries.get(name)
        old = before if before is not None and not before.unloaded else None
        if old is None:  # a new model shows as loading until it is done
            self._put(ModelEntry(name))
        folder_print = self._print(folder)
        try:
            layout = self._layout(folder, old.policy if old is not None else None)
        except (FileNotFoundError, NotADirectoryError):
            # The folder went away while we looked: leave things as they were.
            self._set(name, before)
            raise self._not_found(name, in_store=True) from None
        if layout.problem and old is not None and old.serving is not None:
            logger.error(
                "model %s cannot be reloaded (%s); the previous load goes on serving",
                name,
                layout.problem,
            )
            kept = replace(old, reload_problem=layout.problem, fingerprint=folder_print)
            self._put(kept)
            return kept
        entry = ModelEntry(
            name,
            versioned=layout.versioned,
            problem=layout.problem,
            fingerprint=folder_print,
            policy=layout.policy,
        )
        for number, version_folder in layout.versions.items():
            previous = old.versions.get(number) if old is not None else None
            version_print = self._print(version_folder) if layout.versioned else folder_print
            if previous is not None and previous.fingerprint == version_print:
                entry.versions[number] = previous
                continue
            fresh = self._load_version(name, number, version_folder, version_print)
            if fresh.status == "failed" and previous is not None and previous.model is not None:
                logger.error(
                    "model %s version %d failed to reload; the previous load goes on serving",
                    name,
                    number,
                )
                fresh = replace(previous, reload_error=fresh.error, fingerprint=version_print)
            entry.versions[number] = fresh
        if layout.problem:
            logger.warning("model %s cannot be served: %s", name, layout.problem)
        if old is not None and entry.serving is None:
            entry = _keep_serving(old, entry)
        self._put(entry)
        self._retire(old, entry)
        return entry

    def _layout(self, folder: Path, fallback: VersionPolicy | None = None) -> ModelLayout:
        """``read_layout``, with a folder that cannot be read (or leads out of the store) as the
        layout's problem; FileNotFoundError when the folder is gone."""
        try:
            self.access.check_resolved(folder, f"folder {folder.name}")
            return read_layout(folder, self.access, fallback)
        except (FileNotFoundError, NotADirectoryError):
            raise
        except Exception as error:
            problem = self._relative(_reason(error))
            return ModelLayout(folder.name, folder, False, {}, (), VersionPolicy(), problem)

    def unload(self, name: str) -> None:
        """Stop serving ``name``; the folder stays listed as unloaded while it exists. Requests
        running on it finish first; its memory goes when the last one is done."""
        old = self.entries.get(name)
        if old is None:
            raise self._not_found(name)
        new = ModelEntry(name, unloaded=True) if (self.store / name).is_dir() else None
        self._set(name, new)
        self._retire(old, new)
        logger.info("model %s unloaded", name)

    def _put(self, entry: ModelEntry) -> None:
        self._set(entry.name, entry)

    def _set(self, name: str, entry: ModelEntry | None) -> None:
        """Swap ``entry`` in as ``name`` (None: forget ``name``). A new dict replaces the old, so
        readers iterate a stable one; the lock keeps a swap made by another model's load (on
        another thread) from being lost to this one's copy."""
        with self._entries_lock:
            entries = dict(self.entries)
            if entry is None:
                entries.pop(name, None)
            else:
                entries[name] = entry
            self.entries = entries

    def _retire(self, old: ModelEntry | None, new: ModelEntry | None) -> None:
        """Log when each model no longer served is freed (after its last request)."""
        if old is None:
            return
        kept = {id(v.model) for v in (new.versions.values() if new else ()) if v.model}
        for version in old.versions.values():
            if version.model is not None and id(version.model) not in kept:
                weakref.finalize(
                    version.model,
                    logger.info,
                    "model %s version %d freed (its last request ended)",
                    old.name,
                    version.number,
                )

    def _load_version(
        self, name: str, number: int, folder: Path, print_: Fingerprint
    ) -> ModelVersion:
        started = time.perf_counter()
        version = ModelVersion(number, fingerprint=print_, content=content_digest(folder, print_))
        label = name if folder.name == name else f"{name} version {number}"
        try:
            version.spec = parse_manifest(folder, name=name, version=number, access=self.access)
            version.model = load_model(version.spec, self.device)
        except Exception as error:  # a broken model is reported, never fatal
            version.status = "failed"
            version.model = None
            version.error = self._relative(_reason(error))
            manifest = isinstance(error, ManifestError)
            logger.log(
                logging.WARNING if manifest else logging.ERROR,
                "model %s failed to load: %s",
                label,
                version.error,
                exc_info=not manifest,
            )
            return version
        version.load_seconds = time.perf_counter() - started
        version.status = "ready"
        logger.info(
            "model %s loaded on %s in %.2f s (%s, layers %s)",
            label,
            self.device,
            version.load_seconds,
            version.spec.architecture,
            ", ".join(version.model.target_layers),
        )
        return version

    def _relative(self, text: str) -> str:
        """``text`` with the store's location cut off its paths: clients see ``shapes/model.toml``
        and never where the store lives on the server."""
        for root in {str(self.store.resolve()), str(self.store.absolute()), str(self.store)}:
            if root not in (".", ""):
                text = text.replace(root.rstrip("/") + "/", "")
        return text

    # ------------------------------------------------------------------ lookups

    @property
    def scanned(self) -> bool:
        """True once every model of the first scan has either loaded or failed."""
        return self._loaded.is_set()

    @property
    def ready(self) -> bool:
        """True once the first scan is done, while no model has stayed loading past
        ``stall_s`` (a load that hangs must not pass for a served model)."""
        return self.scanned and not self.stalled()

    def stalled(self) -> list[str]:
        """The models loading for longer than ``stall_s``; each is logged once."""
        now = time.monotonic()
        names = [
            name
            for name, entry in self.entries.items()
            if entry.status == "loading" and now - entry.since > self.stall_s
        ]
        for name in set(names) - self._stall_reported:
            logger.error(
                "model %s has been loading for more than %.0f s (CAMSERVE_MODEL_LOAD_STALL_S); "
                "the service is not ready until it loads or fails",
                name,
                self.stall_s,
            )
        self._stall_reported = set(names)
        return names

    def wait(self, timeout: float | None = None) -> bool:
        return self._loaded.wait(timeout)

    def names(self) -> list[str]:
        return list(self.entries)

    def _not_found(self, name: str, in_store: bool = False) -> ModelNotFound:
        """``name`` is no model (``in_store``: no folder of the store, where a load looks)."""
        known = self.names()
        if in_store:
            try:
                known = sorted({f.name for f in model_folders(self.store)})
            except OSError:
                pass  # the store cannot be listed now: name the models known
        available = close_first(name[:100], known)
        where = " in the model store" if in_store else ""
        listed = ", ".join(available) or "none"
        gone = in_store and name in self.entries and name not in known
        return ModelNotFound(
            f"Unknown model {clip(name)}{where}. Available models: {listed}."
            + (" Ask for one of them by name." if available and not in_store else "")
            + (
                f" {clip(name)} was loaded from a folder that is gone now; put the folder back, "
                f"or POST /models/{name}/unload."
                if gone
                else ""
            ),
            details={"available": available},
        )

    def entry(self, name: str | None) -> ModelEntry:
        """The entry called ``name`` (the default model when None), or ModelNotFound."""
        named = bool(name)
        name = name or self.default_model
        check_name(name)
        try:
            return self.entries[name]
        except KeyError:
            raise (self._not_found(name) if named else self._no_default(name)) from None

    def _no_default(self, name: str) -> ModelNotFound:
        """A request that names no model, where the default model is not in the store."""
        ready = [n for n, entry in self.entries.items() if entry.status == "ready"]
        return ModelNotFound(
            f"No model was named, and the default model {clip(name)} (CAMSERVE_DEFAULT_MODEL) "
            "is not in the store. Name a model (the form field or path's model), or set "
            f"CAMSERVE_DEFAULT_MODEL to one of the ready models: {', '.join(ready) or 'none'}.",
            details={"default_model": name, "available": ready},
        )

    def get(self, name: str | None, version: int | None = None) -> LoadedModel:
        """The loaded model called ``name`` (its newest ready version unless ``version`` is
        given), or an error saying why it cannot serve."""
        entry = self.entry(name)
        if version is not None:
            chosen = entry.versions.get(version)
            if chosen is None:
                served = ", ".join(str(n) for n in sorted(entry.versions)) or "none"
                raise ModelNotFound(
                    f"Model {entry.name!r} has no version {version} (served: {served}).",
                    details={"versions": sorted(entry.versions)},
                )
            if chosen.model is not None:
                return chosen.model
            if chosen.status == "failed":
                raise self._unavailable(
                    entry.name, f"version {version} failed to load: {chosen.error}"
                )
        elif entry.model is not None:
            return entry.model
        if entry.status == "unloaded":
            raise ModelUnavailable(
                f"Model {entry.name!r} is unloaded; load it with POST /models/{entry.name}/load."
            )
        if entry.status == "failed":
            raise self._unavailable(entry.name, f"failed to load: {entry.error}")
        raise ModelUnavailable(
            f"Model {entry.name!r} is still loading; retry shortly.",
            headers={"Retry-After": "1"},
        )

    def _unavailable(self, name: str, why: str) -> ModelUnavailable:
        hint = _FIX_HINT[self.control].format(name=name)
        return ModelUnavailable(f"Model {name!r} {why}. {hint}")


def _keep_serving(old: ModelEntry, entry: ModelEntry) -> ModelEntry:
    """``entry``, none of whose versions serves, with ``old``'s serving versions kept beside
    them: a new version that fails must not take down the ones its policy would retire for it
    (they serve until a version it selects loads)."""
    kept = {
        n: v for n, v in old.versions.items() if v.model is not None and n not in entry.versions
    }
    if not kept:
        return entry
    failed = "; ".join(f"version {v.number}: {v.error}" for v in entry.versions.values() if v.error)
    serving = ", ".join(map(str, sorted(kept)))
    plural = len(kept) > 1
    problem = (
        f"no version that [version_policy] selects loaded ({failed or 'none ready'}); the "
        f"previous version{'s' if plural else ''} {serving} go{'' if plural else 'es'} on "
        "serving until one does"
    )
    logger.error("model %s: %s", entry.name, problem)
    return replace(entry, versions={**entry.versions, **kept}, reload_problem=problem)


def _is_model_folder(folder: Path, name: str) -> bool:
    try:
        return folder.is_dir() and name == folder.name and not hidden(folder)
    except (OSError, ValueError):
        return False


def _reason(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    plain = isinstance(error, ManifestError | AccessError)
    return text if plain else f"{type(error).__name__}: {text}"
