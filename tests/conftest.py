"""Shared fixtures of the test suite.

``assert_untouched(*models)``: a context manager (fixture) that fails the test when the code inside it
changed any of the given modules: a parameter or buffer (value, dtype, device, identity, requires_grad,
``.grad``), the ``training`` flag of any submodule, or any registered hook (forward, pre-forward,
backward, state-dict hooks, and the global module hooks). Every library call of the core tests runs
inside it: the library reads a user's model, it never modifies it.

``shared_path(*parts)``: the path of a file under the shared folder (``$PATHSALIENCY_SHARED``, default
``../shared``); when it is missing the test skips with the reason outside CI and fails under ``CI=true``.

NNCF builds a C++ extension on first use, which takes minutes on a cold 2-core machine and gives up after
60 s by default (``ExtensionLoaderTimeoutException``): the suite raises that limit before NNCF is imported.
"""
from __future__ import annotations

import contextlib
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.modules.module as _module_mod

os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "900")  # seconds; read when nncf loads its extension

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)  # two workers on two cores: one thread each (also far faster on a loaded machine)


@pytest.fixture
def one_thread():
    """One intra-op thread for a bit-exact comparison: with two, some CPU kernel sums in an order that
    varies from run to run (path_magnitude of a ResNet-18, group scores: results 2e-7 to 4e-7
    apart in about a third of the runs with two threads; never with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


_HOOK_ATTRS = (
    "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
    "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
)
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks", "_global_forward_hooks_always_called")


def _tensor_state(t: torch.Tensor):
    meta = t.device.type == "meta"
    value = None if meta else t.detach().clone()
    grad = None if t.grad is None else t.grad.detach().clone()
    return {"obj": t, "value": value, "dtype": t.dtype, "device": t.device, "shape": tuple(t.shape),
            "requires_grad": t.requires_grad, "grad": grad}


def _snapshot(model: nn.Module) -> dict:
    tensors = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        tensors["param:" + name] = _tensor_state(p)
    for name, b in model.named_buffers(remove_duplicate=False):
        tensors["buffer:" + name] = _tensor_state(b)
    sd_keys = list(model.state_dict(keep_vars=True).keys())
    training = {name: m.training for name, m in model.named_modules(remove_duplicate=False)}
    hooks = {}
    for name, m in model.named_modules(remove_duplicate=False):
        for attr in _HOOK_ATTRS:
            d = getattr(m, attr, None)
            if d is not None:
                hooks[(name, attr)] = list(d.items())
    return {"tensors": tensors, "sd_keys": sd_keys, "training": training, "hooks": hooks}


def _same_value(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point() or a.is_complex():
        return bool(torch.equal(a, b) or torch.allclose(a, b, rtol=0, atol=0, equal_nan=True))
    return bool(torch.equal(a, b))


def _compare(before: dict, model: nn.Module, label: str):
    after = _snapshot(model)
    problems = []
    if set(before["tensors"]) != set(after["tensors"]):
        problems.append(f"tensor names changed: {sorted(set(before['tensors']) ^ set(after['tensors']))}")
    for name, old in before["tensors"].items():
        new = after["tensors"].get(name)
        if new is None:
            continue
        if new["obj"] is not old["obj"]:
            problems.append(f"{name}: the tensor object was replaced")
        for key in ("dtype", "device", "shape", "requires_grad"):
            if new[key] != old[key]:
                problems.append(f"{name}: {key} changed from {old[key]} to {new[key]}")
        if old["value"] is not None and not _same_value(old["value"], new["value"]):
            problems.append(f"{name}: values changed")
        if not _same_value(old["grad"], new["grad"]):
            problems.append(f"{name}: .grad changed")
    if before["sd_keys"] != after["sd_keys"]:
        problems.append("state_dict keys changed")
    if before["training"] != after["training"]:
        changed = [k for k in before["training"] if after["training"].get(k) != before["training"][k]]
        problems.append(f"training flag changed on submodules {changed[:10]}")
    if before["hooks"] != after["hooks"]:
        changed = [k for k in set(before["hooks"]) | set(after["hooks"])
                   if before["hooks"].get(k) != after["hooks"].get(k)]
        problems.append(f"hooks changed: {changed[:10]}")
    if problems:
        pytest.fail(f"the library modified {label}:\n  " + "\n  ".join(problems))


@contextlib.contextmanager
def _untouched(*models):
    mods = [m for m in models if isinstance(m, nn.Module)]
    before = [_snapshot(m) for m in mods]
    global_hooks = {n: list(getattr(_module_mod, n, {}).items()) for n in _GLOBAL_HOOKS}
    yield
    for i, (m, snap) in enumerate(zip(mods, before)):
        _compare(snap, m, f"model argument {i} ({type(m).__name__})")
    now = {n: list(getattr(_module_mod, n, {}).items()) for n in _GLOBAL_HOOKS}
    if now != global_hooks:
        pytest.fail("the library changed the global module hooks")


@pytest.fixture
def assert_untouched():
    """``with assert_untouched(model, other): <library call>`` fails the test if a model changed."""
    return _untouched


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


@pytest.fixture
def shared_path():
    """``shared_path("data", "cifar10", "train.zip")``: that file of the shared folder; skips (outside CI)
    or fails (``CI=true``) with the reason when it is missing."""
    from pathlib import Path

    def get(*parts):
        path = Path(os.environ.get("PATHSALIENCY_SHARED", "../shared")).joinpath(*parts)
        if not path.exists():
            msg = (f"{path} missing (set PATHSALIENCY_SHARED to the shared folder; see shared/README.md)")
            if _in_ci():
                pytest.fail(msg)
            pytest.skip(msg)
        return path

    return get
