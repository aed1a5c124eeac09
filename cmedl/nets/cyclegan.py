"""CycleGAN image-to-image translation networks (CT <-> MRI) and their adversarial losses.

The recipe is the CycleGAN one the CMEDL paper uses (reference/method_notes.md section 3.1):

* :class:`ResnetGenerator`: ``c7s1-64, d128, d256, 9 x R256, u128, u64, c7s1-out, tanh`` with instance
  normalisation (``affine=False``) and reflection padding. 11,365,633 parameters for 1 -> 1 channel.
* :class:`PatchDiscriminator`: the 70x70 PatchGAN (``n_layers=3``): a 256x256 image gives a 30x30 map of
  raw scores (no sigmoid). 2,762,689 parameters for 1 channel.
* :class:`ImagePool`: the history of 50 past fakes the discriminators are trained on.
* :func:`gan_loss`: least-squares (``"lsgan"``, the lineage default) or binary cross-entropy (``"vanilla"``).

>>> translator = build_translator("cyclegan", base_channels=8, n_blocks=2)
>>> pseudo_mri = translator.g_ct_to_mr(ct)            # (B, 1, H, W) in [-1, 1]

Images are the engine's normalised images: ``(B, 1, H, W)`` float tensors in ``[-1, 1]``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cmedl.errors import ConfigError
from cmedl.nets.blocks import require_int

__all__ = [
    "TRANSLATOR_NAMES",
    "GAN_MODES",
    "ImagePool",
    "PatchDiscriminator",
    "ResnetGenerator",
    "Translator",
    "build_translator",
    "gan_loss",
    "init_weights",
    "lsgan_loss",
    "set_requires_grad",
    "vanilla_gan_loss",
]

#: the names :func:`build_translator` accepts
TRANSLATOR_NAMES: tuple[str, ...] = ("cyclegan",)
#: the modes :func:`gan_loss` accepts
GAN_MODES: tuple[str, ...] = ("lsgan", "vanilla")

_NORMS = ("instance", "none")


def _norm_layer(norm: str, channels: int) -> nn.Module:
    # affine=False and no running statistics, as in CycleGAN: every image is normalised by its own statistics
    # at training and at inference time alike.
    if norm == "instance":
        return nn.InstanceNorm2d(channels, affine=False, track_running_stats=False)
    return nn.Identity()


def _check_norm(norm: Any) -> str:
    if norm not in _NORMS:
        raise ConfigError(f"unknown normalisation {norm!r}; valid values: {', '.join(_NORMS)}")
    return norm


class ResidualBlock(nn.Module):
    """``x + [reflect pad 1, conv3x3, norm, ReLU, reflect pad 1, conv3x3, norm](x)``; keeps (B, C, H, W)."""

    def __init__(self, channels: int, norm: str = "instance") -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, kernel_size=3, bias=True),
            _norm_layer(norm, channels),
            nn.ReLU(inplace=True),
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, kernel_size=3, bias=True),
            _norm_layer(norm, channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResnetGenerator(nn.Module):
    """CycleGAN ResNet generator: maps ``(B, in_channels, H, W)`` to ``(B, out_channels, H, W)`` in ``[-1, 1]``.

    Layers (``b = base_channels``): ``c7s1-b`` (reflection pad 3, conv 7x7, norm, ReLU); two stride-2
    conv3x3 down-samplings to ``2b`` and ``4b``; ``n_blocks`` residual blocks at ``4b``; two fractionally
    strided convolutions (``ConvTranspose2d`` k3 s2 p1 output_padding 1) to ``2b`` and ``b``; ``c7s1`` to
    ``out_channels`` and tanh. Convolutions carry biases (instance norm without affine has none to replace
    them). With the defaults and 1 -> 1 channel it has 11,365,633 parameters.

    H and W must be multiples of 4 (two halvings, two doublings); any other size raises ``ValueError``.

    Args:
        in_channels: channels of the source image (1 for CT or MRI).
        out_channels: channels of the translated image.
        base_channels: width ``b`` of the first layer (64 in the paper).
        n_blocks: number of residual blocks (9 in the paper).
        norm: ``"instance"`` (the paper) or ``"none"``.
    """

    size_divisor = 4

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        base_channels: int = 64,
        n_blocks: int = 9,
        norm: str = "instance",
    ) -> None:
        super().__init__()
        self.in_channels = require_int("in_channels", in_channels)
        self.out_channels = require_int("out_channels", out_channels)
        b = require_int("base_channels", base_channels)
        n_blocks = require_int("n_blocks", n_blocks, minimum=0)
        norm = _check_norm(norm)

        layers: list[nn.Module] = [
            nn.ReflectionPad2d(3),
            nn.Conv2d(self.in_channels, b, kernel_size=7, bias=True),
            _norm_layer(norm, b),
            nn.ReLU(inplace=True),
        ]
        channels = b
        for _ in range(2):  # d128, d256
            layers += [
                nn.Conv2d(channels, 2 * channels, kernel_size=3, stride=2, padding=1, bias=True),
                _norm_layer(norm, 2 * channels),
                nn.ReLU(inplace=True),
            ]
            channels *= 2
        layers += [ResidualBlock(channels, norm) for _ in range(n_blocks)]
        for _ in range(2):  # u128, u64
            layers += [
                nn.ConvTranspose2d(
                    channels, channels // 2, kernel_size=3, stride=2, padding=1, output_padding=1, bias=True
                ),
                _norm_layer(norm, channels // 2),
                nn.ReLU(inplace=True),
            ]
            channels //= 2
        layers += [
            nn.ReflectionPad2d(3),
            nn.Conv2d(channels, self.out_channels, kernel_size=7, bias=True),
            nn.Tanh(),
        ]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, H, W)`` -> ``(B, out_channels, H, W)`` in ``[-1, 1]``."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"ResnetGenerator expects (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        height, width = int(x.shape[2]), int(x.shape[3])
        if height % self.size_divisor or width % self.size_divisor or min(height, width) < 8:
            raise ValueError(
                f"ResnetGenerator needs H and W to be multiples of {self.size_divisor} and at least 8, "
                f"got {height}x{width}; pad or crop the input"
            )
        return self.model(x)


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator: ``(B, in_channels, H, W)`` -> ``(B, 1, H', W')`` raw scores (logits, no sigmoid).

    With ``n_layers=3`` this is the 70x70 PatchGAN: every output score sees a 70x70 input patch, and a
    256x256 input gives a 30x30 map. Layers (``b = base_channels``): conv4x4 s2 to ``b`` + LeakyReLU(0.2)
    without normalisation; ``n_layers - 1`` conv4x4 s2 layers doubling the width (capped at ``8b``) with
    norm + LeakyReLU; one conv4x4 s1 layer (width ``min(2**n_layers, 8) * b``) with norm + LeakyReLU; a
    conv4x4 s1 to one channel. All convolutions use padding 1. 2,762,689 parameters with the defaults.

    Args:
        in_channels: channels of the judged image.
        base_channels: width ``b`` of the first layer (64 in the paper).
        n_layers: number of stride-2 convolutions (3 for the 70x70 PatchGAN).
        norm: ``"instance"`` (the paper) or ``"none"``. Instance norm couples all positions through the
            per-image statistics; ``"none"`` keeps each score a function of its receptive field only.
    """

    def __init__(
        self, in_channels: int = 1, base_channels: int = 64, n_layers: int = 3, norm: str = "instance"
    ) -> None:
        super().__init__()
        self.in_channels = require_int("in_channels", in_channels)
        b = require_int("base_channels", base_channels)
        self.n_layers = require_int("n_layers", n_layers)
        norm = _check_norm(norm)

        layers: list[nn.Module] = [
            nn.Conv2d(self.in_channels, b, kernel_size=4, stride=2, padding=1, bias=True),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        channels = b
        for n in range(1, self.n_layers):
            width = b * min(2**n, 8)
            layers += [
                nn.Conv2d(channels, width, kernel_size=4, stride=2, padding=1, bias=True),
                _norm_layer(norm, width),
                nn.LeakyReLU(0.2, inplace=True),
            ]
            channels = width
        width = b * min(2**self.n_layers, 8)
        layers += [
            nn.Conv2d(channels, width, kernel_size=4, stride=1, padding=1, bias=True),
            _norm_layer(norm, width),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(width, 1, kernel_size=4, stride=1, padding=1, bias=True),
        ]
        self.model = nn.Sequential(*layers)

    @property
    def receptive_field(self) -> int:
        """Side in pixels of the input patch each output score sees (70 for ``n_layers=3``)."""
        # walk back from one output pixel: the two stride-1 k4 layers, then n_layers stride-2 k4 layers
        size = 1
        for stride in [1, 1] + [2] * self.n_layers:
            size = (size - 1) * stride + 4
        return size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, H, W)`` -> ``(B, 1, H', W')`` logits; ``H' = H / 2**n_layers - 2`` for H divisible."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"PatchDiscriminator expects (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        return self.model(x)


def init_weights(module: nn.Module, gain: float = 0.02) -> nn.Module:
    """Initialise ``module`` in place as CycleGAN does and return it.

    Convolution, transposed-convolution and linear weights are drawn from ``N(0, gain)``; their biases are
    set to 0. Affine normalisation layers (if any) get weights ``N(1, gain)`` and biases 0. Draws come from
    torch's global generator, so ``torch.manual_seed`` makes the initialisation reproducible.
    """

    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, mean=0.0, std=gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d, nn.GroupNorm)) and m.weight is not None:
            nn.init.normal_(m.weight, mean=1.0, std=gain)
            nn.init.zeros_(m.bias)

    module.apply(_init)
    return module


def set_requires_grad(modules: nn.Module | Iterable[nn.Module], requires_grad: bool) -> None:
    """Switch gradients of every parameter of ``modules`` on or off.

    The generator step freezes the discriminators so their parameters collect no gradient from it.
    """
    if isinstance(modules, nn.Module):
        modules = [modules]
    for module in modules:
        for parameter in module.parameters():
            parameter.requires_grad_(requires_grad)


# ----------------------------------------------------------------------------------------------------------
# adversarial losses


def lsgan_loss(prediction: torch.Tensor, is_real: bool) -> torch.Tensor:
    """Least-squares GAN loss: mean squared error of the raw scores against 1 (real) or 0 (fake)."""
    target = torch.ones_like(prediction) if is_real else torch.zeros_like(prediction)
    return F.mse_loss(prediction, target)


def vanilla_gan_loss(prediction: torch.Tensor, is_real: bool) -> torch.Tensor:
    """Original GAN loss (paper eq. 5): binary cross-entropy of the logits against 1 (real) or 0 (fake).

    The discriminators output logits, so the sigmoid is applied inside the (numerically stable) loss.
    """
    target = torch.ones_like(prediction) if is_real else torch.zeros_like(prediction)
    return F.binary_cross_entropy_with_logits(prediction, target)


def gan_loss(mode: str = "lsgan") -> Callable[[torch.Tensor, bool], torch.Tensor]:
    """The adversarial loss ``loss(prediction, is_real) -> scalar`` for ``mode`` ("lsgan" or "vanilla").

    ``"lsgan"`` is the CycleGAN/PSIGAN default; ``"vanilla"`` is the log-likelihood form of the paper's eq. 5.

    Raises:
        ConfigError: unknown mode.
    """
    losses = {"lsgan": lsgan_loss, "vanilla": vanilla_gan_loss}
    if mode not in losses:
        raise ConfigError(f"unknown GAN loss {mode!r}; valid values: {', '.join(GAN_MODES)}")
    return losses[mode]


# ----------------------------------------------------------------------------------------------------------
# image pool


class ImagePool:
    """History buffer of generated images that the discriminator is trained on (Shrivastava et al.; CycleGAN).

    :meth:`query` takes a batch of fakes ``(B, C, H, W)`` and returns a batch of the same shape. Until the
    pool holds ``size`` images, each new image is stored and returned. Afterwards each new image is, with
    probability 0.5, swapped for a uniformly chosen stored image (the stored one is returned, the new one
    takes its place), and otherwise returned as is. ``size=0`` disables the pool.

    Returned images are always detached: they feed the discriminator step, never the generator. Stored
    images are kept on the CPU and moved to the query's device when returned, so a pool of 50 patches
    costs no accelerator memory.

    Args:
        size: number of stored images (50 in CycleGAN).
        rng: the random source, for reproducible runs: a ``torch.Generator``, a ``numpy.random.Generator``,
            an ``int`` seed (a new ``torch.Generator`` seeded with it), or ``None`` (Python's ``random``).
    """

    def __init__(self, size: int = 50, rng: torch.Generator | np.random.Generator | int | None = None) -> None:
        self.size = require_int("pool size", size, minimum=0)
        if isinstance(rng, int) and not isinstance(rng, bool):
            rng = torch.Generator().manual_seed(rng)
        if rng is not None and not isinstance(rng, (torch.Generator, np.random.Generator)):
            raise ConfigError(f"ImagePool rng must be a torch.Generator, numpy Generator, int or None, got {rng!r}")
        self.rng = rng
        self.images: list[torch.Tensor] = []

    def __len__(self) -> int:
        return len(self.images)

    def _uniform(self) -> float:
        if isinstance(self.rng, torch.Generator):
            return float(torch.rand((), generator=self.rng, device=self.rng.device))
        if isinstance(self.rng, np.random.Generator):
            return float(self.rng.random())
        return random.random()

    def _index(self) -> int:
        if isinstance(self.rng, torch.Generator):
            return int(torch.randint(self.size, (), generator=self.rng, device=self.rng.device))
        if isinstance(self.rng, np.random.Generator):
            return int(self.rng.integers(self.size))
        return random.randrange(self.size)

    @torch.no_grad()
    def query(self, images: torch.Tensor) -> torch.Tensor:
        """Return a batch ``(B, C, H, W)`` mixing ``images`` with stored ones (see the class description)."""
        if images.ndim != 4:
            raise ValueError(f"ImagePool.query expects (B, C, H, W), got {tuple(images.shape)}")
        images = images.detach()
        if self.size == 0:
            return images
        returned = []
        for image in images:
            if len(self.images) < self.size:
                self.images.append(image.to("cpu", copy=True))
                returned.append(image)
            elif self._uniform() > 0.5:
                index = self._index()
                returned.append(self.images[index].to(image.device))
                self.images[index] = image.to("cpu", copy=True)
            else:
                returned.append(image)
        return torch.stack(returned, dim=0)

    def state_dict(self) -> dict[str, Any]:
        """Pool content and random state as tensors and plain Python values (readable with ``weights_only``)."""
        if isinstance(self.rng, torch.Generator):
            rng_kind, rng_state = "torch", self.rng.get_state()
        elif isinstance(self.rng, np.random.Generator):
            rng_kind, rng_state = "numpy", self.rng.bit_generator.state
        else:
            rng_kind, rng_state = "python", None  # the global generator belongs to the process, not the pool
        return {"size": self.size, "images": list(self.images), "rng_kind": rng_kind, "rng_state": rng_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned. The random state is restored when the kinds match.

        Raises:
            ConfigError: the state is malformed or holds more images than this pool's size.
        """
        try:
            images = [torch.as_tensor(image).detach().to("cpu") for image in state["images"]]
            rng_kind, rng_state = state.get("rng_kind"), state.get("rng_state")
        except (AttributeError, KeyError, TypeError, ValueError) as error:
            raise ConfigError(f"malformed image-pool state: {error!r}") from None
        if len(images) > self.size:
            raise ConfigError(f"image-pool state holds {len(images)} images, more than the pool size {self.size}")
        self.images = images
        if rng_kind == "torch" and isinstance(self.rng, torch.Generator):
            self.rng.set_state(rng_state)
        elif rng_kind == "numpy" and isinstance(self.rng, np.random.Generator):
            self.rng.bit_generator.state = rng_state


# ----------------------------------------------------------------------------------------------------------
# the translator


class Translator(nn.Module):
    """The CycleGAN pair of generators and discriminators for CT <-> MRI.

    Attributes:
        g_ct_to_mr: :class:`ResnetGenerator`, CT -> pseudo MRI.
        g_mr_to_ct: :class:`ResnetGenerator`, MRI -> pseudo CT.
        d_mr: :class:`PatchDiscriminator` judging real MRI against pseudo MRI.
        d_ct: :class:`PatchDiscriminator` judging real CT against pseudo CT.
        config: the plain arguments that rebuild it via ``build_translator(**config)``.
    """

    def __init__(self, base_channels: int = 64, n_blocks: int = 9, n_layers_d: int = 3) -> None:
        super().__init__()
        self.g_ct_to_mr = ResnetGenerator(1, 1, base_channels, n_blocks)
        self.g_mr_to_ct = ResnetGenerator(1, 1, base_channels, n_blocks)
        self.d_mr = PatchDiscriminator(1, base_channels, n_layers_d)
        self.d_ct = PatchDiscriminator(1, base_channels, n_layers_d)
        self.config: dict[str, Any] = {
            "name": "cyclegan",
            "base_channels": base_channels,
            "n_blocks": n_blocks,
            "n_layers_d": n_layers_d,
        }

    def generators(self) -> Iterator[nn.Parameter]:
        """Parameters of both generators (one optimiser steps them together, as in CycleGAN)."""
        yield from self.g_ct_to_mr.parameters()
        yield from self.g_mr_to_ct.parameters()

    def discriminators(self) -> Iterator[nn.Parameter]:
        """Parameters of both discriminators."""
        yield from self.d_mr.parameters()
        yield from self.d_ct.parameters()

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self.config.items() if key != "name")


_TRANSLATOR_OPTIONS = ("base_channels", "n_blocks", "n_layers_d", "init_gain")


def build_translator(name: str = "cyclegan", **options: Any) -> Translator:
    """Build the image-to-image translator ``name`` with N(0, ``init_gain``) initial weights.

    Options (plain JSON values): ``base_channels`` (generator and discriminator width, default 64),
    ``n_blocks`` (residual blocks per generator, default 9), ``n_layers_d`` (stride-2 layers per
    discriminator, default 3: the 70x70 PatchGAN), ``init_gain`` (standard deviation of the initial
    weights, default 0.02). Small values (``base_channels=8, n_blocks=2``) make a translator for tests.

    Raises:
        ConfigError: unknown name (``"drit"`` is not available yet), unknown option or invalid value.
    """
    if name == "drit":
        raise ConfigError("translator 'drit' (DRIT, VAE-CMEDL) is not available in this version; use 'cyclegan'")
    if name not in TRANSLATOR_NAMES:
        raise ConfigError(f"unknown translator {name!r}; valid names: {', '.join(TRANSLATOR_NAMES)}")
    unknown = sorted(set(options) - set(_TRANSLATOR_OPTIONS))
    if unknown:
        raise ConfigError(
            f"unknown option(s) for translator {name!r}: {', '.join(unknown)}; "
            f"valid options: {', '.join(_TRANSLATOR_OPTIONS)}"
        )
    gain = options.pop("init_gain", 0.02)
    if isinstance(gain, bool) or not isinstance(gain, (int, float)) or not 0 < gain < 10:
        raise ConfigError(f"init_gain must be a positive number, got {gain!r}")
    translator = Translator(**options)
    init_weights(translator, float(gain))
    return translator
