"""Model specifications of the command line: ``torchvision:<name>``, ``cifar:<name>``, ``<module>:<function>``.

:func:`load_model` builds the model a specification names, in eval mode, with torch's random generator
seeded by ``seed`` while it builds (so random weights are reproducible), then loads ``checkpoint`` with
:func:`pathsaliency.checkpoint.load_checkpoint`: weights only, unless ``trust_checkpoint`` (then a whole
pickled module replaces the built one). Every bad specification or checkpoint raises ``ValueError`` (or
``FileNotFoundError``) with one line saying what is wrong. :func:`weights_source` says where the weights
came from, and whether they may be random. Each kind is one entry of :data:`SOURCES` (how it builds,
its default input shape, where its weights come from); any other kind names a user factory.
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path


import torch
import torch.nn as nn

from .checkpoint import load_checkpoint, load_state_dict, one_line
from .models import cifar_resnet

SPEC_HELP = "torchvision:<name>, cifar:resnet20|resnet32|resnet44|resnet56, or <module>:<function>"


class _Source:
    """How one kind of specification (the part before ``:``) builds its models; the base class is a
    user factory ``<module>:<function>``."""

    pretrained_ok = False  # whether ``--pretrained`` means something for this kind

    def input_shape(self, name):
        return None

    def build(self, spec, kind, name, pretrained, packaged):
        if str(Path.cwd()) not in sys.path:
            sys.path.insert(0, str(Path.cwd()))
        try:
            module = importlib.import_module(kind)
        except Exception as exc:  # noqa: BLE001 - importing user code can raise anything
            raise ValueError(f"model '{spec}': module {kind!r} does not import ({one_line(exc)}); run from the "
                             f"folder that holds {kind.replace('.', '/')}.py or add that folder to PYTHONPATH") from None
        factory = getattr(module, name, None)
        if not callable(factory):
            raise ValueError(f"model '{spec}': module {kind!r} has no function {name!r}")
        try:
            model = factory()
        except Exception as exc:  # noqa: BLE001 - the user's factory can raise anything
            raise ValueError(f"model '{spec}': {kind}.{name}() raised {one_line(exc)}") from None
        if not isinstance(model, nn.Module):
            raise ValueError(f"model '{spec}': {kind}.{name}() returned a {type(model).__name__}, not a "
                             "torch.nn.Module")
        return model

    def weights(self, pretrained, seed):
        return (f"the weights the factory builds, with no --checkpoint: random unless it loads some (torch seed "
                f"{seed})", True)


class _Cifar(_Source):
    def input_shape(self, name):
        return (3, 32, 32)

    def build(self, spec, kind, name, pretrained, packaged):
        if name not in cifar_resnet._DEPTHS:
            raise ValueError(f"model '{spec}': unknown CIFAR ResNet {name!r}; choose from {sorted(cifar_resnet._DEPTHS)}")
        return cifar_resnet.load_cifar_resnet(name) if packaged else getattr(cifar_resnet, name)()

    def weights(self, pretrained, seed):
        return "the pretrained CIFAR-10 weights of pathsaliency (packaged, or from $PATHSALIENCY_SHARED)", False


class _Torchvision(_Source):
    pretrained_ok = True

    def input_shape(self, name):
        return (3, 299, 299) if name == "inception_v3" else (3, 224, 224)

    def build(self, spec, kind, name, pretrained, packaged):
        import torchvision

        if name not in torchvision.models.list_models():
            raise ValueError(f"model '{spec}': torchvision has no model {name!r} (see torchvision.models.list_models())")
        kw = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") and not pretrained else {}
        try:
            return torchvision.models.get_model(name, weights="DEFAULT" if pretrained else None, **kw)
        except (OSError, RuntimeError) as exc:  # no network, a broken download
            raise ValueError(f"model '{spec}': could not get the pretrained weights ({one_line(exc)})") from None

    def weights(self, pretrained, seed):
        if pretrained:
            return "torchvision's default pretrained weights", False
        return f"RANDOM weights (torch seed {seed}): pass --checkpoint FILE or --pretrained for trained ones", True


SOURCES = {"cifar": _Cifar(), "torchvision": _Torchvision()}  # any other kind: a user factory
_FACTORY = _Source()


def _source(spec: str):
    kind = spec.partition(":")[0]
    return SOURCES.get(kind, _FACTORY)


def default_input_shape(spec: str):
    """The input shape (without batch) that the models of ``spec`` take by default; None if unknown."""
    return _source(spec).input_shape(spec.partition(":")[2])


def load_model(spec: str, checkpoint=None, trust_checkpoint: bool = False, pretrained: bool = False,
               seed: int = 0) -> nn.Module:
    """Build the model ``spec`` names (in eval mode); see the module docstring."""
    kind, sep, name = spec.partition(":")
    if not sep or not kind or not name:
        raise ValueError(f"model '{spec}': expected {SPEC_HELP}")
    source = _source(spec)
    if pretrained and not source.pretrained_ok:
        raise ValueError(f"model '{spec}': --pretrained is for torchvision models (cifar: loads its pretrained "
                         "weights by default; other models: pass --checkpoint)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = source.build(spec, kind, name, pretrained, packaged=checkpoint is None)
    if checkpoint is not None:
        obj = load_checkpoint(checkpoint, trust_checkpoint)
        model = obj if isinstance(obj, nn.Module) else load_state_dict(model, obj, checkpoint, spec)
    return model.eval()


def weights_source(spec: str, checkpoint=None, pretrained: bool = False, seed: int = 0):
    """``(where the weights of load_model(spec, checkpoint, pretrained=pretrained, seed=seed) come from,
    whether they may be random)``."""
    if checkpoint is not None:
        return f"checkpoint {checkpoint}", False
    return _source(spec).weights(pretrained, seed)
