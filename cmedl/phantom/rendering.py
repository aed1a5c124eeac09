"""Rendering of a phantom's tissue map as CT or MR: tissue appearance, texture, blur, noise and coil bias.

Input is the tissue map ``(z, y, x)`` uint8 of :class:`~cmedl.phantom.anatomy.Tissue` codes drawn by
:class:`~cmedl.phantom.anatomy._ChestBuilder` (tumours included); output is an array of the same shape:

* CT: int16 Hounsfield units, lung parenchyma around -850 HU with texture and a dependent density
  gradient, tumour a few HU below mediastinal soft tissue (or exactly ``ct_tumour_contrast`` HU from it),
  partial-volume blur and slightly correlated Gaussian noise (sigma 10-25 HU).
* MR: float32 arbitrary units (about 0..1000) with T2-weighted contrast: bright tumour, fat and fluid,
  dark lungs, flow voids in the heart and vessels, a smooth multiplicative coil bias and Rician noise.

The volume is rendered in slabs of a few slices so that temporaries stay small.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from cmedl.errors import ConfigError
from cmedl.phantom.anatomy import Tissue, _ChestBuilder

_CHUNK_SLICES = 8  # rendering works on slabs so temporaries stay small and reused

# Per tissue: (CT mean HU, CT texture HU, MR mean, MR texture as a fraction of the mean). Means get a
# per-case jitter; soft tissues of the mediastinum share one drawn level so the tumour contrast is controlled.
_APPEARANCE = {
    Tissue.AIR: (-1000.0, 0.0, 0.0, 0.0),
    Tissue.FAT: (-100.0, 8.0, 500.0, 0.05),
    Tissue.MUSCLE: (48.0, 4.0, 165.0, 0.05),
    Tissue.CORTICAL_BONE: (900.0, 120.0, 15.0, 0.2),
    Tissue.MARROW: (280.0, 60.0, 400.0, 0.1),
    Tissue.CARTILAGE: (120.0, 20.0, 220.0, 0.08),
    Tissue.LUNG: (-850.0, 35.0, 28.0, 0.3),
    Tissue.LUNG_VESSEL: (40.0, 3.0, 18.0, 0.1),
    Tissue.AIRWAY: (-990.0, 5.0, 5.0, 0.0),
    Tissue.AIRWAY_WALL: (50.0, 5.0, 120.0, 0.05),
    Tissue.MYOCARDIUM: (46.0, 3.0, 150.0, 0.05),
    Tissue.BLOOD: (40.0, 2.0, 50.0, 0.15),
    Tissue.MEDIASTINUM: (45.0, 4.0, 290.0, 0.06),
    Tissue.LIVER: (58.0, 4.0, 175.0, 0.05),
    Tissue.ABDOMEN: (42.0, 6.0, 340.0, 0.06),
    Tissue.SPINAL_CANAL: (15.0, 3.0, 880.0, 0.03),
    Tissue.TABLE: (60.0, 0.0, 0.0, 0.0),
    Tissue.TUMOUR: (39.0, 6.0, 660.0, 0.1),
    Tissue.DIAPHRAGM: (48.0, 4.0, 165.0, 0.05),
}


def _check_modality(modality: str) -> str:
    """``"ct"`` or ``"mr"`` for a modality name as users write it ("MRI" too), or a ConfigError."""
    name = str(modality).strip().lower()
    if name in ("mri", "mr"):
        return "mr"
    if name == "ct":
        return "ct"
    raise ConfigError(f"unknown phantom modality {modality!r}; use 'ct' or 'mr'")


def _appearance_tables(
    rng: np.random.Generator, modality: str, ct_tumour_contrast: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per-tissue mean and texture amplitude (256-entry lookup tables) with this case's jitter.

    ``ct_tumour_contrast`` (CT only) sets the tumour's mean relative to the mediastinal level exactly.
    """
    means = np.zeros(256, dtype=np.float32)
    textures = np.zeros(256, dtype=np.float32)
    for tissue, (ct_mean, ct_texture, mr_mean, mr_texture) in _APPEARANCE.items():
        if modality == "ct":
            jitter = 0.0 if tissue in (Tissue.AIR, Tissue.AIRWAY) else float(rng.normal(0, 0.04 * abs(ct_mean) + 1))
            means[tissue], textures[tissue] = ct_mean + jitter, ct_texture
        else:
            means[tissue] = mr_mean * float(rng.uniform(0.9, 1.1))
            textures[tissue] = mr_texture * means[tissue]
    if modality == "ct":
        soft = float(rng.uniform(40.0, 50.0))
        means[Tissue.MEDIASTINUM] = soft
        if ct_tumour_contrast is None:
            # The default low-contrast setting: mediastinal soft tissue 40-50 HU, the tumour 3-9 HU below it.
            means[Tissue.MYOCARDIUM] = soft + float(rng.uniform(-2.0, 3.0))
            means[Tissue.BLOOD] = soft - float(rng.uniform(0.0, 6.0))
            means[Tissue.MUSCLE] = soft + float(rng.uniform(-3.0, 5.0))
            means[Tissue.TUMOUR] = soft - float(rng.uniform(3.0, 9.0))
        else:
            # A set contrast: the tissues a tumour abuts stay within -2..+4 HU of the mediastinal level, so
            # a tumour c HU below it (c < 0) is at least |c| - 2 HU from each of them.
            means[Tissue.MYOCARDIUM] = soft + float(rng.uniform(-1.0, 3.0))
            means[Tissue.BLOOD] = soft - float(rng.uniform(0.0, 2.0))
            means[Tissue.MUSCLE] = soft + float(rng.uniform(0.0, 4.0))
            means[Tissue.TUMOUR] = soft + ct_tumour_contrast
        means[Tissue.LUNG_VESSEL] = means[Tissue.BLOOD]
        means[Tissue.DIAPHRAGM] = means[Tissue.MUSCLE]
    return means, textures


class _SmoothField:
    """A zero-mean, unit-variance random field correlated over about ``correlation_mm``, shape (z, y, x).

    It is drawn on a coarse in-plane grid and upsampled bilinearly one slab at a time, which is far
    cheaper than filtering a full-size volume.
    """

    def __init__(self, rng: np.random.Generator, shape: tuple[int, int, int], spacing, correlation_mm: float):
        nz, ny, nx = shape
        factor = max(1, int(round(correlation_mm / (2 * spacing[0]))))
        coarse = rng.standard_normal((nz, ny // factor + 2, nx // factor + 2), dtype=np.float32)
        coarse = ndimage.gaussian_filter(coarse, (correlation_mm / (2 * spacing[2]), 1.0, 1.0), mode="wrap")
        coarse /= max(float(coarse.std()), 1e-6)
        self.coarse = coarse
        self.rows = _bilinear_taps(ny, coarse.shape[1], factor)
        self.cols = _bilinear_taps(nx, coarse.shape[2], factor)

    def slab(self, start: int, stop: int) -> np.ndarray:
        """Slices ``start:stop`` of the full-size field, float32 ``(stop - start, y, x)``."""
        (r0, r1, rw), (c0, c1, cw) = self.rows, self.cols
        coarse = self.coarse[start:stop]
        # Columns first, on the small array; the row gather then copies whole contiguous rows.
        columns = coarse[:, :, c0] * (1 - cw) + coarse[:, :, c1] * cw
        field = columns[:, r0, :]
        field *= (1 - rw)[:, None]
        field += columns[:, r1, :] * rw[:, None]
        return field


def _bilinear_taps(fine: int, coarse: int, factor: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each fine index: the two coarse neighbours and the weight of the second (float32)."""
    position = (np.arange(fine) + 0.5) / factor
    lower = np.clip(np.floor(position).astype(np.intp), 0, coarse - 2)
    return lower, lower + 1, (position - lower).astype(np.float32)


_BLUR_TRUNCATE = 3.0


def _gaussian_noise_gain(sigma_px: float) -> float:
    """Standard deviation left in unit white noise after the in-plane partial-volume blur."""
    impulse = np.zeros((1, 33, 33), dtype=np.float64)
    impulse[0, 16, 16] = 1.0
    kernel = ndimage.gaussian_filter(impulse, (0, sigma_px, sigma_px), truncate=_BLUR_TRUNCATE)
    return float(np.sqrt(np.sum(kernel**2)))


def _blur_sigma(spacing) -> float:
    """In-plane partial-volume blur in pixels: about 0.6 mm of scanner blur, at least half a pixel."""
    return max(0.5, 0.6 / spacing[0])


def _render_ct(
    tissues: np.ndarray, chest: _ChestBuilder, rng: np.random.Generator, ct_tumour_contrast: float | None = None
) -> np.ndarray:
    """CT in int16 HU from the tissue map ``(z, y, x)``.

    Noise is added before the blur so that it comes out slightly correlated, as in reconstructed CT.
    """
    means, textures = _appearance_tables(rng, "ct", ct_tumour_contrast)
    noise_sigma = float(rng.uniform(10.0, 25.0))
    gravity = float(rng.uniform(20.0, 50.0))  # HU denser at the back of the lungs (dependent lung)
    texture = _SmoothField(rng, tissues.shape, chest.spacing, 4.0)
    gradient = (gravity * np.clip((chest.ys - chest.yc) / chest.b0, -1, 1)).astype(np.float32)[:, None]
    blur = _blur_sigma(chest.spacing)
    noise_scale = np.float32(noise_sigma / _gaussian_noise_gain(blur))
    out = np.empty(tissues.shape, dtype=np.int16)
    for start in range(0, tissues.shape[0], _CHUNK_SLICES):
        codes = tissues[start : start + _CHUNK_SLICES]
        values = means[codes]
        values += textures[codes] * texture.slab(start, start + codes.shape[0])
        values += (codes == Tissue.LUNG) * gradient
        noise = rng.standard_normal(codes.shape, dtype=np.float32)
        noise *= noise_scale
        values += noise
        ndimage.gaussian_filter(values, (0, blur, blur), output=noise, truncate=_BLUR_TRUNCATE)
        np.rint(noise, out=noise)
        np.clip(noise, -1024, 3071, out=noise)
        out[start : start + codes.shape[0]] = noise
    return out


def _render_mr(tissues: np.ndarray, chest: _ChestBuilder, rng: np.random.Generator) -> np.ndarray:
    """T2-weighted-like MR in float32 arbitrary units from the tissue map ``(z, y, x)``."""
    means, textures = _appearance_tables(rng, "mr")
    noise_sigma = np.float32(rng.uniform(10.0, 20.0))
    texture = _SmoothField(rng, tissues.shape, chest.spacing, 5.0)
    bias_xy, bias_z = _bias_field(rng, chest)
    blur = _blur_sigma(chest.spacing)
    out = np.empty(tissues.shape, dtype=np.float32)
    for start in range(0, tissues.shape[0], _CHUNK_SLICES):
        codes = tissues[start : start + _CHUNK_SLICES]
        stop = start + codes.shape[0]
        values = means[codes]
        values += textures[codes] * texture.slab(start, stop)
        np.maximum(values, 0, out=values)
        signal = ndimage.gaussian_filter(values, (0, blur, blur), truncate=_BLUR_TRUNCATE)
        signal *= bias_xy[None]
        signal *= bias_z[start:stop, None, None]
        # Rician: the magnitude of a complex signal with Gaussian noise in both channels.
        rng.standard_normal(codes.shape, dtype=np.float32, out=values)
        values *= noise_sigma
        signal += values
        rng.standard_normal(codes.shape, dtype=np.float32, out=values)
        values *= noise_sigma
        signal *= signal
        values *= values
        signal += values
        np.sqrt(signal, out=out[start:stop])
    return out


def _bias_field(rng: np.random.Generator, chest: _ChestBuilder) -> tuple[np.ndarray, np.ndarray]:
    """A smooth multiplicative coil sensitivity, separable as (y, x) times z, within about 0.7-1.3."""
    x = (chest.xs - chest.xc) / (1.2 * chest.a0)
    y = (chest.ys - chest.yc) / (1.2 * chest.b0)
    x2, y2 = np.meshgrid(x, y)
    c = rng.uniform(-1, 1, size=5) * [0.12, 0.12, 0.1, 0.1, 0.06]
    log_xy = c[0] * x2 + c[1] * y2 + c[2] * x2**2 + c[3] * y2**2 + c[4] * x2 * y2
    z = (chest.zs - chest.zs.mean()) / max(float(np.ptp(chest.zs)) / 2, 1.0) if chest.nz > 1 else np.zeros(1)
    log_z = rng.uniform(-0.1, 0.1) * z + rng.uniform(-0.05, 0.05) * z**2
    return np.exp(np.clip(log_xy, -0.3, 0.3)).astype(np.float32), np.exp(log_z).astype(np.float32)
