"""LeGrad: attention-gradient maps for Vision Transformers."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from app.cam.core import _CAM
from app.cam.layers import LayerSpec
from app.cam.targets import Objective

#: ``score_projection(block_tokens) -> logits``: reads the class scores from a block's output.
ScoreProjection = Callable[[Tensor], Tensor]


def _is_torchvision_vit(model: nn.Module) -> bool:
    return all(hasattr(model, a) for a in ("encoder", "heads", "patch_size", "image_size"))


def _attention_of(block: nn.Module, name: str) -> nn.MultiheadAttention:
    found = next((m for m in block.modules() if isinstance(m, nn.MultiheadAttention)), None)
    if found is None:
        raise ValueError(
            f"Block {name!r} holds no nn.MultiheadAttention: LeGrad reads the softmax attention of "
            "each block it is given (pass the transformer's blocks)."
        )
    if not found._qkv_same_embed_dim or found.bias_k is not None:
        raise ValueError(
            f"The attention of block {name!r} has separate key/value sizes or extra key/value "
            "biases, which LeGrad does not recompute."
        )
    return found


class LeGrad(_CAM):
    """LeGrad (Bousselham et al., 2024, arXiv:2404.03214).

    For each block l, s^l = the class score read from the block's output (its class token through
    the final norm and head); E^l = mean over heads and queries of ReLU(ds^l_c / dA^l), A^l the
    block's softmax attention probabilities; the map is mean_l E^l over the patch tokens (prefix
    tokens removed), laid on the patch grid. It explains class indices only (no ``targets``) and
    returns one map for all the blocks.

    To expose A^l, the hooks recompute each block's ``nn.MultiheadAttention`` (same weights, same
    formula) and return that output in place of the module's, so the forward must run with
    gradients enabled (the parameters may stay frozen).

    Args:
        blocks: the transformer blocks (names or modules); ``None``: every block of a torchvision
            ``VisionTransformer``.
        input_shape: the input's shape without the batch dimension.
        score_projection: maps a block's tokens (N, T, D) to logits (N, classes); built in for
            torchvision's ``VisionTransformer`` (``heads(encoder.ln(tokens[:, 0]))``).
        prefix_tokens: leading tokens that are not patches (class, distillation, registers).
        grid_size: the patch grid (H, W); ``None``: the image size over the patch size for
            torchvision, else a square grid.
    """

    requires_grad = True
    uses_scores = True
    supports_targets = False
    one_map = True
    reads_grids = False  # its blocks' tokens, read through score_projection

    def __init__(
        self,
        model: nn.Module,
        blocks: LayerSpec = None,
        input_shape: Sequence[int] = (3, 224, 224),
        *,
        score_projection: ScoreProjection | None = None,
        prefix_tokens: int = 1,
        grid_size: tuple[int, int] | None = None,
        enable_hooks: bool = True,
    ) -> None:
        torchvision_vit = _is_torchvision_vit(model)
        if isinstance(model, nn.Module) and not any(
            isinstance(m, nn.MultiheadAttention) for m in model.modules()
        ):
            raise ValueError(
                "LeGrad reads the softmax attention of the nn.MultiheadAttention in a Vision "
                "Transformer's blocks, and this model has none: a CNN, or a transformer whose "
                "attention is a module of its own (timm's ViT, DeiT and Swin). Use GradCAM or "
                "LayerCAM instead: on a CNN as they are, on a ViT with vit_target(model), on a "
                "Swin with hierarchical_target(model)."
            )
        if blocks is None:
            if not torchvision_vit:
                raise ValueError(
                    "LeGrad finds the blocks of torchvision's VisionTransformer only: pass blocks "
                    "(and a score_projection) for other transformers."
                )
            blocks = list(model.encoder.layers)  # type: ignore[union-attr, arg-type]
        if score_projection is None:
            if not torchvision_vit:
                raise ValueError(
                    "Pass score_projection (block tokens -> logits): LeGrad builds it for "
                    "torchvision's VisionTransformer only."
                )
            score_projection = partial(_torchvision_projection, model)
        if grid_size is None and torchvision_vit:
            side = int(model.image_size) // int(model.patch_size)  # type: ignore[arg-type]
            grid_size = (side, side)
        self.score_projection = score_projection
        self.prefix_tokens = prefix_tokens
        self.grid_size = grid_size
        self._attention_modules: list[nn.MultiheadAttention] = []
        self._attentions: list[Tensor | None] = []
        super().__init__(model, blocks, input_shape, None, enable_hooks)

    @classmethod
    def unavailable_reason(
        cls, model: nn.Module, target_layer: LayerSpec, input_shape: Sequence[int]
    ) -> str | None:
        if _is_torchvision_vit(model):
            return None
        return (
            "LeGrad reads the attention of a Vision Transformer's blocks (torchvision's "
            "VisionTransformer built in); this model is not one."
        )

    @classmethod
    def default_layers(cls, model: nn.Module) -> list[str] | None:
        if not _is_torchvision_vit(model):
            return None
        blocks = set(cast(Any, model).encoder.layers.children())
        return [name for name, m in model.named_modules() if m in blocks]

    def _register_hooks(self) -> None:
        super()._register_hooks()
        self._attention_modules = [
            _attention_of(block, name)
            for name, block in zip(self.target_names, self._target_modules, strict=True)
        ]
        self._attentions = [None] * len(self._attention_modules)
        for idx, attention in enumerate(self._attention_modules):
            self._handles.append(
                attention.register_forward_hook(partial(self._attend, idx), with_kwargs=True)
            )

    def reset_hooks(self) -> None:
        super().reset_hooks()
        self._attentions = [None] * len(self._attention_modules)

    def _recorded_state(self) -> dict[str, Any]:
        return {**super()._recorded_state(), "_attentions": list(self._attentions)}

    def _attend(
        self,
        idx: int,
        module: nn.MultiheadAttention,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        _output: Any,
    ) -> tuple[Tensor, None] | None:
        """Recompute the attention so that its probabilities are a tensor of the graph."""
        if not self._recording():
            return None
        names = ("query", "key", "value")
        query, key, value = (args[i] if len(args) > i else kwargs[n] for i, n in enumerate(names))
        if any(kwargs.get(m) is not None for m in ("attn_mask", "key_padding_mask")) or bool(
            kwargs.get("is_causal", False)
        ):
            raise ValueError("LeGrad recomputes unmasked self-attention only.")
        if not module.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        batch, tokens, dim = query.shape
        heads = module.num_heads
        w_q, w_k, w_v = module.in_proj_weight.chunk(3)
        b_q, b_k, b_v = (
            module.in_proj_bias.chunk(3) if module.in_proj_bias is not None else (None,) * 3
        )

        def split(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
            return F.linear(x, w, b).reshape(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)

        q, k, v = split(query, w_q, b_q), split(key, w_k, b_k), split(value, w_v, b_v)
        probs = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
        if torch.is_grad_enabled() and not probs.requires_grad:
            # Frozen model: start the graph at the attention, as the base does at target layers.
            probs = probs.detach().requires_grad_(True)
        self._attentions[idx] = probs
        mixed = F.dropout(probs, module.dropout, module.training) @ v
        out = module.out_proj(mixed.transpose(1, 2).reshape(batch, tokens, dim))
        if not module.batch_first:
            out = out.transpose(0, 1)
        return out, None

    def _maps(
        self,
        objective: Objective | None,
        scores: Any,
        retain_graph: bool,
        activations: list[Tensor],
    ) -> list[Tensor]:
        assert objective is not None
        attentions = self._attentions
        if any(a is None or not a.requires_grad for a in attentions) or any(
            a is not None and a.is_inference() for a in attentions
        ):
            raise RuntimeError(
                "LeGrad needs gradients, but the attention was not recorded with an autograd "
                "graph: run the forward with gradients enabled (no inference_mode / no_grad)."
            )
        samples = torch.arange(len(objective))
        relevance = []
        last = len(attentions) - 1
        recorded = zip(self._recorded(), cast(list[Tensor], attentions), strict=True)
        for i, (tokens, attention) in enumerate(recorded):
            score = objective(self.score_projection(tokens), samples).sum()
            (grad,) = torch.autograd.grad(
                score, attention, retain_graph=retain_graph or i < last, allow_unused=True
            )
            if grad is None:
                grad = torch.zeros_like(attention)
            with torch.no_grad():
                relevance.append(torch.relu(grad).mean(dim=(1, 2))[:, self.prefix_tokens :])
        with torch.no_grad():
            mean = torch.stack(relevance).mean(dim=0)
            count = mean.shape[1]
            height, width = self.grid_size or (math.isqrt(count), math.isqrt(count))
            if height * width != count:
                raise ValueError(
                    f"{count} patch tokens do not form a {height}x{width} grid: pass grid_size."
                )
            return [mean.reshape(mean.shape[0], height, width)]


def _torchvision_projection(model: Any, tokens: Tensor) -> Tensor:
    return model.heads(model.encoder.ln(tokens[:, 0]))
