"""``ModelState``: whether a model's parameters are still those an importance's cache was built from."""
from __future__ import annotations

import weakref

import torch


class ModelState:
    """Remembers one model (weakly) and a private copy of its parameters' names, shapes and values;
    :meth:`same` says whether a model is that model with those parameters (torch-pruning prunes in place
    between ``MetaPruner`` steps, and ``.data`` writes change no version counter: values are compared)."""

    def __init__(self):
        self._model, self._values = None, None

    @staticmethod
    def _snapshot(model):
        return [(n, p.detach()) for n, p in model.named_parameters()]

    def same(self, model) -> bool:
        if self._model is None or self._model() is not model:
            return False
        now = self._snapshot(model)
        return len(now) == len(self._values) and all(
            na == nb and va.shape == vb.shape and torch.equal(va, vb) for (na, va), (nb, vb) in zip(now, self._values))

    def remember(self, model):
        self._model = weakref.ref(model)
        self._values = [(n, v.clone()) for n, v in self._snapshot(model)]
