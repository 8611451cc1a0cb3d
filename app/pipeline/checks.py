"""Checks of explain parameters against a loaded model, each raising the matching domain error."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from app.cam import (
    COLORMAPS,
    METHODS,
    MethodOption,
    UnknownMethod,
    close_matches,
    find_method,
)
from app.cam.core import _CAM, ExtraForwards
from app.digits import number_text
from app.errors import (
    ImageTooLarge,
    InvalidParameter,
    MethodNotApplicable,
    OverBudget,
    UnsupportedMethod,
    clip,
)
from app.models.loading import LoadedModel
from app.pipeline.decoding import DecodeCost
from app.pipeline.passes import CamPlan
from app.pipeline.rendering import OUTPUT_FORMATS, OUTPUT_KINDS, draws_pictures


def resolve_method(
    model: LoadedModel, name: str | None, own_layers: bool = False
) -> tuple[str, type[_CAM]]:
    """Case-insensitive method lookup, checked against what applies to the model.

    With ``own_layers`` (the client picked target layers) a method that does not apply to
    the default layers is still tried: the extractor then says whether it applies."""
    wanted = (name or model.spec.default_method).strip()
    applicable = model.applicable_methods
    try:
        method, cls = find_method(wanted)
    except UnknownMethod as error:
        hint = f" Did you mean {error.suggestion}?" if error.suggestion else ""
        raise UnsupportedMethod(
            f"Unknown method {clip(wanted)}.{hint} Methods for model {model.spec.name!r}: "
            f"{', '.join(applicable)}.",
            details={"methods": applicable},
        ) from None
    reason = model.methods.get(method)
    if method in model.allowed_methods and own_layers:
        reason = None
    if reason is not None:
        if not reason.startswith(method):
            reason = f"{method} does not apply to model {model.spec.name!r}: {reason}"
        raise MethodNotApplicable(
            f"{reason} Methods that apply to {model.spec.name!r}: {', '.join(applicable)}.",
            details={"methods": applicable, "reason": reason},
        )
    return method, cls


def option_takers(option: str) -> list[tuple[str, MethodOption]]:
    """The methods that let a request set ``option``, each with its declaration of it."""
    return [
        (name, declared)
        for name, cls in METHODS.items()
        if (declared := cls.option(option)) is not None and declared.public
    ]


def _takers(option: str) -> list[str]:
    return [name for name, _ in option_takers(option)]


def _takes(cls: type[_CAM], option: str) -> bool:
    declared = cls.option(option)
    return declared is not None and declared.public


def resolve_methods(
    model: LoadedModel, names: str | None, own_layers: bool = False
) -> list[tuple[str, type[_CAM]]]:
    """One or several methods (``GradCAM,ScoreCAM``), each checked by ``resolve_method``, in the
    order given, without repeats; none given: the model's default method."""
    wanted: list[str | None] = [p.strip() for p in (names or "").split(",") if p.strip()]
    resolved = [resolve_method(model, name, own_layers) for name in wanted or [None]]
    return list({method: (method, cls) for method, cls in resolved}.values())


def split_options(
    methods: Sequence[tuple[str, type[_CAM]]], options: dict[str, Any]
) -> list[dict[str, Any]]:
    """Per method, the options it takes. One method must take every option sent; of several,
    each option must be taken by at least one of them (it then goes to those only)."""
    if len(methods) == 1:
        return [check_options(*methods[0], options)]
    names = [method for method, _ in methods]
    for option in options:
        if not any(_takes(cls, option) for _, cls in methods):
            takers = _takers(option)
            raise InvalidParameter(
                f"None of {', '.join(names)} takes the option {option!r}; "
                f"{', '.join(takers) or 'no method'} take(s) it. "
                f"Drop {option!r} or add one of those methods.",
                details={"option": option, "methods": takers},
            )
    return [
        check_options(method, cls, {k: v for k, v in options.items() if _takes(cls, k)})
        for method, cls in methods
    ]


def check_options(method: str, cls: type[_CAM], options: dict[str, Any]) -> dict[str, Any]:
    """Each option against the method's declaration (``cls.options``): refuse the ones it does
    not take, naming the methods that do, and values outside the declared type or bounds."""
    checked = {}
    for name, value in options.items():
        declared = cls.option(name)
        if declared is None or not declared.public:
            takers = _takers(name)
            raise InvalidParameter(
                f"{method} does not take the option {clip(name)}; "
                f"{', '.join(takers) or 'no method'} take(s) it. "
                f"Drop {clip(name)} or choose one of those methods.",
                details={"option": name[:40], "methods": takers},
            )
        try:
            checked[name] = declared.check(value)
        except (TypeError, ValueError) as error:
            raise InvalidParameter(f"{method}: {error}", details={"option": name}) from None
    return checked


def check_flip(model: LoadedModel, per_method: Sequence[dict[str, Any]]) -> None:
    """``aug_smooth`` averages over horizontally flipped inputs: refused for a model whose
    manifest says a flip changes the class (``[cam] flip = false``)."""
    if not model.spec.flip and any(options.get("aug_smooth") for options in per_method):
        raise InvalidParameter(
            f"aug_smooth averages the maps of horizontally flipped inputs, but model "
            f"{model.spec.name!r} cannot be flipped: its manifest says a flip changes the class "
            "([cam] flip = false). Drop aug_smooth (eigen_smooth smooths without flipping).",
            details={"option": "aug_smooth", "model": model.spec.name},
        )


def check_layers_taken(methods: Sequence[tuple[str, type[_CAM]]], layers: Sequence[str]) -> None:
    """A ``target_layer`` sent must go to a method that takes layers (FullGrad reads the whole
    network and takes none): one method must take it; of several, at least one of them."""
    if not layers or any(cls.takes_layers for _, cls in methods):
        return
    names = [method for method, _ in methods]
    takers = [name for name, cls in METHODS.items() if cls.takes_layers]
    raise InvalidParameter(
        f"{', '.join(names)} explain(s) the whole network and take(s) no target_layer. "
        "Drop target_layer, or add a method that takes one (e.g. GradCAM).",
        details={"parameter": "target_layer", "methods": takers},
    )


def check_layers(model: LoadedModel, layers: Sequence[str]) -> tuple[str, ...]:
    """The requested layers (deduplicated), or the model's defaults; unknown names refused."""
    if not layers:
        return model.target_layers
    for layer in layers:
        if layer not in model.layer_names:
            close = close_matches(layer, sorted(model.layer_names), n=5)
            raise InvalidParameter(
                f"Model {model.spec.name!r} has no layer {clip(layer)}."
                + (f" Close matches: {', '.join(close)}." if close else "")
                + f" Candidate layers: {', '.join(model.candidate_layers)}.",
                details={"close_matches": close},
            )
    return tuple(dict.fromkeys(layers))


def check_spatial_layers(model: LoadedModel, layers: Sequence[str]) -> None:
    """A layer asked for must give a map of at least 2x2: a Linear head (``fc``) has no grid
    and a global pooling (``avgpool``) a 1x1 one, so every method would fail or draw nothing.
    (Token outputs, (N, T, D), are left to the extractor's reshape.)"""
    for layer in dict.fromkeys(layers):
        shape = model.layer_shapes.get(layer)
        if shape is None or len(shape) == 3:
            continue  # not called in the forward, or tokens: the extractor says what applies
        if len(shape) == 4 and min(shape[2], shape[3]) >= 2:
            continue
        what = f"a {shape[2]}x{shape[3]} map" if len(shape) == 4 else "no spatial map"
        raise InvalidParameter(
            f"Layer {clip(layer)} of model {model.spec.name!r} gives {what} (output shape "
            f"{list(shape)}); class activation maps need a map of at least 2x2. Pick one of "
            f"the candidate layers: {', '.join(model.candidate_layers)}.",
            details={"layer": layer[:40], "candidate_layers": list(model.candidate_layers)},
        )


def check_classes(model: LoadedModel, class_idx: Sequence[int], count: int) -> None:
    """One class index for all images or one per image, each within the model's classes."""
    if class_idx and len(class_idx) not in (1, count):
        raise InvalidParameter(
            f"Got {len(class_idx)} class_idx values for {count} images; give one for all "
            "images or one per image, in upload order."
        )
    for idx in class_idx:
        if not 0 <= idx < model.spec.num_classes:
            raise InvalidParameter(
                f"class_idx {number_text(idx)} is out of range: model {model.spec.name!r} has "
                f"{model.spec.num_classes} classes (0..{model.spec.num_classes - 1})."
            )


def extra_forwards(
    model: LoadedModel,
    cls: type[_CAM],
    layers: Sequence[str],
    options: dict[str, Any],
    images: int,
    classes: int = 1,
) -> ExtraForwards:
    """The forwards ``cls`` would run on ``layers`` of ``model`` besides the model's own, for
    ``classes`` classes per image (a method that does not share its extra forwards between
    classes runs them once per class: they count as that many more images)."""
    shapes = [model.layer_shapes.get(layer, ()) for layer in layers]
    shared = cls.shares_classes_with(options)
    return cls.extra_forwards(shapes, options, images * (1 if shared else classes))


def check_option_fit(
    model: LoadedModel, method: str, cls: type[_CAM], layers: Sequence[str], options: dict[str, Any]
) -> None:
    """Options that do not fit the target layers (``_CAM.option_problem``: DFF's n_components
    past the channels), refused before any pixel is decoded."""
    problem = cls.option_problem([model.layer_shapes.get(layer, ()) for layer in layers], options)
    if problem is not None:
        raise InvalidParameter(
            f"{method}: {problem}", details={"method": method, "layers": list(layers)}
        )


def check_budget(
    model: LoadedModel,
    method: str,
    cls: type[_CAM],
    layers: Sequence[str],
    options: dict[str, Any],
    images: int,
    limit: int,
    classes: int = 1,
) -> None:
    """Refuse requests whose masked, noisy or guided forwards exceed the budget."""
    count = extra_forwards(model, cls, layers, options, images, classes)
    forwards, channels, samples = count.total, count.channels, count.samples
    if forwards > limit:
        kind = "masked" if cls.masked_forwards else "noisy"
        count_text = f"{count.images} image(s) x {channels} channels x {samples} sample(s)"
        own = cls.masked_forwards or cls.noisy_forwards
        if cls.own_forwards and not own:
            kind, own = "guided", True
            count_text = f"{count.images} image(s) x {cls.own_forwards} guided pass(es)"
        if options.get("aug_smooth"):
            kind = f"{kind} and augmented" if own else "augmented"
            count_text = f"aug_smooth's 6 variants of {images} image(s), each explained"
        raise OverBudget(
            f"{method} would run {forwards} {kind} forwards ({count_text}); the limit is {limit} "
            "(CAMSERVE_MAX_CAM_FORWARDS). Send fewer images, lower num_samples, pick a "
            "layer with fewer channels, drop aug_smooth, or use a gradient method such as "
            "GradCAM.",
            details={"forwards": forwards, "limit": limit},
        )


def check_total_budget(
    model: LoadedModel,
    methods: Sequence[tuple[str, type, dict[str, Any]]],
    layers: Sequence[str],
    images: int,
    limit: int,
    classes: int = 1,
) -> None:
    """Several methods in one request: their masked forwards count together."""
    if len(methods) == 1:
        method, cls, options = methods[0]
        check_budget(model, method, cls, layers, options, images, limit, classes)
        return
    counts = {
        method: extra_forwards(model, cls, layers, options, images, classes).total
        for method, cls, options in methods
    }
    total = sum(counts.values())
    if total > limit:
        parts = ", ".join(f"{method} {count}" for method, count in counts.items() if count)
        raise OverBudget(
            f"These methods would run {total} masked forwards together ({parts}); the limit is "
            f"{limit} (CAMSERVE_MAX_CAM_FORWARDS). Send fewer images or methods, lower "
            "num_samples, or pick a layer with fewer channels.",
            details={"forwards": total, "limit": limit, "per_method": counts},
        )


def plans_forwards(
    model: LoadedModel, plans: Sequence[CamPlan], images: int, classes: int = 1
) -> int:
    """The masked and noisy forwards of a request's plans on ``images`` images (``classes``
    classes each), all together."""
    return sum(
        extra_forwards(model, plan.cls, plan.layers, dict(plan.options), images, classes).total
        for plan in plans
    )


def check_forward_sum(masked: int, scoring: int, limit: int, parts: int) -> None:
    """The forwards of a request's parts (KServe instances whose options differ), summed: one
    request may not split its work to go past the budget. ``masked``: the methods' masked or
    noisy forwards; ``scoring``: the faithfulness stage's."""
    forwards = masked + scoring
    if forwards <= limit:
        return
    shares = [
        text
        for count, text in (
            (masked, f"{masked} masked or noisy forwards of the methods"),
            (scoring, f"{scoring} scoring faithfulness"),
        )
        if count
    ]
    fixes = ["send fewer instances"]
    if masked:
        fixes.append("lower num_samples or pick a layer with fewer channels")
    if scoring:
        fixes.append("ask for fewer faithfulness metrics, classes or boxes")
    raise OverBudget(
        f"The {parts} groups of instances of this request would run {forwards} forwards "
        f"together ({' and '.join(shares)}); the limit is {limit} "
        "(CAMSERVE_MAX_CAM_FORWARDS), summed over a request's instances. "
        f"{'; '.join(fixes).capitalize()}, or split the work over several requests.",
        details={"forwards": forwards, "limit": limit, "scoring": scoring},
    )


def check_rendering(outputs: Sequence[str], image_format: str, colormap: str) -> None:
    """Known output kinds, image format and (when images are drawn) colormap."""
    unknown = [o for o in outputs if o not in OUTPUT_KINDS]
    if unknown or not outputs:
        raise InvalidParameter(
            f"output must be any of {', '.join(OUTPUT_KINDS)} (repeat it or separate by "
            f"commas); got {', '.join(clip(o) for o in unknown[:3]) or 'nothing'}.",
            details={"allowed": list(OUTPUT_KINDS)},
        )
    if image_format not in OUTPUT_FORMATS:
        raise InvalidParameter(f"image_format must be one of {', '.join(OUTPUT_FORMATS)}.")
    if draws_pictures(outputs) and colormap not in COLORMAPS:
        raise InvalidParameter(
            f"Unknown colormap {clip(colormap)}; choose one of {', '.join(COLORMAPS)}."
        )


def check_decode_cost(cost: DecodeCost, max_pixels: int | None, budget: int | None) -> None:
    """A request's images, read from their headers, against the pixels one request may decode
    and the memory the whole process may spend decoding."""
    if max_pixels is not None and cost.pixels > max_pixels:
        raise ImageTooLarge(
            f"The images of this request decode to {cost.pixels} pixels in all, over the "
            f"{max_pixels} one request may (CAMSERVE_MAX_REQUEST_PIXELS); send fewer or "
            "smaller images, or split the batch."
        )
    if budget is not None and cost.bytes > budget:
        raise ImageTooLarge(
            f"Decoding the images of this request takes about {cost.bytes} bytes of memory, "
            f"over the {budget} the service spends on decoding at once "
            "(CAMSERVE_DECODE_BUDGET_BYTES); send fewer or smaller images."
        )
