"""Small model files with known behaviour, for tests, Slicer self-tests and checking an installation.

A trained network's output cannot be predicted voxel by voxel; a fixed threshold's can. The threshold model
segments everything brighter than a HU level, so a test that puts a dense block at known voxels of a CT
knows exactly where the mask must land after the whole pipeline has run.
"""

from __future__ import annotations

from pathlib import Path

from cmedl.errors import ConfigError
from cmedl.modelfile import ModelCard, save_model
from cmedl.nets import build_segmentor

THRESHOLD_MODEL_NAME = "threshold-reference"


def write_threshold_model(
    path: str | Path,
    level_hu: float = 300.0,
    hu_window: tuple[float, float] = (-1000.0, 1000.0),
    spacing_mm: tuple[float, float] = (1.0, 1.0),
    patch_size: int = 64,
) -> Path:
    """Write a model file whose network marks every voxel above ``level_hu`` as tumour.

    Args:
        path: the ``.safetensors`` file to write (atomically).
        level_hu: the threshold in HU; it must lie inside ``hu_window``.
        hu_window: the model's input window (low, high) in HU.
        spacing_mm: in-plane (x, y) spacing in mm the pipeline resamples to before the network.
        patch_size: side in pixels of the inference patches.
    """
    low, high = (float(v) for v in hu_window)
    if not low < level_hu < high:
        raise ConfigError(f"level_hu {level_hu} must lie inside the HU window ({low}, {high})")
    level = (level_hu - low) * 2.0 / (high - low) - 1.0
    # A steep slope makes the answer a hard threshold even a fraction of a HU from the level.
    network = build_segmentor("threshold", in_channels=1, num_classes=2, level=level, sharpness=2000.0)
    card = ModelCard(
        name=THRESHOLD_MODEL_NAME,
        architecture="threshold",
        architecture_options={"level": level, "sharpness": network.config["sharpness"]},
        method="reference",
        hu_window=(low, high),
        spacing_mm=(float(spacing_mm[0]), float(spacing_mm[1])),
        patch_size=int(patch_size),
        intended_use="tests and installation checks only: marks every voxel above "
        f"{level_hu:g} HU; it does not segment tumours",
        description=f"Fixed intensity threshold at {level_hu:g} HU (not a trained network).",
    )
    return save_model(path, network, card)
