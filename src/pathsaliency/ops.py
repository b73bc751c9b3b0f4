"""The supported operators: one table that says how each acts in the path-lifting pass.

In the path-norm pass (MATH.md section 2) every operator of a ReLU-DAG becomes a linear map with
non-negative weights applied to non-negative tensors:

* ``Identity``  -- ReLU (every spelling), dropout, ``nn.Identity``: the activation is the identity.
* ``Same``      -- fixed non-negative edges (pooling by averages, concatenation, slicing, padding with
  zeros, reshapes, upsampling, ...): the operator itself, applied unchanged, *is* the pass.
* ``Sum``       -- ``a + b`` of two activations: edges of weight 1 (``alpha`` weights the second input).
* ``Scale``     -- multiplication or division by a positive Python number ``c``: edges of weight ``c``.
* ``Bias``      -- adding a constant: a fixed (non-parameter) bias ``|c|`` on every neuron.
* ``WindowSum`` -- k-max-pooling: every input of a window starts paths through it, so the max becomes a
  *sum* over the window (ceil_mode, padding and dilation respected).

Parameterised operators (convolutions, linear layers, frozen batch-norm) are not in this table: their
weights change from pass to pass, so :mod:`pathsaliency.graph` turns them into ``Affine`` steps.

Anything not listed is refused with the reason in ``REFUSED`` or a generic "not supported" message:
dispatch is on the actual callable or module type, never on names.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------
# Actions: what one value node does in a pass. Each receives the node's resolved args with every
# activation replaced by a raw non-negative tensor (all at a common scale).
# ----------------------------------------------------------------------------------------------------


@dataclass
class Identity:
    """The activation passes unchanged (ReLU, dropout, identity)."""

    combines: bool = False

    def __call__(self, args, kwargs, q):
        return args[0]


@dataclass
class Same:
    """A fixed non-negative linear operator whose weights are all 1 (or whose ``q``-power is handled
    by ``weight_q``); the pass applies the operator itself."""

    fn: Callable
    combines: bool = False  # True when several activations enter (cat, stack): align their scales
    grows: bool = False  # True when outputs can exceed inputs (sums): the pass then rescales
    weight_q: Callable | None = None  # (output, args, kwargs, q) -> output with weights raised to q
    all_ones: bool = True  # every edge weight is 1, so q does not matter

    def __call__(self, args, kwargs, q):
        fn = self.fn.forward if isinstance(self.fn, nn.Module) else self.fn  # never the user's hooks
        out = fn(*args, **kwargs)
        if q != 1 and not self.all_ones:
            if self.weight_q is None:
                raise NotImplementedError(f"q != 1 is not supported through {_name(self.fn)}: its fixed weights are not all 1")
            out = self.weight_q(out, args, kwargs, q)
        return out


@dataclass
class Sum:
    """``a + alpha * b`` of two activations."""

    alpha: float = 1.0
    combines: bool = True

    def __call__(self, args, kwargs, q):
        a, b = args[0], args[1]
        return a + b if self.alpha == 1 else a + (self.alpha ** q) * b


@dataclass
class Scale:
    """Multiplication by a positive constant ``c`` (division by ``1 / c``)."""

    c: float
    combines: bool = False

    def __call__(self, args, kwargs, q):
        return args[0] * (self.c ** q)


@dataclass
class Bias:
    """``x + c`` with a constant ``c``: a bias that is not a parameter (it is the same in every theta).

    ``const_index`` is the position of ``c`` among the node's arguments."""

    const_index: int
    combines: bool = False

    def bias(self, args, like, q):
        c = args[self.const_index]
        if torch.is_tensor(c):
            return c.detach().to(like.dtype).abs() ** q
        return torch.full((), abs(float(c)) ** q, dtype=like.dtype, device=like.device)

    def __call__(self, args, kwargs, q):
        return args[0]


@dataclass
class WindowSum:
    """k-max-pooling in the pass: the sum of every window's inputs (MATH.md section 2).

    Padding of a max-pool is not an input (it is -inf), so it contributes nothing: summing over zero
    padding is exact. ``ceil_mode`` windows that run past the input keep only their real inputs.
    """

    kernel: tuple
    stride: tuple
    padding: tuple
    dilation: tuple
    ceil_mode: bool
    combines: bool = False

    def __call__(self, args, kwargs, q):
        return window_sum(args[0], self.kernel, self.stride, self.padding, self.dilation, self.ceil_mode)


@dataclass
class AdaptiveWindowSum:
    """Adaptive max-pooling in the pass: the sum over each adaptive window."""

    output_size: Any
    combines: bool = False

    def __call__(self, args, kwargs, q):
        x = args[0]
        nd = x.dim() - 2
        size = _tuple(self.output_size, nd)
        size = tuple(x.shape[2 + i] if s is None else s for i, s in enumerate(size))
        avg = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}[nd](x, size)
        return avg * adaptive_window_counts(x.shape[2:], size, x)


def window_sum(x, kernel, stride, padding, dilation, ceil_mode):
    nd = x.dim() - 2
    k, s, p, d = (_tuple(v, nd) for v in (kernel, stride, padding, dilation))
    if nd in (2, 3) and all(v == 1 for v in d):
        pool = F.avg_pool2d if nd == 2 else F.avg_pool3d
        return pool(x, k, s, p, ceil_mode=ceil_mode, count_include_pad=True, divisor_override=1)
    # General case (1d, dilation): a depthwise convolution with a kernel of ones. For ceil_mode the
    # last window may run past the right padding: pad with zeros up to where it ends.
    pads = []
    for i in reversed(range(nd)):
        n, span = x.shape[2 + i], d[i] * (k[i] - 1) + 1
        out = (n + 2 * p[i] - span + (s[i] - 1 if ceil_mode else 0)) // s[i] + 1
        if ceil_mode and (out - 1) * s[i] >= n + p[i]:
            out -= 1
        extra = max(0, (out - 1) * s[i] + span - (n + 2 * p[i]))
        pads += [p[i], p[i] + extra]
    x = F.pad(x, pads)
    c = x.shape[1]
    ones = torch.ones((c, 1) + k, dtype=x.dtype, device=x.device)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
    return conv(x, ones, None, s, 0, d, c)


def adaptive_window_counts(in_size, out_size, like):
    """Number of inputs in each window of adaptive pooling, as a broadcastable tensor."""
    counts = None
    for dim, (n, m) in enumerate(zip(in_size, out_size)):
        i = torch.arange(m, dtype=torch.float64, device=like.device)  # no copy to the device per pass
        start = torch.floor(i * n / m)
        end = torch.ceil((i + 1) * n / m)
        c = (end - start).to(like.dtype)
        shape = [1] * len(in_size)
        shape[dim] = m
        c = c.view(shape)
        counts = c if counts is None else counts * c
    return counts


def _avg_weight_q(out, args, kwargs, q):
    """Average pooling: all weights into one output equal ``1/div``: raise them to ``q``."""
    return out * _avg_inverse_divisor(args, kwargs, out) ** (q - 1)


def _avg_inverse_divisor(args, kwargs, out):
    # The weight of one window is avg(ones)/sum(ones over the real inputs of the window).
    x = args[0]
    ones = torch.ones_like(x[:1])
    fn = {3: F.avg_pool1d, 4: F.avg_pool2d, 5: F.avg_pool3d}[x.dim()]
    avg = fn(ones, *args[1:], **kwargs)
    kw = {k: v for k, v in kwargs.items() if k != "divisor_override"}
    real = window_sum(ones, *_pool_params(x.dim() - 2, args[1:], kw))
    return (avg / real).clamp_min(0)


def _pool_params(nd, args, kw):
    names = ["kernel_size", "stride", "padding", "ceil_mode"]
    vals = dict(zip(names, args))
    vals.update({k: v for k, v in kw.items() if k in names})
    k = vals["kernel_size"]
    s = vals.get("stride") or k
    return k, s, vals.get("padding", 0), 1, vals.get("ceil_mode", False)


def _adaptive_avg_weight_q(out, args, kwargs, q):
    x = args[0]
    return out * adaptive_window_counts(x.shape[2:], out.shape[2:], out) ** (1 - q)


def _mean_weight_q(out, args, kwargs, q):
    x = args[0]
    dims = args[1] if len(args) > 1 else kwargs.get("dim")
    dims = [dims] if isinstance(dims, int) else list(dims)
    n = math.prod(x.shape[d] for d in dims)
    return out * float(n) ** (1 - q)


def _tuple(v, n):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def _name(fn):
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)


# ----------------------------------------------------------------------------------------------------
# The table. Parameterised modules (conv, linear, batch-norm) are listed in AFFINE_MODULES.
# ----------------------------------------------------------------------------------------------------

CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_TRANSPOSE_MODULES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
LINEAR_MODULES = (nn.Linear,)
BATCHNORM_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
try:  # torchvision's frozen batch-norm (detection backbones); torchvision is a dependency
    from torchvision.ops.misc import FrozenBatchNorm2d

    BATCHNORM_MODULES += (FrozenBatchNorm2d,)
except ImportError:  # pragma: no cover
    FrozenBatchNorm2d = None
AFFINE_MODULES = CONV_MODULES + CONV_TRANSPOSE_MODULES + LINEAR_MODULES + BATCHNORM_MODULES

IDENTITY_MODULES = (nn.ReLU, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
SAME_MODULES = (nn.Flatten, nn.Unflatten, nn.ChannelShuffle, nn.PixelShuffle, nn.PixelUnshuffle,
                nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ReflectionPad1d, nn.ReflectionPad2d,
                nn.ReflectionPad3d, nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d,
                nn.CircularPad1d, nn.CircularPad2d, nn.CircularPad3d)
AVG_MODULES = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
ADAPTIVE_AVG_MODULES = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
MAXPOOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
ADAPTIVE_MAX_MODULES = (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
UPSAMPLE_MODES = ("nearest", "nearest-exact", "linear", "bilinear", "trilinear", "area")

RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_, F.relu_}
DROPOUT_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, torch.dropout}
ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
MUL_FUNCTIONS = {operator.mul, operator.imul, torch.mul}
DIV_FUNCTIONS = {operator.truediv, operator.itruediv, torch.div, torch.true_divide}
CAT_FUNCTIONS = {torch.cat, torch.concat, torch.concatenate, torch.stack}
RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze,
                     torch.unsqueeze, torch.movedim, torch.swapaxes, torch.narrow, torch.channel_shuffle,
                     F.pixel_shuffle, F.pixel_unshuffle, torch.chunk, torch.split, torch.tensor_split,
                     torch.unbind, torch.t}
MAXPOOL_FUNCTIONS = {F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3,
                     torch.max_pool1d: 1, torch.max_pool2d: 2, torch.max_pool3d: 3}
ADAPTIVE_MAX_FUNCTIONS = {F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d}
AVG_FUNCTIONS = {F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, torch.avg_pool1d}
ADAPTIVE_AVG_FUNCTIONS = {F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
                          torch.adaptive_avg_pool1d}
INTERPOLATE_FUNCTIONS = {F.interpolate, F.upsample}
REDUCE_FUNCTIONS = {torch.mean: "mean", torch.sum: "sum"}

RELU_METHODS = {"relu", "relu_"}
ADD_METHODS = {"add", "add_", "__add__", "__iadd__", "__radd__"}
MUL_METHODS = {"mul", "mul_", "__mul__", "__rmul__", "__imul__"}
DIV_METHODS = {"div", "div_", "__truediv__", "__itruediv__"}
RESHAPE_METHODS = {"view", "view_as", "reshape", "reshape_as", "flatten", "permute", "transpose",
                   "contiguous", "squeeze", "unsqueeze", "chunk", "split", "tensor_split", "unbind",
                   "narrow", "movedim", "swapaxes", "t", "clone", "detach", "float", "double", "type_as",
                   "to"}
REDUCE_METHODS = {"mean", "sum"}
SHAPE_METHODS = {"size", "dim", "numel", "ndimension"}
SHAPE_ATTRIBUTES = {"shape", "ndim", "dtype", "device", "is_cuda"}

# Operators that look innocent but are not ReLU-DAG edges, with the reason the error gives.
REFUSED_MODULES = {
    nn.ReLU6: "ReLU6 clips at 6: not positively homogeneous",
    nn.Hardtanh: "hardtanh clips: not positively homogeneous",
    nn.GELU: "GELU is not a ReLU",
    nn.SiLU: "SiLU (swish) is not a ReLU",
    nn.Sigmoid: "sigmoid is not a ReLU",
    nn.Tanh: "tanh is not a ReLU",
    nn.Hardswish: "hardswish is not a ReLU",
    nn.Hardsigmoid: "hardsigmoid is not a ReLU",
    nn.LeakyReLU: "leaky ReLU has a negative slope: not a ReLU",
    nn.PReLU: "PReLU has a learned negative slope: not a ReLU",
    nn.ELU: "ELU is not a ReLU",
    nn.Mish: "Mish is not a ReLU",
    nn.Softmax: "softmax is not a ReLU-DAG operator",
    nn.LayerNorm: "LayerNorm divides by an input-dependent norm",
    nn.GroupNorm: "GroupNorm divides by an input-dependent norm",
    nn.InstanceNorm1d: "instance norm divides by an input-dependent norm",
    nn.InstanceNorm2d: "instance norm divides by an input-dependent norm",
    nn.LocalResponseNorm: "local response norm divides by an input-dependent norm",
    nn.MultiheadAttention: "attention multiplies activations together",
    nn.Bilinear: "a bilinear layer multiplies activations together",
    nn.Embedding: "an embedding is a lookup, not a linear map of activations",
}
REFUSED_FUNCTIONS = {
    F.relu6: "ReLU6 clips at 6: not positively homogeneous",
    F.hardtanh: "hardtanh clips: not positively homogeneous",
    F.gelu: "GELU is not a ReLU",
    F.silu: "SiLU (swish) is not a ReLU",
    torch.sigmoid: "sigmoid is not a ReLU",
    F.sigmoid: "sigmoid is not a ReLU",
    torch.tanh: "tanh is not a ReLU",
    F.hardswish: "hardswish is not a ReLU",
    F.hardsigmoid: "hardsigmoid is not a ReLU",
    F.leaky_relu: "leaky ReLU has a negative slope: not a ReLU",
    F.softmax: "softmax is not a ReLU-DAG operator",
    torch.softmax: "softmax is not a ReLU-DAG operator",
    F.layer_norm: "LayerNorm divides by an input-dependent norm",
    F.group_norm: "GroupNorm divides by an input-dependent norm",
    F.batch_norm: "functional batch_norm: use an nn.BatchNorm module so that its statistics can be folded",
    F.scaled_dot_product_attention: "attention multiplies activations together",
    torch.matmul: "matmul of two activations multiplies activations together",
    torch.bmm: "bmm of two activations multiplies activations together",
    operator.matmul: "matmul of two activations multiplies activations together",
    operator.sub: "subtraction is an edge of weight -1: fixed edges must be non-negative",
    operator.isub: "subtraction is an edge of weight -1: fixed edges must be non-negative",
    torch.sub: "subtraction is an edge of weight -1: fixed edges must be non-negative",
    operator.neg: "negation is an edge of weight -1: fixed edges must be non-negative",
    torch.neg: "negation is an edge of weight -1: fixed edges must be non-negative",
    torch.exp: "exp is not a ReLU",
    torch.abs: "abs is not positively homogeneous with a single ReLU",
    torch.max: "an elementwise or global max is not a pooling window of the graph",
    torch.clamp: "clamp clips: not positively homogeneous",
    F.linear: "functional linear with a weight tensor: use nn.Linear so that its weight is a named parameter",
    F.conv2d: "functional conv: use nn.Conv2d so that its weight is a named parameter",
}
REFUSED_METHODS = {
    "sigmoid": "sigmoid is not a ReLU", "tanh": "tanh is not a ReLU", "softmax": "softmax is not a ReLU-DAG operator",
    "sub": "subtraction is an edge of weight -1", "__sub__": "subtraction is an edge of weight -1",
    "__rsub__": "subtraction is an edge of weight -1", "neg": "negation is an edge of weight -1",
    "matmul": "matmul multiplies activations together", "bmm": "bmm multiplies activations together",
    "exp": "exp is not a ReLU", "clamp": "clamp clips: not positively homogeneous",
    "clamp_": "clamp clips: not positively homogeneous", "expand": "expand is not supported",
}


def describe(node, root) -> str:
    """How a node is named in errors: its operator."""
    if node.op == "call_module":
        return f"{type(root.get_submodule(node.target)).__name__} module '{node.target}'"
    if node.op == "call_method":
        return f"tensor method .{node.target}()"
    if node.op == "call_function":
        mod = getattr(node.target, "__module__", "") or ""
        return f"function {mod + '.' if mod else ''}{_name(node.target)}"
    return node.op


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass
class Refusal:
    reason: str


def module_action(mod):
    """Action for a call_module node whose module is not parameterised; a Refusal otherwise."""
    if isinstance(mod, IDENTITY_MODULES):
        return Identity()
    if isinstance(mod, SAME_MODULES):
        return Same(mod)
    if isinstance(mod, (nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d)):
        if mod.value != 0:
            return Refusal(f"constant padding with value {mod.value}: only zero padding is an edge-free neuron")
        return Same(mod)
    if isinstance(mod, AVG_MODULES):
        return Same(mod, all_ones=False,
                    weight_q=lambda out, args, kw, q, m=mod: _avg_weight_q(out, (args[0],) + _avg_module_args(m), {}, q))
    if isinstance(mod, ADAPTIVE_AVG_MODULES):
        return Same(mod, all_ones=False, weight_q=_adaptive_avg_weight_q)
    if isinstance(mod, MAXPOOL_MODULES):
        if mod.return_indices:
            return Refusal("max-pooling with return_indices: the indices are not activations")
        nd = MAXPOOL_MODULES.index(type(mod)) + 1
        return WindowSum(_tuple(mod.kernel_size, nd), _tuple(mod.stride or mod.kernel_size, nd),
                         _tuple(mod.padding, nd), _tuple(mod.dilation, nd), mod.ceil_mode)
    if isinstance(mod, ADAPTIVE_MAX_MODULES):
        if mod.return_indices:
            return Refusal("adaptive max-pooling with return_indices")
        return AdaptiveWindowSum(mod.output_size)
    if isinstance(mod, nn.Upsample):
        if mod.mode not in UPSAMPLE_MODES:
            return Refusal(f"upsampling mode '{mod.mode}' has negative interpolation weights")
        return Same(mod, all_ones=mod.mode.startswith("nearest"))
    for cls, reason in REFUSED_MODULES.items():
        if isinstance(mod, cls):
            return Refusal(reason)
    if isinstance(mod, nn.modules.batchnorm._NormBase):
        return Refusal("normalisation layer that is not a frozen batch-norm")
    return Refusal(f"module type {type(mod).__module__}.{type(mod).__qualname__} is not in the supported set")


def _avg_module_args(m):
    return (m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad) + (
        (m.divisor_override,) if not isinstance(m, nn.AvgPool1d) else ())


def function_action(target, args, kwargs, is_value):
    """Action for a call_function (``target`` a callable) node on activations.

    ``is_value(a)`` tells whether an argument is an activation (depends on the input's values).
    """
    values = [a for a in args if is_value(a)]
    others = [a for a in args if not is_value(a)]
    if target in RELU_FUNCTIONS:
        return Identity()
    if target in DROPOUT_FUNCTIONS:
        return Identity()
    if target in ADD_FUNCTIONS:
        return _add_action(args, is_value, kwargs.get("alpha", 1))
    if target in MUL_FUNCTIONS:
        return _mul_action(values, others, divide=False)
    if target in DIV_FUNCTIONS:
        if not is_value(args[0]):
            return Refusal("division of a constant by an activation is not linear")
        if kwargs.get("rounding_mode") is not None:
            return Refusal("rounding division is not linear")
        return _mul_action(values, others, divide=True)
    if target in CAT_FUNCTIONS:
        return Same(target, combines=True)
    if target is operator.getitem:
        return _getitem_action(args)
    if target in RESHAPE_FUNCTIONS:
        return Same(target)
    if target in MAXPOOL_FUNCTIONS:
        return _maxpool_function_action(target, args, kwargs)
    if target in ADAPTIVE_MAX_FUNCTIONS:
        if kwargs.get("return_indices") or (len(args) > 2 and args[2]):
            return Refusal("adaptive max-pooling with return_indices")
        return AdaptiveWindowSum(args[1] if len(args) > 1 else kwargs["output_size"])
    if target in AVG_FUNCTIONS:
        return Same(target, all_ones=False, weight_q=_avg_weight_q)
    if target in ADAPTIVE_AVG_FUNCTIONS:
        return Same(target, all_ones=False, weight_q=_adaptive_avg_weight_q)
    if target in INTERPOLATE_FUNCTIONS:
        mode = kwargs.get("mode", args[3] if len(args) > 3 else "nearest")
        if mode not in UPSAMPLE_MODES:
            return Refusal(f"interpolation mode '{mode}' has negative weights")
        return Same(target, all_ones=mode.startswith("nearest"))
    if target is F.pad:
        mode = kwargs.get("mode", args[2] if len(args) > 2 else "constant")
        value = kwargs.get("value", args[3] if len(args) > 3 else None)
        if mode == "constant" and value not in (None, 0, 0.0):
            return Refusal(f"constant padding with value {value}: only zero padding is supported")
        return Same(target)
    if target in REDUCE_FUNCTIONS:
        return _reduce_action(target, args, kwargs, is_sum=target is torch.sum)
    if target in REFUSED_FUNCTIONS:
        return Refusal(REFUSED_FUNCTIONS[target])
    return Refusal("operator is not in the supported set")


def method_action(name, args, kwargs, is_value):
    """Action for a call_method node (``args[0]`` is the tensor the method is called on)."""
    if name in RELU_METHODS:
        return Identity()
    values = [a for a in args if is_value(a)]
    others = [a for a in args[1:] if not is_value(a)]
    if name in ADD_METHODS:
        return _add_action(args, is_value, kwargs.get("alpha", 1))
    if name in MUL_METHODS:
        return _mul_action(values, others, divide=False)
    if name in DIV_METHODS:
        if kwargs.get("rounding_mode") is not None:
            return Refusal("rounding division is not linear")
        return _mul_action(values, others, divide=True)
    if name in RESHAPE_METHODS:
        if name in ("to", "float", "double", "type_as") and args[1:] and not all(
                isinstance(a, (torch.dtype, torch.device, str)) or is_value(a) for a in args[1:]):
            return Refusal("conversion with arguments that are not a dtype or device")
        fn = _method(name)
        return Same(fn)
    if name in REDUCE_METHODS:
        return _reduce_action(_method(name), args, kwargs, is_sum=name == "sum")
    if name in REFUSED_METHODS:
        return Refusal(REFUSED_METHODS[name])
    return Refusal("tensor method is not in the supported set")


def _method(name):
    if name in ("to", "float", "double", "type_as"):
        return lambda x, *a, **k: x  # the pass keeps its own dtype and device
    if name in ("clone", "detach"):  # an edge of weight 1 in the path-lifting, whatever autograd does
        return lambda x, *a, **k: x
    return lambda x, *a, **k: getattr(x, name)(*a, **k)


def _add_action(args, is_value, alpha):
    if not is_number(alpha) or alpha <= 0:
        return Refusal(f"add with alpha={alpha}: fixed edges must have positive weight")
    flags = [is_value(a) for a in args[:2]]
    if len(args) == 2 and all(flags):
        return Sum(float(alpha))
    if len(args) == 2 and flags == [True, False] and alpha == 1:
        return Bias(1)
    if len(args) == 2 and flags == [False, True] and alpha == 1:
        return Bias(0)
    return Refusal("add of this form is not supported")


def _mul_action(values, others, divide):
    if len(values) >= 2:
        return Refusal("multiplication of two activations: the network is not a ReLU-DAG")
    if len(others) != 1 or not is_number(others[0]):
        return Refusal("multiplication by something other than a Python number")
    c = float(others[0])
    if c <= 0:
        return Refusal(f"multiplication by {c}: fixed edges must have positive weight")
    return Scale(1.0 / c if divide else c)


def _getitem_action(args):
    index = args[1]
    items = index if isinstance(index, tuple) else (index,)
    for it in items:
        if isinstance(it, slice):
            if it.step is not None and (not is_number(it.step) or it.step <= 0):
                return Refusal(f"slicing with step {it.step}")
            if any(b is not None and not is_number(b) and not _is_node(b) for b in (it.start, it.stop)):
                return Refusal("slicing with non-integer bounds")
        elif not (it is None or it is Ellipsis or is_number(it) or _is_node(it)):
            return Refusal("advanced (tensor) indexing is not supported")
    return Same(operator.getitem)


def _maxpool_function_action(target, args, kwargs):
    nd = MAXPOOL_FUNCTIONS[target]
    names = ["kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"]
    vals = dict(zip(names, args[1:]))
    vals.update(kwargs)
    if vals.get("return_indices"):
        return Refusal("max-pooling with return_indices")
    k = vals["kernel_size"]
    s = vals.get("stride") or k
    return WindowSum(_tuple(k, nd), _tuple(s, nd), _tuple(vals.get("padding", 0), nd),
                     _tuple(vals.get("dilation", 1), nd), bool(vals.get("ceil_mode", False)))


def _reduce_action(fn, args, kwargs, is_sum):
    dims = args[1] if len(args) > 1 else kwargs.get("dim")
    if dims is None:
        return Refusal("reduction over every dimension mixes the samples of a batch: give dims")
    dims_list = [dims] if isinstance(dims, int) else list(dims)
    if any(d == 0 for d in dims_list):
        return Refusal("reduction over the batch dimension")
    if is_sum:
        return Same(fn, grows=True)
    return Same(fn, all_ones=False, weight_q=_mean_weight_q)


def _is_node(v):
    return isinstance(v, torch.fx.Node)
