"""LeGrad against its formula on a one-block toy, and on torchvision's VisionTransformer."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from app.cam import LeGrad, normalize_maps


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.attention(tokens, tokens, tokens, need_weights=False)[0]


class OneBlock(nn.Module):
    """Image (N, D, 1, T) → tokens (N, T, D) → attention (``block``) → head(token 0).

    s_c = W_c . (W_o concat_h(sum_j A_h[0, j] V_h[j]) + b_o) + b_c, so ds_c/dA_h[i, j] is
    V_h[j] . u_h for the class token's row i = 0 (u = W_o^T W_c split by head) and 0 elsewhere.
    """

    def __init__(self, dim: int = 6, heads: int = 2, classes: int = 3) -> None:
        super().__init__()
        self.block = Block(dim, heads)
        self.head = nn.Linear(dim, classes)

    @staticmethod
    def tokens(x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).transpose(1, 2)

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(tokens[:, 0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.block(self.tokens(x)))


def test_legrad_matches_the_formula_on_one_block():
    torch.manual_seed(0)
    model = OneBlock().eval()
    x = torch.randn(2, 6, 1, 5)  # 1 class token + a 2x2 grid
    classes = [2, 0]
    with LeGrad(model, ["block"], (6, 1, 5), score_projection=model.project) as extractor:
        raw = extractor(classes, model(x), normalized=False)[0]
    attention = model.block.attention
    heads, dim = attention.num_heads, attention.embed_dim
    w_v = attention.in_proj_weight[2 * dim :]
    b_v = attention.in_proj_bias[2 * dim :]
    v = (model.tokens(x) @ w_v.T + b_v).reshape(2, 5, heads, -1)  # (N, T, H, d)
    u = (attention.out_proj.weight.T @ model.head.weight[classes].T).T.reshape(2, heads, -1)
    grad_row0 = torch.einsum("nthd,nhd->nht", v, u)  # ds_c/dA_h[0, j]
    relevance = torch.relu(grad_row0).sum(1) / (heads * 5)  # mean over heads and the 5 queries
    expected = relevance[:, 1:].reshape(2, 2, 2)
    torch.testing.assert_close(raw, expected.detach(), rtol=1e-5, atol=1e-7)


@pytest.fixture(scope="module")
def vit() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=32,
        patch_size=8,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        mlp_dim=32,
        num_classes=5,
    ).eval()
    nn.init.normal_(model.heads.head.weight)
    for p in model.parameters():
        p.requires_grad_(False)  # a frozen model, as served
    return model


def test_legrad_on_torchvision_vit_batches_like_single_images(vit):
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    plain = vit(x)
    with LeGrad(vit, input_shape=(3, 32, 32)) as extractor:
        scores = vit(x)
        torch.testing.assert_close(scores, plain, rtol=1e-4, atol=1e-5)  # same attention
        maps = extractor([1, 3, 0], scores)
        assert len(maps) == 1 and maps[0].shape == (3, 4, 4)
        assert torch.isfinite(maps[0]).all() and maps[0].max() == 1
        for i, c in enumerate([1, 3, 0]):
            single = extractor(c, vit(x[i : i + 1]))[0]
            torch.testing.assert_close(single, maps[0][i : i + 1], rtol=1e-4, atol=1e-5)
        raw = extractor(2, vit(x), normalized=False)[0]
        torch.testing.assert_close(normalize_maps(raw), extractor(2, vit(x))[0])
    assert all(not m._forward_hooks for m in vit.modules())


def test_legrad_checks(vit):
    x = torch.randn(2, 3, 32, 32)
    with LeGrad(vit, input_shape=(3, 32, 32)) as extractor:
        scores = vit(x)
        with pytest.raises(ValueError, match="out of range"):
            extractor([0, 5], scores, retain_graph=True)
        with pytest.raises(ValueError, match="one class index per sample"):
            extractor([0], scores, retain_graph=True)
        with pytest.raises(ValueError, match="targets"):
            extractor(scores=scores, targets=lambda o: o[0])
        with torch.inference_mode():
            scores = vit(x)
        with pytest.raises(RuntimeError, match="gradients"):
            extractor([0, 1], scores)
    # A CNN or a timm ViT (its own attention module): it said "LeGrad finds the blocks of
    # torchvision's VisionTransformer only: pass blocks (and a score_projection)", which cannot
    # work for them either.
    cnn = nn.Sequential(nn.Conv2d(3, 3, 1))
    for blocks in (None, ["0"]):
        with pytest.raises(ValueError, match=r"has none: a CNN.*Use GradCAM.*vit_target"):
            LeGrad(cnn, blocks)
    assert not cnn[0]._forward_hooks
    with pytest.raises(ValueError, match="score_projection"):
        LeGrad(nn.Sequential(nn.MultiheadAttention(4, 1)), ["0"])
    with pytest.raises(ValueError, match="MultiheadAttention"):
        LeGrad(vit, ["conv_proj"], score_projection=lambda t: t[:, 0])
