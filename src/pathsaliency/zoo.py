"""Model specifications of the command line: ``torchvision:<name>``, ``cifar:<name>``, ``module:function``.

Checkpoints load with ``torch.load(..., weights_only=True)``: no pickled code runs unless the caller
passes ``trust_checkpoint=True`` (the command's ``--trust-checkpoint``).
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import torch
import torch.nn as nn

from .models.cifar_resnet import _strip_state_dict, load_cifar_resnet


def default_input_shape(spec: str):
    kind, _, name = spec.partition(":")
    if kind == "cifar":
        return (3, 32, 32)
    if kind == "torchvision":
        return (3, 299, 299) if name == "inception_v3" else (3, 224, 224)
    return None


def load_checkpoint(path, trust: bool = False):
    """A state dict from ``path`` (bare, or under ``state_dict`` / ``model``; ``module.`` stripped), or
    a whole pickled module when ``trust`` is True."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trust)
    except Exception as exc:  # noqa: BLE001 - the unpickler raises many kinds
        if not trust:
            raise ValueError(f"{path}: could not be loaded with weights_only=True ({exc}). If it contains pickled "
                             "code that you trust, pass --trust-checkpoint") from exc
        raise
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    return _strip_state_dict(obj)


def load_model(spec: str, checkpoint=None, trust_checkpoint=False, pretrained=False) -> nn.Module:
    """Build the model a specification names (in eval mode)."""
    kind, sep, name = spec.partition(":")
    if not sep or not name:
        raise ValueError(f"model '{spec}': expected torchvision:<name>, cifar:<name> or <module>:<function>")
    if kind == "cifar":
        model = load_cifar_resnet(name, checkpoint)
        return model.eval()
    if kind == "torchvision":
        import torchvision

        kw = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") and not pretrained else {}
        model = torchvision.models.get_model(name, weights="DEFAULT" if pretrained else None, **kw)
    else:
        if str(Path.cwd()) not in sys.path:
            sys.path.insert(0, str(Path.cwd()))
        factory = getattr(importlib.import_module(kind), name)
        model = factory()
    if checkpoint is not None:
        obj = load_checkpoint(checkpoint, trust_checkpoint)
        if isinstance(obj, nn.Module):
            model = obj
        else:
            model.load_state_dict(obj)
    return model.eval()
