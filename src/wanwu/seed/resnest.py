"""ResNeSt in plain PyTorch: the network behind 万物识别 (ModelScope ``cv_resnest101_general_recognition``).

A faithful re-implementation of zhanghang1989/ResNeSt as adapted by ModelScope
(``modelscope/models/cv/animal_recognition/{resnet,splat}.py``), with the same module names, so that the
published ``pytorch_model.pt`` loads key for key. No torchvision, timm or modelscope needed.

The seed model is :func:`resnest101` (``[3, 4, 23, 3]`` blocks, radix 2, deep stem, average-pool
downsampling, 54,092 classes): 935 state-dict entries, 157,060,524 parameters. :class:`ResNeStConfig` makes
depth, width and class count configurable so tests can build a tiny network of the same family.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GENERAL_CLASSES = 54092
ANIMAL_CLASSES = 8288


@dataclass(frozen=True)
class ResNeStConfig:
    """``ResNet(Bottleneck, layers, radix=2, groups=1, bottleneck_width=64, deep_stem=True, stem_width=64,
    avg_down=True, avd=True, avd_first=False, num_classes=N)``.

    ``stem_width`` is the width of the deep stem's first two 3x3 convs; the third doubles it
    (3→64→64→128 for ResNeSt-101, as in zhanghang1989/ResNeSt: this is what gives the published
    checkpoint's 157,060,524 parameters). ``base_planes`` is the first stage's bottleneck width
    (64 in ResNeSt; smaller only for tests), doubled at each later stage.
    """

    layers: tuple[int, int, int, int] = (3, 4, 23, 3)
    num_classes: int = GENERAL_CLASSES
    radix: int = 2
    groups: int = 1
    bottleneck_width: int = 64
    stem_width: int = 64
    base_planes: int = 64
    avg_down: bool = True
    avd: bool = True
    avd_first: bool = False


class RSoftMax(nn.Module):
    """Softmax across the radix splits (sigmoid when radix is 1)."""

    def __init__(self, radix: int, cardinality: int) -> None:
        super().__init__()
        self.radix = radix
        self.cardinality = cardinality

    def forward(self, x: Tensor) -> Tensor:
        batch = x.size(0)
        if self.radix > 1:
            x = x.view(batch, self.cardinality, self.radix, -1).transpose(1, 2)
            return F.softmax(x, dim=1).reshape(batch, -1)
        return torch.sigmoid(x)


class SplAtConv2d(nn.Module):
    """Split-attention conv: ``radix`` grouped conv paths, weighted by attention over the radix splits."""

    def __init__(
        self, in_channels: int, channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
        groups: int = 1, radix: int = 2, reduction_factor: int = 4,
    ) -> None:
        super().__init__()
        inter_channels = max(in_channels * radix // reduction_factor, 32)
        self.radix = radix
        self.cardinality = groups
        self.channels = channels
        self.conv = nn.Conv2d(
            in_channels, channels * radix, kernel_size, stride, padding, groups=groups * radix, bias=False
        )
        self.bn0 = nn.BatchNorm2d(channels * radix)
        self.relu = nn.ReLU(inplace=True)
        self.fc1 = nn.Conv2d(channels, inter_channels, 1, groups=groups)
        self.bn1 = nn.BatchNorm2d(inter_channels)
        self.fc2 = nn.Conv2d(inter_channels, channels * radix, 1, groups=groups)
        self.rsoftmax = RSoftMax(radix, groups)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn0(self.conv(x)))
        batch = x.shape[0]
        if self.radix > 1:
            splits = torch.split(x, self.channels, dim=1)  # a static size: traces and exports cleanly
            gap = splits[0]
            for part in splits[1:]:
                gap = gap + part
        else:
            gap = x
        gap = F.adaptive_avg_pool2d(gap, 1)
        gap = self.relu(self.bn1(self.fc1(gap)))
        # Under CUDA autocast the softmax runs in fp32: bring the weights back to the features' dtype, or
        # ``att * part`` would turn every block's output (and all later layers' inputs) into fp32.
        atten = self.rsoftmax(self.fc2(gap)).view(batch, -1, 1, 1).to(x.dtype)
        if self.radix > 1:
            attens = torch.split(atten, self.channels, dim=1)
            out = attens[0] * splits[0]
            for att, part in zip(attens[1:], splits[1:], strict=True):
                out = out + att * part
        else:
            out = atten * x
        return out  # the input's memory format (channels-last stays channels-last)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(
        self, inplanes: int, planes: int, config: ResNeStConfig, stride: int = 1,
        downsample: nn.Module | None = None, is_first: bool = False,
    ) -> None:
        super().__init__()
        group_width = int(planes * (config.bottleneck_width / 64.0)) * config.groups
        self.conv1 = nn.Conv2d(inplanes, group_width, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(group_width)
        self.avd = config.avd and (stride > 1 or is_first)
        self.avd_first = config.avd_first
        if self.avd:
            self.avd_layer = nn.AvgPool2d(3, stride, padding=1)
            stride = 1
        self.conv2 = SplAtConv2d(
            group_width, group_width, kernel_size=3, stride=stride, padding=1, groups=config.groups,
            radix=config.radix,
        )
        self.conv3 = nn.Conv2d(group_width, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        if self.avd and self.avd_first:
            out = self.avd_layer(out)
        out = self.conv2(out)
        if self.avd and not self.avd_first:
            out = self.avd_layer(out)
        out = self.bn3(self.conv3(out))
        residual = x if self.downsample is None else self.downsample(x)
        result: Tensor = self.relu(out + residual)
        return result


class ResNeSt(nn.Module):
    """ResNet with split-attention bottlenecks, deep stem and average-pool downsampling."""

    def __init__(self, config: ResNeStConfig) -> None:
        super().__init__()
        self.config = config
        stem = config.stem_width
        self.inplanes = stem * 2
        self.conv1 = nn.Sequential(
            nn.Conv2d(3, stem, kernel_size=3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(stem),
            nn.ReLU(inplace=True),
            nn.Conv2d(stem, stem, kernel_size=3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(stem),
            nn.ReLU(inplace=True),
            nn.Conv2d(stem, stem * 2, kernel_size=3, stride=1, padding=1, bias=False),
        )
        self.bn1 = nn.BatchNorm2d(stem * 2)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        base = config.base_planes
        self.layer1 = self._make_layer(base, config.layers[0], stride=1)
        self.layer2 = self._make_layer(base * 2, config.layers[1], stride=2)
        self.layer3 = self._make_layer(base * 4, config.layers[2], stride=2)
        self.layer4 = self._make_layer(base * 8, config.layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(base * 8 * Bottleneck.expansion, config.num_classes)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        out_planes = planes * Bottleneck.expansion
        downsample = None
        if stride != 1 or self.inplanes != out_planes:
            down: list[nn.Module] = []
            if self.config.avg_down:
                down.append(nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False))
                down.append(nn.Conv2d(self.inplanes, out_planes, kernel_size=1, stride=1, bias=False))
            else:
                down.append(nn.Conv2d(self.inplanes, out_planes, kernel_size=1, stride=stride, bias=False))
            down.append(nn.BatchNorm2d(out_planes))
            downsample = nn.Sequential(*down)
        # layer1 is built with is_first=False (as ModelScope does): avd pooling only where stride > 1.
        layers = [Bottleneck(self.inplanes, planes, self.config, stride, downsample, is_first=False)]
        self.inplanes = out_planes
        layers += [Bottleneck(self.inplanes, planes, self.config) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        # The head runs in its own dtype: fp32 even when the body is fp16/bf16 (see :meth:`cast_body`).
        x = self.avgpool(x.to(self.fc.weight.dtype))
        logits: Tensor = self.fc(torch.flatten(x, 1))
        return logits

    def cast_body(self, dtype: torch.dtype) -> None:
        """Cast every layer but the classifier head to ``dtype``, once (instead of autocast re-casting the
        weights every batch). The head and the pooling before it stay fp32: bf16 logits would come in steps
        of 1/16-1/8, enough to flip close scores and ``--threshold`` decisions."""
        self.to(dtype)
        self.fc.float()

    @property
    def input_dtype(self) -> torch.dtype:
        """The dtype the first layer's weights have: what a batch must be cast to."""
        first: nn.Conv2d = self.conv1[0]  # type: ignore[assignment]
        return first.weight.dtype


def resnest101(num_classes: int = GENERAL_CLASSES) -> ResNeSt:
    """The seed model's network (random weights; load the checkpoint with :mod:`wanwu.seed.checkpoint`)."""
    return ResNeSt(ResNeStConfig(num_classes=num_classes))


def tiny_config(num_classes: int = 10) -> ResNeStConfig:
    """A small network of the same family and key scheme (for tests): one block per stage, narrow."""
    return ResNeStConfig(layers=(1, 1, 1, 1), num_classes=num_classes, stem_width=8, base_planes=8)
