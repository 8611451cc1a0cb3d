"""Activation-based methods: CAM and the Score-CAM family (Score-CAM, SS-CAM, IS-CAM).

None of them needs gradients, so the forward may run under ``torch.inference_mode()``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar, cast

import torch
from torch import Tensor, nn

from app.cam.chunking import ChunkSizer
from app.cam.core import (
    _CAM,
    _SharedExtraForwards,
    finite_number,
    hooks_silenced,
    normalize_maps,
    positive_int,
    resize_maps,
    seeded_generator,
)
from app.cam.layers import LayerSpec, eval_mode, resolve_layer
from app.cam.options import (
    BATCH_SIZE,
    CHUNK_MS,
    FC_LAYER,
    MAX_TIMED_CHUNK,
    PRECISION,
    SCHEDULE,
    SEED,
    MethodOption,
    noise_std,
    num_samples,
)
from app.cam.targets import Objective, take_rows

logger = logging.getLogger(__name__)

#: Spatial size (pixels or voxels per channel) from which masked batches run channels-last on CPU.
_CHANNELS_LAST_MIN_PIXELS = 180 * 180


def _linear_layers(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def _pointwise(module: nn.Module) -> bool:
    if not isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        return False
    padding = module.padding
    no_padding = padding == "valid" or (not isinstance(padding, str) and not any(padding))
    return (
        all(k == 1 for k in module.kernel_size)
        and all(s == 1 for s in module.stride)
        and module.groups == 1
        and no_padding
    )


def head_weight(head: nn.Module) -> Tensor:
    """The class weights (classes, channels) of a Linear head or a 1x1-convolution head."""
    weight = cast(Tensor, head.weight).detach()
    return weight.reshape(weight.shape[0], weight.shape[1])


def resolve_fc_layer(
    model: nn.Module, fc_layer: str | nn.Module | None = None
) -> tuple[str, nn.Module]:
    """The classification head CAM reads its weights from: ``fc_layer`` if given (an
    ``nn.Linear`` or a 1x1 convolution, the same linear map applied before the pooling), else the
    model's only ``nn.Linear``. Raises ``ValueError`` saying why CAM does not apply otherwise."""
    if fc_layer is not None:
        name, module = resolve_layer(model, fc_layer)
        if not isinstance(module, nn.Linear) and not _pointwise(module):
            raise ValueError(
                f"fc_layer {name!r} is a {type(module).__name__} that is not an nn.Linear nor a "
                "1x1 convolution (stride 1, no padding, one group): CAM reads the class weights "
                "of a linear head and global average pooling."
            )
        return name, module
    linears = _linear_layers(model)
    if not linears:
        raise ValueError(
            "CAM does not apply: the model has no nn.Linear classification head (e.g. "
            "SqueezeNet's convolutional head). Use GradCAM, LayerCAM or ScoreCAM instead, or pass "
            "a compatible fc_layer."
        )
    if len(linears) > 1:
        names = [n for n, _ in linears]
        if len(names) > 5:  # a transformer's blocks hold dozens: the first ones and the last
            names = [*names[:3], f"... {len(names) - 4} more", names[-1]]
        raise ValueError(
            f"CAM does not apply: the model has {len(linears)} nn.Linear layers ({names}), so the "
            "class weights are not those of a single head fed by global pooling (a head of "
            "several layers, as VGG's and MobileNet v3's, or Linear layers inside the blocks, as "
            "in ConvNeXt and transformers). Use GradCAM, LayerCAM or ScoreCAM instead, or pass "
            "fc_layer= explicitly if one of them is a Linear head fed by global average pooling."
        )
    return linears[0]


def find_fc_layer(
    model: nn.Module,
    target_layer: LayerSpec = None,
    input_shape: Sequence[int] = (3, 224, 224),
) -> str:
    """Name of the Linear head CAM would use with ``target_layer``, checked by a dummy forward:
    its input must be the global average of the target layer's output. Raises ``ValueError``
    with the reason when CAM does not apply to this model and layer."""
    with CAM(model, target_layer, input_shape) as extractor:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        with eval_mode(model), torch.inference_mode():
            model(torch.zeros((1, *extractor.input_shape), device=device, dtype=dtype))
            extractor._check_head(extractor._activations_for_use())
        return extractor.fc_name


class CAM(_CAM):
    """CAM (Zhou et al., CVPR 2016, arXiv:1512.04150).

    w_k = W_fc[c, k], the head's weight of class c for channel k;  L = ReLU(sum_k w_k A_k).
    Needs a single nn.Linear head fed by global average pooling of the target layer, or a 1x1
    convolution head (given as ``fc_layer``) followed by global pooling. It reads the class's
    own head weights, so it explains class indices only (no ``targets``).

    Args:
        fc_layer: the head (name or module): an ``nn.Linear`` or a 1x1 convolution; ``None``
            resolves the model's only Linear.
    """

    supports_targets = False
    reads_head = True
    options = (FC_LAYER,)

    def __init__(
        self,
        model: nn.Module,
        target_layer: LayerSpec = None,
        input_shape: Sequence[int] = (3, 224, 224),
        reshape_transform: Callable[[Tensor], Tensor] | None = None,
        *,
        fc_layer: str | nn.Module | None = None,
        enable_hooks: bool = True,
    ) -> None:
        self._explicit_fc = fc_layer is not None
        self.fc_name, self.fc = resolve_fc_layer(model, fc_layer)
        self._fc_input: Tensor | None = None
        self._fc_training = False
        super().__init__(model, target_layer, input_shape, reshape_transform, enable_hooks)
        if len(self.target_names) != 1:
            self.remove_hooks()  # refused: the model is left as it was given
            raise ValueError("CAM takes exactly one target layer: the one the head pools.")

    def _register_hooks(self) -> None:
        super()._register_hooks()
        self._handles.append(self.fc.register_forward_pre_hook(self._record_fc_input))

    def _record_fc_input(self, module: nn.Module, args: tuple[object, ...]) -> None:
        if self._recording() and args and isinstance(args[0], Tensor):
            self._fc_input = args[0]
            self._fc_training = module.training

    def reset_hooks(self) -> None:
        super().reset_hooks()
        self._fc_input = None

    def _check_head(self, activations: list[Tensor]) -> None:
        activation = activations[0]
        channels = activation.shape[1]
        in_features = head_weight(self.fc).shape[1]
        fed = self._fc_input
        if fed is not None and fed.ndim > 2:
            # A 1x1-convolution head sees the map itself (or its pool); pooling commutes with it.
            fed = fed.mean(dim=tuple(range(2, fed.ndim)))
        if in_features != channels:
            why = (
                "The head pools another layer, or more than this layer's average pool (timm's "
                "global_pool='catavgmax' concatenates its max pool). Use the layer whose output "
                "the head pools (e.g. 'layer4' on a ResNet) if there is one, or GradCAM, "
                "LayerCAM or ScoreCAM, which need no particular head."
            )
            raise ValueError(
                f"CAM does not apply to target layer {self.target_names[0]!r}: it has {channels} "
                f"channels but fc_layer {self.fc_name!r} takes {in_features} features. {why}"
            )
        if fed is None or fed.shape != (activation.shape[0], channels):
            return
        if not _average_pool_of(activation, fed):
            message = (
                f"fc_layer {self.fc_name!r} is not fed by the global average pool of target "
                f"layer {self.target_names[0]!r}, so CAM's weights do not apply to its channels."
            )
            if self._fc_training:
                message += (
                    " The forward ran in train mode, where a dropout before the head changes its "
                    "input: put the model in eval mode (model.eval())."
                )
            if self._explicit_fc:
                logger.warning("%s Using it because it was passed explicitly.", message)
            elif self._fc_training:
                raise ValueError(message)
            else:
                raise ValueError(message + " Use GradCAM, LayerCAM or ScoreCAM instead.")

    def _get_weights(
        self,
        objective: Objective | None,
        scores: Any,
        retain_graph: bool,
        activations: list[Tensor],
    ) -> list[Tensor]:
        class_idx = objective.classes  # type: ignore[union-attr]
        weight = head_weight(self.fc)
        self._check_range(class_idx, weight.shape[0])  # type: ignore[arg-type]
        self._check_head(activations)
        return [weight.index_select(0, class_idx.to(weight.device))]  # type: ignore[union-attr]


def _average_pool_of(activation: Tensor, fed: Tensor) -> bool:
    """Whether ``fed`` (N, K) is the global average pool of ``activation`` (N, K, *S)."""
    eps = max(torch.finfo(activation.dtype).eps, torch.finfo(fed.dtype).eps)
    pooled = activation.float().mean(dim=tuple(range(2, activation.ndim)))
    # An image with a NaN or inf pixel pools to NaN on both sides: compare the finite rest
    # (a NaN scale made the tolerance itself NaN).
    pooled = torch.nan_to_num(pooled, nan=0.0, posinf=0.0, neginf=0.0)
    fed = torch.nan_to_num(fed.float(), nan=0.0, posinf=0.0, neginf=0.0)
    scale = pooled.abs().max().clamp_min(1e-12)
    # A bf16 or fp16 model pools and rounds in its own precision (bf16: up to eps/2 = 0.4%
    # apart), so the tolerance grows with the coarser of the two dtypes.
    rtol = max(1e-3, 2 * eps)
    return torch.allclose(pooled, fed, rtol=rtol, atol=max(1e-4, 2 * eps) * float(scale))


class _ScoreFamily(_SharedExtraForwards):
    """Family base: channel weights from the class score (logit) of the input masked by each
    channel's upsampled, min-max normalised activation, softmaxed over the channels.

    The logit, not the probability: a softmax over channels of probabilities, which lie in [0, 1],
    gives weights within a factor e of each other, so the map barely depends on the class. The
    baseline score f_c(X_b) of the paper is the same for every channel and cancels in the softmax.

    A channel whose activation is flat has a zero mask; those channels share one masked input
    (per noise draw), so they cost one forward in all instead of one each. Masked forwards run
    in chunks of ``batch_size`` with every extractor's hooks off; masks are built per chunk, so
    memory grows with ``batch_size`` and not with the number of channels. On CUDA the chunks
    are sized by time instead (``chunk_ms``, ``app.cam.chunking``), up to 256 inputs.

    ``precision="bf16"`` runs the masked forwards under bf16 autocast; the scores, the softmax
    and the map stay fp32.
    """

    uses_scores = True
    scores_optional = True
    uses_input = True
    masked_forwards = True
    options: ClassVar[tuple[MethodOption, ...]] = (BATCH_SIZE, CHUNK_MS, PRECISION)
    #: masked inputs per (sample, channel): noise draws or integration steps.
    _variants = 1

    def __init__(
        self,
        model: nn.Module,
        target_layer: LayerSpec = None,
        input_shape: Sequence[int] = (3, 224, 224),
        reshape_transform: Callable[[Tensor], Tensor] | None = None,
        *,
        batch_size: int = 32,
        chunk_ms: float = 20.0,
        precision: str = "fp32",
        enable_hooks: bool = True,
    ) -> None:
        positive_int("batch_size", batch_size)
        self.chunk_ms = finite_number("chunk_ms", chunk_ms, above=True)
        PRECISION.check(precision)
        super().__init__(model, target_layer, input_shape, reshape_transform, enable_hooks)
        self.batch_size = batch_size
        self.precision = precision
        self.chunk_sizes: list[int] = []
        """Inputs per chunk of the last call's masked forwards."""

    # --- what a method says
    def _masked_inputs(
        self, inputs: Tensor, masks: Tensor, sample_idx: Tensor, variant_idx: Tensor
    ) -> Tensor:
        """Inputs (B, C, *S) multiplied by their masks (B, *S) for the given variants."""
        return inputs * masks.unsqueeze(1)

    def _flat_input_is_shared(self) -> bool:
        """Whether a zero mask gives the same masked input for every sample and variant."""
        return True

    def _prepare_call(self, inputs: Tensor) -> None:
        """Per-call state (noise) before the masked forwards."""

    # --- shared machinery
    def _masks(self, activation_maps: Tensor, size: Sequence[int]) -> Tensor:
        """(B, *s) activation maps → (B, *S) upsampled masks in [0, 1]."""
        return normalize_maps(resize_maps(activation_maps.float(), size))

    def _logits(self, masked: Tensor) -> Any:
        """The model's output on masked inputs, with every extractor's hooks off."""
        if (
            masked.device.type == "cpu"
            and masked.ndim in (4, 5)
            and masked[0, 0].numel() >= _CHANNELS_LAST_MIN_PIXELS
        ):
            # oneDNN's CPU convolutions on channels-last batches: resnet18 at 224x224 ran 1.3x
            # faster, but 64x64 inputs ran 0.7x and 128x128 ones gained nothing. The values agree
            # with the contiguous layout to float rounding.
            layout = torch.channels_last if masked.ndim == 4 else torch.channels_last_3d
            masked = masked.contiguous(memory_format=layout)
        autocast = torch.autocast(
            masked.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"
        )
        with torch.inference_mode(), hooks_silenced(), self._work.pausable(), autocast:
            return self.model(masked)

    def _class_scores(
        self, masked: Tensor, objectives: Sequence[Objective], samples: Tensor
    ) -> Tensor:
        """The score to explain (the class logit) of each masked input's sample, for every
        objective, from one forward (the logits hold every class): (objectives, B), fp32."""
        with torch.inference_mode():
            logits = self._logits(masked)
            return torch.stack([objective(logits, samples).float() for objective in objectives])

    def _sizer(self, device: torch.device) -> ChunkSizer:
        return ChunkSizer(self.batch_size, self.chunk_ms, device, MAX_TIMED_CHUNK)

    def _chunks(self, total: int) -> Iterator[slice]:
        for start in range(0, total, self.batch_size):
            yield slice(start, min(start + self.batch_size, total))

    def _channel_scores(
        self, activation: Tensor, inputs: Tensor, objectives: Sequence[Objective]
    ) -> Tensor:
        """Mean class score over variants for every objective, sample and channel:
        (objectives, N, K)."""
        n_samples, n_channels = activation.shape[:2]
        size = inputs.shape[2:]
        if activation.ndim != inputs.ndim:
            raise ValueError(
                f"The target layer's activation {tuple(activation.shape)} and the model input "
                f"{tuple(inputs.shape)} do not have the same number of spatial dimensions."
            )
        # Pass 1: which channels are flat (their normalised mask is all zeros).
        flat = torch.zeros(n_samples, n_channels, dtype=torch.bool, device=activation.device)
        per_chunk = max(1, self.batch_size // n_samples)
        for start in range(0, n_channels, per_chunk):
            block = activation[:, start : start + per_chunk]
            masks = self._masks(block.flatten(0, 1), size)
            flat[:, start : start + per_chunk] = (
                masks.flatten(1).amax(dim=1).reshape(n_samples, -1) == 0
            )
        variants = self._variants
        totals = torch.zeros(
            len(objectives), n_samples, n_channels, dtype=torch.float32, device=activation.device
        )
        # Flat channels cost at most one shared input each; they count as done at once.
        self._work.advance(int(flat.sum()) * variants)
        # Pass 2: one masked forward per (sample, live channel, variant), in chunks.
        live = torch.nonzero(~flat)  # (J, 2)
        jobs = live.repeat_interleave(variants, dim=0)
        job_variants = torch.arange(variants, device=live.device).repeat(live.shape[0])
        sizer = self._sizer(inputs.device)
        self.chunk_sizes = sizer.sizes
        for part in sizer.slices(jobs.shape[0]):
            sample_idx, channel_idx = jobs[part, 0], jobs[part, 1]
            with sizer.timing(sample_idx.shape[0]):
                variant_idx = job_variants[part]
                masks = self._masks(activation[sample_idx, channel_idx], size)
                masked = self._masked_inputs(inputs[sample_idx], masks, sample_idx, variant_idx)
                scores = self._class_scores(masked, objectives, sample_idx)
                for k in range(len(objectives)):
                    totals[k].index_put_(
                        (sample_idx, channel_idx), scores[k].to(totals.device), accumulate=True
                    )
            self._work.advance(sample_idx.shape[0])
        # Flat channels: a zero mask, one shared masked input per (sample, variant) at most.
        if bool(flat.any()):
            totals += flat * self._flat_scores(inputs, objectives)[:, :, None]
        return totals / variants

    def _flat_scores(self, inputs: Tensor, objectives: Sequence[Objective]) -> Tensor:
        """Summed class score over variants of the zero-mask input, per objective and sample:
        (objectives, N)."""
        n_samples = inputs.shape[0]
        zero_masks = torch.zeros((1, *inputs.shape[2:]), device=inputs.device)
        if self._flat_input_is_shared():
            # Zeros, not the first image times its zero mask: a NaN or inf pixel times 0 is NaN,
            # and would be every image's flat input.
            masked = self._masked_inputs(
                torch.zeros_like(inputs[:1]),
                zero_masks,
                torch.zeros(1, dtype=torch.long),
                torch.zeros(1),
            )
            everyone = torch.arange(n_samples)
            shared = take_rows(self._logits(masked), torch.zeros(n_samples, dtype=torch.long))
            with torch.inference_mode():
                scores = torch.stack([o(shared, everyone).float() for o in objectives])
                return scores.to(inputs.device) * self._variants
        sums = torch.zeros(len(objectives), n_samples, device=inputs.device)
        pairs = torch.cartesian_prod(
            torch.arange(n_samples, device=inputs.device),
            torch.arange(self._variants, device=inputs.device),
        ).reshape(-1, 2)
        for part in self._chunks(pairs.shape[0]):
            sample_idx, variant_idx = pairs[part, 0], pairs[part, 1]
            masks = zero_masks.expand(sample_idx.shape[0], *zero_masks.shape[1:])
            masked = self._masked_inputs(inputs[sample_idx], masks, sample_idx, variant_idx)
            scores = self._class_scores(masked, objectives, sample_idx)
            for k in range(len(objectives)):
                sums[k].index_put_((sample_idx,), scores[k].to(sums.device), accumulate=True)
        return sums

    def _weights_many(
        self, objectives: Sequence[Objective], scores: Any, activations: list[Tensor]
    ) -> list[list[Tensor]]:
        """Per objective, per layer, the channel weights: every objective is scored on the
        logits of the same masked forwards."""
        recorded = self._recorded_input()
        with torch.inference_mode(False):
            inputs = recorded.detach().clone()
        self._prepare_call(inputs)
        self._work.begin(sum(a.shape[0] * a.shape[1] for a in activations) * self._variants)
        per_layer = [
            torch.softmax(self._channel_scores(activation, inputs, objectives), dim=2)
            for activation in activations
        ]
        return [[weights[k] for weights in per_layer] for k in range(len(objectives))]


class ScoreCAM(_ScoreFamily):
    """Score-CAM (Wang et al., CVPR-W 2020, arXiv:1910.01279), Algorithm 1.

    M_k = minmax(Up(A_k)); S_k = f_c(x * M_k) (the logit); w = softmax_k(S);
    L = ReLU(sum_k w_k A_k).

    Args:
        batch_size: masked inputs per forward (memory grows with it; the result does not).
    """


class SSCAM(_ScoreFamily):
    """SS-CAM, Smoothed Score-CAM (Wang et al., 2020, arXiv:2006.14255), noise on the masks.

    S_k = mean_s f_c(x * (M_k + e_s)) with e_s ~ N(0, std^2), one noise map per draw s
    shared by the channels and the samples of a batch; w = softmax_k(S); L = ReLU(sum_k w_k A_k).

    Args:
        batch_size: masked inputs per forward.
        num_samples: noise draws per mask.
        std: standard deviation of the noise added to the [0, 1] masks.
        seed: seeds the noise of every call (``None``: torch's global generator).
    """

    options = (
        BATCH_SIZE,
        CHUNK_MS,
        PRECISION,
        num_samples(35, "noise draws per mask"),
        noise_std(2.0, "standard deviation of the noise added to the [0, 1] masks"),
        SEED,
    )

    def __init__(
        self,
        model: nn.Module,
        target_layer: LayerSpec = None,
        input_shape: Sequence[int] = (3, 224, 224),
        reshape_transform: Callable[[Tensor], Tensor] | None = None,
        *,
        batch_size: int = 32,
        chunk_ms: float = 20.0,
        precision: str = "fp32",
        num_samples: int = 35,
        std: float = 2.0,
        seed: int | None = None,
        enable_hooks: bool = True,
    ) -> None:
        positive_int("num_samples", num_samples)
        finite_number("std", std)
        super().__init__(
            model,
            target_layer,
            input_shape,
            reshape_transform,
            batch_size=batch_size,
            chunk_ms=chunk_ms,
            precision=precision,
            enable_hooks=enable_hooks,
        )
        self.num_samples = num_samples
        self._variants = num_samples
        self.std = float(std)
        self.seed = seed
        self._noise: Tensor | None = None

    def _prepare_call(self, inputs: Tensor) -> None:
        generator = seeded_generator(self.seed, inputs.device)
        # One noise map per draw, shared by every channel and every sample of the batch: a sample's
        # map then does not depend on the batch it came in.
        shape = (self.num_samples, *inputs.shape[2:])
        self._noise = self.std * torch.randn(
            shape, generator=generator, device=inputs.device, dtype=torch.float32
        )

    def _flat_input_is_shared(self) -> bool:
        return False

    def _masked_inputs(
        self, inputs: Tensor, masks: Tensor, sample_idx: Tensor, variant_idx: Tensor
    ) -> Tensor:
        if self._noise is None:
            raise RuntimeError("SSCAM's noise is drawn when it is called; call the extractor.")
        noise = self._noise[variant_idx.to(self._noise.device).long()]
        return inputs * (masks + noise).unsqueeze(1).to(inputs.dtype)


class ISCAM(_ScoreFamily):
    """IS-CAM, Integrated Score-CAM (Naidu et al., 2020, arXiv:2010.03023).

    S_k = mean_{i=1..n} f_c(x * c_i M_k), the class score integrated along a path of scaled
    masks; w = softmax_k(S); L = ReLU(sum_k w_k A_k). The schedule c_i:

    - ``"cumulative"`` (default), the authors' code: the coefficient grows by i/n at step i
      (``new_map += x * 0.1 * i`` at n = 10), so c_i = sum_{j<=i} j/n = i(i+1)/(2n), which
      reaches (n+1)/2 = 5.5 at n = 10. TorchCAM's ISCAM follows it too.
    - ``"linear"``: c_i = i/n, the straight path from the zero mask to M_k that the paper's
      integral describes and camserve used before (on 40 shape pairs its pointing game was
      0.575 against 0.662 for the authors' schedule).

    Args:
        batch_size: masked inputs per forward.
        num_samples: integration steps.
        schedule: ``"cumulative"`` or ``"linear"``.
    """

    options = (
        BATCH_SIZE,
        CHUNK_MS,
        PRECISION,
        num_samples(10, "integration steps from the zero mask to the mask"),
        SCHEDULE,
    )

    def __init__(
        self,
        model: nn.Module,
        target_layer: LayerSpec = None,
        input_shape: Sequence[int] = (3, 224, 224),
        reshape_transform: Callable[[Tensor], Tensor] | None = None,
        *,
        batch_size: int = 32,
        chunk_ms: float = 20.0,
        precision: str = "fp32",
        num_samples: int = 10,
        schedule: str = "cumulative",
        enable_hooks: bool = True,
    ) -> None:
        positive_int("num_samples", num_samples)
        if schedule not in SCHEDULE.choices:
            raise ValueError(
                f"schedule must be one of {', '.join(SCHEDULE.choices)}, got {schedule!r}."
            )
        super().__init__(
            model,
            target_layer,
            input_shape,
            reshape_transform,
            batch_size=batch_size,
            chunk_ms=chunk_ms,
            precision=precision,
            enable_hooks=enable_hooks,
        )
        self.num_samples = num_samples
        self.schedule = schedule
        self._variants = num_samples

    def coefficients(self) -> Tensor:
        """c_i for i = 1..n, the scale of the mask at each step: (n,)."""
        steps = torch.arange(1, self.num_samples + 1, dtype=torch.float64)
        if self.schedule == "linear":
            return (steps / self.num_samples).float()
        return (steps * (steps + 1) / (2 * self.num_samples)).float()

    def _masked_inputs(
        self, inputs: Tensor, masks: Tensor, sample_idx: Tensor, variant_idx: Tensor
    ) -> Tensor:
        steps = self.coefficients().to(masks.device)[variant_idx.to(masks.device).long()]
        scaled = masks * steps.reshape(-1, *([1] * (masks.ndim - 1)))
        return inputs * scaled.unsqueeze(1).to(inputs.dtype)
