"""The options of a segmentation run, their defaults and what values inference accepts.

:class:`SegmentOptions` is the one place these are defined: ``cmedl segment``'s flags take their defaults from
it, and the Slicer panel builds its runs from it (its parameter node's defaults are checked against it). This
module imports the standard library only, so that the command line's parser and a panel read the defaults
without loading torch, NumPy or SimpleITK.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from cmedl.devices import DEFAULT_DEVICE
from cmedl.errors import InputError

# The options that change a result; device and batch size do not (batch resume compares these).
RESULT_OPTIONS = (
    "lung_threshold_hu",
    "roi_margin_mm",
    "probability_threshold",
    "overlap",
    "tta",
    "min_lesion_ml",
    "min_lesion_probability",
)


@dataclass
class SegmentOptions:
    """User-adjustable inference settings.

    Attributes:
        lung_threshold_hu: HU below which a voxel counts as air for lung detection.
        roi_margin_mm: in-plane margin around the lungs' bounding box.
        probability_threshold: tumour probability at or above which a voxel is labelled.
        batch_size: patches per network call; None lets the engine choose from the device
            (:meth:`cmedl.inference.InferenceEngine.tiles_per_call`: 4 on a CPU, as many as the free GPU memory
            allows on a GPU, up to 64).
        overlap: fraction by which neighbouring patches overlap.
        device: ``auto`` (CUDA when usable, else CPU), ``cpu`` or ``cuda``.
        force: segment even when the image does not look like CT.
        tta: test-time augmentation: average over the slice as is, mirrored left-right and mirrored
            front-back (three network passes); their standard deviation is the uncertainty.
        min_lesion_ml: lesions smaller than this (mL) are removed from the result; 0 keeps all.
        min_lesion_probability: lesions whose peak tumour probability is below this (0-1) are removed;
            0 keeps all. Only values above ``probability_threshold`` can remove anything.
    """

    lung_threshold_hu: float = -300.0
    roi_margin_mm: float = 30.0
    probability_threshold: float = 0.5
    batch_size: int | None = None
    overlap: float = 0.25
    device: str = DEFAULT_DEVICE
    force: bool = False
    tta: bool = False
    min_lesion_ml: float = 0.0
    min_lesion_probability: float = 0.0

    def validate(self) -> SegmentOptions:
        """Refuse values inference cannot use, with one line (an :class:`InputError`, exit 3); returns self.

        ``roi_margin_mm`` finite within 0-500 mm; ``lung_threshold_hu`` finite within -1000..0 HU (what lung
        detection accepts); ``probability_threshold`` strictly between 0 and 1; ``batch_size`` None or an
        integer from 1 to 4096 (larger batches only exhaust memory, after minutes); ``overlap`` within [0, 1).
        Comparisons are written so that NaN fails them.
        """
        if not 0.0 <= self.roi_margin_mm <= 500.0:
            raise InputError(f"ROI margin must be between 0 and 500 mm, got {self.roi_margin_mm!r}")
        if not -1000.0 < self.lung_threshold_hu < 0.0:
            raise InputError(f"lung threshold must be between -1000 and 0 HU, got {self.lung_threshold_hu!r}")
        if not 0.0 < self.probability_threshold < 1.0:
            raise InputError(f"probability threshold must be between 0 and 1, got {self.probability_threshold!r}")
        batch = self.batch_size
        if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or not 1 <= batch <= 4096):
            raise InputError(f"batch size must be an integer from 1 to 4096, got {self.batch_size!r}")
        if not 0.0 <= self.overlap < 1.0:
            raise InputError(f"patch overlap must be at least 0 and below 1, got {self.overlap!r}")
        if not (0.0 <= self.min_lesion_ml and math.isfinite(self.min_lesion_ml)):
            raise InputError(f"minimum lesion volume must be 0 mL or more, got {self.min_lesion_ml!r}")
        if not 0.0 <= self.min_lesion_probability <= 1.0:
            raise InputError(f"minimum lesion probability must be between 0 and 1, got {self.min_lesion_probability!r}")
        return self

    def result_options(self) -> dict[str, Any]:
        """The options that change the result (see :data:`RESULT_OPTIONS`), as plain values."""
        return {key: getattr(self, key) for key in RESULT_OPTIONS}
