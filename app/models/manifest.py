"""Parse and validate ``model_store/<name>/model.toml`` into a frozen ModelSpec.

The manifest is a pydantic model (``Manifest``); its errors read like the settings' errors, one
``[table] key: problem`` per problem. Checks that need the folder (the weights and labels files
exist) and the defaults a timm model brings (its preprocessing) come after, in ``parse_manifest``.

Every field is bounded (``LIMITS``), and so are the manifest and labels files: a manifest is
written by whoever can write the store, and ``/models`` sends parts of it to every client.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from app.cam.targets import Probabilities
from app.errors import clip
from app.models.access import AccessError, StoreAccess
from app.models.timm_config import TimmError, pretrained_preprocess

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

MANIFEST_NAME = "model.toml"
WEIGHT_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
_ENUM_RE = re.compile(r"^[A-Z][A-Z0-9_]*$")

Interpolation = Literal["bilinear", "bicubic", "nearest"]
Task = Literal["classification", "detection", "segmentation"]
"""What a model does: the top-level ``task`` of its manifest (``app.models.tasks``)."""
CompileMode = Literal["off", "compile", "cudagraphs"]
"""``[model] compile``: the plain forward eager, through torch.compile, or also in CUDA graphs
(``app.models.compiling``)."""
TIMM_PREFIX = "timm:"
RANDOM_WEIGHTS = "random"
"""``weights = "random"``: the architecture's own random initialisation, nothing read or
downloaded (to try an architecture or test the service; its answers mean nothing)."""

MAX_MANIFEST_BYTES = 1024 * 1024
MAX_LABELS_BYTES = 16 * 1024 * 1024
MAX_LABEL_CHARS = 1000
MAX_DESCRIPTION_CHARS = 4000
MAX_NAME_CHARS = 256
"""architecture, weights, labels, layer and method names."""
MAX_KWARGS_BYTES = 16 * 1024
"""``[model] kwargs`` written as JSON."""
MAX_LIST_ITEMS = 64
MAX_CLASSES = 1_000_000
MAX_INPUT_SIDE = 4096
MAX_RESIZE = 8192
TIMM_PATH_KWARGS = ("checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")
"""timm.create_model arguments that read files from anywhere: refused in a manifest."""


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
    interpolation: Interpolation = "bilinear"
    pretrained: bool = False
    """timm only: the weights come from timm's pretrained checkpoint (downloaded once)."""
    flip: bool = True
    """Whether a horizontal flip of an input keeps its class, so that ``aug_smooth`` may
    average over flipped variants (false for arrows, text, left/right classes)."""
    task: Task = "classification"
    score_threshold: float = 0.5
    """Detection: the lowest score of a detection that is answered."""
    max_detections: int = 100
    """Detection: the most detections answered per image, best first."""
    max_side: int = 1333
    """Detection and segmentation: an upload's longest side is scaled down to this for the
    model (its answer is mapped back to the upload's pixels); no square resize."""
    compile: CompileMode = "off"
    """How the plain (logits-only) forward runs: ``app.models.compiling``."""
    probabilities: Probabilities = "softmax"
    """Classification: how the logits become class probabilities (``sigmoid``: a multi-label
    model), for its predictions, its explanations and their faithfulness scores
    (``app.cam.targets.class_probabilities``)."""

    @property
    def weights_path(self) -> Path | None:
        """The weights file, or None when ``weights`` names a torchvision weights enum (or a
        timm model uses its pretrained weights)."""
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


class _Table(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


_Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME_CHARS)]


class ModelTable(_Table):
    architecture: _Name
    kwargs: dict[str, Any] = Field(default_factory=dict)
    pretrained: bool = False
    weights: str | None = Field(None, validate_default=True, max_length=MAX_NAME_CHARS)
    num_classes: int = Field(ge=1, le=MAX_CLASSES)
    labels: str | None = Field(None, max_length=MAX_NAME_CHARS)
    compile: CompileMode = "off"
    probabilities: Probabilities = "softmax"

    @field_validator("kwargs")
    @classmethod
    def _small_kwargs(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        try:
            size = len(json.dumps(value, default=str))
        except (RecursionError, ValueError):
            size = MAX_KWARGS_BYTES + 1
        if size > MAX_KWARGS_BYTES:
            raise ValueError(f"must be at most {MAX_KWARGS_BYTES} bytes written as JSON")
        if str(info.data.get("architecture", "")).startswith(TIMM_PREFIX):
            paths = sorted(set(value) & set(TIMM_PATH_KWARGS))
            if paths:
                raise ValueError(
                    f"{', '.join(paths)} would read files from outside the model's folder; "
                    "put the weights in the folder and name them with weights ="
                )
        return value

    @field_validator("pretrained")
    @classmethod
    def _pretrained_is_timm(cls, value: bool, info: ValidationInfo) -> bool:
        if value and not str(info.data.get("architecture", "")).startswith(TIMM_PREFIX):
            raise ValueError(
                "pretrained = true is for timm architectures; torchvision ones name their "
                'weights, e.g. weights = "IMAGENET1K_V1"'
            )
        return value

    @field_validator("weights")
    @classmethod
    def _weights(cls, value: str | None, info: ValidationInfo) -> str | None:
        timm = str(info.data.get("architecture", "")).startswith(TIMM_PREFIX)
        if value is None:
            if info.data.get("pretrained"):
                return value
            raise ValueError(
                "weights is required: a state_dict file"
                + (", or pretrained = true" if timm else " or a torchvision weights name")
            )
        if value == RANDOM_WEIGHTS and not timm:
            return value
        if not value.endswith(WEIGHT_FILE_SUFFIXES) and (timm or not _ENUM_RE.match(value)):
            raise ValueError(
                f"neither a file ({', '.join(WEIGHT_FILE_SUFFIXES)})"
                + (
                    " nor pretrained = true"
                    if timm
                    else " nor a torchvision weights name such as IMAGENET1K_V2 or DEFAULT, "
                    f"nor {RANDOM_WEIGHTS!r}"
                )
            )
        return value


class PreprocessTable(_Table):
    input_shape: list[Annotated[int, Field(le=MAX_INPUT_SIDE)]] = Field(max_length=3)
    resize: int | None = Field(None, le=MAX_RESIZE)
    crop: int | list[int] | None = None
    mean: list[float] = Field(max_length=3)
    std: list[float] = Field(max_length=3)
    interpolation: Interpolation = "bilinear"

    @field_validator("input_shape")
    @classmethod
    def _shape(cls, value: list[int]) -> list[int]:
        if len(value) != 3 or any(v <= 0 for v in value) or value[0] not in (1, 3):
            raise ValueError("must be [C, H, W] with C = 1 or 3")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> PreprocessTable:
        channels, height, width = self.input_shape
        for key in ("mean", "std"):
            if len(getattr(self, key)) != channels:
                raise ValueError(f"{key} must be a list of {channels} numbers")
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be positive")
        if self.crop_size != (height, width):
            raise ValueError(
                f"crop {list(self.crop_size)} must equal input_shape's H, W {[height, width]}"
            )
        if self.resize is not None and self.resize < min(self.crop_size):
            raise ValueError(
                f"resize must be an integer >= the crop's shorter side ({min(self.crop_size)})"
            )
        return self

    @property
    def crop_size(self) -> tuple[int, int]:
        if self.crop is None:
            return self.input_shape[1], self.input_shape[2]
        if isinstance(self.crop, int):
            return self.crop, self.crop
        if len(self.crop) != 2:
            raise ValueError("crop must be an integer or [H, W]")
        return self.crop[0], self.crop[1]


class CamTable(_Table):
    target_layers: list[_Name] = Field(default_factory=list, max_length=MAX_LIST_ITEMS)
    fc_layer: _Name | None = None
    default_method: _Name = "GradCAM"
    allowed_methods: list[_Name] | None = Field(None, min_length=1, max_length=MAX_LIST_ITEMS)
    flip: bool = True


class DetectionTable(_Table):
    """``[detection]``: how a detector's answers are cut (``task = "detection"`` only)."""

    score_threshold: float = Field(0.5, ge=0.0, le=1.0)
    max_detections: int = Field(100, ge=1, le=1000)
    max_side: int = Field(1333, ge=16, le=MAX_RESIZE)


class SegmentationTable(_Table):
    """``[segmentation]``: how a segmenter sees an upload (``task = "segmentation"`` only)."""

    max_side: int = Field(1024, ge=16, le=MAX_RESIZE)


class Manifest(_Table):
    """``model.toml``: the tables a model folder's manifest may hold."""

    description: str = Field("", max_length=MAX_DESCRIPTION_CHARS)
    task: Task = "classification"
    model: ModelTable
    detection: DetectionTable | None = None
    segmentation: SegmentationTable | None = None
    preprocess: PreprocessTable | None = None
    cam: CamTable = Field(default_factory=CamTable)
    version_policy: dict[str, Any] | None = None

    @field_validator("version_policy")
    @classmethod
    def _policy(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            parse_policy(value)
        return value

    @model_validator(mode="after")
    def _task_tables(self) -> Manifest:
        if "probabilities" in self.model.model_fields_set and self.task != "classification":
            raise ValueError(
                f"[model] probabilities = {self.model.probabilities!r} is for classification "
                f"models; a {self.task} model's scores are its own: leave probabilities out"
            )
        if self.model.compile != "off" and self.task != "classification":
            raise ValueError(
                f"[model] compile = {self.model.compile!r} is for classification models (their "
                f'plain forward); this one\'s task is {self.task!r}: set compile = "off"'
            )
        for table in ("detection", "segmentation"):
            if getattr(self, table) is not None and self.task != table:
                raise ValueError(
                    f"[{table}] is for task = {table!r} models; this one's task is {self.task!r}"
                )
        return self


def describe_manifest_error(error: ValidationError) -> str:
    """pydantic's report as ``[table] key: problem`` phrases; unknown keys grouped per table
    with the keys allowed there."""
    problems: list[str] = []
    unknown: dict[str, list[str]] = {}
    for item in error.errors():
        loc = [str(part) for part in item["loc"]]
        section = f"[{loc[0]}]" if loc and loc[0] in _TABLES else ""
        keys = loc[1:] if section else loc
        where = " ".join(part for part in (section, ".".join(keys)) if part)
        if item["type"] == "extra_forbidden":
            unknown.setdefault(section, []).append(".".join(keys))
            continue
        if item["type"] == "missing":
            problems.append(f"{where} is required")
            continue
        message = item["msg"].removeprefix("Value error, ")
        value = item.get("input")
        got = clip(value) if isinstance(value, str) else repr(value)
        shown = f" (got {got})" if not isinstance(value, dict | list) and keys else ""
        problems.append(f"{where}: {message}{shown}" if keys else f"{where} {message}")
    for section, keys in unknown.items():
        allowed = _TABLES[section.strip("[]")] if section else _TOP_LEVEL
        where = f"key(s) in {section}" if section else "top-level key(s)"
        problems.append(
            f"unknown {where}: {', '.join(sorted(keys))}; allowed: {', '.join(allowed)}"
        )
    return "; ".join(problems)


_TABLES: dict[str, tuple[str, ...]] = {
    "model": tuple(ModelTable.model_fields),
    "preprocess": tuple(PreprocessTable.model_fields),
    "cam": tuple(CamTable.model_fields),
    "detection": tuple(DetectionTable.model_fields),
    "segmentation": tuple(SegmentationTable.model_fields),
    "version_policy": ("latest", "all", "specific"),
}
_TOP_LEVEL = (
    "description",
    "task",
    "[model]",
    "[preprocess]",
    "[cam]",
    "[detection]",
    "[segmentation]",
    "[version_policy]",
)


def read_bounded(path: Path, limit: int, what: str) -> str:
    """The text of ``path`` when it is a file of at most ``limit`` bytes; ManifestError else."""
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise ManifestError(f"{what} is not a file")
        if size > limit:
            raise ManifestError(f"{what} has {size} bytes; the most allowed is {limit}")
        with path.open("rb") as file:
            data = file.read(limit + 1)
    except FileNotFoundError:
        raise ManifestError(f"{what} does not exist in {path.parent}") from None
    except OSError as error:
        raise ManifestError(f"cannot read {what}: {error.strerror or error}") from None
    if len(data) > limit:
        raise ManifestError(f"{what} has more than {limit} bytes, the most allowed")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ManifestError(f"{what} is not UTF-8 text: {error}") from None


def read_manifest_data(folder: Path, access: StoreAccess) -> dict[str, Any]:
    """``folder/model.toml`` as TOML data (bounded in size, inside the store); ManifestError
    naming the problem otherwise."""
    try:
        path = access.inside(folder, MANIFEST_NAME, MANIFEST_NAME)
    except AccessError as error:
        raise ManifestError(str(error)) from None
    if not path.exists() and not path.is_symlink():
        raise ManifestError(f"{MANIFEST_NAME} is missing")
    text = read_bounded(path, MAX_MANIFEST_BYTES, MANIFEST_NAME)
    try:
        data: dict[str, Any] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ManifestError(f"{MANIFEST_NAME} is not valid TOML: {error}") from None
    except RecursionError:
        raise ManifestError(f"{MANIFEST_NAME} nests arrays or tables too deeply") from None
    return data


def read_labels(path: Path, num_classes: int) -> tuple[str, ...]:
    """One label per line; the count must match ``num_classes``."""
    text = read_bounded(path, MAX_LABELS_BYTES, f"labels file {path.name}")
    labels = tuple(line.strip() for line in text.splitlines() if line.strip())
    if len(labels) != num_classes:
        raise ManifestError(
            f"{path.name} has {len(labels)} labels but num_classes is {num_classes}"
        )
    long = next((i for i, label in enumerate(labels) if len(label) > MAX_LABEL_CHARS), None)
    if long is not None:
        raise ManifestError(
            f"{path.name}: label {long + 1} has {len(labels[long])} characters; the most "
            f"allowed is {MAX_LABEL_CHARS}"
        )
    return labels


def parse_manifest(
    folder: Path,
    name: str | None = None,
    version: int = 1,
    access: StoreAccess | None = None,
) -> ModelSpec:
    """Read ``folder/model.toml``; raise ManifestError naming every problem found.

    ``name`` is the model's (default: the folder's name); a version folder passes its model's.
    ``access`` holds the store's rules (default: only the built-in modules are trusted)."""
    access = access or StoreAccess()
    data = read_manifest_data(folder, access)
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as error:
        raise ManifestError(describe_manifest_error(error)) from None
    except RecursionError:
        raise ManifestError(f"{MANIFEST_NAME} nests arrays or tables too deeply") from None
    try:
        return _spec(manifest, folder, name or folder.name, version, access)
    except AccessError as error:
        raise ManifestError(str(error)) from None


def _spec(
    manifest: Manifest, folder: Path, name: str, version: int, access: StoreAccess
) -> ModelSpec:
    model, cam = manifest.model, manifest.cam
    access.check_architecture(model.architecture)
    if model.weights is not None and model.weights.endswith(WEIGHT_FILE_SUFFIXES):
        weights = access.inside(folder, model.weights, "weights")
        if not weights.is_file():
            raise ManifestError(f"weights file {model.weights} does not exist in {folder}")
    labels = None
    if model.labels is not None:
        labels = read_labels(access.inside(folder, model.labels, "labels"), model.num_classes)
    pre = manifest.preprocess
    if pre is None:
        if not model.architecture.startswith(TIMM_PREFIX):
            raise ManifestError(
                "[preprocess] is required (only timm models take it from their pretrained "
                "config): set input_shape, mean and std"
            )
        try:
            table = pretrained_preprocess(model.architecture.removeprefix(TIMM_PREFIX))
        except TimmError as error:
            raise ManifestError(str(error)) from None
        pre = PreprocessTable.model_validate(table)
    channels, height, width = pre.input_shape
    crop = pre.crop_size
    detection = manifest.detection or DetectionTable()
    side = (manifest.segmentation or SegmentationTable()).max_side
    return ModelSpec(
        name=name,
        folder=folder,
        description=manifest.description,
        architecture=model.architecture,
        kwargs=MappingProxyType(dict(model.kwargs)),
        weights=model.weights or "",
        num_classes=model.num_classes,
        labels=labels,
        resize=pre.resize if pre.resize is not None else min(crop),
        crop=crop,
        mean=tuple(pre.mean),
        std=tuple(pre.std),
        input_shape=(channels, height, width),
        target_layers=tuple(cam.target_layers),
        fc_layer=cam.fc_layer,
        default_method=cam.default_method,
        allowed_methods=tuple(cam.allowed_methods) if cam.allowed_methods else None,
        version=version,
        interpolation=pre.interpolation,
        pretrained=model.pretrained,
        flip=cam.flip,
        task=manifest.task,
        score_threshold=detection.score_threshold,
        max_detections=detection.max_detections,
        max_side=detection.max_side if manifest.task == "detection" else side,
        compile=model.compile,
        probabilities=model.probabilities,
    )
