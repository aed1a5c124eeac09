"""Translation losses of the CycleGAN branch: the contextual loss (paper eqs. 3-4) and the cycle loss (eq. 6).

Contextual loss (Mechrez, Talmi and Zelnik-Manor, ECCV 2018), following the authors' TensorFlow definition
(reference/method_notes.md section 3.2). For generated features ``x`` and target features ``y`` of shape
``(B, C, H, W)``, with ``i`` running over the positions of ``x`` and ``j`` (and ``k``) over those of ``y``:

1. centre both on the target's mean: ``mu = mean of y over (B, H, W)`` per channel; ``x - mu``, ``y - mu``;
2. L2-normalise each position's channel vector;
3. cosine distance ``d_ij = 1 - <x_i, y_j>``;
4. relative distance ``dr_ij = d_ij / (min_k d_ik + epsilon)``;
5. ``w_ij = exp((1 - dr_ij) / h)`` with band width ``h``, and ``CX_ij = w_ij / sum_k w_ik``;
6. ``CX = mean_j max_i CX_ij`` per sample;
7. ``loss = mean over the batch of -log(CX + epsilon)``.

The same ``epsilon`` (1e-5 by default) is used in step 4 (added to the row minimum) and step 7 (added to CX
inside the log). Step 5 is computed as a softmax of ``(1 - dr_ij) / h`` over ``j``, which is the same value
without overflow for small ``h``. A perfect match (``x`` equal to ``y`` up to a permutation of positions)
gives ``CX = 1`` and ``loss = -log(1 + epsilon)``, about ``-1e-5``. The loss is asymmetric: ``x`` is the
generated (pseudo-MRI) side, ``y`` the target (real MRI).

Memory: the distance matrix of one sample is ``N_x x N_y`` (``N = H * W``); a 64x64 map gives 4096 x 4096
(64 MiB in float32). Samples are processed one at a time, so only one sample's temporaries exist at once, and
backward keeps two such matrices per sample. Larger maps are bounded by ``max_positions``: when a map has more
positions, that many are drawn at random (the same positions in ``x`` and ``y`` when their grids agree, the
same for every sample of the batch), as the reference code does with 65 x 65 = 4225 positions.
:class:`ContextualLoss` uses that bound by default, so the paper's 64x64 Conv7 map (4096 positions) is used
whole and the cost never exceeds a 4225 x 4225 matrix per sample, whatever the image size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cmedl.errors import ConfigError
from cmedl.nets.vgg import DEFAULT_LAYERS, VGG16Features

__all__ = [
    "DEFAULT_MAX_POSITIONS",
    "ContextualLoss",
    "contextual_loss",
    "cycle_loss",
]

#: positions kept per feature map by :class:`ContextualLoss` (the reference implementation's 65 x 65)
DEFAULT_MAX_POSITIONS = 65 * 65


def _check_positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def _check_max_positions(value: int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"max_positions must be a positive integer or None, got {value!r}")
    return value


def _sample_positions(count: int, keep: int, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    """``keep`` distinct random indices in ``[0, count)``, on ``device``."""
    generator_device = generator.device if generator is not None else torch.device("cpu")
    order = torch.randperm(count, generator=generator, device=generator_device)
    return order[:keep].to(device)


def contextual_loss(
    x_features: torch.Tensor,
    y_features: torch.Tensor,
    band_width: float = 0.5,
    epsilon: float = 1e-5,
    max_positions: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Contextual loss ``-log CX(x, y)`` averaged over the batch (see the module description for the formula).

    Args:
        x_features: ``(B, C, H_x, W_x)`` features of the generated image (gradients flow into it).
        y_features: ``(B, C, H_y, W_y)`` features of the target image.
        band_width: ``h`` in ``exp((1 - dr) / h)``; smaller values make the matching sharper (paper: 0.5).
        epsilon: added to the row minimum of the distances and to ``CX`` inside the log.
        max_positions: when a map has more than this many positions, use this many random ones (``None``:
            use every position; the cost is then ``O(H_x W_x H_y W_y)`` memory per sample).
        generator: random source of that sampling, for reproducibility (torch's global one when ``None``).

    Returns:
        A scalar tensor (float32, or float64 for float64 features). About ``-epsilon`` for a perfect match;
        about 2 for unrelated random 16-channel features with ``h = 0.5``.

    Raises:
        ValueError: the tensors are not 4-D or differ in batch size or channels.
        ConfigError: non-positive ``band_width`` / ``epsilon`` or invalid ``max_positions``.
    """
    if x_features.ndim != 4 or y_features.ndim != 4 or x_features.shape[:2] != y_features.shape[:2]:
        raise ValueError(
            "contextual_loss expects features (B, C, H, W) with equal B and C, "
            f"got {tuple(x_features.shape)} and {tuple(y_features.shape)}"
        )
    band_width = _check_positive("band_width", band_width)
    epsilon = _check_positive("epsilon", epsilon)
    max_positions = _check_max_positions(max_positions)

    # at least float32 even under autocast: exp/log of relative distances are sensitive to half precision
    dtype = torch.promote_types(torch.promote_types(x_features.dtype, y_features.dtype), torch.float32)
    x = x_features.to(dtype)
    y = y_features.to(dtype)
    batch, channels = x.shape[:2]

    mean = y.mean(dim=(0, 2, 3), keepdim=True)  # the target's mean over (B, H, W), per channel
    x = F.normalize((x - mean).reshape(batch, channels, -1), dim=1)  # (B, C, N_x), unit channel vectors
    y = F.normalize((y - mean).reshape(batch, channels, -1), dim=1)  # (B, C, N_y)

    if max_positions is not None:
        n_x, n_y = x.shape[2], y.shape[2]
        if n_x == n_y and n_x > max_positions:
            # the same positions on both sides, so identical maps still match perfectly
            keep = _sample_positions(n_x, max_positions, x.device, generator)
            x, y = x[:, :, keep], y[:, :, keep]
        else:
            if n_x > max_positions:
                x = x[:, :, _sample_positions(n_x, max_positions, x.device, generator)]
            if n_y > max_positions:
                y = y[:, :, _sample_positions(n_y, max_positions, y.device, generator)]

    losses = []
    with torch.autocast(device_type=x.device.type, enabled=False):  # keep the matrix product in float32 too
        for b in range(batch):  # one sample at a time bounds the temporaries to one N_x x N_y matrix family
            # in-place steps only touch temporaries autograd does not keep; they save two N_x x N_y buffers
            distance = (x[b].transpose(0, 1) @ y[b]).neg_().add_(1.0)  # (N_x, N_y) cosine distances d_ij
            relative = distance / (distance.amin(dim=1, keepdim=True) + epsilon)  # dr_ij, min over target k
            logits = relative.neg_().add_(1.0).div_(band_width)  # (1 - dr_ij) / h
            cx = torch.softmax(logits, dim=1)  # CX_ij, normalised over target positions
            similarity = cx.amax(dim=0).mean()  # max over generated i, mean over target j
            losses.append(-torch.log(similarity + epsilon))
    return torch.stack(losses).mean()


class ContextualLoss(nn.Module):
    """Contextual loss between a generated and a target image through a frozen VGG16.

    ``forward(generated, target)`` takes ``(B, 1, H, W)`` images in ``[-1, 1]`` and returns the scalar
    ``sum_l weight_l * contextual_loss(vgg(generated)_l, vgg(target)_l)`` over the VGG16 layers ``layers``
    (torchvision feature indices; the paper's Conv7/8/9 are 14, 17, 19). The target branch runs without
    autograd unless ``target`` itself requires gradients, since in CMEDL the target is a real MRI.

    Args:
        vgg: the feature extractor (see :func:`cmedl.nets.vgg.load_vgg16_features`); it becomes a submodule,
            so ``.to(device)`` moves it along.
        layers: VGG16 feature indices.
        weights: one weight per layer.
        band_width: ``h`` of :func:`contextual_loss` (0.5 as in the reference implementation).
        max_positions: per-map sampling bound of :func:`contextual_loss` (default 4225 = 65 x 65).
        generator: random source of that sampling.
    """

    def __init__(
        self,
        vgg: VGG16Features,
        layers: Sequence[int] = DEFAULT_LAYERS,
        weights: Sequence[float] = (1.0, 1.0, 1.0),
        band_width: float = 0.5,
        max_positions: int | None = DEFAULT_MAX_POSITIONS,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(vgg, VGG16Features):
            raise ConfigError(f"ContextualLoss needs a VGG16Features network, got {type(vgg).__name__}")
        self.vgg = vgg
        self.layers = vgg.check_layers(layers)
        self.weights = tuple(float(w) for w in weights)
        if len(self.weights) != len(self.layers):
            raise ConfigError(
                f"contextual loss: {len(self.layers)} VGG layer(s) {list(self.layers)} "
                f"but {len(self.weights)} weight(s)"
            )
        self.band_width = _check_positive("band_width", band_width)
        self.max_positions = _check_max_positions(max_positions)
        self.generator = generator

    def forward(self, generated: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``(B, 1, H, W)`` generated and target images in ``[-1, 1]`` -> scalar loss."""
        generated_features = self.vgg(generated, self.layers)
        with torch.set_grad_enabled(torch.is_grad_enabled() and target.requires_grad):
            target_features = self.vgg(target, self.layers)
        total = generated.new_zeros((), dtype=torch.float32)
        for weight, x, y in zip(self.weights, generated_features, target_features):
            if weight:
                total = total + weight * contextual_loss(
                    x, y, self.band_width, max_positions=self.max_positions, generator=self.generator
                )
        return total

    def extra_repr(self) -> str:
        return (
            f"layers={self.layers}, weights={self.weights}, band_width={self.band_width}, "
            f"max_positions={self.max_positions}"
        )


def cycle_loss(reconstructed: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """Cycle-consistency loss (paper eq. 6): mean absolute difference ``|G_MC(G_CM(x)) - x|``.

    Both tensors are ``(B, C, H, W)`` images in the same units; the mean runs over every element. The same
    L1 serves as CycleGAN's optional identity loss (``|G_CM(x_mr) - x_mr|``), which the paper does not list.
    """
    if reconstructed.shape != original.shape:
        raise ValueError(f"cycle_loss needs equal shapes, got {tuple(reconstructed.shape)} and {tuple(original.shape)}")
    return F.l1_loss(reconstructed, original)
