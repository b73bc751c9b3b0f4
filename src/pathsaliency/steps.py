"""Affine steps ``y = W x + b``: the parameterised operators of a ReLU-DAG, one class per kind.

A step reads one activation and holds the names of the tensors its ``(W, b)`` is made of: a conv,
transposed conv or linear module (optionally with the frozen batch-norm folded into it, MATH.md
section 1) or a standalone batch-norm (the diagonal step ``(s, t)``). Each class says how ``W`` acts
(``linear``), how its bias broadcasts (``bias_view``), which dimension holds its channels
(``channel_dim`` of the activations, ``weight_dims`` of the weight), and how a per-channel factor multiplies its output channels (``scale_outputs``) or
its input channels (``scale_inputs``). :class:`Weights` is one step's non-negative ``(|W|**q, |b|**q)``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Weights:
    """The non-negative weights of one affine step for one pass."""

    w: torch.Tensor
    b: torch.Tensor | None

    @classmethod
    def absolute(cls, w: torch.Tensor, b: torch.Tensor | None, q=1) -> "Weights":
        """``(|W|**q, |b|**q)`` of a signed pair."""
        if q == 1:
            return cls(w.abs(), None if b is None else b.abs())
        return cls(w.abs() ** q, None if b is None else b.abs() ** q)


@dataclass
class Step:
    """One affine step of the graph (the node whose value is its output and the activation it reads)."""

    node: fx.Node
    input: fx.Node
    module: str | None  # qualified name of the conv/linear (None for a standalone batch-norm)
    bn: str | None  # qualified name of the batch-norm (folded or standalone)
    conv: nn.Module | None = None  # the conv/linear module (for its hyper-parameters)
    eps: float = 0.0

    channel_dim = 1  # the dimension of the output (and input) tensor that holds the channels
    weight_dims = (0, 1)  # (output-channel dim, input-channel dim or None) of the weight tensor

    @property
    def name(self) -> str:
        return self.module if self.module is not None else self.bn

    def folded(self, node: fx.Node, bn: str, eps: float) -> "Step":
        """This conv/linear with the batch-norm ``bn`` (whose output is ``node``) folded into it."""
        return dataclasses.replace(self, node=node, bn=bn, eps=eps)

    def linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``W x`` without bias."""
        raise NotImplementedError

    def bias_view(self, b: torch.Tensor, ndim: int) -> torch.Tensor:
        """The per-channel bias ``b`` shaped to broadcast over an output of ``ndim`` dimensions."""
        return b.view((1, -1) + (1,) * (ndim - 2))

    def scale_outputs(self, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """``w`` with every output channel ``o`` multiplied by ``s[o]`` (weight layout ``(out, ...)``)."""
        return w * s.view((-1,) + (1,) * (w.dim() - 1))

    def scale_inputs(self, w: torch.Tensor, s: torch.Tensor, flat: bool = False) -> None:
        """Multiply in place every weight reading input channel ``c`` by ``s[c]``."""
        raise NotImplementedError


class ConvStep(Step):
    """``nn.Conv1d/2d/3d``: weight ``(out, in / groups, *k)``."""

    def linear(self, x, weight):
        return self.conv._conv_forward(x, weight, None)

    def scale_inputs(self, w, s, flat=False):
        # input channel c = group * (in / groups) + local
        g = self.conv.groups
        out, per = w.shape[0], w.shape[1]
        w.view(g, out // g, per, *w.shape[2:]).mul_(s.view(g, 1, per, *([1] * (w.dim() - 2))))


class ConvTransposeStep(Step):
    """``nn.ConvTranspose1d/2d/3d``: weight ``(in, out / groups, *k)``."""

    weight_dims = (1, 0)

    _FUNCTIONS = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}

    def linear(self, x, weight):
        m = self.conv
        fn = self._FUNCTIONS[x.dim() - 2]
        return fn(x, weight, None, m.stride, m.padding, m.output_padding, m.groups, m.dilation)

    def scale_outputs(self, w, s):
        g, shape = self.conv.groups, w.shape
        w = w.view(g, shape[0] // g, shape[1], *shape[2:]) * s.view(g, 1, shape[1], *([1] * (w.dim() - 2)))
        return w.view(shape)

    def scale_inputs(self, w, s, flat=False):
        w.mul_(s.view((-1,) + (1,) * (w.dim() - 1)))


class LinearStep(Step):
    """``nn.Linear``: weight ``(out, in)``, features on the last dimension."""

    channel_dim = -1

    def linear(self, x, weight):
        return F.linear(x, weight)

    def bias_view(self, b, ndim):
        return b

    def scale_inputs(self, w, s, flat=False):
        """With ``flat``, the input is a flattened ``(C, *spatial)`` tensor: ``s`` has one factor per ``C``."""
        k = w.shape[1] // len(s) if flat else 1
        if k * len(s) != w.shape[1]:
            raise ValueError(f"cannot map {len(s)} channels onto the {w.shape[1]} inputs of '{self.module}'")
        w.mul_(s.repeat_interleave(k).view(1, -1))


class BatchNormStep(Step):
    """A standalone frozen batch-norm: the diagonal step ``x * s + t`` (its ``W`` is the vector ``s``)."""

    weight_dims = (0, None)

    def linear(self, x, weight):
        return x * weight.view((1, -1) + (1,) * (x.dim() - 2))


CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_TRANSPOSE_MODULES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
LINEAR_MODULES = (nn.Linear,)
WEIGHT_MODULES = CONV_MODULES + CONV_TRANSPOSE_MODULES + LINEAR_MODULES
BATCHNORM_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
try:  # torchvision's frozen batch-norm (detection backbones); torchvision is a dependency
    from torchvision.ops.misc import FrozenBatchNorm2d

    BATCHNORM_MODULES += (FrozenBatchNorm2d,)
except ImportError:  # pragma: no cover
    FrozenBatchNorm2d = None
AFFINE_MODULES = WEIGHT_MODULES + BATCHNORM_MODULES


def step_class(mod: nn.Module) -> type | None:
    """The :class:`Step` subclass of the affine module ``mod``, None if ``mod`` is not one of ``AFFINE_MODULES``."""
    for types, cls in ((CONV_MODULES, ConvStep), (CONV_TRANSPOSE_MODULES, ConvTransposeStep),
                       (LINEAR_MODULES, LinearStep), (BATCHNORM_MODULES, BatchNormStep)):
        if isinstance(mod, types):
            return cls
    return None


def step_for(node: fx.Node, mod: nn.Module) -> Step:
    """The step of a call of the affine module ``mod`` (one of ``AFFINE_MODULES``) at ``node``."""
    cls = step_class(mod)
    if cls is BatchNormStep:
        return BatchNormStep(node, node.args[0], None, node.target, None, eps=float(mod.eps))
    return cls(node, node.args[0], node.target, None, mod)
