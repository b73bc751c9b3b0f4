"""Checkpoint files: the one loader of the package.

Contract. ``torch.load`` runs with ``weights_only=True`` unless the caller trusts the file
(``trust=True``, the command's ``--trust-checkpoint``), so no pickled code runs by default. Every failure
is a :class:`CheckpointError` (a ``ValueError``) or ``FileNotFoundError`` with a one-line message that
names the file and says what is wrong with it:

- missing file, a folder, a truncated or corrupt file, a file that is not a torch checkpoint;
- a file holding pickled code (a whole ``torch.save(model)``, or any other global) without ``trust``:
  refused, naming the first global it would have run, and how to load it if its code is trusted;
- a state dict whose keys or shapes do not match the model (:func:`load_state_dict`).

:func:`load_checkpoint` accepts a state dict, one under ``"state_dict"`` or ``"model"``, with the
``module.`` prefix of ``DataParallel`` stripped, or (trusted only) a whole pickled ``nn.Module``.
"""
from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Dict, Union

import torch
import torch.nn as nn

__all__ = ["CheckpointError", "torch_load", "load_checkpoint", "load_state_dict", "one_line"]

TRUST_HINT = "--trust-checkpoint (trust=True in Python)"


class CheckpointError(ValueError):
    """A checkpoint file cannot be loaded as asked; the message is one line naming the file."""


def one_line(exc: BaseException) -> str:
    """``Type: first sentence`` of an exception raised by code we call (torch, the user's)."""
    text = str(exc).strip().split("\n", 1)[0].split(". ", 1)[0].rstrip(".")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def torch_load(source, trust: bool = False, what: str = "checkpoint"):
    """``torch.load(source, map_location="cpu", weights_only=not trust)`` with one-line errors.

    ``source`` is a path or an ``importlib.resources`` file; ``what`` names it in messages."""
    if isinstance(source, (str, Path)):
        source = Path(source)
    if not source.is_file():
        if isinstance(source, Path) and source.is_dir():
            raise CheckpointError(f"{what} {source} is a folder, not a file")
        raise FileNotFoundError(f"{what} {source}: no such file")
    try:
        with source.open("rb") as f:
            return torch.load(f, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if not trust and found:
            raise CheckpointError(
                f"{what} {source} refused: it holds pickled code ({found.group(1)}), which a weights-only load "
                f"does not run; pass {TRUST_HINT} to load it, only if you trust the code in this file") from None
        raise CheckpointError(f"{what} {source} is not a readable torch checkpoint (truncated or corrupt?): "
                              f"{one_line(exc)}") from None
    except (RuntimeError, EOFError, KeyError, ValueError, OSError) as exc:
        raise CheckpointError(f"{what} {source} is not a readable torch checkpoint (truncated or corrupt?): "
                              f"{one_line(exc)}") from None
    except (ImportError, AttributeError) as exc:  # trusted unpickling of a class that does not import
        raise CheckpointError(f"{what} {source}: its pickled code does not import here ({one_line(exc)}); run "
                              "from the folder that holds that code, or add it to PYTHONPATH") from None


def load_checkpoint(source, trust: bool = False) -> Union[Dict[str, torch.Tensor], nn.Module]:
    """The state dict in ``source`` (bare, or under ``"state_dict"`` / ``"model"``; ``module.`` stripped),
    or, with ``trust``, the whole pickled module it holds."""
    obj = torch_load(source, trust)
    if isinstance(obj, nn.Module):
        return obj
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), (dict, nn.Module)):
            obj = obj[key]
            break
    if isinstance(obj, nn.Module):
        return obj
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) and torch.is_tensor(v)
                                                         for k, v in obj.items()):
        raise CheckpointError(f"checkpoint {source}: expected a state dict (name -> tensor), possibly under "
                              f"'state_dict' or 'model', or a whole module with {TRUST_HINT}; got "
                              f"{_describe(obj)}")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}


def _describe(obj) -> str:
    if isinstance(obj, dict):
        keys = list(obj)[:3]
        return f"a dict with keys {keys}{' ...' if len(obj) > 3 else ''}" if obj else "an empty dict"
    return f"a {type(obj).__name__}"


def _names(names) -> str:
    names = sorted(names)
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def load_state_dict(model: nn.Module, state: Dict[str, torch.Tensor], source, target: str) -> nn.Module:
    """``model.load_state_dict(state, strict=True)``, after checking keys and shapes so that a mismatch is
    one line: the missing keys (but batch-norm's ``num_batches_tracked``, which torch fills in), the unexpected ones, the first shape that differs. ``target`` names the model.
    Nothing is loaded when the check fails."""
    expected = model.state_dict()
    missing, extra = expected.keys() - state.keys(), state.keys() - expected.keys()
    missing = {k for k in missing if not k.endswith("num_batches_tracked")}  # batch-norm fills it, as in torch
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} key(s) ({_names(missing)})")
    if extra:
        problems.append(f"{len(extra)} unexpected key(s) ({_names(extra)})")
    for name in sorted(expected.keys() & state.keys()):
        if tuple(state[name].shape) != tuple(expected[name].shape):
            problems.append(f"{name} has shape {tuple(state[name].shape)}, the model's is "
                            f"{tuple(expected[name].shape)}")
            break
    if problems:
        raise CheckpointError(f"checkpoint {source} is not a state dict of {target}: {'; '.join(problems)}")
    model.load_state_dict(state, strict=True)
    return model
