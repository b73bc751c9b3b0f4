"""A model captured once and its parameters read per call: the object every public function uses.

``lift(model)`` returns a :class:`Lifted` from a per-model cache. A cached result never outlives what it
was computed from:

* the captured graph is reused while :func:`structure_signature` is unchanged: the module tree, every
  module's non-tensor attributes (conv padding, batch-norm ``eps``, pooling kernels, Python flags that
  ``forward`` reads), and the identity, shape, dtype and device of every parameter and buffer; any
  change captures the model again;
* values derived from the parameters (signed and absolute ``(W, b)``, the forward/backward profile) are
  reused while the model's tensors equal a private copy of the values they were computed from
  (bit for bit: exact, and it sees writes through ``.data`` that ``_version`` misses). The copy costs
  one model's worth of memory; the comparison is memory-bound, far cheaper than a pass.
"""
from __future__ import annotations

import enum
import itertools
import weakref

import torch
import torch.nn as nn
from torch.nn.utils.parametrize import type_before_parametrizations

from . import params, steps
from .errors import ArchitectureMismatchError, PathSaliencyError
from .graph import capture
from .steps import Weights

_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()
_STATES = itertools.count()  # tokens: one per (capture, parameter values), never reused
_NOT_ATTRIBUTES = {"_parameters", "_buffers", "_modules", "training"}  # the tree and the tensors are read apart
_PLAIN = (bool, int, str, bytes, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format, enum.Enum)


def structure_signature(model: nn.Module, output) -> tuple:
    """What the captured graph depends on apart from tensor values: the module tree (names, types,
    identities), each module's attributes other than its tensors, submodules and hooks (recursively into
    plain objects), the identity, shape, dtype and device of every parameter and buffer, and ``output``.
    A pair ``(plain, tensors)``: ``plain`` compares with ``==`` (types kept apart: ``True`` is not ``1``),
    ``tensors`` holds private copies of tensor-valued attributes. Compare with :func:`same_signature`."""
    frozen = []
    mods = tuple((name, id(m), type(m), _frozen({k: v for k, v in vars(m).items()
                                                   if k not in _NOT_ATTRIBUTES and "hook" not in k}, frozen))
                 for name, m in model.named_modules(remove_duplicate=False))
    tensors = tuple((name, id(t), tuple(t.shape), t.dtype, t.device) for name, t in params.named_tensors(model).items())
    return (mods, tensors, repr(output)), frozen


def _frozen(v, tensors, depth=0):
    """A snapshot of an attribute value that compares with ``==`` exactly: ints, strings and ``None`` as
    they are, other plain values (bools, enums, dtypes, ...) with their type, floats by their exact hex,
    tensors as an index into ``tensors`` (which receives a private copy), containers and plain objects
    element by element (to a depth of 6), modules, functions and other objects by identity."""
    if type(v) in (int, str, type(None)):
        return v
    if isinstance(v, _PLAIN):
        return (type(v), v)
    if isinstance(v, float):
        return ("float", v.hex())
    if torch.is_tensor(v):
        tensors.append(v.detach().clone())
        return ("tensor", len(tensors) - 1, tuple(v.shape), v.dtype, v.device)
    if depth > 6 or isinstance(v, (nn.Module, type)) or callable(v):
        return ("object", type(v), id(v))
    if isinstance(v, (tuple, list)):
        return (type(v), tuple(_frozen(x, tensors, depth + 1) for x in v))
    if isinstance(v, dict):
        return (type(v), tuple((_frozen(k, tensors, depth + 1), _frozen(x, tensors, depth + 1)) for k, x in v.items()))
    if isinstance(v, (set, frozenset)):
        return (type(v), tuple(sorted((_frozen(x, tensors, depth + 1) for x in v), key=repr)))
    if hasattr(v, "__dict__"):
        return ("object", type(v), id(v), _frozen(vars(v), tensors, depth + 1))
    return ("object", type(v), id(v))


_WORDS = ((8, torch.int64), (4, torch.int32), (2, torch.int16), (1, torch.uint8))


def _words(t: torch.Tensor):
    """The bytes of a contiguous tensor as the widest integer type its size and offset allow (a view),
    or None (non-contiguous, or a dtype without a byte view)."""
    if not t.is_contiguous() or t.dtype == torch.bool or t.is_complex() or t.is_quantized:
        return None
    t = t.detach().reshape(-1).view(torch.uint8)
    for bytes_, dtype in _WORDS:
        if t.numel() % bytes_ == 0 and t.storage_offset() % bytes_ == 0:
            return t.view(dtype)
    return None  # pragma: no cover - one byte always divides


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``a`` and ``b`` (same shape, dtype, device) hold the same bits: exact (a NaN equals itself, -0.0
    differs from 0.0), compared as 64-bit words where the layout allows (about three times as fast as
    ``torch.equal`` on float32: the comparison is one model-sized read of both)."""
    wa, wb = _words(a), _words(b)
    if wa is not None and wb is not None and wa.dtype == wb.dtype:
        return bool(torch.equal(wa, wb))
    return bool(torch.equal(a, b))


def same_signature(a, b) -> bool:
    """Equality of two :func:`structure_signature` values (tensor attributes compared bit for bit)."""
    (plain_a, tensors_a), (plain_b, tensors_b) = a, b
    return plain_a == plain_b and all(same_bits(x, y) for x, y in zip(tensors_a, tensors_b))


def model_device(model: nn.Module) -> torch.device:
    devices = {t.device for t in params.named_tensors(model).values()}
    if not devices:
        return torch.device("cpu")
    if any(d.type == "meta" for d in devices):
        raise PathSaliencyError("the model is on the meta device: its parameters have no values; "
                                "materialise it (e.g. model.to_empty(device=...) and load weights) first")
    if len(devices) > 1:
        raise PathSaliencyError(f"the model's tensors are on several devices ({sorted(map(str, devices))}); "
                                "move it to one device")
    return devices.pop()


_DTYPES = {"float32": torch.float32, "float64": torch.float64, "torch.float32": torch.float32,
           "torch.float64": torch.float64}


def compute_dtype(dtype) -> torch.dtype:
    """``torch.float32`` or ``torch.float64``, also given as one of the strings of ``_DTYPES``."""
    dtype = _DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64 (or the strings 'float32', 'float64'), got "
                         f"{dtype!r}; half-precision models are computed in one of these")
    return dtype


def sample_shape(input_shape, plan=None) -> tuple:
    """The shape of one input sample, validated: a tuple, list or ``torch.Size`` of positive ints (or a
    tensor, read as its shape). With ``plan``, a leading batch dimension of 1 before the input of a first
    conv, ``(1, C, *spatial)``, is dropped. The one place where every entry point checks ``input_shape``."""
    hint = "the shape of one input sample as a tuple of positive ints, e.g. (3, 224, 224) or (784,)"
    if torch.is_tensor(input_shape):
        input_shape = tuple(input_shape.shape)
    if isinstance(input_shape, int) and not isinstance(input_shape, bool):
        raise PathSaliencyError(f"input_shape must be {hint}; got the int {input_shape} (write ({input_shape},) "
                                "for a one-dimensional input)")
    if not isinstance(input_shape, (tuple, list)):
        raise PathSaliencyError(f"input_shape must be {hint}; got {type(input_shape).__name__} {input_shape!r}")
    shape = []
    for s in input_shape:
        if isinstance(s, bool) or not hasattr(s, "__index__"):
            raise PathSaliencyError(f"input_shape must be {hint}; got {tuple(input_shape)!r} (an entry that is not an int)")
        shape.append(s.__index__())
    if not shape:
        raise PathSaliencyError(f"input_shape must be {hint}, with at least one dimension; got ()")
    if min(shape) <= 0:
        raise PathSaliencyError(f"input_shape must be {hint}; got {tuple(shape)} (sizes must be positive)")
    shape = tuple(shape)
    first = None if plan is None else next((s for s in plan.steps if s.input is plan.input), None)
    if first is not None and isinstance(first, (steps.ConvStep, steps.ConvTransposeStep)) and shape[0] == 1:
        if len(shape) == first.conv.weight.dim():  # (1, C, *spatial) for a conv with len(spatial)+2 dims
            return shape[1:]
    return shape


class Lifted:
    """The validated graph of a model plus the means to read its parameter vector theta."""

    def __init__(self, model: nn.Module, output=None):
        self.device = model_device(model)
        self.plan = capture(model, output)
        self._model = weakref.ref(model)
        self._values = None  # name -> private copy of the tensor values the caches were computed from
        self.state = None  # a token for those values (set by :meth:`verify`)
        self._signed_cache, self._weights_cache = {}, {}

    def verify(self, model: nn.Module):
        """Compare ``model``'s tensors with the copy the caches were computed from; on any difference
        (a write through ``.data``, in place, ``load_state_dict``, ``copy_``) drop the caches and take a new
        copy. Returns the token of the current values (see :mod:`profile`)."""
        tensors = params.named_tensors(model)
        if self._values is not None and all(same_bits(self._values[n], t) for n, t in tensors.items()
                                            if n in self._values):
            return self.state
        old, seen, values = self._values or {}, set(), {}
        for name, t in tensors.items():  # a tied tensor once (the signature holds who shares what)
            if id(t) not in seen:
                seen.add(id(t))
                values[name] = _private_copy(t, old.get(name))
        self._values, self.state = values, next(_STATES)
        self._signed_cache, self._weights_cache = {}, {}
        return self.state

    def sample_shape(self, input_shape) -> tuple:
        """:func:`sample_shape` for this model's graph."""
        return sample_shape(input_shape, self.plan)

    def signed(self, source, dtype, what="model") -> dict:
        """node -> signed ``(W, b)`` of every affine step, from a module or a state dict (cached for the
        lifted model while its values are unchanged, see :meth:`verify`). ``what`` names the source in
        errors (non-finite tensors, a batch-norm with ``running_var + eps <= 0``)."""
        if source is not self._model():
            return self._signed(source, dtype, what)
        self.verify(source)
        if dtype not in self._signed_cache:
            self._signed_cache = {dtype: self._signed(source, dtype, what)}
        return self._signed_cache[dtype]

    def _signed(self, source, dtype, what, absolute=False) -> dict:
        tensors = params.named_tensors(source)
        names = [n for s in self.plan.steps for n in params.step_tensor_names(s)]
        what = what if isinstance(source, nn.Module) else f"{what} (state dict)"
        params.check_finite(tensors, names, what)
        params.check_batchnorms(tensors, self.plan.steps, what)
        return {node: params.effective(step, tensors, dtype, self.device, absolute)
                for node, step in self.plan.affine.items()}

    def absolute(self, source, dtype, q=1) -> dict:
        """node -> :class:`Weights` ``(|W|**q, |b|**q)`` (cached like :meth:`signed`; computed from the
        tensors directly, without the signed values, unless those are cached)."""
        if source is not self._model():
            return {node: Weights.absolute(w, b, q) for node, (w, b) in self._signed(source, dtype, "model").items()}
        self.verify(source)
        if (dtype, q) not in self._weights_cache:
            if dtype in self._signed_cache:
                pairs = self._signed_cache[dtype].items()
                weights = {node: Weights.absolute(w, b, q) for node, (w, b) in pairs}
            else:
                pairs = self._signed(source, dtype, "model", absolute=True).items()
                weights = {node: Weights(w, b) if q == 1 else Weights.absolute(w, b, q) for node, (w, b) in pairs}
            self._weights_cache = {(dtype, q): weights}
        return self._weights_cache[(dtype, q)]


def _private_copy(t: torch.Tensor, buffer):
    """A copy of ``t``'s values, written into ``buffer`` (the previous copy) when it has the same layout:
    writing into memory that is already mapped is several times faster than a fresh allocation."""
    t = t.detach()
    if (buffer is not None and buffer.shape == t.shape and buffer.dtype == t.dtype and buffer.device == t.device
            and buffer.stride() == t.stride()):
        return buffer.copy_(t)
    return t.clone()


def lift(model: nn.Module, output=None) -> Lifted:
    """The cached :class:`Lifted` of ``model`` (captured again when its structure changed)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    sig = structure_signature(model, output)
    hit = _CACHE.get(model)
    if hit is not None and same_signature(hit[0], sig):
        return hit[1]
    lifted = Lifted(model, output)
    _CACHE[model] = (sig, lifted)
    return lifted


def _plain_type(module: nn.Module) -> type:
    """The module's class, seen through torch parametrizations (which subclass it on the fly)."""
    return type_before_parametrizations(module)


def check_same_architecture(model, lifted: Lifted, other, output=None):
    """``other`` (a module or a state dict) must be theta' of the same architecture: the same graph, the
    same hyper-parameters of every module it calls (``extra_repr``: padding, ``eps``, kernels), and the
    same shape for every tensor that theta is made of (keys of a state dict that theta does not use are
    ignored; a missing one is refused). The one architecture check of the library. Raises :class:`ArchitectureMismatchError`."""
    if isinstance(other, nn.Module):
        theirs = lift(other, output).plan
        mine = [(n.op, str(n.target)) for n in lifted.plan.nodes]
        other_nodes = [(n.op, str(n.target)) for n in theirs.nodes]
        if mine != other_nodes:
            diff = next((i for i, (a, b) in enumerate(zip(mine, other_nodes)) if a != b), min(len(mine), len(other_nodes)))
            a = mine[diff] if diff < len(mine) else "<end>"
            b = other_nodes[diff] if diff < len(other_nodes) else "<end>"
            raise ArchitectureMismatchError(f"the two models have different graphs: node {diff} is {a} in the "
                                            f"first and {b} in the second")
        for n in lifted.plan.graph.nodes:  # the same hyper-parameters (padding, eps, pooling kernels, ...)
            if n.op == "call_module":
                a, b = lifted.plan.root.get_submodule(n.target), theirs.root.get_submodule(n.target)
                if _plain_type(a) is not _plain_type(b) or a.extra_repr() != b.extra_repr():
                    raise ArchitectureMismatchError(f"module '{n.target}' is {a!r} in the first model and {b!r} in "
                                                    "the second")
    mine_t, theirs_t = params.named_tensors(model), params.named_tensors(other)
    state_dict = not isinstance(other, nn.Module)
    for step in lifted.plan.steps:
        for name in params.step_tensor_names(step):
            a, b = mine_t.get(name), theirs_t.get(name)
            if b is None and a is not None and state_dict:
                unused = [k for k in theirs_t if k not in mine_t]
                raise ArchitectureMismatchError(
                    f"the state dict has no '{name}' (needed by layer '{step.name}'); it must hold the buffers too, "
                    "e.g. batch-norm running statistics: {**model.state_dict(), **changed}"
                    + (f"; its keys that the architecture does not use: {unused[:5]}" if unused else ""))
            if (a is None) != (b is None):
                raise ArchitectureMismatchError(f"layer '{step.name}': '{name}' exists in only one of the two "
                                                "parameter vectors")
            if a is not None and tuple(a.shape) != tuple(b.shape):
                raise ArchitectureMismatchError(f"layer '{step.name}': '{name}' has shape {tuple(a.shape)} in the "
                                                f"first model and {tuple(b.shape)} in the second")
