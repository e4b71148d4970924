"""CIFAR-style CNNs with BatchNorm after every conv, each with a width multiplier so small versions run on CPU.

All models are plain `nn.Module`s traceable by torch.fx (the compactor and the slicer walk their graphs).
`build_model(arch, num_classes, in_channels, width)` is the one entry point; `torchvision:<name>` takes any
torchvision classifier (randomly initialised: weights are never downloaded). Every architecture, these included, is a
registration (`register_model`, see registry.py): an exact name, or a prefix with a check of what follows it.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn

from .errors import GradauthError
from .registry import arch_problem, register_model  # noqa: F401 (arch_problem lives in registry; re-exported)

VGG_CFGS = {
    "vgg_tiny": [16, 16, "M", 32, 32, "M", 64],  # the digits quickstart (8×8 inputs)
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512],
}


def _w(c: int, width: float) -> int:
    return max(1, int(round(c * width)))


class VGG(nn.Module):
    """Network-slimming VGG: conv-BN-ReLU stacks, max-pools, global average pool, one linear head."""

    def __init__(self, cfg: list, num_classes: int, in_channels: int = 3, width: float = 1.0):
        super().__init__()
        layers, c = [], in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c, _w(v, width), 3, padding=1, bias=False), nn.BatchNorm2d(_w(v, width)), nn.ReLU(inplace=True)]
                c = _w(v, width)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:  # projection shortcut ("option B")
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(out)) + self.shortcut(x))


# The ImageNet-style layouts at CIFAR resolution (3×3 stem, no max-pool), as NNSlicer and pytorch-cifar use them.
WIDE_RESNETS = {10: (1, 1, 1, 1), 18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}


class ResNet(nn.Module):
    """CIFAR ResNet. Depth 6n+2 (20, 56, 110): He et al. 2016 §4.2, three stages of 16/32/64 channels.
    Depth 10/18/34: four stages of 64/128/256/512 channels (the layout NNSlicer benchmarks). All × width."""

    def __init__(self, depth: int, num_classes: int, in_channels: int = 3, width: float = 1.0):
        super().__init__()
        if depth in WIDE_RESNETS:
            stages, blocks_per = (64, 128, 256, 512), WIDE_RESNETS[depth]
        elif (depth - 2) % 6 == 0:
            stages, blocks_per = (16, 32, 64), ((depth - 2) // 6,) * 3
        else:
            raise GradauthError(f"CIFAR ResNet depth must be 6n+2 (20, 56, 110) or 10/18/34, got {depth}")
        c = _w(stages[0], width)
        self.conv1 = nn.Conv2d(in_channels, c, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        blocks = []
        for i, (s, n) in enumerate(zip(stages, blocks_per)):
            for j in range(n):
                blocks.append(BasicBlock(c, _w(s, width), 2 if (i > 0 and j == 0) else 1))
                c = _w(s, width)
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        x = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(cin, growth, 3, 1, 1, bias=False)

    def forward(self, x):
        return torch.cat([x, self.conv(self.relu(self.bn(x)))], 1)


class Transition(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)
        self.pool = nn.AvgPool2d(2)

    def forward(self, x):
        return self.pool(self.conv(self.relu(self.bn(x))))


class DenseNet(nn.Module):
    """DenseNet (Huang et al. 2017) without bottlenecks: DenseNet-40 is 3 blocks of 12 layers, growth k=12."""

    def __init__(self, depth: int, num_classes: int, in_channels: int = 3, width: float = 1.0, growth: int = 12):
        super().__init__()
        n = (depth - 4) // 3
        k = _w(growth, width)
        c = 2 * k
        self.conv1 = nn.Conv2d(in_channels, c, 3, 1, 1, bias=False)
        layers = []
        for b in range(3):
            for _ in range(n):
                layers.append(DenseLayer(c, k))
                c += k
            if b < 2:
                layers.append(Transition(c, c))
        self.blocks = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        x = self.relu(self.bn(self.blocks(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def _vgg(arch: str, num_classes: int, in_channels: int = 3, width: float = 1.0) -> nn.Module:
    return VGG(VGG_CFGS[arch], num_classes, in_channels, width)


for _name in VGG_CFGS:
    register_model(_name, _vgg, _builtin=True)


def _depth(arch: str, prefix: str) -> int | None:
    tail = arch[len(prefix):]
    return int(tail) if tail.isdigit() else None


def _depth_problem(arch: str, prefix: str, ok, why: str) -> str | None:
    """A `<prefix><depth>` arch's check: None if `ok(depth)`, else what is wrong."""
    depth = _depth(arch, prefix)
    return None if depth is not None and ok(depth) else f"{arch!r}: {why}"


def _resnet_depth_ok(depth: int) -> bool:
    return depth in WIDE_RESNETS or (depth >= 8 and (depth - 2) % 6 == 0)


def _densenet_depth_ok(depth: int) -> bool:
    return depth >= 7 and (depth - 4) % 3 == 0


@register_model("resnet", prefix=True, shown="resnet<depth>", _builtin=True, check=partial(
    _depth_problem, prefix="resnet", ok=_resnet_depth_ok, why="CIFAR ResNet depth must be 6n+2 (20, 56, 110) or 10/18/34"))
def _resnet(arch: str, num_classes: int, in_channels: int = 3, width: float = 1.0) -> nn.Module:
    return ResNet(int(arch[6:]), num_classes, in_channels, width)


@register_model("densenet", prefix=True, shown="densenet<depth>", _builtin=True, check=partial(
    _depth_problem, prefix="densenet", ok=_densenet_depth_ok, why="DenseNet depth must be 3n+4 with n ≥ 1 (e.g. 40)"))
def _densenet(arch: str, num_classes: int, in_channels: int = 3, width: float = 1.0) -> nn.Module:
    return DenseNet(int(arch[8:]), num_classes, in_channels, width)


def _torchvision_problem(arch: str) -> str | None:
    import torchvision
    name = arch.split(":", 1)[1]
    if name not in torchvision.models.list_models(torchvision.models):
        return f"torchvision has no classifier {name!r}: see torchvision.models.list_models()"
    return None


@register_model("torchvision:", prefix=True, check=_torchvision_problem, shown="torchvision:<name>", _builtin=True)
def _torchvision(arch: str, num_classes: int, in_channels: int = 3, width: float = 1.0) -> nn.Module:
    import torchvision
    if in_channels != 3:
        raise GradauthError(f"torchvision models take 3-channel images; {arch} cannot read {in_channels}-channel data")
    return torchvision.models.get_model(arch.split(":", 1)[1], weights=None, num_classes=num_classes)


def build_model(arch: str, num_classes: int, in_channels: int = 3, width: float = 1.0) -> nn.Module:
    from .registry import model
    problem = arch_problem(arch)
    if problem:
        raise GradauthError(problem)
    net = model(arch).build(arch, num_classes, in_channels, width)
    if not isinstance(net, nn.Module):
        raise GradauthError(f"model.arch {arch!r}: its builder returned {type(net).__name__}, not a torch nn.Module: "
                            f"fix the builder")
    return net


def bn_layers(model: nn.Module) -> dict[str, nn.BatchNorm2d]:
    """Every BatchNorm in the model by qualified name: the channels that importance ranks and the lock prunes."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d))}


def head_layer(model: nn.Module) -> nn.Module:
    """The last Linear layer (fine-tune scope `head`)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise GradauthError("the model has no Linear head, so fine-tune scope `head` cannot be used")
    return linears[-1]
