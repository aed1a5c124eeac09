"""How close a synthesised image is to a real one: KL divergence of intensities, PSNR and SSIM.

These are the paper's pseudo-MRI synthesis measures (section IV; KL over all test cases, PSNR and SSIM on the
cases with both a CT and an MRI of the same anatomy). The paper leaves the details open; the choices here:

- intensities are compared on a common scale: each image is mapped to [0, 1] by :func:`unit_scale` (0 stays 0,
  its own 99.5th percentile becomes 1, clipped), so an image in arbitrary MR units and a pseudo-MRI meet;
- **KL divergence** is ``KL(real || synthetic)`` of the two intensity histograms (``bins`` equal bins on [0, 1],
  each bin count plus 1e-6 before normalising so that an empty bin does not give infinity), in nats. It needs no
  pairing: it compares intensity distributions;
- **PSNR** (dB) and **SSIM** use scikit-image (``peak_signal_noise_ratio``, ``structural_similarity``) with data
  range 1, SSIM per axial slice (the translator is 2D) and averaged; both need the two images on the same grid.

A boolean ``mask`` (same shape) restricts the histogram and PSNR to its voxels (the body, say); SSIM is computed
on the whole slices and averaged over the slices the mask touches, since its windows need neighbours.
"""

from __future__ import annotations

import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

HISTOGRAM_EPSILON = 1e-6
#: scikit-image's default SSIM window side (uniform 7x7), the smallest slice side that SSIM accepts here
SSIM_WINDOW = 7


def unit_scale(values: np.ndarray, percentile: float = 99.5) -> np.ndarray:
    """``values`` clipped at 0 and at their ``percentile`` and divided by it: float32 in [0, 1]."""
    values = np.asarray(values, dtype=np.float32)
    high = float(np.percentile(values, percentile))
    if high <= 0:
        return np.zeros(values.shape, dtype=np.float32)
    return np.clip(values / high, 0.0, 1.0)


def intensity_kl_divergence(real: np.ndarray, synthetic: np.ndarray, bins: int = 64) -> float:
    """``KL(real || synthetic)`` in nats between the histograms of two [0, 1] intensity samples (any shapes)."""
    p, _ = np.histogram(np.asarray(real).ravel(), bins=bins, range=(0.0, 1.0))
    q, _ = np.histogram(np.asarray(synthetic).ravel(), bins=bins, range=(0.0, 1.0))
    p = (p + HISTOGRAM_EPSILON) / (p.sum() + bins * HISTOGRAM_EPSILON)
    q = (q + HISTOGRAM_EPSILON) / (q.sum() + bins * HISTOGRAM_EPSILON)
    return float(np.sum(p * np.log(p / q)))


def image_similarity(
    real: np.ndarray, synthetic: np.ndarray, mask: np.ndarray | None = None, bins: int = 64
) -> dict[str, float]:
    """KL divergence, PSNR (dB) and mean slice SSIM of two ``(z, y, x)`` volumes on the same grid.

    Both are put on the common [0, 1] scale first (:func:`unit_scale`). PSNR is inf for identical images.
    """
    real, synthetic = np.asarray(real), np.asarray(synthetic)
    if real.shape != synthetic.shape:
        raise ValueError(f"the images differ in shape: {real.shape} vs {synthetic.shape}")
    if real.ndim != 3:
        raise ValueError(f"expected (z, y, x) volumes, got {real.ndim} dimensions")
    real, synthetic = unit_scale(real), unit_scale(synthetic)
    if mask is None:
        mask = np.ones(real.shape, dtype=bool)
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        raise ValueError("the mask is empty")
    in_real, in_synthetic = real[mask], synthetic[mask]
    if np.array_equal(in_real, in_synthetic):
        psnr = float("inf")
    else:
        psnr = float(peak_signal_noise_ratio(in_real, in_synthetic, data_range=1.0))
    slices = [z for z in range(real.shape[0]) if mask[z].any()]
    if min(real.shape[1:]) < SSIM_WINDOW:
        raise ValueError(f"slices of {real.shape[1:]} pixels are smaller than the SSIM window ({SSIM_WINDOW} px)")
    ssim = float(np.mean([structural_similarity(real[z], synthetic[z], data_range=1.0) for z in slices]))
    return {"kl_divergence": intensity_kl_divergence(in_real, in_synthetic, bins), "psnr_db": psnr, "ssim": ssim}
