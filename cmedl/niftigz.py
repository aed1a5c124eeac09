"""Reading a gzipped NIfTI volume with one decompression instead of two.

Every ``.nii.gz`` input is inflated to its end before it is used (:mod:`cmedl.imagefiles`): SimpleITK reads a
cut-off or damaged one without complaint. Letting SimpleITK then read the file would inflate it a second time;
on a 512 x 512 x 300 CT that second pass is about half the reading time, and reading is most of what a GPU run
spends on a CT. So the voxels are taken from the checked decompression itself, where memory allows
(:func:`one_pass_fits`).

SimpleITK stays the judge of the geometry: :func:`image_from_nifti_content` asks its NIfTI reader for the
header's meaning (size, pixel type, origin, spacing, direction, which it derives from the qform or sform) and
only places the voxels. Whatever this module does not reproduce exactly is left to SimpleITK's full read (the
function returns None): a rank other than 3, a data type outside the plain integer and float ones, and
intensity scaling (``scl_slope``/``scl_inter``), which ITK applies while reading.
"""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from cmedl.imagefiles import read_nifti_header
from cmedl.memory import available_ram_bytes

# NIfTI datatype codes the fast path takes, with the numpy type of their voxels and ITK's pixel type for them.
_PLAIN_TYPES: dict[int, tuple[str, int]] = {
    2: ("u1", sitk.sitkUInt8),
    4: ("i2", sitk.sitkInt16),
    8: ("i4", sitk.sitkInt32),
    16: ("f4", sitk.sitkFloat32),
    64: ("f8", sitk.sitkFloat64),
    256: ("i1", sitk.sitkInt8),
    512: ("u2", sitk.sitkUInt16),
    768: ("u4", sitk.sitkUInt32),
}


def one_pass_fits(path: str | Path, available: int | None = None) -> bool:
    """Whether reading ``path`` in one decompression fits in memory: it holds the decompressed file and the
    image's copy of its voxels at once (SimpleITK's own read holds one), and they may take at most half of the
    memory available now (``available`` bytes, default :func:`cmedl.memory.available_ram_bytes`). Only the first
    bytes are decompressed to tell; a file that is not a NIfTI, or damaged, is left to the usual read."""
    try:
        with gzip.open(path, "rb") as handle:
            header = read_nifti_header(handle.read(540))
    except (OSError, EOFError, zlib.error):
        return False
    if header is None or header.voxel_bytes is None:
        return False
    available = available_ram_bytes() if available is None else available
    return available is None or 2 * (header.voxel_offset + header.voxel_bytes) <= available // 2


def image_from_nifti_content(path: str | Path, content: bytes | bytearray) -> sitk.Image | None:
    """The volume of the ``.nii.gz`` at ``path`` from ``content``, its already decompressed bytes; None when the
    file needs SimpleITK's full read (see the module docstring).

    The voxels come from ``content`` (file order: x fastest, as ITK reads them); the image's geometry is what
    SimpleITK's NIfTI reader makes of the header. Raises ``RuntimeError`` as ``SimpleITK.ReadImage`` would when
    ITK refuses the header.
    """
    header = read_nifti_header(content)
    if header is None or header.problem or header.dims[0] != 3 or header.datatype not in _PLAIN_TYPES:
        return None
    # ITK rescales (and turns the pixels to float) unless the slope is 0 or 1 and the intercept is 0.
    slope, inter = header.scaling
    if slope not in (0.0, 1.0) or inter != 0.0:
        return None
    code, pixel_id = _PLAIN_TYPES[header.datatype]
    size = tuple(int(extent) for extent in header.dims[1:4])
    offset = header.voxel_offset
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    if (
        reader.GetDimension() != 3
        or tuple(reader.GetSize()) != size
        or reader.GetNumberOfComponents() != 1
        or reader.GetPixelID() != pixel_id
    ):
        return None
    dtype = np.dtype(header.byte_order + code)
    count = math.prod(size)
    if offset + count * dtype.itemsize > len(content):
        return None  # the check before this one refuses such a file; never read past the end
    voxels = np.frombuffer(content, dtype=dtype, count=count, offset=offset).reshape(size[::-1])
    if not dtype.isnative:
        voxels = voxels.astype(dtype.newbyteorder("="))
    image = sitk.GetImageFromArray(voxels)  # a copy: ``content`` can go
    image.SetOrigin(reader.GetOrigin())
    image.SetSpacing(reader.GetSpacing())
    image.SetDirection(reader.GetDirection())
    return image
