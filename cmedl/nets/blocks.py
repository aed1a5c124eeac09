"""Building blocks shared by the segmentation networks.

Holds the common segmentor contract (:class:`Segmentor`), option checks that raise
:class:`cmedl.errors.ConfigError`, and small layer builders (``conv3x3 -> BatchNorm -> ReLU``).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn

from cmedl.errors import ConfigError

__all__ = [
    "Segmentor",
    "conv_bn_relu",
    "require_int",
    "require_probability",
]


def require_int(name: str, value: Any, minimum: int = 1) -> int:
    """Return ``value`` if it is a plain ``int`` (not ``bool``) of at least ``minimum``, else raise ConfigError."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value}")
    return int(value)


def require_probability(name: str, value: Any) -> float:
    """Return ``value`` as ``float`` if it is a number in ``[0, 1)``, else raise ConfigError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number in [0, 1), got {value!r}")
    value = float(value)
    if not math.isfinite(value) or not 0.0 <= value < 1.0:
        raise ConfigError(f"{name} must be a number in [0, 1), got {value}")
    return value


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 3) -> nn.Sequential:
    """``Conv2d(kernel_size, 'same' padding, bias) -> BatchNorm2d -> ReLU``."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=True),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class Segmentor(nn.Module):
    """Common contract of the CMEDL segmentors (U-Net, FC-DenseNet, MRRN).

    ``forward(x)`` takes a float tensor ``(B, in_channels, H, W)`` and returns raw logits
    ``(B, num_classes, H, W)`` (no softmax). ``forward(x, return_hints=True)`` returns
    ``(logits, [h1, h2])``: the features of the network's last two layers before the classifier, used by
    the hint (distillation) loss. Their channel counts are :attr:`hint_channels`.

    ``H`` and ``W`` must be multiples of :attr:`size_divisor`; any other size raises ``ValueError``
    (pad or crop the input first). :attr:`config` is a JSON-serialisable dict such that
    ``build_segmentor(**net.config)`` builds the same architecture again.
    """

    #: registry name, set by each subclass
    name: ClassVar[str] = ""
    #: H and W must be multiples of this
    size_divisor: ClassVar[int] = 1

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.in_channels = require_int("in_channels", in_channels)
        self.num_classes = require_int("num_classes", num_classes)
        self.hint_channels: tuple[int, int] = (0, 0)
        self._options: dict[str, Any] = {}

    @property
    def config(self) -> dict[str, Any]:
        """Plain, JSON-serialisable arguments that rebuild this architecture via ``build_segmentor(**config)``."""
        return {
            "name": self.name,
            "in_channels": self.in_channels,
            "num_classes": self.num_classes,
            **self._options,
        }

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``x`` is ``(B, in_channels, H, W)`` with H, W multiples of size_divisor."""
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{type(self).__name__} expects a tensor (B, C, H, W), got {shape}")
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__} was built for {self.in_channels} input channel(s), "
                f"got a tensor with {x.shape[1]}"
            )
        height, width = int(x.shape[2]), int(x.shape[3])
        d = self.size_divisor
        if height % d or width % d or height == 0 or width == 0:
            raise ValueError(
                f"{type(self).__name__} needs H and W to be positive multiples of {d}, got {height}x{width}; "
                f"pad or crop the input (for example to {max(d, -(-height // d) * d)}x{max(d, -(-width // d) * d)})"
            )

    def encoder_modules(self) -> list[nn.Module]:
        """The modules of the encoder (the contracting path, down to and including the deepest block).

        Each trainable architecture names its own; fine-tuning can freeze them while the decoder adapts.
        """
        raise NotImplementedError(f"{type(self).__name__} does not name its encoder")

    def encoder_parameters(self) -> list[nn.Parameter]:
        """The parameters of :meth:`encoder_modules`, in module order (what ``freeze_encoder_epochs`` holds still)."""
        return [parameter for module in self.encoder_modules() for parameter in module.parameters()]

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self.config.items() if key != "name")
