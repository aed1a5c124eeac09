"""Synthetic unpaired CT and T2-weighted MRI chest phantoms with known lung tumours.

A phantom is drawn from a seed as a tissue map (one :class:`Tissue` code per voxel, arrays ``(z, y, x)``,
LPS millimetres), with 1-3 lobulated tumours of 1-6 cm, and then rendered in one modality: CT as int16 HU,
MR as float32 arbitrary units. The modules, each importing only those listed after it:

* :mod:`~cmedl.phantom.dataset`: :func:`write_phantom_dataset`, unpaired CT/MR datasets on disk and
  ``tumours.csv``;
* :mod:`~cmedl.phantom.case`: :func:`make_phantom` and :class:`PhantomCase`, one case;
* :mod:`~cmedl.phantom.tumours`: tumour sites, placement and :func:`measure_tumour_contrast`;
* :mod:`~cmedl.phantom.rendering`: tissue map to CT HU or MR intensities, with blur, noise and coil bias;
* :mod:`~cmedl.phantom.anatomy`: the tissue codes and the chest drawn into a tissue map, and its grid.
"""

from cmedl.phantom.anatomy import IN_PLANE_SPACING_MM, MAX_SLICES, REFERENCE_MATRIX, SLICE_THICKNESSES_MM, Tissue
from cmedl.phantom.case import MAX_SIZE, MIN_SIZE, PEAK_BYTES_PER_VOXEL, PhantomCase, make_phantom, size_problem
from cmedl.phantom.dataset import TUMOUR_TABLE_COLUMNS, case_seed, write_phantom_dataset
from cmedl.phantom.tumours import (
    CHEST_WALL_TISSUES,
    CONTRAST_REFERENCE_TISSUES,
    CT_TUMOUR_CONTRAST_LIMIT_HU,
    LOCATION_ODDS,
    LOCATIONS,
    LUNG_FIELD_TISSUES,
    MEDIASTINAL_TISSUES,
    TUMOUR_DIAMETER_MM,
    measure_tumour_contrast,
)

__all__ = [
    "CHEST_WALL_TISSUES",
    "CONTRAST_REFERENCE_TISSUES",
    "CT_TUMOUR_CONTRAST_LIMIT_HU",
    "IN_PLANE_SPACING_MM",
    "LOCATIONS",
    "LOCATION_ODDS",
    "LUNG_FIELD_TISSUES",
    "MAX_SIZE",
    "MAX_SLICES",
    "MEDIASTINAL_TISSUES",
    "MIN_SIZE",
    "PEAK_BYTES_PER_VOXEL",
    "REFERENCE_MATRIX",
    "SLICE_THICKNESSES_MM",
    "TUMOUR_DIAMETER_MM",
    "TUMOUR_TABLE_COLUMNS",
    "PhantomCase",
    "Tissue",
    "case_seed",
    "make_phantom",
    "measure_tumour_contrast",
    "size_problem",
    "write_phantom_dataset",
]
