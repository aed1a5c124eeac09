"""Reading a gzipped NIfTI volume with one decompression instead of two.

Every ``.nii.gz`` input is inflated to its end before it is used (:mod:`cmedl.imagefiles`): SimpleITK reads a
cut-off or damaged one without complaint. Letting SimpleITK then read the file would inflate it a second time;
on a 512 x 512 x 300 CT that second pass is about half the reading time, and reading is most of what a GPU run
spends on a CT. So the voxels are taken from the checked decompression itself.

SimpleITK stays the judge of the geometry: :func:`image_from_nifti_content` asks its NIfTI reader for the
header's meaning (size, pixel type, origin, spacing, direction, which it derives from the qform or sform) and
only places the voxels. Whatever this module does not reproduce exactly is left to SimpleITK's full read (the
function returns None): a rank other than 3, a data type outside the plain integer and float ones, and
intensity scaling (``scl_slope``/``scl_inter``), which ITK applies while reading.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import SimpleITK as sitk

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


def _layout(content: bytes | bytearray) -> tuple[str, int, tuple[int, ...], int, float, float] | None:
    """(byte order, datatype, dim[0..7], voxel offset, scl_slope, scl_inter) of a NIfTI-1 or NIfTI-2 header."""
    for order in ("<", ">"):
        size = struct.unpack_from(order + "i", content, 0)[0] if len(content) >= 4 else 0
        if size == 348 and len(content) >= 348 and bytes(content[344:347]) == b"n+1":
            datatype = struct.unpack_from(order + "h", content, 70)[0]
            dims = struct.unpack_from(order + "8h", content, 40)
            offset = struct.unpack_from(order + "f", content, 108)[0]
            slope, inter = struct.unpack_from(order + "2f", content, 112)
        elif size == 540 and len(content) >= 540 and bytes(content[4:7]) == b"n+2":
            datatype = struct.unpack_from(order + "h", content, 12)[0]
            dims = struct.unpack_from(order + "8q", content, 16)
            offset = struct.unpack_from(order + "q", content, 168)[0]
            slope, inter = struct.unpack_from(order + "2d", content, 176)
        else:
            continue
        if not math.isfinite(offset) or offset < 0:
            return None
        return order, datatype, tuple(dims), int(offset), float(slope), float(inter)
    return None


def image_from_nifti_content(path: str | Path, content: bytes | bytearray) -> sitk.Image | None:
    """The volume of the ``.nii.gz`` at ``path`` from ``content``, its already decompressed bytes; None when the
    file needs SimpleITK's full read (see the module docstring).

    The voxels come from ``content`` (file order: x fastest, as ITK reads them); the image's geometry is what
    SimpleITK's NIfTI reader makes of the header. Raises ``RuntimeError`` as ``SimpleITK.ReadImage`` would when
    ITK refuses the header.
    """
    layout = _layout(content)
    if layout is None:
        return None
    order, datatype, dims, offset, slope, inter = layout
    if dims[0] != 3 or datatype not in _PLAIN_TYPES:
        return None
    # ITK rescales (and turns the pixels to float) unless the slope is 0 or 1 and the intercept is 0.
    if slope not in (0.0, 1.0) or inter != 0.0:
        return None
    code, pixel_id = _PLAIN_TYPES[datatype]
    size = tuple(int(extent) for extent in dims[1:4])
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
    dtype = np.dtype(order + code)
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
