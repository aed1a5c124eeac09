"""Online augmentation of 2D training patches: flip, rotation, scaling and elastic deformation.

The CMEDL paper augments its training patches with flipping, scaling, rotation and elastic deformation. Here
all of them are composed into one pull-back mapping (an affine about the patch centre plus an optional smooth
displacement field) and the patch is resampled once, so repeated interpolation never blurs it. The image is
interpolated linearly; a binary label is interpolated linearly and thresholded at 0.5, so that its edge is the
iso-line of the same interpolation the image gets (smooth, not staircased when zooming in); any other label
takes the nearest neighbour. Pixels pulled from outside the patch take the image's background value and label 0.

The resampling itself is ``torch.nn.functional.grid_sample`` on all channels and the label at once: for a
256x256 pair it takes about 1 ms on one CPU core, several times less than ``scipy.ndimage.map_coordinates``
(about 5 ms per channel), which matters because patches are drawn in the training loop.

Coordinates are array ``(row, col)`` coordinates; the patch is displayed with row 0 at the top, so a positive
angle turns the content counter-clockwise on screen, and "left-right" flips the column axis.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from cmedl.errors import ConfigError


@dataclass
class AugmentConfig:
    """Settings of :func:`augment_pair`.

    Attributes:
        flip: flip left-right (columns) with probability 0.5.
        rotation_deg: rotation angle drawn uniformly from ``[-rotation_deg, rotation_deg]`` degrees.
        scale: isotropic zoom factor drawn uniformly from ``[scale[0], scale[1]]`` (> 1 enlarges the content).
        elastic_displacement_px: root-mean-square length of each component of the elastic displacement, in
            pixels. Patches carry no spacing, so it is given in pixels (about 1.5-2 mm on typical chest CT).
        elastic_sigma_px: smoothness of the elastic field (standard deviation of its Gaussian), in pixels.
        p_elastic: probability of adding the elastic deformation.
        probability: probability of transforming a patch at all; otherwise it is returned unchanged.
    """

    flip: bool = True
    rotation_deg: float = 10.0
    scale: tuple[float, float] = (0.9, 1.1)
    elastic_displacement_px: float = 2.0
    elastic_sigma_px: float = 16.0
    p_elastic: float = 0.3
    probability: float = 1.0

    def __post_init__(self) -> None:
        low, high = self.scale
        if not 0 < low <= high:
            raise ConfigError(f"augmentation scale range must satisfy 0 < low <= high, got {self.scale}")
        if self.rotation_deg < 0:
            raise ConfigError(f"augmentation rotation_deg must be >= 0, got {self.rotation_deg}")
        if self.elastic_displacement_px < 0 or self.elastic_sigma_px <= 0:
            raise ConfigError(
                "augmentation elastic_displacement_px must be >= 0 and elastic_sigma_px > 0, got "
                f"{self.elastic_displacement_px} and {self.elastic_sigma_px}"
            )
        for name in ("p_elastic", "probability"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"augmentation {name} must lie in [0, 1], got {value}")


def augment_pair(
    image: np.ndarray,
    label: np.ndarray,
    rng: np.random.Generator,
    config: AugmentConfig,
    fill_value: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Apply one random geometric transform, drawn from ``rng``, to an image patch and its label.

    Args:
        image: ``(H, W)`` or ``(C, H, W)`` float image (already normalised); every channel gets the same transform.
        label: ``(H, W)`` integer label, normally {0, 1}.
        rng: source of all random draws: the same generator state gives the same result.
        config: what to draw.
        fill_value: image value for pixels pulled from outside the patch; default: each channel's minimum.

    Returns:
        New arrays of the input shapes and dtypes.
    """
    if rng.random() >= config.probability:
        return image.copy(), label.copy()
    flip = config.flip and rng.random() < 0.5
    angle_deg = rng.uniform(-config.rotation_deg, config.rotation_deg) if config.rotation_deg > 0 else 0.0
    low, high = config.scale
    scale = rng.uniform(low, high) if high > low else low
    displacement = None
    if config.p_elastic > 0 and config.elastic_displacement_px > 0 and rng.random() < config.p_elastic:
        displacement = smooth_displacement_field(
            label.shape, rng, config.elastic_displacement_px, config.elastic_sigma_px
        )
    return warp_pair(
        image, label, flip=flip, angle_deg=angle_deg, scale=scale, displacement=displacement, fill_value=fill_value
    )


def warp_pair(
    image: np.ndarray,
    label: np.ndarray,
    *,
    flip: bool = False,
    angle_deg: float = 0.0,
    scale: float = 1.0,
    displacement: np.ndarray | None = None,
    fill_value: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Resample an image patch and its label through one given transform (the deterministic half of augmentation).

    The output pixel at ``p`` takes the input at ``c + M (p - c) + displacement[:, p]``, where ``c`` is the patch
    centre and ``M`` undoes "flip left-right, then zoom by ``scale``, then rotate by ``angle_deg``
    counter-clockwise on screen".

    Args:
        image: ``(H, W)`` or ``(C, H, W)`` float image.
        label: ``(H, W)`` integer label.
        displacement: optional ``(2, H, W)`` pull-back displacement in pixels (row, column components).
        fill_value: image value outside the patch; default: each channel's minimum.

    Returns:
        ``(image, label)`` of the input shapes and dtypes.
    """
    if image.ndim not in (2, 3) or label.ndim != 2 or image.shape[-2:] != label.shape:
        raise ValueError(f"image (H, W) or (C, H, W) and label (H, W) expected, got {image.shape} and {label.shape}")
    if not flip and angle_deg == 0.0 and scale == 1.0 and displacement is None:
        return image.copy(), label.copy()

    channels = (image[None] if image.ndim == 2 else image).astype(np.float32)
    if fill_value is None:
        fills = channels.min(axis=(1, 2), keepdims=True)
    else:
        fills = np.full((len(channels), 1, 1), fill_value, dtype=np.float32)
    binary = bool(label.min() >= 0 and label.max() <= 1)
    # Sampling (value - fill) with zero padding is constant-fill padding, blended linearly at the border.
    stack = channels - fills
    if binary:
        stack = np.concatenate([stack, label[None].astype(np.float32)])
    grid = _sampling_grid(label.shape, flip, angle_deg, scale, displacement)
    with torch.no_grad():
        warped = F.grid_sample(
            torch.from_numpy(np.ascontiguousarray(stack))[None],
            grid,
            mode="bilinear",
            padding_mode="zeros",
            align_corners=True,
        )[0].numpy()
        if binary:
            warped_label = (warped[-1] >= 0.5).astype(label.dtype)
        else:
            nearest = F.grid_sample(
                torch.from_numpy(label.astype(np.float32))[None, None],
                grid,
                mode="nearest",
                padding_mode="zeros",
                align_corners=True,
            )
            warped_label = nearest[0, 0].numpy().round().astype(label.dtype)
    warped_image = (warped[: len(channels)] + fills).astype(image.dtype)
    return (warped_image[0] if image.ndim == 2 else warped_image), warped_label


def smooth_displacement_field(
    shape: tuple[int, int], rng: np.random.Generator, rms_px: float, sigma_px: float
) -> np.ndarray:
    """A random smooth ``(2, H, W)`` displacement field in pixels whose components have RMS ``rms_px``.

    White noise smoothed by a Gaussian of ``sigma_px`` pixels. The smoothing runs on a grid coarser by about
    ``sigma_px / 4`` and is interpolated back up linearly, which keeps it to about a millisecond for 256x256
    patches; the field carries nothing finer than that grid anyway.
    """
    step = max(1, int(sigma_px // 4))
    coarse_shape = tuple(math.ceil((size - 1) / step) + 1 for size in shape)
    coarse = np.stack(
        [ndimage.gaussian_filter(rng.standard_normal(coarse_shape), sigma_px / step, mode="reflect") for _ in range(2)]
    )
    with torch.no_grad():
        field = F.interpolate(
            torch.from_numpy(coarse.astype(np.float32))[None], size=tuple(shape), mode="bilinear", align_corners=True
        )[0].numpy()
    rms = np.sqrt(np.mean(field**2, axis=(1, 2), keepdims=True))
    return field * (rms_px / np.maximum(rms, 1e-12))


def _sampling_grid(
    shape: tuple[int, int], flip: bool, angle_deg: float, scale: float, displacement: np.ndarray | None
) -> torch.Tensor:
    """``grid_sample`` grid ``(1, H, W, 2)``: for every output pixel, the input (x=col, y=row) it reads, in [-1, 1]."""
    height, width = shape
    centre_row, centre_col = (height - 1) / 2.0, (width - 1) / 2.0
    angle = math.radians(angle_deg)
    cos, sin = math.cos(angle), math.sin(angle)
    # Forward rotation, counter-clockwise on screen in (row, col): row' = cos*row - sin*col, col' = sin*row + cos*col.
    # Its inverse is the transpose; then undo the zoom, then the flip (its own inverse).
    inverse = np.array([[cos, sin], [-sin, cos]]) / scale
    if flip:
        inverse = np.diag([1.0, -1.0]) @ inverse
    rows = (np.arange(height, dtype=np.float64) - centre_row)[:, None]
    cols = (np.arange(width, dtype=np.float64) - centre_col)[None, :]
    source_rows = inverse[0, 0] * rows + inverse[0, 1] * cols + centre_row
    source_cols = inverse[1, 0] * rows + inverse[1, 1] * cols + centre_col
    if displacement is not None:
        if displacement.shape != (2, *shape):
            raise ValueError(f"displacement must have shape {(2, *shape)}, got {displacement.shape}")
        source_rows = source_rows + displacement[0]
        source_cols = source_cols + displacement[1]
    grid = np.empty((1, height, width, 2), dtype=np.float32)
    grid[0, ..., 0] = source_cols * (2.0 / max(width - 1, 1)) - 1.0
    grid[0, ..., 1] = source_rows * (2.0 / max(height - 1, 1)) - 1.0
    return torch.from_numpy(grid)
