"""U-Net segmentor as used by CMEDL (the authors' PSIGAN-lineage U-Net, 13,394,242 parameters).

Recipe (reference/method_notes.md section 3.5): every block is a double ``conv3x3 -> BN -> ReLU``;
encoder ``inc(in -> 64)`` then four ``maxpool2 + double conv`` steps 64 -> 128 -> 256 -> 512 -> 512; decoder of
four steps, each ``bilinear x2 up-sampling (align_corners=True) -> concat(skip, up) -> double conv``:
1024 -> 256, 512 -> 128, 256 -> 64, 128 -> 64; a 1x1 classifier. No learnable up-sampling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cmedl.nets.blocks import Segmentor, conv_bn_relu, require_int

__all__ = ["UNet"]


class DoubleConv(nn.Sequential):
    """``(conv3x3 -> BN -> ReLU) x 2``."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            conv_bn_relu(in_channels, out_channels),
            conv_bn_relu(out_channels, out_channels),
        )


class Down(nn.Sequential):
    """``maxpool 2x2 -> DoubleConv``: halves H and W."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(nn.MaxPool2d(2), DoubleConv(in_channels, out_channels))


class Up(nn.Module):
    """Bilinear x2 up-sampling (``align_corners=True``), concatenation with the skip, DoubleConv.

    ``in_channels`` is the channel count after concatenation (skip + up-sampled).
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = DoubleConv(in_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=True)
        return self.conv(torch.cat([skip, x], dim=1))


class UNet(Segmentor):
    """2D U-Net with bilinear up-sampling and BatchNorm; defaults reproduce the paper's 13,394,242 parameters.

    Args:
        in_channels: image channels (1 for CT or MRI).
        num_classes: output classes (2: background, tumour).
        base_channels: width ``b`` of the first block (default 64). Encoder widths are
            ``b, 2b, 4b, 8b, 8b``; decoder widths ``4b, 2b, b, b``.

    Input size: ``x`` is ``(B, in_channels, H, W)`` with H and W multiples of 16 (four 2x2 poolings).
    Any other size raises ``ValueError``; pad or crop the input first.

    Output: raw logits ``(B, num_classes, H, W)``.

    Hints (``return_hints=True``): the outputs of the last two decoder blocks ``up3`` and ``up4`` (the
    paper's 128x128x64 and 256x256x64 at a 256x256 input):

    * ``h1``: ``(B, b, H/2, W/2)``, output of ``up3``;
    * ``h2``: ``(B, b, H, W)``, output of ``up4``, the classifier's input.

    ``hint_channels == (b, b)``.
    """

    name = "unet"
    size_divisor = 16

    def __init__(self, in_channels: int = 1, num_classes: int = 2, *, base_channels: int = 64) -> None:
        super().__init__(in_channels, num_classes)
        b = require_int("base_channels", base_channels)
        self._options = {"base_channels": b}

        self.inc = DoubleConv(self.in_channels, b)
        self.down1 = Down(b, 2 * b)
        self.down2 = Down(2 * b, 4 * b)
        self.down3 = Down(4 * b, 8 * b)
        self.down4 = Down(8 * b, 8 * b)
        self.up1 = Up(16 * b, 4 * b)
        self.up2 = Up(8 * b, 2 * b)
        self.up3 = Up(4 * b, b)
        self.up4 = Up(2 * b, b)
        self.outc = nn.Conv2d(b, self.num_classes, kernel_size=1)
        self.hint_channels = (b, b)

    def encoder_modules(self) -> list[nn.Module]:
        """``inc`` and the four down steps (``down4`` is the bottleneck); the up steps and classifier: the decoder."""
        return [self.inc, self.down1, self.down2, self.down3, self.down4]

    def forward(
        self, x: torch.Tensor, return_hints: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        self.check_input(x)
        x1 = self.inc(x)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        x4 = self.down3(x3)
        x5 = self.down4(x4)
        y = self.up1(x5, x4)
        y = self.up2(y, x3)
        h1 = self.up3(y, x2)
        h2 = self.up4(h1, x1)
        logits = self.outc(h2)
        if return_hints:
            return logits, [h1, h2]
        return logits
