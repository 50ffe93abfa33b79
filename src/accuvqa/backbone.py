"""ResNet-style image backbones with torchvision's architecture, parameter names and weights.

A state dict that torchvision's `resnet50()` (or any backbone of BACKBONES) saves loads here strictly,
its unused classifier `fc` included, and gives the same feature maps: the bottleneck puts its stride on
the 3x3 convolution (ResNet v1.5), ResNeXt widens it by groups, Wide ResNet by width_per_group.
`forward` stops at the stage that BACKBONE_LAYER names: c4 (layer3, stride 16) or c5 (layer4, stride 32).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class Architecture(NamedTuple):
    """One torchvision ResNet: bottleneck blocks per stage, groups of its 3x3 convolutions, their width."""

    blocks: tuple[int, int, int, int]
    groups: int = 1
    width_per_group: int = 64


BACKBONES: dict[str, Architecture] = {
    "resnet50": Architecture((3, 4, 6, 3)),
    "resnet101": Architecture((3, 4, 23, 3)),
    "resnet152": Architecture((3, 8, 36, 3)),
    "resnext50_32x4d": Architecture((3, 4, 6, 3), groups=32, width_per_group=4),
    "resnext101_32x8d": Architecture((3, 4, 23, 3), groups=32, width_per_group=8),
    "resnext101_64x4d": Architecture((3, 4, 23, 3), groups=64, width_per_group=4),
    "wide_resnet50_2": Architecture((3, 4, 6, 3), width_per_group=128),
    "wide_resnet101_2": Architecture((3, 4, 23, 3), width_per_group=128),
}

EXPANSION = 4  # a bottleneck's output has 4x its planes: 256, 512, 1024, 2048 channels per stage
LAYERS = {"c4": ("layer3", 16, 256 * EXPANSION), "c5": ("layer4", 32, 512 * EXPANSION)}  # name, stride, channels


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (grouped, strided) -> 1x1 expand, each batch-normalised, plus the shortcut."""

    def __init__(self, in_channels: int, planes: int, stride: int, groups: int, width_per_group: int) -> None:
        super().__init__()
        width = int(planes * width_per_group / 64) * groups
        out_channels = planes * EXPANSION
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None  # a projection where the shape changes (first block of a stage)
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, 4 * planes, H / stride, W / stride)."""
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + shortcut)


class ResNet(nn.Module):
    """torchvision's ResNet (stem, four stages of bottlenecks, classifier `fc`) that returns a stage's grid map."""

    def __init__(self, arch: Architecture, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        channels = 64
        for stage, (planes, count) in enumerate(zip((64, 128, 256, 512), arch.blocks), start=1):
            blocks = []
            for i in range(count):
                stride = 2 if i == 0 and stage > 1 else 1
                blocks.append(Bottleneck(channels, planes, stride, arch.groups, arch.width_per_group))
                channels = planes * EXPANSION
            self.add_module(f"layer{stage}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)  # unused by `forward`; kept so torchvision's weights load strictly

    def forward(self, x: torch.Tensor, layer: str = "c5") -> torch.Tensor:
        """(B, 3, H, W) normalised RGB -> (B, C, ceil(H / s), ceil(W / s)): the map of `layer` (LAYERS: c4 or c5)."""
        last, _, _ = LAYERS[layer]
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for name in ("layer1", "layer2", "layer3", "layer4"):
            x = getattr(self, name)(x)
            if name == last:
                break
        return x


def build_backbone(name: str) -> ResNet:
    """The backbone `name` (a key of BACKBONES) with uninitialised weights on the meta device: load a state dict
    into it with `load_state_dict(..., assign=True)`."""
    with torch.device("meta"):
        return ResNet(BACKBONES[name])
