"""FC-DenseNet57 ("Tiramisu", Jegou et al. 2017) segmentor, 1,374,194 parameters for 1 input channel, 2 classes.

Recipe (reference/method_notes.md section 3.4): a 3x3 stem conv (48 channels); five dense blocks of four
layers each on the way down, each followed by a transition down; a bottleneck dense block of four layers;
five transitions up, each followed by a dense block of four layers; a 1x1 classifier. Growth rate 12.

* dense layer = ``BN -> ReLU -> conv3x3 (growth_rate) -> Dropout2d(0.2)``;
* transition down = ``BN -> ReLU -> conv1x1 -> Dropout2d(0.2) -> maxpool 2x2``;
* transition up = ``ConvTranspose2d(k3, stride 2, no padding)``, centre-cropped to the skip, concatenated;
* the bottleneck and the up-path dense blocks pass on only their new features (to keep the up path
  narrow), except the last block, which passes on its input and its new features.

The original ends with a LogSoftmax; here the network returns raw logits.
"""

from __future__ import annotations

import torch
from torch import nn

from cmedl.nets.blocks import Segmentor, require_int, require_probability

__all__ = ["DenseFCN"]


class DenseLayer(nn.Sequential):
    """``BN -> ReLU -> conv3x3 -> Dropout2d``, producing ``growth_rate`` new channels."""

    def __init__(self, in_channels: int, growth_rate: int, dropout: float) -> None:
        super().__init__(
            nn.BatchNorm2d(in_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_channels, growth_rate, kernel_size=3, padding=1, bias=True),
            nn.Dropout2d(dropout),
        )


class DenseBlock(nn.Module):
    """``num_layers`` densely connected layers.

    Returns ``cat(input, new features)`` if ``keep_input`` else only the new features
    (``num_layers * growth_rate`` channels).
    """

    def __init__(self, in_channels: int, growth_rate: int, num_layers: int, dropout: float, keep_input: bool) -> None:
        super().__init__()
        self.keep_input = keep_input
        self.layers = nn.ModuleList(
            DenseLayer(in_channels + i * growth_rate, growth_rate, dropout) for i in range(num_layers)
        )
        self.out_channels = (in_channels if keep_input else 0) + num_layers * growth_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        new_features = []
        for layer in self.layers:
            out = layer(x)
            x = torch.cat([x, out], dim=1)
            new_features.append(out)
        return x if self.keep_input else torch.cat(new_features, dim=1)


class TransitionDown(nn.Sequential):
    """``BN -> ReLU -> conv1x1 (same width) -> Dropout2d -> maxpool 2x2``."""

    def __init__(self, channels: int, dropout: float) -> None:
        super().__init__(
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, kernel_size=1, bias=True),
            nn.Dropout2d(dropout),
            nn.MaxPool2d(2),
        )


class TransitionUp(nn.Module):
    """``ConvTranspose2d(k3, stride 2, padding 0)``, centre-cropped to the skip's size, then ``cat(up, skip)``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(channels, channels, kernel_size=3, stride=2, padding=0, bias=True)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        out = self.up(x)
        height, width = skip.shape[-2:]
        top = (out.shape[-2] - height) // 2
        left = (out.shape[-1] - width) // 2
        out = out[:, :, top : top + height, left : left + width]
        return torch.cat([out, skip], dim=1)


class DenseFCN(Segmentor):
    """FC-DenseNet ("Tiramisu"); defaults are FC-DenseNet57 with the paper's 1,374,194 parameters (1 in, 2 classes).

    Args:
        in_channels: image channels.
        num_classes: output classes.
        growth_rate: channels added by each dense layer (default 12).
        stem_channels: output channels of the first 3x3 conv (default 48).
        layers_per_block: dense layers in each of the 5 down and 5 up dense blocks (default 4).
        bottleneck_layers: dense layers in the bottleneck block (default 4).
        dropout: ``Dropout2d`` probability after every dense layer and transition-down conv (default 0.2).

    Input size: ``x`` is ``(B, in_channels, H, W)`` with H and W multiples of 32 (five 2x2 poolings).
    Any other size raises ``ValueError``; pad or crop the input first.

    Output: raw logits ``(B, num_classes, H, W)`` (no LogSoftmax).

    Hints (``return_hints=True``). The paper does not name the DenseFCN hint layers; the documented choice
    here is the outputs of the last two up-path dense blocks, i.e. the last two feature layers before the
    classifier (with g = growth_rate, L = layers_per_block, s = stem_channels):

    * ``h1``: ``(B, L*g, H/2, W/2)``, the new features of the second-to-last up dense block
      (48 channels with the defaults);
    * ``h2``: ``(B, s + 3*L*g, H, W)``, the output of the last up dense block, the classifier's input
      (192 channels with the defaults).

    ``hint_channels == (L*g, s + 3*L*g)``, ``(48, 192)`` with the defaults.
    """

    name = "densefcn"
    size_divisor = 32
    num_levels = 5

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        *,
        growth_rate: int = 12,
        stem_channels: int = 48,
        layers_per_block: int = 4,
        bottleneck_layers: int = 4,
        dropout: float = 0.2,
    ) -> None:
        super().__init__(in_channels, num_classes)
        g = require_int("growth_rate", growth_rate)
        stem = require_int("stem_channels", stem_channels)
        n_layers = require_int("layers_per_block", layers_per_block)
        n_bottleneck = require_int("bottleneck_layers", bottleneck_layers)
        p = require_probability("dropout", dropout)
        self._options = {
            "growth_rate": g,
            "stem_channels": stem,
            "layers_per_block": n_layers,
            "bottleneck_layers": n_bottleneck,
            "dropout": p,
        }

        self.stem = nn.Conv2d(self.in_channels, stem, kernel_size=3, padding=1, bias=True)
        channels = stem
        skip_channels: list[int] = []
        self.down_blocks = nn.ModuleList()
        self.transitions_down = nn.ModuleList()
        for _ in range(self.num_levels):
            block = DenseBlock(channels, g, n_layers, p, keep_input=True)
            channels = block.out_channels
            skip_channels.append(channels)
            self.down_blocks.append(block)
            self.transitions_down.append(TransitionDown(channels, p))

        self.bottleneck = DenseBlock(channels, g, n_bottleneck, p, keep_input=False)
        channels = self.bottleneck.out_channels

        self.transitions_up = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        for level in range(self.num_levels):
            last = level == self.num_levels - 1
            self.transitions_up.append(TransitionUp(channels))
            block = DenseBlock(channels + skip_channels[-1 - level], g, n_layers, p, keep_input=last)
            self.up_blocks.append(block)
            if level == self.num_levels - 2:
                hint1_channels = block.out_channels
            channels = block.out_channels

        self.classifier = nn.Conv2d(channels, self.num_classes, kernel_size=1, bias=True)
        self.hint_channels = (hint1_channels, channels)

    def encoder_modules(self) -> list[nn.Module]:
        """The stem, the down-path dense blocks and transitions, and the bottleneck block (the deepest, as the
        U-Net's ``down4``); the transitions up, up-path blocks and classifier are the decoder."""
        return [self.stem, self.down_blocks, self.transitions_down, self.bottleneck]

    def forward(
        self, x: torch.Tensor, return_hints: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        self.check_input(x)
        out = self.stem(x)
        skips = []
        for block, down in zip(self.down_blocks, self.transitions_down):
            out = block(out)
            skips.append(out)
            out = down(out)
        out = self.bottleneck(out)
        features = []
        for up, block in zip(self.transitions_up, self.up_blocks):
            out = block(up(out, skips.pop()))
            features.append(out)
        logits = self.classifier(out)
        if return_hints:
            return logits, features[-2:]
        return logits
