"""A fixed intensity threshold written as a segmentor: the reference network for geometry and self-tests.

It is not a tumour model. It marks every pixel brighter than a level, so a test that places a bright block
at known voxels can check that the whole pipeline (export from Slicer, resampling, patches, blending,
writing back on the input grid, import as a segment) puts the mask exactly where the block is.
"""

from __future__ import annotations

import torch
from torch import nn

from cmedl.errors import ConfigError
from cmedl.nets.blocks import Segmentor


class IntensityThreshold(Segmentor):
    """Segments the pixels whose (normalised) input value is above ``level``.

    Args:
        in_channels: image channels; only the first is used.
        num_classes: output classes; class 1 is "above the level", every other class gets logit 0.
        level: threshold in the network's input units (CT normalised to [-1, 1] over the model's HU window).
        sharpness: slope of the logit around the level; large values give a hard threshold.

    Input ``(B, in_channels, H, W)``, any H and W. Output: logits ``(B, num_classes, H, W)`` with class 0 at
    0 and class 1 at ``sharpness * (x - level)``. Hints (``return_hints=True``): the input itself, twice.
    """

    name = "threshold"

    def __init__(self, in_channels: int, num_classes: int, *, level: float = 0.0, sharpness: float = 50.0) -> None:
        super().__init__(in_channels, num_classes)
        if num_classes < 2:
            raise ConfigError("the threshold network needs at least 2 classes (background and foreground)")
        for option, value in (("level", level), ("sharpness", sharpness)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{option} must be a number, got {value!r}")
        self._options = {"level": float(level), "sharpness": float(sharpness)}
        self.hint_channels = (in_channels, in_channels)
        # A 1x1 convolution holds the threshold so the network saves and loads like any other model file.
        self.classifier = nn.Conv2d(in_channels, num_classes, kernel_size=1)
        with torch.no_grad():
            self.classifier.weight.zero_()
            self.classifier.bias.zero_()
            self.classifier.weight[1, 0] = float(sharpness)
            self.classifier.bias[1] = -float(sharpness) * float(level)

    def forward(
        self, x: torch.Tensor, return_hints: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        self.check_input(x)
        logits = self.classifier(x)
        if return_hints:
            return logits, [x, x]
        return logits
