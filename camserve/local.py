"""The pipeline in this process, with no server: what ``camserve explain`` runs by default.

It builds what the service's lifespan builds (the device, the model store's registry, an
``Explainer``) from the same settings, and calls the same ``Explainer.explain``, so its answers
are the service's. It uses ``app.pipeline`` and ``app.models`` only, never the HTTP layer.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from app.cam import ProgressCallback
from app.models.device import resolve_device
from app.models.registry import ModelRegistry
from app.pipeline.decoding import Upload
from app.pipeline.explainer import Explainer
from app.pipeline.results import ExplainResponse
from app.settings import Settings
from camserve.request import ExplainRequest


@dataclass(frozen=True)
class ModelRow:
    """One line of ``camserve models``, from a local registry or from a server."""

    name: str
    status: str
    layers: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()
    error: str | None = None


class LocalService:
    """The model store loaded in this process; ``async with`` it, then ``explain``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.registry = ModelRegistry.from_settings(settings, resolve_device(settings.device))
        # One thread runs every torch call, as the service's model threads do.
        self._model_threads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="camserve")
        self.explainer = Explainer.from_settings(
            settings, self.registry, model_threads=self._model_threads
        )

    async def __aenter__(self) -> LocalService:
        self.registry.discover()
        await asyncio.get_running_loop().run_in_executor(
            self._model_threads, self.registry.load_all
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.explainer.close()
        self._model_threads.shutdown(wait=True)

    async def explain(
        self,
        filename: str,
        data: bytes,
        request: ExplainRequest,
        progress: ProgressCallback | None = None,
    ) -> ExplainResponse:
        """What ``POST /explain`` answers for this one image and request (or ``/jobs``: no
        request timeout binds a run in this process, so what only a job may ask for, such as
        ROAD, runs here too)."""
        return await self.explainer.explain(
            request.model,
            [Upload(filename=filename, data=data)],
            request.params(),
            progress=progress,
            job=True,
        )

    def models(self) -> list[ModelRow]:
        rows = []
        for entry in self.registry.entries.values():
            model = entry.model
            rows.append(
                ModelRow(
                    name=entry.name,
                    status=entry.status,
                    layers=model.target_layers if model else (),
                    methods=tuple(model.applicable_methods) if model else (),
                    error=entry.error,
                )
            )
        return rows
