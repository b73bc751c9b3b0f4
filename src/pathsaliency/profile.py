"""One forward and one backward of the path-norm pass for one model state, cached.

Saliencies and per-layer distances both read it: the activation ``fwd(v)`` of every node, the
derivative ``bwd(v)`` of the total output by it (the sum over path suffixes from ``v``), and per affine
step the per-channel ``sum fwd * bwd`` relative to the norm. It is cached per model under the token of
the model's capture and parameter values (:meth:`pathsaliency.lifting.Lifted.verify`), so any change to
the model's structure or values computes it again.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn as nn

from .interpreter import norm_pass
from .scaled import detach
from .steps import ConvStep, Weights


class Profile:
    """One forward and one backward of the path-norm pass for one model state: the cached activations
    (for removal passes), the derivative of the output by every node, and per affine step and channel
    ``sum fwd(v) * bwd(v) / ||Phi||`` (``channel_loss``: every path through the neurons) and
    ``|b| * bwd(v) / ||Phi||`` (``bias_loss``: the paths that start at their bias)."""

    def __init__(self, lifted, model, shape, dtype):
        plan = lifted.plan
        self.weights = lifted.absolute(model, dtype)
        self._removal_weights = None
        outs = {}
        with torch.enable_grad():
            log2, env = norm_pass(plan, self.weights, shape, dtype=dtype, device=lifted.device, retain=outs)
            total = env[plan.output].t.sum(dtype=torch.float64)
            grads = torch.autograd.grad(total, list(outs.values()), allow_unused=True) if outs else []
        self.log2_norm = float(log2.detach()[0])
        self.cache = {n: detach(v) for n, v in env.items()}
        self.grads = {n: (g if g is not None else torch.zeros_like(t)) for (n, t), g in zip(outs.items(), grads)}
        self.channel_loss, self.bias_loss = {}, {}
        for node, g in self.grads.items():
            if node not in plan.affine:
                continue
            step, t = plan.affine[node], outs[node]
            prod = (t.detach() * g).to(torch.float64)
            dim = step.channel_dim % prod.dim()
            others = [d for d in range(prod.dim()) if d != dim]
            self.channel_loss[node] = prod.sum(others) / total.detach()
            b = self.weights[node].b
            if b is not None:  # the bias enters the raw tensor as b * 2**-e
                scale = torch.exp2(-self.cache[node].e.to(torch.float64))
                per_channel = g.to(torch.float64).sum(others) if others else g.to(torch.float64)
                self.bias_loss[node] = b.to(torch.float64) * scale * per_channel / total.detach()
            else:
                self.bias_loss[node] = torch.zeros_like(self.channel_loss[node])


    def removal_weights(self, plan) -> dict:
        """The weights for removal passes: on a CPU every 2-d convolution's in the channels-last layout
        (batched convolutions run 1.2-3.4x faster so on this project's CPU, 1x1 ones most; the same
        values), built once per profile; elsewhere :attr:`weights` itself."""
        if self._removal_weights is None:
            out = dict(self.weights)
            for node, wts in self.weights.items():
                if (isinstance(plan.affine[node], ConvStep) and wts.w.dim() == 4 and wts.w.device.type == "cpu"):
                    out[node] = Weights(wts.w.contiguous(memory_format=torch.channels_last), wts.b)
            self._removal_weights = out
        return self._removal_weights


_PROFILES: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def profile(model, lifted, shape, dtype) -> Profile:
    lifted.verify(model)
    key = (lifted.state, shape, dtype)
    hit = _PROFILES.get(model)
    if hit is not None and hit[0] == key:
        return hit[1]
    prof = Profile(lifted, model, shape, dtype)
    _PROFILES[model] = (key, prof)
    return prof
