"""Segmentation networks of the CMEDL engine, built by name.

>>> net = build_segmentor("unet", in_channels=1, num_classes=2)
>>> count_parameters(net)
13394242

``net(x)`` maps ``(B, in_channels, H, W)`` to raw logits ``(B, num_classes, H, W)``;
``net(x, return_hints=True)`` returns ``(logits, [h1, h2])``, the pre-classifier features of the last two
layers used by the hint loss (``net.hint_channels`` gives their channel counts). ``net.config`` holds the
plain, JSON-serialisable arguments that rebuild the architecture: ``build_segmentor(**net.config)``.

With default options the parameter counts (1 input channel, 2 classes) are those of the CMEDL paper:
U-Net 13,394,242; FC-DenseNet57 1,374,194; incremental MRRN 38,916,418.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from cmedl.errors import ConfigError
from cmedl.nets.blocks import Segmentor
from cmedl.nets.densefcn import DenseFCN
from cmedl.nets.mrrn import MRRN
from cmedl.nets.threshold import IntensityThreshold
from cmedl.nets.unet import UNet

__all__ = [
    "SEGMENTOR_NAMES",
    "DenseFCN",
    "IntensityThreshold",
    "MRRN",
    "Segmentor",
    "UNet",
    "build_segmentor",
    "count_parameters",
]

_TRAINABLE: dict[str, type[Segmentor]] = {cls.name: cls for cls in (UNet, DenseFCN, MRRN)}
# The threshold network is fixed and only checks geometry; it is built from model files but never trained.
_SEGMENTORS: dict[str, type[Segmentor]] = {**_TRAINABLE, IntensityThreshold.name: IntensityThreshold}

#: the trainable architectures (the paper's three)
SEGMENTOR_NAMES: tuple[str, ...] = tuple(_TRAINABLE)


def _option_names(cls: type[Segmentor]) -> list[str]:
    parameters = inspect.signature(cls.__init__).parameters.values()
    return [p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY]


def build_segmentor(name: str, in_channels: int = 1, num_classes: int = 2, **options: Any) -> Segmentor:
    """Build the segmentor ``name`` (one of :data:`SEGMENTOR_NAMES`, or ``"threshold"``).

    ``options`` are the architecture's width options (plain JSON values), for example ``base_channels``
    for ``"unet"`` (default 64) and ``"mrrn"`` (default 32), or ``growth_rate``, ``stem_channels``,
    ``layers_per_block``, ``bottleneck_layers`` and ``dropout`` for ``"densefcn"``. ``"threshold"`` is a
    fixed intensity threshold (options ``level``, ``sharpness``) used to check geometry in tests.

    Raises:
        ConfigError: unknown name, unknown option, or an option value of the wrong type or range.
    """
    cls = _SEGMENTORS.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ConfigError(f"unknown segmentor {name!r}; valid names: {', '.join(_SEGMENTORS)}")
    allowed = _option_names(cls)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(
            f"unknown option(s) for segmentor {name!r}: {', '.join(unknown)}; valid options: {', '.join(allowed)}"
        )
    return cls(in_channels, num_classes, **options)


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters (``requires_grad``) of ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
