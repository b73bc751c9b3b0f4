"""float32 means float32: no TF32 inside the library's passes on a GPU.

On Ampere and later GPUs PyTorch lets cuDNN compute float32 convolutions in TF32 by default (inputs
rounded to 10 mantissa bits, about 1e-3 relative error per layer), which would put the float32
path-norm of a ResNet-50 off in its third digit instead of its seventh. The public computations run
inside :func:`ieee_float32`, which asks for IEEE float32 convolutions and matmuls and restores the
caller's settings afterwards (process-wide flags: not for concurrent threads that want TF32). CPU
results are unaffected.
"""
from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def ieee_float32():
    """Context manager and decorator: float32 convolutions and matmuls in IEEE float32 on CUDA."""
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    before = conv.fp32_precision, matmul.fp32_precision
    conv.fp32_precision = matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        conv.fp32_precision, matmul.fp32_precision = before
