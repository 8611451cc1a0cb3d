"""Parse and validate ``model_store/<name>/model.toml`` into a frozen ModelSpec."""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

MANIFEST_NAME = "model.toml"
WEIGHT_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
_ENUM_RE = re.compile(r"^[A-Z][A-Z0-9_]*$")

_ALLOWED_KEYS: dict[str, set[str]] = {
    "": {"description", "model", "preprocess", "cam", "version_policy"},
    "model": {"architecture", "kwargs", "weights", "num_classes", "labels"},
    "preprocess": {"resize", "crop", "mean", "std", "input_shape"},
    "cam": {"target_layers", "fc_layer", "default_method", "allowed_methods"},
}


class ManifestError(ValueError):
    """The manifest or a file it names is missing or malformed; the message says which."""


@dataclass(frozen=True)
class ModelSpec:
    """Everything the service needs to know about one model, read from its manifest."""

    name: str
    folder: Path
    description: str
    architecture: str
    kwargs: MappingProxyType[str, Any]
    weights: str
    num_classes: int
    labels: tuple[str, ...] | None
    resize: int
    crop: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_shape: tuple[int, int, int]
    target_layers: tuple[str, ...]
    fc_layer: str | None
    default_method: str
    allowed_methods: tuple[str, ...] | None
    version: int = 1
    """The version folder's number (1 for a model folder without version folders)."""

    @property
    def weights_path(self) -> Path | None:
        """The weights file, or None when ``weights`` names a torchvision weights enum."""
        if self.weights.endswith(WEIGHT_FILE_SUFFIXES):
            return self.folder / self.weights
        return None


@dataclass(frozen=True)
class VersionPolicy:
    """Which numbered versions of a model are served."""

    latest: int | None = 1
    all: bool = False
    specific: tuple[int, ...] = ()

    def select(self, numbers: list[int]) -> list[int]:
        """The served numbers among ``numbers``, ascending."""
        ordered = sorted(numbers)
        if self.all:
            return ordered
        if self.specific:
            return [n for n in ordered if n in self.specific]
        return ordered[-(self.latest or 1) :]

    def describe(self) -> str:
        if self.all:
            return "all"
        if self.specific:
            return "specific " + ", ".join(map(str, self.specific))
        return f"latest {self.latest or 1}"


class PolicyError(ValueError):
    """The ``[version_policy]`` table is malformed; the message says how."""


def parse_policy(value: Any) -> VersionPolicy:
    """A ``[version_policy]`` table: exactly one of ``latest = N``, ``all = true``,
    ``specific = [numbers]``."""
    usage = "[version_policy] takes one of latest = N, all = true or specific = [1, 2]"
    if not isinstance(value, dict) or len(value) != 1:
        raise PolicyError(usage)
    (key, item), *_ = value.items()
    if key == "latest" and isinstance(item, int) and not isinstance(item, bool) and item >= 1:
        return VersionPolicy(latest=item)
    if key == "all" and item is True:
        return VersionPolicy(latest=None, all=True)
    if (
        key == "specific"
        and isinstance(item, list)
        and item
        and all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in item)
    ):
        return VersionPolicy(latest=None, specific=tuple(sorted(set(item))))
    raise PolicyError(f"{usage}; got {key} = {item!r}")


def _table(data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise ManifestError(f"[{key}] must be a table")
    unknown = set(value) - _ALLOWED_KEYS[key]
    if unknown:
        raise ManifestError(
            f"unknown key(s) in [{key}]: {', '.join(sorted(unknown))}; "
            f"allowed: {', '.join(sorted(_ALLOWED_KEYS[key]))}"
        )
    return value


def _require(table: dict[str, Any], section: str, key: str, kind: type | tuple[type, ...]) -> Any:
    if key not in table:
        raise ManifestError(f"[{section}] {key} is required")
    value = table[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ManifestError(f"[{section}] {key} has the wrong type ({type(value).__name__})")
    return value


def _numbers(value: Any, section: str, key: str, length: int) -> tuple[float, ...]:
    if (
        not isinstance(value, list)
        or len(value) != length
        or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
    ):
        raise ManifestError(f"[{section}] {key} must be a list of {length} numbers")
    return tuple(float(v) for v in value)


def _strings(value: Any, section: str, key: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ManifestError(f"[{section}] {key} must be a non-empty list of strings")
    return tuple(value)


def read_labels(path: Path, num_classes: int) -> tuple[str, ...]:
    """One label per line; the count must match ``num_classes``."""
    if not path.is_file():
        raise ManifestError(f"labels file {path.name} does not exist in {path.parent}")
    labels = tuple(
        line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
    )
    if len(labels) != num_classes:
        raise ManifestError(
            f"{path.name} has {len(labels)} labels but num_classes is {num_classes}"
        )
    return labels


def parse_manifest(folder: Path, name: str | None = None, version: int = 1) -> ModelSpec:
    """Read ``folder/model.toml``; raise ManifestError naming the first problem found.

    ``name`` is the model's (default: the folder's name); a version folder passes its model's."""
    path = folder / MANIFEST_NAME
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(f"{MANIFEST_NAME} is missing") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ManifestError(f"{MANIFEST_NAME} is not valid TOML: {error}") from None

    unknown = set(data) - _ALLOWED_KEYS[""]
    if unknown:
        raise ManifestError(
            f"unknown top-level key(s): {', '.join(sorted(unknown))}; "
            "allowed: description, [model], [preprocess], [cam], [version_policy]"
        )
    if "version_policy" in data:
        try:
            parse_policy(data["version_policy"])
        except PolicyError as error:
            raise ManifestError(str(error)) from None
    description = data.get("description", "")
    if not isinstance(description, str):
        raise ManifestError("description must be a string")
    model = _table(data, "model")
    pre = _table(data, "preprocess")
    cam = _table(data, "cam")

    architecture = _require(model, "model", "architecture", str)
    kwargs = model.get("kwargs", {})
    if not isinstance(kwargs, dict):
        raise ManifestError("[model] kwargs must be a table")
    weights = _require(model, "model", "weights", str)
    num_classes = _require(model, "model", "num_classes", int)
    if num_classes < 1:
        raise ManifestError("[model] num_classes must be at least 1")
    if weights.endswith(WEIGHT_FILE_SUFFIXES):
        if not (folder / weights).is_file():
            raise ManifestError(f"weights file {weights} does not exist in {folder}")
    elif not _ENUM_RE.match(weights):
        raise ManifestError(
            f"[model] weights={weights!r} is neither a file ({', '.join(WEIGHT_FILE_SUFFIXES)}) "
            "nor a torchvision weights name such as IMAGENET1K_V2 or DEFAULT"
        )
    labels = None
    if "labels" in model:
        labels = read_labels(folder / _require(model, "model", "labels", str), num_classes)

    shape = _require(pre, "preprocess", "input_shape", list)
    if (
        len(shape) != 3
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape)
        or shape[0] not in (1, 3)
    ):
        raise ManifestError("[preprocess] input_shape must be [C, H, W] with C = 1 or 3")
    input_shape = (shape[0], shape[1], shape[2])
    crop_value = pre.get("crop", [input_shape[1], input_shape[2]])
    if isinstance(crop_value, int) and not isinstance(crop_value, bool):
        crop = (crop_value, crop_value)
    elif isinstance(crop_value, list) and len(crop_value) == 2:
        crop = (int(crop_value[0]), int(crop_value[1]))
    else:
        raise ManifestError("[preprocess] crop must be an integer or [H, W]")
    if crop != input_shape[1:]:
        raise ManifestError(
            f"[preprocess] crop {list(crop)} must equal input_shape's H, W {list(input_shape[1:])}"
        )
    resize = pre.get("resize", min(crop))
    if not isinstance(resize, int) or isinstance(resize, bool) or resize < min(crop):
        raise ManifestError(
            f"[preprocess] resize must be an integer >= the crop's shorter side ({min(crop)})"
        )
    mean = _numbers(_require(pre, "preprocess", "mean", list), "preprocess", "mean", shape[0])
    std = _numbers(_require(pre, "preprocess", "std", list), "preprocess", "std", shape[0])
    if any(s <= 0 for s in std):
        raise ManifestError("[preprocess] std values must be positive")

    target_layers: tuple[str, ...] = ()
    if "target_layers" in cam:
        target_layers = _strings(cam["target_layers"], "cam", "target_layers")
    fc_layer = cam.get("fc_layer")
    if fc_layer is not None and not isinstance(fc_layer, str):
        raise ManifestError("[cam] fc_layer must be a string")
    default_method = cam.get("default_method", "GradCAM")
    if not isinstance(default_method, str):
        raise ManifestError("[cam] default_method must be a string")
    allowed = None
    if "allowed_methods" in cam:
        allowed = _strings(cam["allowed_methods"], "cam", "allowed_methods")

    return ModelSpec(
        name=name or folder.name,
        folder=folder,
        description=description,
        architecture=architecture,
        kwargs=MappingProxyType(dict(kwargs)),
        weights=weights,
        num_classes=num_classes,
        labels=labels,
        resize=resize,
        crop=crop,
        mean=mean,
        std=std,
        input_shape=input_shape,
        target_layers=target_layers,
        fc_layer=fc_layer,
        default_method=default_method,
        allowed_methods=allowed,
        version=version,
    )
