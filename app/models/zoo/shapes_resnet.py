"""Small ResNet-style classifier for the synthetic shapes dataset.

The layout mirrors torchvision's ResNet naming (``stem``, ``layer1``..``layer3``,
``avgpool``, ``fc``) so CAM methods can target ``layer3`` and read the single
linear head ``fc``. At a 128x128 input the feature map of ``layer3`` is 16x16.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["BasicBlock", "ShapesResNet", "build"]


class BasicBlock(nn.Module):
    """Two 3x3 conv/BN layers with an identity (or 1x1 projection) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


def _stage(in_channels: int, out_channels: int, blocks: int, stride: int) -> nn.Sequential:
    layers = [BasicBlock(in_channels, out_channels, stride)]
    layers += [BasicBlock(out_channels, out_channels) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class ShapesResNet(nn.Module):
    """ResNet-style network: stride-2 stem, three stages, global average pool, linear head.

    Spatial sizes at a 128x128 input: stem 64, layer1 32, layer2 16, layer3 16.
    """

    def __init__(
        self,
        num_classes: int = 8,
        widths: tuple[int, int, int, int] = (16, 24, 48, 64),
        blocks: tuple[int, int, int] = (1, 1, 1),
    ) -> None:
        super().__init__()
        stem_w, w1, w2, w3 = widths
        self.stem = nn.Sequential(
            nn.Conv2d(3, stem_w, 3, 2, 1, bias=False),
            nn.BatchNorm2d(stem_w),
            nn.ReLU(inplace=True),
        )
        self.layer1 = _stage(stem_w, w1, blocks[0], stride=2)
        self.layer2 = _stage(w1, w2, blocks[1], stride=2)
        self.layer3 = _stage(w2, w3, blocks[2], stride=1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w3, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def build(num_classes: int = 8) -> nn.Module:
    """Build the default shapes classifier (entry point ``app.models.zoo.shapes_resnet:build``)."""
    return ShapesResNet(num_classes=num_classes)
