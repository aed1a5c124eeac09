"""A CT volume node and one of its segments, added to a training dataset as an image and a label file.

The image keeps the node's voxels and geometry (origin, spacing and any direction, oblique included); the
segment is exported onto exactly the volume's grid with Slicer's own segmentation logic
(``ExportSegmentsToLabelmapNode`` with the volume as reference), and written as a 0/1 label with the same
geometry. Both files are NIfTI (``.nii.gz``), named after the case, and appear together: they are written
under temporary names first and renamed only when both are complete. An existing case of that name is
refused unless replacing it was asked for. Slicer works in RAS, the files in ITK's LPS: the first two rows
of the IJK-to-RAS matrix change sign.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import vtk
from slicer import vtkMRMLLabelMapVolumeNode, vtkSlicerSegmentationsModuleLogic
from vtkmodules.util import numpy_support

from cmedl.errors import InputError, NotCTError, OutputError
from cmedl.modality import ct_likelihood_report
from cmedl.volumes import atomic_output, list_volumes, stem_of

CASE_SUFFIX = ".nii.gz"
_CASE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class AddedCase:
    """The files of a case added to a dataset, and the size of its tumour."""

    name: str
    image: Path
    label: Path
    label_voxels: int
    replaced: bool


def ijk_to_lps(volume_node) -> np.ndarray:
    """The node's IJK-to-RAS matrix turned into IJK-to-LPS (4x4)."""
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    ras = np.array([[matrix.GetElement(row, column) for column in range(4)] for row in range(4)])
    return _RAS_TO_LPS @ ras


def node_voxels(volume_node) -> np.ndarray:
    """A copy of the node's voxels as a ``(K, J, I)`` array (slices, rows, columns)."""
    image_data = volume_node.GetImageData() if volume_node is not None else None
    if image_data is None or image_data.GetNumberOfPoints() == 0:
        raise InputError("the volume has no voxels")
    if image_data.GetNumberOfScalarComponents() != 1:
        raise InputError(f"{volume_node.GetName()} has several components per voxel; expected grey levels")
    columns, rows, slices = image_data.GetDimensions()
    values = numpy_support.vtk_to_numpy(image_data.GetPointData().GetScalars())
    return values.reshape(slices, rows, columns).copy()


def with_node_geometry(array: np.ndarray, volume_node) -> sitk.Image:
    """``array`` (``(K, J, I)``, on the node's grid) as a SimpleITK image with the node's geometry in LPS:
    spacing = the lengths of the matrix columns, direction = the columns divided by them."""
    lps = ijk_to_lps(volume_node)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    if np.any(spacing <= 0):
        raise InputError(f"{volume_node.GetName()} has a degenerate geometry (a zero voxel size)")
    image = sitk.GetImageFromArray(array)
    image.SetSpacing([float(value) for value in spacing])
    image.SetOrigin([float(value) for value in lps[:3, 3]])
    image.SetDirection([float(value) for value in (lps[:3, :3] / spacing).flatten()])
    return image


def node_to_image(volume_node) -> sitk.Image:
    """The node's voxels as a SimpleITK image with the node's geometry in LPS."""
    return with_node_geometry(node_voxels(volume_node), volume_node)


def segment_to_image(scene, segmentation_node, segment_id: str, volume_node) -> sitk.Image:
    """The segment as a 0/1 uint8 image on exactly ``volume_node``'s grid (same geometry as its image)."""
    segmentation = segmentation_node.GetSegmentation() if segmentation_node is not None else None
    if segmentation is None or segmentation.GetSegment(segment_id) is None:
        raise InputError(f"segment {segment_id!r} is not in the segmentation")
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", f"{segment_id} export")
    try:
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(segment_id)
        if not vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            segmentation_node, ids, labelmap, volume_node
        ):
            raise OutputError(f"Slicer could not export segment {segment_id!r} onto {volume_node.GetName()}")
        return _labelmap_on_grid(labelmap, volume_node)
    finally:
        scene.RemoveNode(labelmap)


def _labelmap_on_grid(labelmap: vtkMRMLLabelMapVolumeNode, volume_node) -> sitk.Image:
    reference = volume_node.GetImageData().GetDimensions()
    data = labelmap.GetImageData()
    if data is None or data.GetDimensions() != reference:
        raise OutputError("the exported segment is not on the volume's grid")
    if not np.allclose(ijk_to_lps(labelmap), ijk_to_lps(volume_node), atol=1e-6):
        raise OutputError("the exported segment is not on the volume's grid")
    return with_node_geometry((node_voxels(labelmap) > 0).astype(np.uint8), volume_node)


def existing_case_files(images_folder: Path, labels_folder: Path, name: str) -> list[Path]:
    """Files in either folder that belong to case ``name`` (any volume format)."""
    found = []
    for folder in (images_folder, labels_folder):
        if folder.is_dir():
            found.extend(path for path in list_volumes(folder) if stem_of(path) == name)
    return found


def add_case(
    scene,
    volume_node,
    segmentation_node,
    segment_id: str,
    images_folder: str | Path,
    labels_folder: str | Path,
    name: str,
    overwrite: bool = False,
    require_ct: bool = True,
) -> AddedCase:
    """Write ``volume_node`` and its segment ``segment_id`` as case ``name`` of a dataset (see the docstring).

    Raises:
        InputError: bad case name, no such segment, an empty segment, or the case exists and not ``overwrite``.
        NotCTError: ``require_ct`` and the volume does not look like a CT in Hounsfield units.
        OutputError: a file cannot be written (nothing of the case is left then).
    """
    if not _CASE_NAME.fullmatch(name or "") or stem_of(name) != name:
        raise InputError(f"{name!r} is not a usable case name: use letters, digits, '.', '_' or '-', no suffix")
    if not str(images_folder).strip() or not str(labels_folder).strip():
        raise InputError("choose the CT images and labels folders first")
    images_folder, labels_folder = Path(images_folder), Path(labels_folder)
    existing = existing_case_files(images_folder, labels_folder, name)
    if existing and not overwrite:
        shown = ", ".join(str(path) for path in existing)
        raise InputError(f"case {name!r} already exists ({shown}); choose another name or replace it")
    image = node_to_image(volume_node)
    if require_ct:
        report = ct_likelihood_report(image)
        if not report["looks_like_ct"]:
            raise NotCTError(f"{volume_node.GetName()} does not look like a CT in Hounsfield units: {report['reason']}")
    label = segment_to_image(scene, segmentation_node, segment_id, volume_node)
    voxels = int(np.count_nonzero(sitk.GetArrayViewFromImage(label)))
    if voxels == 0:
        raise InputError(f"segment {segment_id!r} is empty on {volume_node.GetName()}'s grid")
    image_path = images_folder / f"{name}{CASE_SUFFIX}"
    label_path = labels_folder / f"{name}{CASE_SUFFIX}"
    for folder in (images_folder, labels_folder):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise OutputError(f"cannot create {folder}: {error.strerror or error}") from None
    # Both files are complete before either is renamed; the label goes first, so a case never appears
    # as an image without its label.
    with atomic_output(image_path) as image_temp, atomic_output(label_path) as label_temp:
        try:
            sitk.WriteImage(image, str(image_temp), True)
            sitk.WriteImage(label, str(label_temp), True)
        except RuntimeError as error:
            raise OutputError(f"cannot write case {name!r}: {str(error).strip().splitlines()[-1]}") from None
    for path in existing:
        if path not in (image_path, label_path):
            path.unlink(missing_ok=True)
    return AddedCase(name, image_path, label_path, voxels, replaced=bool(existing))


def segment_ids_and_names(segmentation_node) -> list[tuple[str, str]]:
    """``(segment id, name)`` of every segment, in the segmentation's order."""
    if segmentation_node is None:
        return []
    segmentation = segmentation_node.GetSegmentation()
    pairs = []
    for index in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(index)
        pairs.append((segment_id, segmentation.GetSegment(segment_id).GetName()))
    return pairs


def suggested_case_name(volume_node, images_folder: str | Path) -> str:
    """A case name from the volume's name that is not yet taken in ``images_folder``."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", volume_node.GetName() if volume_node else "").strip("._-") or "case"
    folder = Path(images_folder) if str(images_folder).strip() else None
    taken = {stem_of(path) for path in list_volumes(folder)} if folder is not None and folder.is_dir() else set()
    name, number = base, 2
    while name in taken:
        name, number = f"{base}_{number}", number + 1
    return name
