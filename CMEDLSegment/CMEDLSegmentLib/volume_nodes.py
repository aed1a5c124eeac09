"""Scalar volume nodes to SimpleITK images and files, and labelmap files back to arrays on a node's grid.

Slicer keeps a volume's geometry in the node (the IJK-to-RAS matrix) and its voxels in a ``vtkImageData``
whose own origin and spacing stay at their defaults. The engine works in ITK's LPS convention. These
functions convert between the two without losing anything: origin, spacing and any direction, oblique
included. They only read the node: the input volume is never modified.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
import vtk
from vtkmodules.util import numpy_support

from cmedl.errors import InputError
from cmedl.volumes import write_volume

# RAS (Slicer's world) and LPS (ITK's) differ by the sign of the first two axes.
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def ijk_to_ras_matrix(volume_node) -> np.ndarray:
    """The node's 4x4 IJK-to-RAS matrix as a numpy array (mm; columns are the voxel axes times spacing)."""
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(row, column) for column in range(4)] for row in range(4)])


def volume_array(volume_node) -> np.ndarray:
    """A copy of the node's voxels as a ``(slices, rows, columns)`` = ``(K, J, I)`` array."""
    image_data = volume_node.GetImageData() if volume_node is not None else None
    if image_data is None or image_data.GetNumberOfPoints() == 0:
        raise InputError("the volume has no image data")
    if image_data.GetNumberOfScalarComponents() != 1:
        raise InputError(
            f"{volume_node.GetName()} has {image_data.GetNumberOfScalarComponents()} components per voxel; "
            "a CT is a single-component scalar volume"
        )
    columns, rows, slices = image_data.GetDimensions()
    scalars = numpy_support.vtk_to_numpy(image_data.GetPointData().GetScalars())
    return scalars.reshape(slices, rows, columns).copy()


def volume_node_to_image(volume_node) -> sitk.Image:
    """The node as a SimpleITK image in LPS with the node's exact geometry."""
    array = volume_array(volume_node)
    lps = _RAS_TO_LPS @ ijk_to_ras_matrix(volume_node)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    if np.any(spacing <= 0):
        raise InputError(f"{volume_node.GetName()} has a degenerate IJK-to-RAS matrix")
    direction = lps[:3, :3] / spacing
    image = sitk.GetImageFromArray(array)
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(o) for o in lps[:3, 3]])
    image.SetDirection([float(d) for d in direction.flatten()])
    return image


def write_volume_node(volume_node, path: str | Path, compress: bool = False) -> Path:
    """Write the node's voxels and geometry to ``path`` (.nrrd, .nii.gz or .mha), atomically.

    Uncompressed by default: the file is a hand-over to a child process, and compressing a 512x512x300 CT
    costs seconds for nothing.
    """
    path = Path(path)
    write_volume(volume_node_to_image(volume_node), path, compress=compress)
    return path


def read_labelmap_on_grid(path: str | Path, volume_node, tolerance_mm: float = 1e-3) -> np.ndarray:
    """Read a labelmap written for ``volume_node`` and return it as a ``(K, J, I)`` uint8 array.

    The file must lie on exactly the node's grid (the engine always writes on the input's grid); a file on
    any other grid is refused rather than silently misplaced.
    """
    path = Path(path)
    try:
        label = sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise InputError(f"cannot read the labelmap {path.name}: {str(error).strip().splitlines()[-1]}") from None
    reference = volume_node_to_image(volume_node)
    if label.GetSize() != reference.GetSize():
        raise InputError(f"{path.name} has size {label.GetSize()}, the volume {reference.GetSize()}")
    corners = [reference.TransformIndexToPhysicalPoint(index) for index in _corner_indices(reference.GetSize())]
    label_corners = [label.TransformIndexToPhysicalPoint(index) for index in _corner_indices(label.GetSize())]
    offset = float(np.max(np.abs(np.array(corners) - np.array(label_corners))))
    if offset > tolerance_mm:
        raise InputError(f"{path.name} is not on the volume's grid (corners differ by {offset:.3f} mm)")
    return (sitk.GetArrayFromImage(label) > 0).astype(np.uint8)


def _corner_indices(size: tuple[int, ...]) -> list[tuple[int, int, int]]:
    last = [n - 1 for n in size]
    return [(i, j, k) for i in (0, last[0]) for j in (0, last[1]) for k in (0, last[2])]


def add_volume_from_image(scene, image: sitk.Image, name: str):
    """Add ``image`` (LPS, any direction) to ``scene`` as a new scalar volume node with the same geometry."""
    array = sitk.GetArrayFromImage(image)
    if array.ndim != 3:
        raise InputError(f"{name}: expected a 3D scalar image, got {array.ndim} dimensions")
    image_data = vtk.vtkImageData()
    image_data.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    vtk_array = numpy_support.numpy_to_vtk(np.ascontiguousarray(array).reshape(-1), deep=True)
    image_data.GetPointData().SetScalars(vtk_array)
    lps = np.eye(4)
    lps[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    ras = _RAS_TO_LPS @ lps
    matrix = vtk.vtkMatrix4x4()
    for row in range(4):
        for column in range(4):
            matrix.SetElement(row, column, float(ras[row, column]))
    volume_node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    volume_node.SetIJKToRASMatrix(matrix)
    volume_node.SetAndObserveImageData(image_data)
    volume_node.CreateDefaultDisplayNodes()
    return volume_node
