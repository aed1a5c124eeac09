"""Lesions and confidence in the scene: one segment per lesion, the probability map as an overlay, removing a lesion.

Qt-free scene code: every function takes the nodes it works on. The lesions are those of the engine
(:mod:`cmedl.lesions`): 3D connected components of a segment's voxels, numbered by decreasing volume, so the
ids here match the ``id`` column of the lesion table ``cmedl segment --lesions`` writes for the same mask.

- :func:`split_lesions_into_segments`: the tumour segment becomes one segment per lesion ("Lung tumour 1",
  "Lung tumour 2", ...), each with the original's terminology and the lesion's measurements as segment tags.
- :func:`add_probability_volume` / :func:`show_probability_overlay`: the uint8 probability map (0-255 for
  0-1) as a scalar volume with a cold-to-hot colour table, shown over the CT in the slice views; voxels below
  a probability are transparent.
- :func:`remove_lesion`: delete one lesion's voxels from a segment (by lesion id or by a point on it).
- :func:`centre_views_on`: move every slice view to a point (a lesion's centroid from the table).
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import vtk
from slicer import (
    vtkMRMLColorTableNode,
    vtkMRMLSliceNode,
    vtkOrientedImageData,
    vtkSegment,
    vtkSlicerSegmentationsModuleLogic,
)
from vtkmodules.util import numpy_support

from cmedl.errors import InputError, OutputError
from CMEDLSegmentLib.segmentation_nodes import mask_volume_ml, oriented_labelmap
from CMEDLSegmentLib.volume_nodes import add_volume_from_image, ijk_to_ras_matrix, volume_node_to_image

#: Colour tables tried in this order for the probability overlay; the first one in the scene is used. Inside
#: Slicer the colour logic has loaded them; a bare scene (tests, scripts) gets :data:`OWN_COLOR_TABLE_NAME`.
PREFERRED_COLOR_NODE_IDS = (
    "vtkMRMLColorTableNodeFileColdToHotRainbow.txt",
    "vtkMRMLPETProceduralColorNodePET-Heat",
    "vtkMRMLColorTableNodeRainbow",
)
OWN_COLOR_TABLE_NAME = "CMEDL cold to hot"
PROBABILITY_SCALE = 255.0  # the engine writes round(p * 255)
DEFAULT_OVERLAY_OPACITY = 0.5
DEFAULT_VISIBLE_FROM = 0.1  # probabilities below this are transparent in the overlay
LESION_ID_TAG = "CMEDL.LesionId"
_TAGGED_COLUMNS = ("volume_ml", "long_axis_mm", "short_axis_mm", "max_probability", "mean_probability", "location")


# -- segment <-> array ----------------------------------------------------------------------------------


def segment_mask(segmentation_node, segment_id: str, volume_node) -> np.ndarray:
    """The segment as a ``(K, J, I)`` boolean array on ``volume_node``'s grid (Slicer's own export)."""
    from slicer import vtkMRMLLabelMapVolumeNode

    if segmentation_node.GetSegmentation().GetSegment(segment_id) is None:
        raise InputError(f"segment {segment_id!r} is not in {segmentation_node.GetName()}")
    scene = volume_node.GetScene()
    labelmap = vtkMRMLLabelMapVolumeNode()
    scene.AddNode(labelmap)
    try:
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(segment_id)
        if not vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            segmentation_node, ids, labelmap, volume_node
        ):
            raise OutputError(f"Slicer could not export segment {segment_id!r}")
        image = labelmap.GetImageData()
        columns, rows, slices = image.GetDimensions()
        values = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
        return values.reshape(slices, rows, columns) > 0
    finally:
        scene.RemoveNode(labelmap)


def _cropped_labelmap(mask: np.ndarray, offset_kji: tuple[int, int, int], volume_node) -> vtkOrientedImageData:
    """A binary labelmap covering only ``mask``'s box (first voxel at ``offset_kji``) on the volume's grid.

    A lesion is a small part of a CT: its segment's labelmap need not be the CT's size.
    """
    slices, rows, columns = mask.shape
    k0, j0, i0 = offset_kji
    image = vtkOrientedImageData()
    image.SetExtent(i0, i0 + columns - 1, j0, j0 + rows - 1, k0, k0 + slices - 1)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    flat = np.ascontiguousarray(mask.reshape(-1) > 0, dtype=np.uint8)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(flat, deep=True, array_type=vtk.VTK_UNSIGNED_CHAR))
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    image.SetImageToWorldMatrix(matrix)
    return image


def _write_segment(segmentation_node, segment_id: str, labelmap: vtkOrientedImageData) -> None:
    if not vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        labelmap, segmentation_node, segment_id, vtkSlicerSegmentationsModuleLogic.MODE_REPLACE
    ):
        raise OutputError(f"Slicer refused the labelmap for segment {segment_id!r}")


# -- one segment per lesion -----------------------------------------------------------------------------


@dataclass
class LesionSegment:
    """A segment made for one lesion: its lesion id (the table's ``id``), segment id and volume in mL."""

    lesion_id: int
    segment_id: str
    volume_ml: float


def lesion_colour(index: int, first: tuple[float, float, float]) -> tuple[float, float, float]:
    """Colour of lesion ``index`` (1-based): the tumour's own colour first, then hues spread around it."""
    if index <= 1:
        return first
    hue, lightness, saturation = colorsys.rgb_to_hls(*first)
    hue = (hue + 0.38196601 * (index - 1)) % 1.0  # golden-ratio steps keep neighbours apart
    return tuple(float(c) for c in colorsys.hls_to_rgb(hue, lightness, max(saturation, 0.5)))  # type: ignore[return-value]


def split_lesions_into_segments(
    segmentation_node,
    segment_id: str,
    volume_node,
    lesions: list[dict] | None = None,
    lesion_labels: np.ndarray | None = None,
    keep_original: bool = False,
) -> list[LesionSegment]:
    """Replace segment ``segment_id`` by one segment per lesion, named "<name> <id>"; returns them by id.

    Args:
        segmentation_node: the segmentation holding the tumour segment.
        segment_id: the tumour segment (for example the one CMEDL Segment wrote).
        volume_node: the CT the segmentation was made on: its grid is the lesions' grid.
        lesions: the lesion table rows (``cmedl segment --lesions`` or the run's result); their
            measurements go into each segment's tags (``CMEDL.volume_ml``, ...). Optional.
        lesion_labels: lesion ids ``(K, J, I)`` on the volume's grid (:func:`cmedl.lesions.label_lesions`);
            None computes them from the segment, which gives the same ids as the engine for the same mask.
        keep_original: keep the tumour segment beside the lesion segments (default: it is removed).

    Running it again on a segment whose lesions already have segments replaces their content (segments are
    found by name). Each lesion segment keeps the original's terminology and gets its lesion id as the tag
    ``CMEDL.LesionId``.
    """
    segmentation = segmentation_node.GetSegmentation()
    original = segmentation.GetSegment(segment_id)
    if original is None:
        raise InputError(f"segment {segment_id!r} is not in {segmentation_node.GetName()}")
    if lesion_labels is None:
        lesion_labels = _label_lesions(segment_mask(segmentation_node, segment_id, volume_node))
    else:
        expected = tuple(reversed(volume_node.GetImageData().GetDimensions()))
        if tuple(lesion_labels.shape) != expected:
            raise InputError(f"the lesion ids {lesion_labels.shape} do not match the volume {expected}")
    rows_by_id = {int(row["id"]): row for row in lesions or []}
    name = original.GetName()
    colour = tuple(original.GetColor())
    terminology = vtk.reference("")
    has_terminology = original.GetTag(vtkSegment.GetTerminologyEntryTagName(), terminology)
    made = []
    for lesion_id, box in enumerate(_boxes(lesion_labels), start=1):
        if box is None:
            continue
        crop = lesion_labels[box] == lesion_id
        lesion_name = f"{name} {lesion_id}"
        new_id = segmentation.GetSegmentIdBySegmentName(lesion_name) or segmentation.AddEmptySegment(
            "", lesion_name, list(lesion_colour(lesion_id, colour))
        )
        if not new_id:
            raise OutputError(f"could not add a segment to {segmentation_node.GetName()}")
        segment = segmentation.GetSegment(new_id)
        if has_terminology:
            segment.SetTag(vtkSegment.GetTerminologyEntryTagName(), str(terminology))
        segment.SetTag(LESION_ID_TAG, str(lesion_id))
        for column in _TAGGED_COLUMNS:
            if lesion_id in rows_by_id and rows_by_id[lesion_id].get(column) is not None:
                segment.SetTag(f"CMEDL.{column}", str(rows_by_id[lesion_id][column]))
        _write_segment(segmentation_node, new_id, _cropped_labelmap(crop, tuple(s.start for s in box), volume_node))
        made.append(LesionSegment(lesion_id, new_id, mask_volume_ml(crop, volume_node)))
    if not keep_original:
        segmentation.RemoveSegment(segment_id)
    return made


def _label_lesions(mask: np.ndarray) -> np.ndarray:
    # The engine's lesion module needs scipy and scikit-image, which Slicer gets only with the first run:
    # imported here, not with the module, so that the panel loads without them.
    from cmedl.lesions import label_lesions

    return label_lesions(mask)


def _boxes(labels: np.ndarray) -> list[tuple[slice, ...] | None]:
    from scipy import ndimage

    return list(ndimage.find_objects(labels)) if labels.any() else []


def lesion_segment_ids(segmentation_node) -> dict[int, str]:
    """Lesion id -> segment id of the segments :func:`split_lesions_into_segments` made."""
    segmentation = segmentation_node.GetSegmentation()
    found = {}
    for index in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(index)
        value = vtk.reference("")
        if segment.GetTag(LESION_ID_TAG, value):
            found[int(str(value))] = segmentation.GetNthSegmentID(index)
    return found


# -- removing a lesion ----------------------------------------------------------------------------------


def ras_to_index(volume_node, point_ras: tuple[float, float, float]) -> tuple[int, int, int]:
    """The (K, J, I) voxel holding ``point_ras`` (mm), rounded to the nearest voxel centre."""
    ijk = np.linalg.solve(ijk_to_ras_matrix(volume_node), np.array([*point_ras, 1.0]))[:3]
    i, j, k = (int(round(float(v))) for v in ijk)
    return k, j, i


def remove_lesion(
    segmentation_node,
    segment_id: str,
    volume_node,
    lesion_id: int | None = None,
    point_ras: tuple[float, float, float] | None = None,
) -> float:
    """Delete one lesion's voxels from segment ``segment_id``; returns the volume removed in mL.

    The lesion is given by its id (as numbered by :func:`cmedl.lesions.label_lesions` on the segment as it is
    now: for an unedited result, the table's ``id``), or by a point on it in RAS mm (a click). A segment made
    for a single lesion (:func:`split_lesions_into_segments`) is simply removed with
    ``segmentation.RemoveSegment``.
    """
    if (lesion_id is None) == (point_ras is None):
        raise InputError("name the lesion by its id or by a point on it, not both")
    mask = segment_mask(segmentation_node, segment_id, volume_node)
    labels = _label_lesions(mask)
    if point_ras is not None:
        index = ras_to_index(volume_node, point_ras)
        if not all(0 <= v < n for v, n in zip(index, labels.shape)) or labels[index] == 0:
            raise InputError("no lesion of the segment at that point")
        lesion_id = int(labels[index])
    if not 1 <= int(lesion_id) <= int(labels.max(initial=0)):
        raise InputError(f"segment {segment_id!r} has no lesion {lesion_id}")
    removed = labels == int(lesion_id)
    mask &= ~removed
    _write_segment(segmentation_node, segment_id, oriented_labelmap(mask, volume_node))
    return mask_volume_ml(removed, volume_node)


# -- probability overlay --------------------------------------------------------------------------------


def probability_colour_node(scene):
    """A cold-to-hot colour node for probabilities: Slicer's own when loaded, else one made once per scene."""
    for node_id in PREFERRED_COLOR_NODE_IDS:
        node = scene.GetNodeByID(node_id)
        if node is not None:
            return node
    existing = scene.GetFirstNodeByName(OWN_COLOR_TABLE_NAME)
    if existing is not None:
        return existing
    table = vtkMRMLColorTableNode()
    table.SetName(OWN_COLOR_TABLE_NAME)
    table.SetTypeToUser()
    table.SetNumberOfColors(256)
    for index in range(256):
        # Hue from blue (cold, p = 0) through cyan, green and yellow to red (hot, p = 1).
        red, green, blue = colorsys.hsv_to_rgb((2.0 / 3.0) * (1.0 - index / 255.0), 1.0, 1.0)
        table.SetColor(index, f"{index / PROBABILITY_SCALE:.2f}", red, green, blue, 1.0)
    table.SetAttribute("Category", "CMEDL")
    scene.AddNode(table)
    return table


def add_probability_volume(
    scene,
    probabilities: sitk.Image | str | Path,
    reference_volume_node,
    name: str | None = None,
    visible_from: float = DEFAULT_VISIBLE_FROM,
    tolerance_mm: float = 1e-3,
    what: str = "probability map",
):
    """Add the engine's probability map (uint8, 0-255 for 0-1) as a scalar volume with a colour table.

    ``probabilities`` is the image or its file (``cmedl segment --probabilities``, or ``--uncertainty``, a map of
    the same form; ``what`` names it in errors); it must lie on the reference CT's grid. The display maps 0-255
    onto the colour table and leaves voxels below ``visible_from`` (a probability, 0-1) transparent, so the CT
    shows through where the model sees nothing. The new node sits under the CT's parent transform; it is not
    shown yet (:func:`show_probability_overlay`).
    """
    if not isinstance(probabilities, sitk.Image):
        path = Path(probabilities)
        try:
            probabilities = sitk.ReadImage(str(path))
        except RuntimeError as error:
            lines = [line for line in str(error).splitlines() if line.strip()]
            raise InputError(f"cannot read the {what} {path.name}: {lines[-1] if lines else error}") from None
    reference = volume_node_to_image(reference_volume_node)
    if probabilities.GetSize() != reference.GetSize():
        raise InputError(f"the {what} has size {probabilities.GetSize()}, the CT {reference.GetSize()}")
    corners = [(0, 0, 0), tuple(n - 1 for n in reference.GetSize())]
    offset = max(
        float(np.max(np.abs(np.subtract(
            probabilities.TransformIndexToPhysicalPoint(corner), reference.TransformIndexToPhysicalPoint(corner)
        ))))
        for corner in corners
    )  # fmt: skip
    if offset > tolerance_mm:
        raise InputError(f"the {what} is not on the CT's grid (corners differ by {offset:.3f} mm)")
    node = add_volume_from_image(
        scene, sitk.Cast(probabilities, sitk.sitkUInt8), name or f"{reference_volume_node.GetName()} probability"
    )
    node.SetAndObserveTransformNodeID(reference_volume_node.GetTransformNodeID())
    display = node.GetDisplayNode()
    display.SetAndObserveColorNodeID(probability_colour_node(scene).GetID())
    display.SetAutoWindowLevel(0)
    display.SetWindowLevelMinMax(0.0, PROBABILITY_SCALE)
    display.SetAutoThreshold(0)
    display.SetThreshold(float(np.ceil(visible_from * PROBABILITY_SCALE)), PROBABILITY_SCALE)
    display.SetApplyThreshold(1)
    node.SetAttribute("CMEDL.Probability", "1")
    return node


def show_probability_overlay(
    scene, probability_node, opacity: float = DEFAULT_OVERLAY_OPACITY, background_node=None
) -> int:
    """Show ``probability_node`` as the foreground of every slice view at ``opacity`` (0-1).

    ``background_node`` (the CT) becomes the background where a view has none. ``probability_node`` None
    hides the overlay again: views showing a CMEDL probability map as foreground show nothing there.
    Returns the number of slice views changed.
    """
    if not 0.0 <= opacity <= 1.0:
        raise InputError(f"overlay opacity must be between 0 and 1, got {opacity!r}")
    changed = 0
    composites = scene.GetNodesByClass("vtkMRMLSliceCompositeNode")
    for index in range(composites.GetNumberOfItems()):
        composite = composites.GetItemAsObject(index)
        if probability_node is None:
            current = scene.GetNodeByID(composite.GetForegroundVolumeID() or "")
            if current is not None and current.GetAttribute("CMEDL.Probability") == "1":
                composite.SetForegroundVolumeID(None)
                changed += 1
            continue
        if background_node is not None and not composite.GetBackgroundVolumeID():
            composite.SetBackgroundVolumeID(background_node.GetID())
        composite.SetForegroundVolumeID(probability_node.GetID())
        composite.SetForegroundOpacity(float(opacity))
        changed += 1
    return changed


# -- navigation -----------------------------------------------------------------------------------------


def centre_views_on(scene, point_ras: tuple[float, float, float]) -> None:
    """Centre every slice view on ``point_ras`` (mm), e.g. a lesion's ``centroid_r/a/s_mm`` from the table."""
    r, a, s = (float(v) for v in point_ras)
    vtkMRMLSliceNode.JumpAllSlices(scene, r, a, s, vtkMRMLSliceNode.CenteredJumpSlice)
