"""The supported operators: one registry that says how each acts in the path-lifting pass.

In the path-norm pass (MATH.md section 2) every operator of a ReLU-DAG becomes a linear map with
non-negative weights applied to non-negative tensors. Each fixed (non-parameterised) operator is an
:class:`Action` that carries its whole behaviour:

* ``apply(args, kwargs, q)`` -- the operator on raw non-negative tensors (edge weights raised to ``q``),
* ``bias(args, like, q)``    -- a fixed bias it adds (``x + c``), or None,
* ``combines``               -- several activations enter: the pass aligns their scales first,
* ``renorms``                -- its output can leave ``[0, 1)``: the pass rescales it,
* ``channels``               -- how it maps channels (:class:`ChannelMap`): ``KEEP`` (output channel
  ``c`` reads input channel ``c`` only, so it commutes with a positive per-channel factor), ``FLATTEN``
  (``(B, C, *s) -> (B, C * prod(s))``), ``CONCAT`` (the channels of its inputs one after the other) or
  None (anything else).

The actions:

* ``Identity``  -- ReLU (every spelling), dropout, ``nn.Identity``, stochastic depth in eval mode.
* ``Same``      -- fixed non-negative edges (pooling by averages, concatenation, slicing, padding with
  zeros, reshapes, upsampling, ...): the operator itself, applied unchanged, *is* the pass.
* ``Sum``       -- ``a + b`` of two activations: edges of weight 1 (``alpha`` weights the second input).
* ``Scale``     -- multiplication or division by a positive Python number ``c``: edges of weight ``c``.
* ``Bias``      -- adding a constant: a fixed (non-parameter) bias ``|c|`` on every neuron.
* ``WindowSum`` -- k-max-pooling: every input of a window starts paths through it, so the max becomes a
  *sum* over the window (ceil_mode, padding and dilation respected).

:func:`action_for` looks a graph node up in the registry (``MODULES`` by module type, along its MRO;
``FUNCTIONS`` by the callable; ``METHODS`` by tensor-method name), whose entries build the node's action
from its arguments or return a :class:`Refusal` with the reason (``REFUSED``: the operators refused by
design, one row per reason with every spelling). A miss is a refusal too: dispatch is on
the actual callable or module type, never on names. Parameterised operators (convolutions, linear
layers, frozen batch-norm) are not here: their weights change from pass to pass, so
:mod:`pathsaliency.steps` makes them affine steps.
"""
from __future__ import annotations

import builtins
import enum
import math
import operator
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.ops


class ChannelMap(enum.Enum):
    """How an operator maps the channels (dim 1) of its input to those of its output."""

    KEEP = "keep"
    FLATTEN = "flatten"
    CONCAT = "concat"


# ----------------------------------------------------------------------------------------------------
# Actions: what one value node does in a pass. ``apply`` receives the node's resolved args with every
# activation replaced by a raw non-negative tensor (all at a common scale when ``combines``).
# ----------------------------------------------------------------------------------------------------


class Action:
    """Base: a fixed operator of the pass (see the module docstring for the attributes)."""

    combines = False
    renorms = True
    channels: ChannelMap | None = None

    def apply(self, args, kwargs, q):
        raise NotImplementedError

    def bias(self, args, like, q):
        return None


class Identity(Action):
    """The activation passes unchanged (ReLU, dropout, identity, stochastic depth in eval mode)."""

    renorms = False
    channels = ChannelMap.KEEP

    def apply(self, args, kwargs, q):
        return args[0]

    def __repr__(self):
        return "Identity()"


@dataclass
class Same(Action):
    """A fixed non-negative linear operator whose weights are all 1 (or whose ``q``-power is handled
    by ``weight_q``); the pass applies the operator itself."""

    fn: Callable
    combines: bool = False  # True when several activations enter (cat, stack): align their scales
    grows: bool = False  # True when outputs can exceed inputs (sums): the pass then rescales
    weight_q: Callable | None = None  # (output, args, kwargs, q) -> output with weights raised to q
    all_ones: bool = True  # every edge weight is 1, so q does not matter
    channels: ChannelMap | None = None

    @property
    def renorms(self):  # a fixed map that cannot grow values (reshape, slice, pad, average): no rescale
        return self.combines or self.grows

    def apply(self, args, kwargs, q):
        fn = self.fn.forward if isinstance(self.fn, nn.Module) else self.fn  # never the user's hooks
        out = fn(*args, **kwargs)
        if q != 1 and not self.all_ones:
            if self.weight_q is None:
                raise NotImplementedError(f"q != 1 is not supported through {_name(self.fn)}: its fixed weights are not all 1")
            out = self.weight_q(out, args, kwargs, q)
        return out


@dataclass
class Sum(Action):
    """``a + alpha * b`` of two activations."""

    alpha: float = 1.0
    combines = True

    def apply(self, args, kwargs, q):
        a, b = args[0], args[1]
        return a + b if self.alpha == 1 else a + (self.alpha ** q) * b


@dataclass
class Scale(Action):
    """Multiplication by a positive constant ``c`` (division by ``1 / c``); the activation is the
    argument at ``value_index`` (``2 * x`` as well as ``x * 2``)."""

    c: float
    value_index: int = 0

    def apply(self, args, kwargs, q):
        return args[self.value_index] * (self.c ** q)


@dataclass
class Bias(Action):
    """``x + c`` with a constant ``c``: a bias that is not a parameter (it is the same in every theta).

    ``const_index`` is the position of ``c`` among the node's arguments."""

    const_index: int

    def apply(self, args, kwargs, q):
        return args[0]

    def bias(self, args, like, q):
        c = args[self.const_index]
        if torch.is_tensor(c):
            return c.detach().to(like.dtype).abs() ** q
        return torch.full((), abs(float(c)) ** q, dtype=like.dtype, device=like.device)


@dataclass
class WindowSum(Action):
    """k-max-pooling in the pass: the sum of every window's inputs (MATH.md section 2).

    Padding of a max-pool is not an input (it is -inf), so it contributes nothing: summing over zero
    padding is exact. ``ceil_mode`` windows that run past the input keep only their real inputs.
    """

    kernel: tuple
    stride: tuple
    padding: tuple
    dilation: tuple
    ceil_mode: bool
    channels = ChannelMap.KEEP

    def apply(self, args, kwargs, q):
        return window_sum(args[0], self.kernel, self.stride, self.padding, self.dilation, self.ceil_mode)


@dataclass
class AdaptiveWindowSum(Action):
    """Adaptive max-pooling in the pass: the sum over each adaptive window."""

    output_size: Any
    channels = ChannelMap.KEEP

    def apply(self, args, kwargs, q):
        x = args[0]
        nd = x.dim() - 2
        size = _tuple(self.output_size, nd)
        size = tuple(x.shape[2 + i] if s is None else s for i, s in enumerate(size))
        avg = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}[nd](x, size)
        return avg * adaptive_window_counts(x.shape[2:], size, x)


@dataclass
class Refusal:
    """The operator is not a ReLU-DAG edge; ``reason`` says why."""

    reason: str


# Pass helpers ------------------------------------------------------------------------------------------


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
# The registry: module type / callable / method name -> factory of the node's action (or Refusal).
# Module factories take the module; function and method factories take (args, kwargs, is_value), where
# ``is_value(a)`` tells whether an argument is an activation (depends on the input's values) and, for a
# method, ``args[0]`` is the tensor it is called on.
# ----------------------------------------------------------------------------------------------------

MODULES: dict = {}
FUNCTIONS: dict = {}
METHODS: dict = {}

SHAPE_METHODS = {"size", "dim", "numel", "ndimension"}
SHAPE_ATTRIBUTES = {"shape", "ndim", "dtype", "device", "is_cuda"}
UPSAMPLE_MODES = ("nearest", "nearest-exact", "linear", "bilinear", "trilinear", "area")


def _register(table, keys, factory):
    for k in keys:
        table[k] = factory


def _refuse(reason):
    return lambda *_: Refusal(reason)


def _identity(*_):
    return Identity()


def action_for(node, root, is_value):
    """The :class:`Action` of a value node that is not an affine step, or a :class:`Refusal`."""
    if node.op == "call_module":
        mod = root.get_submodule(node.target)
        factory = next((MODULES[c] for c in type(mod).__mro__ if c in MODULES), None)
        if factory is None:
            return Refusal(f"module type {type(mod).__module__}.{type(mod).__qualname__} is not in the supported set")
        return factory(mod)
    if node.op == "call_function":
        try:
            factory = FUNCTIONS.get(node.target)
        except TypeError:  # an unhashable callable
            factory = None
        if factory is None:
            return Refusal("operator is not in the supported set")
        return factory(node.args, node.kwargs, is_value)
    if node.op == "call_method":
        factory = METHODS.get(node.target)
        if factory is None:
            return Refusal("tensor method is not in the supported set")
        return factory(node.args, node.kwargs, is_value)
    return Refusal(f"graph node of kind {node.op}")


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


def _is_node(v):
    return isinstance(v, torch.fx.Node)


# ReLU, dropout, identity -----------------------------------------------------------------------------

_register(MODULES, (nn.ReLU, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout),
          _identity)
_register(FUNCTIONS, (F.relu, torch.relu, torch.relu_, F.relu_, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
                      F.alpha_dropout, torch.dropout), _identity)
_register(METHODS, ("relu", "relu_"), _identity)


def _stochastic_depth(args, kwargs, is_value):
    names = ["input", "p", "mode", "training"]
    vals = {**dict(zip(names, args)), **kwargs}
    if vals.get("training", True) and vals.get("p") != 0:
        return Refusal("stochastic depth with training=True drops random branches: call it with "
                       "training=self.training (the model is captured in eval mode, where it is the identity)")
    return Identity()


_register(FUNCTIONS, (torchvision.ops.stochastic_depth,), _stochastic_depth)

# Fixed maps with edges of weight 1: reshapes, padding, shuffles, concatenation, selection ------------------


def _same(fn, **kw):
    return lambda *_: Same(fn, **kw)


def _same_module(mod):
    return Same(mod)


def _flatten_channels(start_dim, end_dim):
    return ChannelMap.FLATTEN if start_dim == 1 and end_dim == -1 else None


_register(MODULES, (nn.Unflatten, nn.ChannelShuffle, nn.PixelShuffle, nn.PixelUnshuffle,
                    nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ReflectionPad1d, nn.ReflectionPad2d,
                    nn.ReflectionPad3d, nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d,
                    nn.CircularPad1d, nn.CircularPad2d, nn.CircularPad3d), _same_module)
_register(MODULES, (nn.Flatten,), lambda m: Same(m, channels=_flatten_channels(m.start_dim, m.end_dim)))


def _constant_pad_module(mod):
    if mod.value != 0:
        return Refusal(f"constant padding with value {mod.value}: only zero padding is an edge-free neuron")
    return Same(mod)


_register(MODULES, (nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d), _constant_pad_module)

for _fn in (torch.reshape, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze, torch.movedim, torch.swapaxes,
            torch.narrow, torch.channel_shuffle, F.pixel_shuffle, F.pixel_unshuffle, torch.chunk, torch.split,
            torch.tensor_split, torch.unbind, torch.t):
    FUNCTIONS[_fn] = _same(_fn)


def _flatten_function(args, kwargs, is_value):
    start = args[1] if len(args) > 1 else kwargs.get("start_dim", 0)
    end = args[2] if len(args) > 2 else kwargs.get("end_dim", -1)
    return Same(torch.flatten, channels=_flatten_channels(start, end))


_register(FUNCTIONS, (torch.flatten,), _flatten_function)


def _cat(fn):
    def factory(args, kwargs, is_value):
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        return Same(fn, combines=True, channels=ChannelMap.CONCAT if dim == 1 and fn is not torch.stack else None)
    return factory


for _fn in (torch.cat, torch.concat, torch.concatenate, torch.stack):
    FUNCTIONS[_fn] = _cat(_fn)


def _getitem(args, kwargs, is_value):
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


FUNCTIONS[operator.getitem] = _getitem


def _pad_function(args, kwargs, is_value):
    mode = kwargs.get("mode", args[2] if len(args) > 2 else "constant")
    value = kwargs.get("value", args[3] if len(args) > 3 else None)
    if mode == "constant" and value not in (None, 0, 0.0):
        return Refusal(f"constant padding with value {value}: only zero padding is supported")
    return Same(F.pad)


FUNCTIONS[F.pad] = _pad_function


def _passthrough_method(x, *a, **k):
    """``.to()``/``.float()``/... keep the pass's own dtype and device; ``.clone()``/``.detach()`` are
    edges of weight 1 in the path-lifting, whatever autograd does."""
    return x


def _reshape_method(name):
    def fn(x, *a, **k):
        return getattr(x, name)(*a, **k)

    def factory(args, kwargs, is_value):
        if name == "flatten":
            start = args[1] if len(args) > 1 else kwargs.get("start_dim", 0)
            end = args[2] if len(args) > 2 else kwargs.get("end_dim", -1)
            return Same(fn, channels=_flatten_channels(start, end))
        return Same(fn)
    return factory


for _name_ in ("view", "view_as", "reshape", "reshape_as", "flatten", "permute", "transpose", "contiguous", "squeeze",
               "unsqueeze", "chunk", "split", "tensor_split", "unbind", "narrow", "movedim", "swapaxes", "t"):
    METHODS[_name_] = _reshape_method(_name_)


def _conversion(args, kwargs, is_value):
    if args[1:] and not all(isinstance(a, (torch.dtype, torch.device, str)) or is_value(a) for a in args[1:]):
        return Refusal("conversion with arguments that are not a dtype or device")
    return Same(_passthrough_method)


_register(METHODS, ("to", "float", "double", "type_as"), _conversion)
_register(METHODS, ("clone", "detach"), lambda *_: Same(_passthrough_method))

# Pooling and upsampling ------------------------------------------------------------------------------

_AVG_MODULES = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_MAXPOOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)


def _avg_module_args(m):
    return (m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad) + (
        (m.divisor_override,) if not isinstance(m, nn.AvgPool1d) else ())


_register(MODULES, _AVG_MODULES, lambda m: Same(
    m, all_ones=False, channels=ChannelMap.KEEP,
    weight_q=lambda out, args, kw, q: _avg_weight_q(out, (args[0],) + _avg_module_args(m), {}, q)))
_register(MODULES, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d),
          lambda m: Same(m, all_ones=False, weight_q=_adaptive_avg_weight_q, channels=ChannelMap.KEEP))
for _fn in (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, torch.avg_pool1d):
    FUNCTIONS[_fn] = _same(_fn, all_ones=False, weight_q=_avg_weight_q, channels=ChannelMap.KEEP)
for _fn in (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, torch.adaptive_avg_pool1d):
    FUNCTIONS[_fn] = _same(_fn, all_ones=False, weight_q=_adaptive_avg_weight_q, channels=ChannelMap.KEEP)


def _maxpool_module(mod):
    if mod.return_indices:
        return Refusal("max-pooling with return_indices: the indices are not activations")
    nd = next(i + 1 for i, c in enumerate(_MAXPOOL_MODULES) if isinstance(mod, c))
    return WindowSum(_tuple(mod.kernel_size, nd), _tuple(mod.stride or mod.kernel_size, nd),
                     _tuple(mod.padding, nd), _tuple(mod.dilation, nd), mod.ceil_mode)


def _adaptive_max_module(mod):
    if mod.return_indices:
        return Refusal("adaptive max-pooling with return_indices")
    return AdaptiveWindowSum(mod.output_size)


_register(MODULES, _MAXPOOL_MODULES, _maxpool_module)
_register(MODULES, (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d), _adaptive_max_module)


def _maxpool_function(nd):
    def factory(args, kwargs, is_value):
        names = ["kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"]
        vals = {**dict(zip(names, args[1:])), **kwargs}
        if vals.get("return_indices"):
            return Refusal("max-pooling with return_indices")
        k = vals["kernel_size"]
        s = vals.get("stride") or k
        return WindowSum(_tuple(k, nd), _tuple(s, nd), _tuple(vals.get("padding", 0), nd),
                         _tuple(vals.get("dilation", 1), nd), bool(vals.get("ceil_mode", False)))
    return factory


for _fn, _nd in ((F.max_pool1d, 1), (F.max_pool2d, 2), (F.max_pool3d, 3),
                 (torch.max_pool1d, 1), (torch.max_pool2d, 2), (torch.max_pool3d, 3)):
    FUNCTIONS[_fn] = _maxpool_function(_nd)


def _adaptive_max_function(args, kwargs, is_value):
    if kwargs.get("return_indices") or (len(args) > 2 and args[2]):
        return Refusal("adaptive max-pooling with return_indices")
    return AdaptiveWindowSum(args[1] if len(args) > 1 else kwargs["output_size"])


_register(FUNCTIONS, (F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d), _adaptive_max_function)


def _upsample_module(mod):
    if mod.mode not in UPSAMPLE_MODES:
        return Refusal(f"upsampling mode '{mod.mode}' has negative interpolation weights")
    return Same(mod, all_ones=mod.mode.startswith("nearest"))


def _interpolate(fn):
    def factory(args, kwargs, is_value):
        mode = kwargs.get("mode", args[3] if len(args) > 3 else "nearest")
        if mode not in UPSAMPLE_MODES:
            return Refusal(f"interpolation mode '{mode}' has negative weights")
        return Same(fn, all_ones=mode.startswith("nearest"))
    return factory


MODULES[nn.Upsample] = _upsample_module
for _fn in (F.interpolate, F.upsample):
    FUNCTIONS[_fn] = _interpolate(_fn)

# Arithmetic with constants and between activations ---------------------------------------------------


def _add(args, kwargs, is_value):
    alpha = kwargs.get("alpha", 1)
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


def _scale(divide, method):
    def factory(args, kwargs, is_value):
        if divide and not method and not is_value(args[0]):
            return Refusal("division of a constant by an activation is not linear")
        if divide and kwargs.get("rounding_mode") is not None:
            return Refusal("rounding division is not linear")
        values = [a for a in args if is_value(a)]
        others = [a for a in (args[1:] if method else args) if not is_value(a)]
        if len(values) >= 2:
            return Refusal("multiplication of two activations: the network is not a ReLU-DAG")
        if len(others) != 1 or not is_number(others[0]):
            return Refusal("multiplication by something other than a Python number")
        c = float(others[0])
        if c <= 0:
            return Refusal(f"multiplication by {c}: fixed edges must have positive weight")
        return Scale(1.0 / c if divide else c, next(i for i, a in enumerate(args) if is_value(a)))
    return factory


_register(FUNCTIONS, (operator.add, operator.iadd, torch.add), _add)
_register(FUNCTIONS, (operator.mul, operator.imul, torch.mul), _scale(divide=False, method=False))
_register(FUNCTIONS, (operator.truediv, operator.itruediv, torch.div, torch.true_divide), _scale(divide=True, method=False))
_register(METHODS, ("add", "add_", "__add__", "__iadd__", "__radd__"), _add)
_register(METHODS, ("mul", "mul_", "__mul__", "__rmul__", "__imul__"), _scale(divide=False, method=True))
_register(METHODS, ("div", "div_", "__truediv__", "__itruediv__"), _scale(divide=True, method=True))


def _reduce(fn, is_sum):
    def factory(args, kwargs, is_value):
        dims = args[1] if len(args) > 1 else kwargs.get("dim")
        if dims is None:
            return Refusal("reduction over every dimension mixes the samples of a batch: give dims")
        dims_list = [dims] if isinstance(dims, int) else list(dims)
        if any(d == 0 for d in dims_list):
            return Refusal("reduction over the batch dimension")
        if is_sum:
            return Same(fn, grows=True)
        return Same(fn, all_ones=False, weight_q=_mean_weight_q)
    return factory


FUNCTIONS[torch.mean] = _reduce(torch.mean, is_sum=False)
FUNCTIONS[torch.sum] = _reduce(torch.sum, is_sum=True)
METHODS["mean"] = _reduce(lambda x, *a, **k: x.mean(*a, **k), is_sum=False)
METHODS["sum"] = _reduce(lambda x, *a, **k: x.sum(*a, **k), is_sum=True)


# Refused: operators that look innocent but are not ReLU-DAG edges. One row per reason, with every spelling
# of the operator: a module type (MODULES), a callable (FUNCTIONS) or a tensor-method name (METHODS). ----
_NOT_HOMOGENEOUS = "clips: not positively homogeneous"
_INPUT_NORM = "divides by an input-dependent norm"
_PRODUCT = "multiplies activations together"
_NEGATIVE = "is an edge of weight -1: fixed edges must be non-negative"
_MODULE_WEIGHT = "use the nn module so that its weight is a named parameter"
REFUSED = {
    "ReLU6 clips at 6: not positively homogeneous": (nn.ReLU6, F.relu6),
    f"hardtanh {_NOT_HOMOGENEOUS}": (nn.Hardtanh, F.hardtanh),
    f"clamp {_NOT_HOMOGENEOUS}": (torch.clamp, "clamp", "clamp_"),
    "GELU is not a ReLU": (nn.GELU, F.gelu),
    "SiLU (swish) is not a ReLU": (nn.SiLU, F.silu),
    "sigmoid is not a ReLU": (nn.Sigmoid, torch.sigmoid, F.sigmoid, "sigmoid"),
    "tanh is not a ReLU": (nn.Tanh, torch.tanh, "tanh"),
    "hardswish is not a ReLU": (nn.Hardswish, F.hardswish),
    "hardsigmoid is not a ReLU": (nn.Hardsigmoid, F.hardsigmoid),
    "leaky ReLU has a negative slope: not a ReLU": (nn.LeakyReLU, F.leaky_relu),
    "PReLU has a learned negative slope: not a ReLU": (nn.PReLU,),
    "ELU is not a ReLU": (nn.ELU,),
    "Mish is not a ReLU": (nn.Mish,),
    "exp is not a ReLU": (torch.exp, "exp"),
    "abs is not positively homogeneous with a single ReLU": (torch.abs,),
    "softmax is not a ReLU-DAG operator": (nn.Softmax, F.softmax, torch.softmax, "softmax"),
    f"LayerNorm {_INPUT_NORM}": (nn.LayerNorm, F.layer_norm),
    f"GroupNorm {_INPUT_NORM}": (nn.GroupNorm, F.group_norm),
    f"instance norm {_INPUT_NORM}": (nn.InstanceNorm1d, nn.InstanceNorm2d),
    f"local response norm {_INPUT_NORM}": (nn.LocalResponseNorm,),
    "functional batch_norm: use an nn.BatchNorm module so that its statistics can be folded": (F.batch_norm,),
    f"attention {_PRODUCT}": (nn.MultiheadAttention, F.scaled_dot_product_attention),
    f"a bilinear layer {_PRODUCT}": (nn.Bilinear,),
    f"matmul of two activations {_PRODUCT}": (torch.matmul, operator.matmul, "matmul"),
    f"bmm of two activations {_PRODUCT}": (torch.bmm, "bmm"),
    "an embedding is a lookup, not a linear map of activations": (nn.Embedding,),
    f"subtraction {_NEGATIVE}": (operator.sub, operator.isub, torch.sub, "sub", "__sub__", "__rsub__"),
    f"negation {_NEGATIVE}": (operator.neg, torch.neg, "neg"),
    "an elementwise or global max is not a pooling window of the graph": (torch.max,),
    f"functional linear with a weight tensor: {_MODULE_WEIGHT} (nn.Linear)": (F.linear,),
    f"functional conv: {_MODULE_WEIGHT} (nn.Conv2d)": (F.conv2d,),
    "expand is not supported": ("expand",),
}
for _reason, _spellings in REFUSED.items():
    for _op in _spellings:
        (METHODS if isinstance(_op, str) else MODULES if isinstance(_op, type) else FUNCTIONS)[_op] = _refuse(_reason)

MODULES[nn.modules.batchnorm._NormBase] = _refuse("normalisation layer that is not a frozen batch-norm")
FUNCTIONS[builtins.getattr] = lambda args, kwargs, is_value: Refusal(f"attribute '{args[1]}' of an activation")

del _fn, _nd, _op, _spellings, _reason, _name_  # loop variables of the registrations
