"""Choosing the compute device and the mixed-precision mode."""

from __future__ import annotations

import contextlib

import torch

from cmedl.errors import InputError


def resolve_device(requested: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a usable GPU is an error.

    Apple's MPS is never chosen automatically: several operations the networks use are missing or
    slow there, and a silent fallback would be worse than the CPU.
    """
    requested = (requested or "auto").lower()
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cpu":
        return torch.device("cpu")
    if requested.startswith("cuda") or requested == "gpu":
        if not torch.cuda.is_available():
            raise InputError("a GPU was asked for but CUDA is not available here; use device cpu")
        return torch.device("cuda" if requested == "gpu" else requested)
    raise InputError(f"unknown device {requested!r}; use auto, cpu or cuda")


def autocast_dtype(device: torch.device, mode: str = "auto") -> torch.dtype | None:
    """The autocast dtype for ``mode`` (auto/off/bf16/fp16) on ``device``; None means full fp32.

    Mixed precision is used on CUDA only: ``auto`` picks bf16 where the GPU supports it, else fp16.
    """
    if device.type != "cuda" or mode == "off":
        return None
    if mode == "fp16":
        return torch.float16
    if mode == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """A context manager running the forward pass in ``dtype`` (a no-op when ``dtype`` is None)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
