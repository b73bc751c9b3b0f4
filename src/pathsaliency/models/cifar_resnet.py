"""CIFAR-10 ResNets of He et al. (2016), "Deep Residual Learning for Image Recognition", section 4.2.

Architecture (ResNet-(6n+2), n = 3, 5, 7, 9 for ResNet-20, 32, 44, 56):

- ``conv1`` 3x3, 16 channels, no bias, ``bn1``, ReLU;
- three stages ``layer1..layer3`` of ``n`` BasicBlocks with 16, 32, 64 channels; the first block of
  stages 2 and 3 has stride 2. A block is ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``
  with 3x3 convolutions without bias;
- the shortcut is the identity, except where the shape changes: there it is "option A", a
  parameter-free shortcut ``F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, planes // 4, planes // 4))``
  (every second pixel, channels zero-padded on both sides), see :class:`ShortcutA`;
- global average pooling over the 8x8 map, then ``linear`` (64 -> 10, with bias).

Inputs are RGB in [0, 1] normalised with mean ``CIFAR_MEAN = (0.485, 0.456, 0.406)`` and std
``CIFAR_STD = (0.229, 0.224, 0.225)`` (the convention the pretrained checkpoints were trained with).

Parameter names match the pretrained checkpoints (Yerlan Idelbayev's ``pytorch_resnet_cifar10``)
once their ``module.`` prefix is stripped. :class:`ShortcutConv` is the same option-A function
written as a frozen 0/1 strided 1x1 convolution, for tools (torch-pruning) whose dependency graph
does not follow channel padding; :func:`to_conv_shortcut` converts a model to that form.
"""

from __future__ import annotations

import copy
import os
from importlib import resources
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint import load_checkpoint, load_state_dict

__all__ = [
    "CIFAR_MEAN",
    "CIFAR_STD",
    "BasicBlock",
    "CifarResNet",
    "ShortcutA",
    "ShortcutConv",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "load_cifar_resnet",
    "to_conv_shortcut",
]

CIFAR_MEAN = (0.485, 0.456, 0.406)
CIFAR_STD = (0.229, 0.224, 0.225)

_DEPTHS = {"resnet20": 3, "resnet32": 5, "resnet44": 7, "resnet56": 9}


class ShortcutA(nn.Module):
    """Option-A shortcut: every second pixel, channels zero-padded by ``pad`` on each side."""

    def __init__(self, pad: int):
        super().__init__()
        self.pad = int(pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))

    def extra_repr(self) -> str:
        return f"pad={self.pad}"


class ShortcutConv(nn.Module):
    """Option A as a frozen 1x1 stride-2 convolution: ``weight[o, i] = 1`` iff ``o == i + pad``.

    Same function as :class:`ShortcutA` (exactly: each output is one input or 0), but visible to
    tools that track channels through convolutions. The weight has ``requires_grad=False``.
    """

    def __init__(self, in_planes: int, pad: int):
        super().__init__()
        self.pad = int(pad)
        out_planes = in_planes + 2 * self.pad
        self.conv = nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=2, bias=False)
        w = torch.zeros(out_planes, in_planes, 1, 1)
        idx = torch.arange(in_planes)
        w[idx + self.pad, idx, 0, 0] = 1.0
        self.conv.weight.data.copy_(w)
        self.conv.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: str = "A"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.relu2 = nn.ReLU()
        if stride != 1 or in_planes != planes:
            # Option A, as in the paper: only used for 16->32 and 32->64 with stride 2.
            if stride != 2 or planes != 2 * in_planes:
                raise ValueError("option-A shortcut needs stride 2 and doubled channels")
            pad = planes // 4
            if shortcut == "A":
                self.shortcut: nn.Module = ShortcutA(pad)
            elif shortcut == "conv":
                self.shortcut = ShortcutConv(in_planes, pad)
            else:
                raise ValueError(f"shortcut must be 'A' or 'conv', got {shortcut!r}")
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, num_blocks=(3, 3, 3), num_classes: int = 10, shortcut: str = "A"):
        super().__init__()
        self.in_planes = 16
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.layer1 = self._make_layer(16, num_blocks[0], 1, shortcut)
        self.layer2 = self._make_layer(32, num_blocks[1], 2, shortcut)
        self.layer3 = self._make_layer(64, num_blocks[2], 2, shortcut)
        self.linear = nn.Linear(64, num_classes)
        self._init_weights()

    def _make_layer(self, planes: int, n: int, stride: int, shortcut: str) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(BasicBlock(self.in_planes, planes, s, shortcut))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        frozen = {id(m.conv) for m in self.modules() if isinstance(m, ShortcutConv)}
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)) and id(m) not in frozen:
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1)
        out = torch.flatten(out, 1)
        return self.linear(out)


def _resnet(name: str, num_classes: int = 10, shortcut: str = "A") -> CifarResNet:
    n = _DEPTHS[name]
    return CifarResNet((n, n, n), num_classes=num_classes, shortcut=shortcut)


def resnet20(num_classes: int = 10, shortcut: str = "A") -> CifarResNet:
    """ResNet-20 (0.27 M parameters), random init. ``shortcut``: ``"A"`` (padding) or ``"conv"``."""
    return _resnet("resnet20", num_classes, shortcut)


def resnet32(num_classes: int = 10, shortcut: str = "A") -> CifarResNet:
    """ResNet-32 (0.46 M parameters), random init."""
    return _resnet("resnet32", num_classes, shortcut)


def resnet44(num_classes: int = 10, shortcut: str = "A") -> CifarResNet:
    """ResNet-44 (0.66 M parameters), random init."""
    return _resnet("resnet44", num_classes, shortcut)


def resnet56(num_classes: int = 10, shortcut: str = "A") -> CifarResNet:
    """ResNet-56 (0.85 M parameters), random init."""
    return _resnet("resnet56", num_classes, shortcut)


def to_conv_shortcut(model: nn.Module) -> nn.Module:
    """Return a deep copy of ``model`` with every :class:`ShortcutA` replaced by :class:`ShortcutConv`.

    The copy computes the same function. When pruning it with torch-pruning, keep the frozen
    shortcut convolutions out of the pruned set (e.g. ``ignored_layers``) if the 0/1 structure
    must be preserved.
    """
    model = copy.deepcopy(model)
    for block in model.modules():
        if isinstance(block, BasicBlock) and isinstance(block.shortcut, ShortcutA):
            in_planes = block.conv1.in_channels
            ref = block.conv1.weight
            block.shortcut = ShortcutConv(in_planes, block.shortcut.pad).to(ref.device, ref.dtype)
    return model


def _find_checkpoint(name: str):
    """Path (or importlib.resources Traversable) of the default checkpoint for ``name``."""
    looked = []
    if name == "resnet20":
        packaged = resources.files("pathsaliency") / "assets" / "cifar10-resnet20.th"
        if packaged.is_file():
            return packaged
        looked.append(str(packaged))
    shared = Path(os.environ.get("PATHSALIENCY_SHARED", "../shared"))
    path = shared / "models" / f"cifar10-{name}.th"
    if path.is_file():
        return path
    looked.append(str(path.resolve()))
    raise FileNotFoundError(
        f"no pretrained weights for {name}: looked in {', '.join(looked)} "
        "(set PATHSALIENCY_SHARED to the shared folder, or pass checkpoint=<path to a .th file>)"
    )


def load_cifar_resnet(
    name: str,
    checkpoint: Optional[Union[str, os.PathLike]] = None,
    shortcut: str = "A",
) -> CifarResNet:
    """Build ``name`` (``"resnet20"`` ... ``"resnet56"``) and load pretrained CIFAR-10 weights (strict).

    1. ``checkpoint`` given: load it with :func:`pathsaliency.checkpoint.load_checkpoint`, weights only
       (a bare state dict or one under ``state_dict``; a ``module.`` prefix is stripped).
    2. Otherwise, for ResNet-20, the copy shipped in ``pathsaliency/assets``.
    3. Otherwise ``$PATHSALIENCY_SHARED/models/cifar10-<name>.th`` (default ``../shared``).

    ``shortcut="conv"`` returns the :func:`to_conv_shortcut` form. The model is in eval mode.
    """
    if name not in _DEPTHS:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(_DEPTHS)}")
    if shortcut not in ("A", "conv"):
        raise ValueError(f"shortcut must be 'A' or 'conv', got {shortcut!r}")
    source = _find_checkpoint(name) if checkpoint is None else checkpoint
    model = load_state_dict(_resnet(name), load_checkpoint(source), source, f"CIFAR {name}")
    if shortcut == "conv":
        model = to_conv_shortcut(model)
    return model.eval()
