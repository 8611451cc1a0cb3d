"""What a task (classification, detection, segmentation) tells the loader about its models.

A task is one small object per kind of model: how the module is prepared for serving, how the
warm-up forward proves its output, which target layers an architecture explains by default and
which CAM methods can explain it. The loader asks the model's task; it never branches on a name.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from app.models.manifest import ModelSpec


class ModelTask:
    """The defaults of one task; a task overrides what differs."""

    name: ClassVar[str] = ""
    methods: ClassVar[tuple[str, ...] | None] = None
    """The CAM methods that can explain this task's output (None: every method)."""
    presets: ClassVar[tuple[tuple[str, str], ...]] = ()
    """(architecture prefix, target layer): the layer explained by default, longest prefix first."""

    def prepare(self, module: nn.Module, spec: ModelSpec) -> None:
        """Make ``module`` answer what the task's code expects (called once, before warm-up)."""

    def check_output(self, output: Any, spec: ModelSpec) -> None:
        """Raise ManifestError when the warm-up forward's ``output`` is not this task's."""
        raise NotImplementedError

    def preset_layers(self, spec: ModelSpec, layer_names: frozenset[str]) -> tuple[str, ...]:
        """The preset target layer of ``spec``'s architecture, when it is one of the module's."""
        for prefix, layer in self.presets:
            if spec.architecture.startswith(prefix) and layer in layer_names:
                return (layer,)
        return ()

    def method_reason(self, method: str) -> str | None:
        """Why ``method`` cannot explain this task (None when it can)."""
        if self.methods is None or method in self.methods:
            return None
        return (
            f"{method} cannot explain a {self.name} model; the methods for {self.name} are "
            f"{', '.join(self.methods)}"
        )
