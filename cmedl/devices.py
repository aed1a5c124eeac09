"""The compute devices a user can choose, choosing one, and the mixed-precision mode.

:data:`DEVICE_CHOICES` is the one list of device names (with the label a person reads) that the command line's
``--device``, the configurations and both Slicer panels offer. Importing this module does not import torch:
the panels list the devices before torch is installed, and torch is imported where a device is resolved.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from cmedl.errors import InputError

if TYPE_CHECKING:
    import torch

# (label, name): auto first, as it is every default.
DEVICE_CHOICES: tuple[tuple[str, str], ...] = (("Auto", "auto"), ("GPU (CUDA)", "cuda"), ("CPU", "cpu"))
DEVICES: tuple[str, ...] = tuple(name for _, name in DEVICE_CHOICES)
DEFAULT_DEVICE = DEVICES[0]


def is_device_name(name: str, indexed: bool = True) -> bool:
    """Whether ``name`` is one of :data:`DEVICES` or, when ``indexed``, ``cuda:N`` (one GPU of several)."""
    name = str(name).lower()
    return name in DEVICES or (indexed and name.startswith("cuda:") and name[5:].isdigit())


def resolve_device(requested: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a usable GPU is an error.

    Apple's MPS is never chosen automatically: several operations the networks use are missing or
    slow there, and a silent fallback would be worse than the CPU.
    """
    import torch

    requested = (requested or DEFAULT_DEVICE).lower()
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cpu":
        return torch.device("cpu")
    if requested.startswith("cuda") or requested == "gpu":
        if not torch.cuda.is_available():
            raise InputError("a GPU was asked for but CUDA is not available here; use device cpu")
        return torch.device("cuda" if requested == "gpu" else requested)
    raise InputError(f"unknown device {requested!r}; use {', '.join(DEVICES)}")


def autocast_dtype(
    device: torch.device, mode: str = "auto", cpu_flags: frozenset[str] | None = None
) -> torch.dtype | None:
    """The autocast dtype for ``mode`` (auto/off/bf16/fp16) on ``device``; None means full fp32.

    ``auto`` takes reduced precision only where the hardware computes it natively: on CUDA bf16 where the GPU
    supports it, else fp16; on a CPU bf16 when its flags (``cpu_flags``, default ``/proc/cpuinfo``) include
    AVX512-BF16 or AMX (:func:`cmedl.cpu.native_bf16_flags`), else fp32. Without them a CPU emulates bf16,
    several times slower than fp32. On a CPU ``bf16`` forces bf16, and ``fp16`` gives fp32 (a CPU has no
    fast fp16 arithmetic, and fp16 would need loss scaling for nothing).
    """
    import torch

    if mode == "off":
        return None
    if device.type == "cuda":
        if mode == "fp16":
            return torch.float16
        if mode == "bf16" or torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16
    if device.type == "cpu":
        from cmedl.cpu import native_bf16_flags

        if mode == "bf16" or (mode == "auto" and native_bf16_flags(cpu_flags)):
            return torch.bfloat16
    return None


def precision_name(dtype: torch.dtype | None) -> str:
    """``fp32`` for no autocast (None), else ``bf16`` or ``fp16``: how summaries and logs name a precision."""
    if dtype is None:
        return "fp32"
    return "bf16" if str(dtype) == "torch.bfloat16" else "fp16"


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """A context manager running the forward pass in ``dtype`` (a no-op when ``dtype`` is None)."""
    if dtype is None:
        return contextlib.nullcontext()
    import torch

    return torch.autocast(device.type, dtype=dtype)
