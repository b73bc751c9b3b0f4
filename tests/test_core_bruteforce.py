"""The path-norm equals the explicit sum over every path of the neuron-level DAG (MATH.md section 2).

For each small network below, the neuron-level DAG is built here, independently of the library, with
explicit Python loops over neurons and edges read from the module definitions (convolution with
padding/stride/dilation/groups, linear, frozen batch-norm folded into the conv/linear before it or as a
diagonal step, pooling windows, skips, concatenation, upsampling, padding, slicing). Every path (from an
input neuron or from a neuron with a bias, to an output neuron) is then enumerated one by one by a DFS,
and the sum of ``|bias| * prod |w|`` (or its ``q``-th power) is compared with ``path_norm``.

Each DAG is first checked to compute the same function as the model (ReLU, max and identity neurons on
a random input), so a wrong DAG cannot make a wrong library pass.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pathsaliency import path_norm

REL = 1e-9


# ----------------------------------------------------------------------------------------------------
# Models: a list of ops interpreted by forward (torch.fx unrolls the loop) and by the DAG builder.
# ----------------------------------------------------------------------------------------------------


class DagNet(nn.Module):
    """``ops``: ``(out, kind, inputs, cfg)`` in execution order; ``x`` is the input; the last op is the
    output."""

    def __init__(self, ops, mods):
        super().__init__()
        self.ops = ops
        self.mods = nn.ModuleDict(mods)

    def forward(self, x):
        env = {"x": x}
        for out, kind, ins, cfg in self.ops:
            a = [env[i] for i in ins]
            env[out] = _FORWARD[kind](self, a, cfg)
        return env[self.ops[-1][0]]


def _shortcut_a(x, pad):
    return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, pad, pad))


_FORWARD = {
    "mod": lambda self, a, c: self.mods[c["m"]](a[0]),
    "conv_bn": lambda self, a, c: self.mods[c["bn"]](self.mods[c["conv"]](a[0])),
    "relu": lambda self, a, c: F.relu(a[0]),
    "add": lambda self, a, c: a[0] + a[1],
    "cat": lambda self, a, c: torch.cat(a, dim=1),
    "scale": lambda self, a, c: a[0] * c["c"],
    "add_const": lambda self, a, c: a[0] + c["c"],
    "maxpool_fn": lambda self, a, c: F.max_pool2d(a[0], **c),
    "avgpool_fn": lambda self, a, c: F.avg_pool2d(a[0], **c),
    "adaptive_avg_fn": lambda self, a, c: F.adaptive_avg_pool2d(a[0], c["size"]),
    "interp": lambda self, a, c: F.interpolate(a[0], **c),
    "pad": lambda self, a, c: F.pad(a[0], c["pad"]),
    "slice": lambda self, a, c: a[0][c["index"]],
    "flatten": lambda self, a, c: torch.flatten(a[0], 1),
    "shortcut_a": lambda self, a, c: _shortcut_a(a[0], c["pad"]),
}


# ----------------------------------------------------------------------------------------------------
# The neuron-level DAG, built independently of the library.
# ----------------------------------------------------------------------------------------------------


class Dag:
    def __init__(self):
        self.act = []  # "input", "id", "relu", "max"
        self.bias = []
        self.ins = []  # ins[v] = [(u, w), ...]
        self.outs = []

    def neuron(self, act, bias=0.0):
        self.act.append(act)
        self.bias.append(float(bias))
        self.ins.append([])
        self.outs.append([])
        return len(self.act) - 1

    def edge(self, u, v, w):
        self.ins[v].append((u, float(w)))
        self.outs[u].append((v, float(w)))

    def grid(self, shape, act, bias=None):
        ids = np.empty(shape, dtype=np.int64)
        for idx in np.ndindex(*shape):
            ids[idx] = self.neuron(act, 0.0 if bias is None else bias(idx))
        return ids

    def evaluate(self, x: np.ndarray, inputs: np.ndarray) -> np.ndarray:
        """The function the DAG computes (neurons are created in topological order)."""
        val = np.zeros(len(self.act))
        val[inputs.reshape(-1)] = x.reshape(-1)
        for v, act in enumerate(self.act):
            if act == "input":
                continue
            if act == "max":
                val[v] = max(w * val[u] for u, w in self.ins[v])
                continue
            s = self.bias[v] + sum(w * val[u] for u, w in self.ins[v])
            val[v] = max(s, 0.0) if act == "relu" else s
        return val

    def path_sum(self, outputs: np.ndarray, q=1):
        """Explicit enumeration: every path from an input neuron or a biased neuron to an output neuron,
        one at a time. Returns (sum of |Phi_p|**q, number of paths)."""
        is_out = np.zeros(len(self.act), dtype=bool)
        is_out[outputs.reshape(-1)] = True
        outs = [[(v, abs(w) ** q) for v, w in e] for e in self.outs]
        terms, count = [], 0
        for start, act in enumerate(self.act):
            if act == "input":
                p0 = 1.0
            elif self.bias[start] != 0.0:
                p0 = abs(self.bias[start]) ** q
            else:
                continue
            stack = [(start, p0)]
            while stack:
                v, p = stack.pop()
                if is_out[v]:
                    terms.append(p)
                    count += 1
                for u, w in outs[v]:
                    stack.append((u, p * w))
        return math.fsum(terms), count


def _pool_out(n, k, s, p, d, ceil):
    """PyTorch's pooling output size."""
    num = n + 2 * p - d * (k - 1) - 1 + (s - 1 if ceil else 0)
    out = num // s + 1
    if ceil and (out - 1) * s >= n + p:
        out -= 1
    return out


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _bn_affine(bn):
    var = bn.running_var.detach().double()
    s = 1.0 / torch.sqrt(var + bn.eps)
    if bn.weight is not None:
        s = bn.weight.detach().double() * s
    t = -bn.running_mean.detach().double() * s
    if bn.bias is not None:
        t = t + bn.bias.detach().double()
    return s.numpy(), t.numpy()


def dag_conv(g, X, conv, bn=None):
    C, H, W = X.shape
    wt = conv.weight.detach().double().numpy()
    b = None if conv.bias is None else conv.bias.detach().double().numpy()
    O, Cg, kh, kw = wt.shape
    groups = conv.groups
    (sh, sw), (ph, pw), (dh, dw) = _pair(conv.stride), _pair(conv.padding), _pair(conv.dilation)
    Ho = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    Wo = (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    s, t = _bn_affine(bn) if bn is not None else (np.ones(O), np.zeros(O))
    Y = np.empty((O, Ho, Wo), dtype=np.int64)
    for o in range(O):
        grp = o // (O // groups)
        bias = (0.0 if b is None else b[o]) * s[o] + t[o]
        for i in range(Ho):
            for j in range(Wo):
                v = g.neuron("id", bias)
                Y[o, i, j] = v
                for cl in range(Cg):
                    c = grp * Cg + cl
                    for ki in range(kh):
                        for kj in range(kw):
                            y, x = i * sh - ph + ki * dh, j * sw - pw + kj * dw
                            if 0 <= y < H and 0 <= x < W:
                                g.edge(X[c, y, x], v, wt[o, cl, ki, kj] * s[o])
    return Y


def dag_linear(g, X, lin, bn=None):
    wt = lin.weight.detach().double().numpy()
    b = None if lin.bias is None else lin.bias.detach().double().numpy()
    O, I = wt.shape
    assert X.shape == (I,)
    s, t = _bn_affine(bn) if bn is not None else (np.ones(O), np.zeros(O))
    Y = np.empty(O, dtype=np.int64)
    for o in range(O):
        v = g.neuron("id", (0.0 if b is None else b[o]) * s[o] + t[o])
        Y[o] = v
        for i in range(I):
            g.edge(X[i], v, wt[o, i] * s[o])
    return Y


def dag_bn(g, X, bn):
    """A standalone frozen batch-norm: one neuron per entry, edge ``s``, bias ``t``."""
    s, t = _bn_affine(bn)
    Y = np.empty_like(X)
    for idx in np.ndindex(*X.shape):
        v = g.neuron("id", t[idx[0]])
        g.edge(X[idx], v, s[idx[0]])
        Y[idx] = v
    return Y


def dag_unary(g, X, act, w=1.0, bias=0.0):
    Y = np.empty_like(X)
    for idx in np.ndindex(*X.shape):
        v = g.neuron(act, bias)
        g.edge(X[idx], v, w)
        Y[idx] = v
    return Y


def dag_add(g, A, B):
    assert A.shape == B.shape
    Y = np.empty_like(A)
    for idx in np.ndindex(*A.shape):
        v = g.neuron("id")
        g.edge(A[idx], v, 1.0)
        g.edge(B[idx], v, 1.0)
        Y[idx] = v
    return Y


def dag_maxpool(g, X, k, s, p, d, ceil):
    C, H, W = X.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = _pair(k), _pair(s if s is not None else k), _pair(p), _pair(d)
    Ho, Wo = _pool_out(H, kh, sh, ph, dh, ceil), _pool_out(W, kw, sw, pw, dw, ceil)
    Y = np.empty((C, Ho, Wo), dtype=np.int64)
    for c in range(C):
        for i in range(Ho):
            for j in range(Wo):
                v = g.neuron("max")
                Y[c, i, j] = v
                n = 0
                for ki in range(kh):
                    for kj in range(kw):
                        y, x = i * sh - ph + ki * dh, j * sw - pw + kj * dw
                        if 0 <= y < H and 0 <= x < W:  # padding is -inf: not an input of the window
                            g.edge(X[c, y, x], v, 1.0)
                            n += 1
                assert n > 0
    return Y


def dag_avgpool(g, X, k, s, p, ceil, count_include_pad):
    C, H, W = X.shape
    (kh, kw), (sh, sw), (ph, pw) = _pair(k), _pair(s if s is not None else k), _pair(p)
    Ho, Wo = _pool_out(H, kh, sh, ph, 1, ceil), _pool_out(W, kw, sw, pw, 1, ceil)
    Y = np.empty((C, Ho, Wo), dtype=np.int64)
    for c in range(C):
        for i in range(Ho):
            for j in range(Wo):
                h0, w0 = i * sh - ph, j * sw - pw
                h1, w1 = min(h0 + kh, H + ph), min(w0 + kw, W + pw)
                padded_size = (h1 - h0) * (w1 - w0)  # the window clipped to the padded input
                real = [(y, x) for y in range(max(h0, 0), min(h1, H)) for x in range(max(w0, 0), min(w1, W))]
                div = padded_size if count_include_pad else len(real)
                v = g.neuron("id")
                Y[c, i, j] = v
                for y, x in real:
                    g.edge(X[c, y, x], v, 1.0 / div)
    return Y


def _adaptive_windows(n, m):
    return [(math.floor(i * n / m), math.ceil((i + 1) * n / m)) for i in range(m)]


def dag_adaptive(g, X, size, kind):
    C, H, W = X.shape
    mh, mw = _pair(size)
    Y = np.empty((C, mh, mw), dtype=np.int64)
    for c in range(C):
        for i, (h0, h1) in enumerate(_adaptive_windows(H, mh)):
            for j, (w0, w1) in enumerate(_adaptive_windows(W, mw)):
                cells = [(y, x) for y in range(h0, h1) for x in range(w0, w1)]
                v = g.neuron("max" if kind == "max" else "id")
                Y[c, i, j] = v
                for y, x in cells:
                    g.edge(X[c, y, x], v, 1.0 if kind == "max" else 1.0 / len(cells))
    return Y


def dag_nearest(g, X, out_size):
    C, H, W = X.shape
    Ho, Wo = out_size
    Y = np.empty((C, Ho, Wo), dtype=np.int64)
    for c in range(C):
        for i in range(Ho):
            for j in range(Wo):
                v = g.neuron("id")
                g.edge(X[c, (i * H) // Ho, (j * W) // Wo], v, 1.0)
                Y[c, i, j] = v
    return Y


def dag_jacobian(g, X, fn):
    """A fixed linear per-channel map given by its Jacobian (bilinear upsampling)."""
    C, H, W = X.shape
    jac = torch.autograd.functional.jacobian(fn, torch.zeros(1, 1, H, W, dtype=torch.float64))
    Ho, Wo = jac.shape[2], jac.shape[3]
    jac = jac.reshape(Ho * Wo, H * W).numpy()
    assert (jac >= 0).all()
    Y = np.empty((C, Ho, Wo), dtype=np.int64)
    for c in range(C):
        for i in range(Ho):
            for j in range(Wo):
                v = g.neuron("id")
                Y[c, i, j] = v
                for y in range(H):
                    for x in range(W):
                        w = jac[i * Wo + j, y * W + x]
                        if w != 0.0:
                            g.edge(X[c, y, x], v, w)
    return Y


def dag_zero_pad(g, X, pad):
    """``F.pad`` with zeros: new neurons without inputs and without bias (constant 0)."""
    pad = list(pad) + [0] * (6 - len(pad))
    (wl, wr), (hl, hr), (cl, cr) = (pad[0], pad[1]), (pad[2], pad[3]), (pad[4], pad[5])
    C, H, W = X.shape
    Y = np.empty((C + cl + cr, H + hl + hr, W + wl + wr), dtype=np.int64)
    for c in range(Y.shape[0]):
        for y in range(Y.shape[1]):
            for x in range(Y.shape[2]):
                src = (c - cl, y - hl, x - wl)
                if 0 <= src[0] < C and 0 <= src[1] < H and 0 <= src[2] < W:
                    Y[c, y, x] = X[src]
                else:
                    Y[c, y, x] = g.neuron("id")
    return Y


def build_dag(model: DagNet, input_shape):
    g = Dag()
    env = {"x": g.grid(input_shape, "input")}
    for out, kind, ins, c in model.ops:
        a = [env[i] for i in ins]
        X = a[0]
        if kind == "conv_bn":
            conv, bn = model.mods[c["conv"]], model.mods[c["bn"]]
            Y = dag_conv(g, X, conv, bn) if isinstance(conv, nn.Conv2d) else dag_linear(g, X, conv, bn)
        elif kind == "mod":
            m = model.mods[c["m"]]
            if isinstance(m, nn.Conv2d):
                Y = dag_conv(g, X, m)
            elif isinstance(m, nn.Linear):
                Y = dag_linear(g, X, m)
            elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                Y = dag_bn(g, X, m)
            elif isinstance(m, nn.ReLU):
                Y = dag_unary(g, X, "relu")
            elif isinstance(m, nn.MaxPool2d):
                Y = dag_maxpool(g, X, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)
            elif isinstance(m, nn.AvgPool2d):
                assert m.divisor_override is None
                Y = dag_avgpool(g, X, m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad)
            elif isinstance(m, nn.AdaptiveAvgPool2d):
                Y = dag_adaptive(g, X, m.output_size, "avg")
            elif isinstance(m, nn.AdaptiveMaxPool2d):
                Y = dag_adaptive(g, X, m.output_size, "max")
            elif isinstance(m, nn.Upsample) and m.mode == "nearest":
                f = int(m.scale_factor)
                Y = dag_nearest(g, X, (X.shape[1] * f, X.shape[2] * f))
            elif isinstance(m, nn.Upsample):
                Y = dag_jacobian(g, X, lambda t, m=m: m(t))
            elif isinstance(m, nn.ZeroPad2d):
                Y = dag_zero_pad(g, X, m.padding)
            elif isinstance(m, nn.Flatten):
                Y = X.reshape(-1)
            else:
                raise AssertionError(f"no DAG builder for {m}")
        elif kind == "relu":
            Y = dag_unary(g, X, "relu")
        elif kind == "add":
            Y = dag_add(g, a[0], a[1])
        elif kind == "cat":
            Y = np.concatenate(a, axis=0)
        elif kind == "scale":
            Y = dag_unary(g, X, "id", w=c["c"])
        elif kind == "add_const":
            Y = dag_unary(g, X, "id", bias=c["c"])
        elif kind == "maxpool_fn":
            Y = dag_maxpool(g, X, c["kernel_size"], c.get("stride"), c.get("padding", 0), c.get("dilation", 1),
                            c.get("ceil_mode", False))
        elif kind == "avgpool_fn":
            Y = dag_avgpool(g, X, c["kernel_size"], c.get("stride"), c.get("padding", 0), c.get("ceil_mode", False),
                            c.get("count_include_pad", True))
        elif kind == "adaptive_avg_fn":
            Y = dag_adaptive(g, X, c["size"], "avg")
        elif kind == "interp" and c["mode"] == "nearest":
            Y = dag_nearest(g, X, c["size"])
        elif kind == "interp":
            Y = dag_jacobian(g, X, lambda t, c=c: F.interpolate(t, **c))
        elif kind == "pad":
            Y = dag_zero_pad(g, X, c["pad"])
        elif kind == "slice":
            Y = X[c["index"][1:]]  # drop the batch dimension of the index
        elif kind == "flatten":
            Y = X.reshape(-1)
        elif kind == "shortcut_a":
            Y = dag_zero_pad(g, X[:, ::2, ::2], (0, 0, 0, 0, c["pad"], c["pad"]))
        else:
            raise AssertionError(kind)
        env[out] = Y
    return g, env["x"], env[model.ops[-1][0]]


# ----------------------------------------------------------------------------------------------------
# Random parameters
# ----------------------------------------------------------------------------------------------------


def randomize(model, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * scale)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.5)
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.25)
                if m.affine:
                    m.weight.copy_(torch.randn(n, generator=gen) * 0.7 + 0.5)  # some gamma negative
                    m.bias.copy_(torch.randn(n, generator=gen) * 0.5)
    return model.eval()


# ----------------------------------------------------------------------------------------------------
# The families
# ----------------------------------------------------------------------------------------------------


def mlp_with_skips():
    mods = {"l1": nn.Linear(5, 4), "l2": nn.Linear(4, 4), "bn2": nn.BatchNorm1d(4), "bn": nn.BatchNorm1d(4),
            "l3": nn.Linear(4, 3, bias=False), "l4": nn.Linear(7, 3), "l5": nn.Linear(3, 2)}
    ops = [
        ("h1", "mod", ["x"], {"m": "l1"}),
        ("r1", "relu", ["h1"], {}),
        ("h2", "conv_bn", ["r1"], {"conv": "l2", "bn": "bn2"}),  # linear + folded batch-norm
        ("r2", "relu", ["h2"], {}),
        ("s2", "add", ["r2", "r1"], {}),  # skip
        ("b", "mod", ["s2"], {"m": "bn"}),  # standalone batch-norm after an add
        ("h3", "mod", ["b"], {"m": "l3"}),
        ("r3", "relu", ["h3"], {}),
        ("c", "cat", ["r3", "s2"], {}),
        ("sc", "scale", ["c"], {"c": 0.5}),
        ("bc", "add_const", ["sc"], {"c": 0.25}),
        ("h4", "mod", ["bc"], {"m": "l4"}),
        ("r4", "relu", ["h4"], {}),
        ("s4", "add", ["r4", "r3"], {}),
        ("out", "mod", ["s4"], {"m": "l5"}),
    ]
    return DagNet(ops, mods), (5,)


def conv_pool(pool_op, in_shape=(1, 7, 7), c2_kernel=3):
    """conv (+ folded BN) -> ReLU -> pool -> conv -> ReLU -> flatten -> linear."""
    c_in = in_shape[0]
    mods = {"c1": nn.Conv2d(c_in, 2, 3, padding=1), "bn1": nn.BatchNorm2d(2),
            "c2": nn.Conv2d(2, 2, c2_kernel, padding=1)}
    mods.update(pool_op[1])
    ops = [("h1", "conv_bn", ["x"], {"conv": "c1", "bn": "bn1"}),
           ("r1", "relu", ["h1"], {}),
           ("p", *pool_op[0]),
           ("h2", "mod", ["p"], {"m": "c2"}),
           ("r2", "relu", ["h2"], {}),
           ("f", "flatten", ["r2"], {})]
    net = DagNet(ops, mods)
    with torch.no_grad():
        n = net(torch.zeros(1, *in_shape)).shape[1]
    net.mods["fc"] = nn.Linear(n, 2)
    net.ops = ops + [("out", "mod", ["f"], {"m": "fc"})]
    return net, in_shape


def pool_input_shape(name):
    """6x6 makes ``ceil_mode`` add a last (partial) window for the kernel-3 stride-2 pools; 7x7 does it for
    the kernel-2 "odd" pools and gives overlapping adaptive windows. ``maxpool_k2_s2_p1_ceil`` is the case
    where the extra ceil window would start in the padding and PyTorch drops it."""
    return (1, 7, 7) if ("odd" in name or "adaptive" in name) else (1, 6, 6)


def pool_variant(name):
    mod = {
        "maxpool_k3_s2_p1": nn.MaxPool2d(3, 2, 1),
        "maxpool_k3_s2_p1_ceil": nn.MaxPool2d(3, 2, 1, ceil_mode=True),
        "maxpool_k2_s2_p1_ceil": nn.MaxPool2d(2, 2, 1, ceil_mode=True),
        "maxpool_k2_s2_ceil_odd": nn.MaxPool2d(2, 2, 0, ceil_mode=True),
        "maxpool_k2_s1_dilation2": nn.MaxPool2d(2, 1, 0, dilation=2),
        "maxpool_k3_s2_p1_dilation2_ceil": nn.MaxPool2d(3, 2, 1, dilation=2, ceil_mode=True),
        "avgpool_k3_s2_p1_include_pad": nn.AvgPool2d(3, 2, 1, count_include_pad=True),
        "avgpool_k3_s2_p1_exclude_pad": nn.AvgPool2d(3, 2, 1, count_include_pad=False),
        "avgpool_k3_s2_p1_ceil_include_pad": nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=True),
        "avgpool_k3_s2_p1_ceil_exclude_pad": nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False),
        "avgpool_k2_s2_ceil_odd": nn.AvgPool2d(2, 2, 0, ceil_mode=True),
        "adaptive_avg_3x2": nn.AdaptiveAvgPool2d((3, 2)),
        "adaptive_avg_1": nn.AdaptiveAvgPool2d(1),
        "adaptive_max_3x3": nn.AdaptiveMaxPool2d(3),
        "adaptive_max_2x4": nn.AdaptiveMaxPool2d((2, 4)),
    }.get(name)
    if mod is not None:
        return ("mod", ["r1"], {"m": "pool"}), {"pool": mod}
    fn = {
        "F.max_pool2d_k3_s2_p1_ceil": ("maxpool_fn", dict(kernel_size=3, stride=2, padding=1, ceil_mode=True)),
        "F.max_pool2d_k2_default_stride": ("maxpool_fn", dict(kernel_size=2)),
        "F.avg_pool2d_k3_s2_p1_ceil_exclude_pad": ("avgpool_fn", dict(kernel_size=3, stride=2, padding=1,
                                                                      ceil_mode=True, count_include_pad=False)),
        "F.adaptive_avg_pool2d_3": ("adaptive_avg_fn", dict(size=3)),
    }[name]
    return (fn[0], ["r1"], fn[1]), {}


POOL_NAMES = [
    "maxpool_k3_s2_p1", "maxpool_k3_s2_p1_ceil", "maxpool_k2_s2_p1_ceil", "maxpool_k2_s2_ceil_odd",
    "maxpool_k2_s1_dilation2", "maxpool_k3_s2_p1_dilation2_ceil",
    "avgpool_k3_s2_p1_include_pad", "avgpool_k3_s2_p1_exclude_pad", "avgpool_k3_s2_p1_ceil_include_pad",
    "avgpool_k3_s2_p1_ceil_exclude_pad", "avgpool_k2_s2_ceil_odd",
    "adaptive_avg_3x2", "adaptive_avg_1", "adaptive_max_3x3", "adaptive_max_2x4",
    "F.max_pool2d_k3_s2_p1_ceil", "F.max_pool2d_k2_default_stride", "F.avg_pool2d_k3_s2_p1_ceil_exclude_pad",
    "F.adaptive_avg_pool2d_3",
]


def conv_hyperparameters():
    """Stride, padding, dilation, groups, rectangular kernels, no bias."""
    mods = {"c1": nn.Conv2d(4, 4, 3, stride=2, padding=2, dilation=2, groups=2),
            "c2": nn.Conv2d(4, 2, (2, 3), stride=(1, 2), padding=(1, 0), bias=False),
            "bn2": nn.BatchNorm2d(2), "fc": nn.Linear(2 * 4 * 1, 2)}
    ops = [("h1", "mod", ["x"], {"m": "c1"}),
           ("r1", "relu", ["h1"], {}),
           ("h2", "conv_bn", ["r1"], {"conv": "c2", "bn": "bn2"}),
           ("r2", "relu", ["h2"], {}),
           ("f", "flatten", ["r2"], {}),
           ("out", "mod", ["f"], {"m": "fc"})]
    return DagNet(ops, mods), (4, 6, 5)


def dense_concat():
    """DenseNet-style: concatenations, standalone batch-norms after a concat, average pooling."""
    mods = {"c1": nn.Conv2d(2, 2, 3, padding=1), "bn_a": nn.BatchNorm2d(4), "c2": nn.Conv2d(4, 2, 1),
            "bn_b": nn.BatchNorm2d(6, affine=False), "pool": nn.AvgPool2d(2, 2), "c3": nn.Conv2d(6, 2, 3, padding=1),
            "gap": nn.AdaptiveAvgPool2d(1), "flat": nn.Flatten(), "fc": nn.Linear(2, 2)}
    ops = [("h1", "mod", ["x"], {"m": "c1"}),
           ("r1", "relu", ["h1"], {}),
           ("k1", "cat", ["x", "r1"], {}),
           ("b1", "mod", ["k1"], {"m": "bn_a"}),
           ("s1", "relu", ["b1"], {}),
           ("h2", "mod", ["s1"], {"m": "c2"}),
           ("k2", "cat", ["x", "r1", "h2"], {}),
           ("b2", "mod", ["k2"], {"m": "bn_b"}),
           ("s2", "relu", ["b2"], {}),
           ("p", "mod", ["s2"], {"m": "pool"}),
           ("h3", "mod", ["p"], {"m": "c3"}),
           ("r3", "relu", ["h3"], {}),
           ("g", "mod", ["r3"], {"m": "gap"}),
           ("f", "mod", ["g"], {"m": "flat"}),
           ("out", "mod", ["f"], {"m": "fc"})]
    return DagNet(ops, mods), (2, 4, 4)


def unet(up):
    """Encoder/decoder: conv, max-pool, conv, upsampling, concatenation with the skip, 1x1 conv head
    (the output is a whole map)."""
    mods = {"e1": nn.Conv2d(2, 2, 3, padding=1), "e2": nn.Conv2d(2, 2, 3, padding=1), "head": nn.Conv2d(4, 2, 1)}
    if up == "nearest_module":
        up_op = ("mod", ["r2"], {"m": "up"})
        mods["up"] = nn.Upsample(scale_factor=2, mode="nearest")
    elif up == "bilinear_module":
        up_op = ("mod", ["r2"], {"m": "up"})
        mods["up"] = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
    elif up == "nearest_size":
        up_op = ("interp", ["r2"], dict(size=(6, 6), mode="nearest"))
    elif up == "bilinear_align_corners_size":
        up_op = ("interp", ["r2"], dict(size=(6, 6), mode="bilinear", align_corners=True))
    else:
        raise AssertionError(up)
    ops = [("h1", "mod", ["x"], {"m": "e1"}),
           ("r1", "relu", ["h1"], {}),
           ("d", "maxpool_fn", ["r1"], dict(kernel_size=2, stride=2)),
           ("h2", "mod", ["d"], {"m": "e2"}),
           ("r2", "relu", ["h2"], {}),
           ("u", *up_op),
           ("k", "cat", ["r1", "u"], {}),
           ("out", "mod", ["k"], {"m": "head"})]
    return DagNet(ops, mods), (2, 6, 6)


def pad_and_slice():
    """Zero padding (functional and module), strided slicing of space and channels."""
    mods = {"c1": nn.Conv2d(2, 3, 3, stride=2), "zp": nn.ZeroPad2d((0, 1, 1, 0)), "c2": nn.Conv2d(2, 2, 2),
            "fc": nn.Linear(2 * 1 * 3, 2)}
    ops = [("p", "pad", ["x"], {"pad": (1, 2, 0, 1)}),
           ("h1", "mod", ["p"], {"m": "c1"}),
           ("r1", "relu", ["h1"], {}),
           ("s", "slice", ["r1"], {"index": (slice(None), slice(None, None, 2), slice(1, None), slice(None))}),
           ("z", "mod", ["s"], {"m": "zp"}),
           ("h2", "mod", ["z"], {"m": "c2"}),
           ("r2", "relu", ["h2"], {}),
           ("f", "flatten", ["r2"], {}),
           ("out", "mod", ["f"], {"m": "fc"})]
    return DagNet(ops, mods), (2, 5, 5)


def resnet_block_option_a():
    """Stem conv+BN+ReLU, then a BasicBlock with stride 2 whose shortcut is option A
    (``x[:, :, ::2, ::2]`` then channel zero-padding), global average pooling, linear."""
    mods = {"c0": nn.Conv2d(1, 2, 3, padding=1, bias=False), "bn0": nn.BatchNorm2d(2),
            "c1": nn.Conv2d(2, 4, 3, stride=2, padding=1, bias=False), "bn1": nn.BatchNorm2d(4),
            "c2": nn.Conv2d(4, 4, 3, padding=1, bias=False), "bn2": nn.BatchNorm2d(4),
            "gap": nn.AdaptiveAvgPool2d(1), "fc": nn.Linear(4, 3)}
    ops = [("h0", "conv_bn", ["x"], {"conv": "c0", "bn": "bn0"}),
           ("r0", "relu", ["h0"], {}),
           ("h1", "conv_bn", ["r0"], {"conv": "c1", "bn": "bn1"}),
           ("r1", "relu", ["h1"], {}),
           ("h2", "conv_bn", ["r1"], {"conv": "c2", "bn": "bn2"}),
           ("sc", "shortcut_a", ["r0"], {"pad": 1}),
           ("a", "add", ["h2", "sc"], {}),
           ("r2", "relu", ["a"], {}),
           ("g", "mod", ["r2"], {"m": "gap"}),
           ("f", "flatten", ["g"], {}),
           ("out", "mod", ["f"], {"m": "fc"})]
    return DagNet(ops, mods), (1, 4, 4)


# ----------------------------------------------------------------------------------------------------
# The checks
# ----------------------------------------------------------------------------------------------------


def check_dag_computes_the_model(model, dag, inputs, outputs, shape, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((1,) + tuple(shape), generator=gen, dtype=torch.float64) * 2
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x)[0].numpy()
    val = dag.evaluate(x[0].numpy(), inputs)
    np.testing.assert_allclose(val[outputs], ref, rtol=1e-10, atol=1e-10)


def assert_path_norm_equals_enumeration(model, shape, assert_untouched, q=1, min_paths=50, seed=0):
    dag, inputs, outputs = build_dag(model, shape)
    check_dag_computes_the_model(model, dag, inputs, outputs, shape, seed)
    expected, count = dag.path_sum(outputs, q=q)
    assert count >= min_paths
    with assert_untouched(model):
        got = path_norm(model, shape, q=q, dtype=torch.float64)
    assert got.value == pytest.approx(expected, rel=REL), (got, expected, count)
    assert got.log10 == pytest.approx(math.log10(expected), rel=REL, abs=1e-12)
    return expected, count


def test_path_norm_equals_sum_over_paths_mlp_with_skips_batchnorm_and_biases(assert_untouched):
    for seed in range(3):
        model, shape = mlp_with_skips()
        randomize(model, seed)
        assert_path_norm_equals_enumeration(model, shape, assert_untouched, seed=seed)


def test_l2_path_norm_equals_sum_over_paths_of_squared_products_mlp(assert_untouched):
    for seed in range(3):
        model, shape = mlp_with_skips()
        randomize(model, 10 + seed)
        assert_path_norm_equals_enumeration(model, shape, assert_untouched, q=2, seed=seed)


def test_lq_path_norm_equals_sum_over_paths_of_qth_powers_conv_with_avg_pooling(assert_untouched):
    for name, q in (("avgpool_k3_s2_p1_ceil_exclude_pad", 2), ("avgpool_k3_s2_p1_include_pad", 3),
                    ("adaptive_avg_3x2", 2), ("maxpool_k3_s2_p1_ceil", 1.5)):
        model, shape = conv_pool(pool_variant(name), in_shape=(1, 5, 5))
        randomize(model, 7)
        assert_path_norm_equals_enumeration(model, shape, assert_untouched, q=q)


@pytest.mark.parametrize("pool", POOL_NAMES)
def test_path_norm_equals_sum_over_paths_conv_batchnorm_pooling(pool, assert_untouched):
    model, shape = conv_pool(pool_variant(pool), in_shape=pool_input_shape(pool))
    randomize(model, 1)
    assert_path_norm_equals_enumeration(model, shape, assert_untouched, min_paths=1000)


def test_path_norm_equals_sum_over_paths_conv_stride_padding_dilation_groups(assert_untouched):
    model, shape = conv_hyperparameters()
    randomize(model, 2)
    assert_path_norm_equals_enumeration(model, shape, assert_untouched, min_paths=1000)


def test_path_norm_equals_sum_over_paths_densenet_style_concat_and_standalone_batchnorm(assert_untouched):
    model, shape = dense_concat()
    randomize(model, 3)
    assert_path_norm_equals_enumeration(model, shape, assert_untouched, min_paths=1000)


@pytest.mark.parametrize("up", ["nearest_module", "bilinear_module", "nearest_size", "bilinear_align_corners_size"])
def test_path_norm_equals_sum_over_paths_unet_style_upsampling_and_concat(up, assert_untouched):
    model, shape = unet(up)
    randomize(model, 4)
    assert_path_norm_equals_enumeration(model, shape, assert_untouched, min_paths=1000)


def test_path_norm_equals_sum_over_paths_zero_padding_and_strided_slicing(assert_untouched):
    model, shape = pad_and_slice()
    randomize(model, 5)
    assert_path_norm_equals_enumeration(model, shape, assert_untouched, min_paths=100)


def test_path_norm_equals_sum_over_paths_resnet_block_with_option_a_shortcut(assert_untouched):
    model, shape = resnet_block_option_a()
    randomize(model, 6)
    assert_path_norm_equals_enumeration(model, shape, assert_untouched, min_paths=1000)


def test_path_norm_accepts_a_leading_batch_dimension_of_one_and_matches_enumeration(assert_untouched):
    model, shape = resnet_block_option_a()
    randomize(model, 8)
    expected, _ = assert_path_norm_equals_enumeration(model, shape, assert_untouched)
    with assert_untouched(model):
        assert path_norm(model, (1,) + shape, dtype=torch.float64).value == pytest.approx(expected, rel=REL)
