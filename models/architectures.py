"""Torch definitions of the shipped character models (24x24 grayscale in, 36 logits out)."""

from __future__ import annotations

import torch
from torch import nn


class Maxout(nn.Module):
    """Max over groups of k consecutive channels (Goodfellow et al. 2013), static spatial size.

    The static shape makes the ONNX export a Reshape with a constant shape and a ReduceMax."""

    def __init__(self, channels: int, k: int, size: int) -> None:
        super().__init__()
        self.shape = (-1, channels // k, k, size, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(self.shape).amax(dim=2)


class CharNet(nn.Module):
    """The character CNN of Jaderberg et al. 2014 as used by Lebedev et al. 2015.

    conv1 9x9 1->96, maxout 2 (24 -> 16); conv2 9x9 48->128, maxout 2 (16 -> 8);
    conv3 8x8 64->512, maxout 4 (8 -> 1); conv4 1x1 128->144, maxout 4 -> 36 logits. No pooling.
    """

    def __init__(self, dropout: float = 0.1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 96, 9)
        self.mo1 = Maxout(96, 2, 16)
        self.conv2 = nn.Conv2d(48, 128, 9)
        self.mo2 = Maxout(128, 2, 8)
        self.conv3 = nn.Conv2d(64, 512, 8)
        self.mo3 = Maxout(512, 4, 1)
        self.drop = nn.Dropout(dropout)
        self.conv4 = nn.Conv2d(128, 144, 1)
        self.mo4 = Maxout(144, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            # same maths, faster CPU backward: channels_last makes oneDNN's weight gradient of the
            # 1-channel conv1 ~5x faster, and conv3 (8x8 kernel on an 8x8 map) is a matmul
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.mo1(self.conv1(x))
        x = self.mo2(self.conv2(x))
        if self.training:
            w = self.conv3.weight
            x = nn.functional.linear(x.reshape(x.shape[0], -1), w.reshape(w.shape[0], -1),
                                     self.conv3.bias).reshape(x.shape[0], -1, 1, 1)
        else:
            x = self.conv3(x)
        x = self.drop(self.mo3(x))
        return self.mo4(self.conv4(x)).reshape(-1, 36)  # constant-shape Reshape in ONNX


def conv_bn(cin: int, cout: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv+BN, projection shortcut (1x1 conv+BN) when shapes change."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = conv_bn(cin, cout, 3, stride)
        self.conv2 = conv_bn(cout, cout, 3, 1)
        self.shortcut = conv_bn(cin, cout, 1, stride) if (cin != cout or stride != 1) else None
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.shortcut is None else self.shortcut(x)
        return self.relu(self.conv2(self.relu(self.conv1(x))) + identity)


class CharResNet(nn.Module):
    """Small ResNet: stem 3x3 1->32 (24x24); basic blocks 32->64 /2 (12x12), 64->128 /2 (6x6),
    128->256 /2 (3x3); global average pool; linear 256 -> 36. Holds a 128->128 3x3 conv and a
    strided 128->256 3x3 conv (kernel 256x128x3x3), the solver benchmark's shapes. Strided early
    so that it costs less than charnet to train on two cores."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(1, 32)
        self.relu = nn.ReLU()
        self.stage1 = BasicBlock(32, 64, 2)
        self.stage2 = BasicBlock(64, 128, 2)
        self.stage3 = BasicBlock(128, 256, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(256, 36)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:  # oneDNN's weight gradient of the 1-channel stem is ~5x faster so
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.relu(self.stem(x))
        x = self.stage3(self.stage2(self.stage1(x)))
        return self.fc(self.pool(x).reshape(-1, 256))


ARCHITECTURES = {"charnet": CharNet, "charresnet": CharResNet}
