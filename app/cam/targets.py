"""What an extractor explains: a class index per sample, or any output through ``targets``.

``targets`` are callables that turn one sample's output into the scalar to explain, so models
whose output is not (N, classes) logits work too: a segmentation map, an embedding, a detector's
per-image dicts. One callable serves the whole batch, or a list gives one per sample.

    with GradCAM(seg_model, "backbone.layer4") as cam:
        out = seg_model(x)                                   # (N, classes, H, W)
        maps = cam(scores=out, targets=lambda o: o[3][mask].sum())
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, get_args

import torch
from torch import Tensor

#: ``target(output_of_one_sample) -> scalar tensor``: the score a map explains.
Target = Callable[[Any], Tensor]

Probabilities = Literal["softmax", "sigmoid"]
"""How a classifier's logits become class probabilities: ``softmax`` over the classes (one class
per image), or ``sigmoid`` of each logit on its own (a multi-label model: each class is present
or not, and an image's probabilities need not sum to 1)."""
PROBABILITIES: tuple[str, ...] = get_args(Probabilities)


def class_probabilities(logits: Tensor, kind: Probabilities = "softmax") -> Tensor:
    """The class probabilities of logits ``(..., classes)``, by ``kind``: the one rule that
    predictions, explanations and faithfulness scores read a classifier's probabilities by."""
    if kind == "sigmoid":
        return logits.float().sigmoid()
    if kind == "softmax":
        return logits.float().softmax(-1)
    raise ValueError(f"probabilities must be one of {', '.join(PROBABILITIES)}, not {kind!r}")


class ClassProbability:
    """The probability of class ``class_idx`` in one sample's ``(classes,)`` logits, by
    ``kind`` (:func:`class_probabilities`): a target in [0, 1] for the faithfulness curves of a
    model whose probabilities are no softmax (a multi-label model's sigmoid)."""

    def __init__(self, class_idx: int, kind: Probabilities = "softmax") -> None:
        class_probabilities(torch.zeros(1), kind)  # refuses an unknown kind here
        self.class_idx = int(class_idx)
        self.kind = kind

    def __call__(self, output: Tensor) -> Tensor:
        return class_probabilities(output, self.kind)[self.class_idx]


def take_rows(output: Any, rows: Tensor) -> Any:
    """The rows ``rows`` of a batched output: a tensor's rows, or the items of a per-sample list."""
    if isinstance(output, Tensor):
        return output.index_select(0, rows.to(output.device))
    if isinstance(output, list | tuple):
        return [output[int(i)] for i in rows.tolist()]
    raise TypeError(
        f"The model's output is a {type(output).__name__}: targets need a tensor whose first "
        "dimension is the batch, or a list with one item per sample."
    )


def output_length(output: Any) -> int:
    """How many samples a batched output holds."""
    if isinstance(output, Tensor):
        if output.ndim == 0:
            raise ValueError("The model's output is a scalar: it has no batch dimension.")
        return int(output.shape[0])
    if isinstance(output, list | tuple):
        return len(output)
    raise TypeError(
        f"The model's output is a {type(output).__name__}, not a tensor or a per-sample list."
    )


class Objective:
    """The per-sample score an extractor explains: ``classes`` (logit indices) or ``targets``.

    ``objective(output, samples)`` scores each row of ``output``: row ``i`` came from sample
    ``samples[i]`` of the user's batch (masked, ablated and noisy forwards repeat samples).
    """

    def __init__(self, classes: Tensor | None = None, targets: list[Target] | None = None) -> None:
        if (classes is None) == (targets is None):
            raise ValueError("An objective is either class indices or target callables.")
        self.classes = classes
        self.targets = targets

    def __len__(self) -> int:
        return len(self.classes) if self.classes is not None else len(self.targets)  # type: ignore[arg-type]

    def check_output(self, output: Any) -> None:
        """Raise if ``output`` (rows of this objective's samples) cannot be scored."""
        if self.classes is None:
            return
        if not isinstance(output, Tensor) or output.ndim != 2:
            raise ValueError(not_logits(output))
        if self.classes.numel() and int(self.classes.max()) >= output.shape[1]:
            raise ValueError(
                f"class_idx {self.classes.tolist()} out of range: the model has "
                f"{output.shape[1]} classes (valid indices 0..{output.shape[1] - 1})."
            )

    def __call__(self, output: Any, samples: Tensor) -> Tensor:
        """Score of each row of ``output`` for its sample: (B,) float."""
        if self.classes is not None:
            self.check_output(output)
            classes = self.classes.to(output.device).index_select(0, samples.to(output.device))
            return output.gather(1, classes[:, None])[:, 0].float()
        rows = output_length(output)
        if rows != samples.numel():
            raise ValueError(f"The output holds {rows} samples, expected {samples.numel()}.")
        values = []
        for row, sample in enumerate(samples.tolist()):
            item = output[row]
            value = self.targets[sample](item)  # type: ignore[index]
            if not isinstance(value, Tensor) or value.numel() != 1:
                raise ValueError(
                    f"targets[{sample}] returned {_describe(value)}: a target must return a "
                    "scalar tensor (the score to explain)."
                )
            values.append(value.reshape(()))
        return torch.stack(values).float()


def not_logits(output: Any, takes_targets: bool = True) -> str:
    """Why ``output`` is not the logits tensor (N, classes) that ``class_idx`` explains, and the
    fixes: the one message of every method (``takes_targets``: whether it may offer
    ``targets=``)."""
    targets = (
        " or pass targets= callables that turn each sample's output into a score."
        if takes_targets
        else ""
    )
    if isinstance(output, Tensor):
        return (
            f"class_idx explains logits of shape (N, classes), but the model's output has shape "
            f"{tuple(output.shape)}."
            + (targets.replace(" or pass", " Pass") if targets else " Pass the model's logits.")
        )
    name = type(output).__name__
    if (
        isinstance(output, tuple | list)
        and output
        and all(isinstance(t, Tensor) and t.ndim >= 3 for t in output)
    ):
        return (
            f"class_idx explains the model's logits, a tensor of shape (N, classes), but its "
            f"output is a {name} of {len(output)} feature maps: a backbone without a head "
            "(timm's features_only=True) has no class scores to explain. Explain the layers "
            "with a class-agnostic method (EigenCAM, KPCACAM, FEM), or the whole classifier."
        )
    if isinstance(getattr(output, "logits", None), Tensor):
        what, access = f"of type {name} (its logits in .logits)", ".logits"
    elif isinstance(output, Mapping):
        keys = [str(k)[:40] for k in list(output)[:8]]
        access = "['logits']" if "logits" in output else "[<the logits' key>]"
        what = f"of type {name} (keys {keys})"
    elif isinstance(output, tuple | list):
        items = f"{len(output)} item" + ("" if len(output) == 1 else "s")
        what, access = f"of type {name} ({items})", "[0]"
    else:
        what, access = f"of type {name}", ""
    message = (
        f"class_idx explains the model's logits, a tensor of shape (N, classes), but its "
        f"output is {what}. Wrap the model so that its forward returns the logits tensor alone "
        f"(the usage guide's LogitsOnly wrapper, whose forward returns self.model(x){access}; "
        "a gradient method also takes that tensor as scores)" + (f",{targets}" if targets else ".")
    )
    if isinstance(output, tuple):
        message += (
            " GoogLeNet and Inception v3 add their auxiliary logits in train mode only: "
            "model.eval() gives the logits alone."
        )
    return message


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


def target_list(targets: Target | Sequence[Target], batch: int) -> list[Target]:
    """One callable per sample from one callable or a list of them."""
    if callable(targets):
        return [targets] * batch
    if isinstance(targets, Sequence) and not isinstance(targets, str):
        items = list(targets)
        if any(not callable(t) for t in items):
            raise TypeError("targets must be a callable or a list of callables.")
        if len(items) != batch:
            raise ValueError(
                f"targets has {len(items)} callables but the batch has {batch} samples: pass one "
                "per sample, or a single callable for all of them."
            )
        return items
    raise TypeError(f"targets must be a callable or a list of callables, not {type(targets)}.")
