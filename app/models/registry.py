"""The model store: discover manifests, load models once, and look them up by name."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from app.cam.names import close_matches
from app.errors import ModelNotFound, ModelUnavailable, clip
from app.models.loading import LoadedModel, load_model
from app.models.manifest import ManifestError, ModelSpec, parse_manifest

logger = logging.getLogger(__name__)

Status = Literal["loading", "ready", "failed"]


@dataclass
class ModelEntry:
    """One folder of the store and how far its loading got."""

    name: str
    status: Status = "loading"
    spec: ModelSpec | None = None
    error: str | None = None
    model: LoadedModel | None = None
    load_seconds: float | None = None


def close_first(name: str, candidates: list[str] | tuple[str, ...]) -> list[str]:
    """All candidates, the ones that look like ``name`` first."""
    close = close_matches(name, candidates, n=5, cutoff=0.5)
    return close + sorted(c for c in candidates if c not in close)


class ModelRegistry:
    """Models of one store, keyed by folder name; a broken model never hides the others."""

    def __init__(self, store: Path, device: torch.device, default_model: str) -> None:
        self.store = store
        self.device = device
        self.default_model = default_model
        self.entries: dict[str, ModelEntry] = {}
        self._loaded = threading.Event()

    def discover(self) -> None:
        """List the store's folders; every folder with files is a model entry."""
        if not self.store.is_dir():
            logger.error("model store %s does not exist; no models are served", self.store)
            self._loaded.set()
            return
        for folder in sorted(p for p in self.store.iterdir() if p.is_dir()):
            if folder.name.startswith((".", "_")):
                continue
            self.entries[folder.name] = ModelEntry(name=folder.name)
        if self.default_model not in self.entries:
            logger.warning(
                "default model %r is not in %s (found: %s)",
                self.default_model,
                self.store,
                ", ".join(self.entries) or "nothing",
            )

    def load_all(self) -> None:
        """Load every discovered model; record failures instead of raising."""
        try:
            for entry in self.entries.values():
                self._load_entry(entry)
        finally:
            self._loaded.set()

    def _load_entry(self, entry: ModelEntry) -> None:
        started = time.perf_counter()
        folder = self.store / entry.name
        try:
            entry.spec = parse_manifest(folder)
            entry.model = load_model(entry.spec, self.device)
        except Exception as error:  # a broken model is reported, never fatal
            entry.status = "failed"
            entry.error = self._relative(_reason(error))
            level = logging.WARNING if isinstance(error, ManifestError) else logging.ERROR
            logger.log(
                level,
                "model %s failed to load: %s",
                entry.name,
                entry.error,
                exc_info=not isinstance(error, ManifestError),
            )
            return
        entry.load_seconds = time.perf_counter() - started
        entry.status = "ready"
        logger.info(
            "model %s loaded on %s in %.2f s (%s, layers %s)",
            entry.name,
            self.device,
            entry.load_seconds,
            entry.spec.architecture,
            ", ".join(entry.model.target_layers),
        )

    def _relative(self, text: str) -> str:
        """``text`` with the store's location cut off its paths: clients see ``shapes/model.toml``
        and never where the store lives on the server."""
        for root in {str(self.store.resolve()), str(self.store.absolute()), str(self.store)}:
            if root not in (".", ""):
                text = text.replace(root.rstrip("/") + "/", "")
        return text

    @property
    def ready(self) -> bool:
        """True once every model has either loaded or failed."""
        return self._loaded.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._loaded.wait(timeout)

    def names(self) -> list[str]:
        return list(self.entries)

    def entry(self, name: str | None) -> ModelEntry:
        """The entry called ``name`` (the default model when None), or ModelNotFound."""
        name = name or self.default_model
        try:
            return self.entries[name]
        except KeyError:
            available = close_first(name[:100], self.names())
            raise ModelNotFound(
                f"Unknown model {clip(name)}. Available models: {', '.join(available) or 'none'}."
                + (" Pick one with the `model` parameter." if available else ""),
                details={"available": available},
            ) from None

    def get(self, name: str | None) -> LoadedModel:
        """The loaded model called ``name``, or an error saying why it cannot serve."""
        entry = self.entry(name)
        if entry.status == "loading":
            raise ModelUnavailable(
                f"Model {entry.name!r} is still loading; retry shortly.",
                headers={"Retry-After": "1"},
            )
        if entry.status == "failed" or entry.model is None:
            raise ModelUnavailable(
                f"Model {entry.name!r} failed to load: {entry.error}. "
                "Fix its folder in the model store and restart the service."
            )
        return entry.model


def _reason(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text if isinstance(error, ManifestError) else f"{type(error).__name__}: {text}"
