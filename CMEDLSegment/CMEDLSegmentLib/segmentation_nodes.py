"""Writing a tumour mask into a segmentation node so that it is ready for editing and DICOM SEG export.

The segmentation gets the input volume as its reference geometry (DICOM SEG export needs it), sits in the
input's subject-hierarchy study and under the input's parent transform, and its segment carries the model's
name, colour and DICOM terminology. A second run replaces the segment's content instead of adding nodes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import vtk
from slicer import (
    vtkMRMLSegmentationNode,
    vtkMRMLSubjectHierarchyNode,
    vtkOrientedImageData,
    vtkSegment,
    vtkSlicerSegmentationsModuleLogic,
)
from vtkmodules.util import numpy_support

from cmedl.errors import InputError, OutputError
from CMEDLSegmentLib.volume_nodes import ijk_to_ras_matrix


@dataclass
class SegmentStyle:
    """How the result appears: segment name, colour (RGB in [0, 1]) and Slicer terminology entry string."""

    name: str = "Lung tumour"
    color: tuple[float, float, float] = (0.85, 0.32, 0.26)
    terminology: str = ""

    @classmethod
    def from_model_card(cls, card: dict) -> SegmentStyle:
        """The style of the model card's first label (class 1)."""
        labels = card.get("labels") or []
        if not labels:
            return cls()
        label = labels[0]
        color = tuple(float(c) for c in label.get("color", cls.color))
        return cls(name=str(label.get("name") or cls.name), color=color, terminology=str(label.get("terminology", "")))


@dataclass
class WrittenSegment:
    segmentation_node: vtkMRMLSegmentationNode
    segment_id: str
    created_node: bool
    volume_ml: float


def mask_volume_ml(mask: np.ndarray, volume_node) -> float:
    """Volume of the non-zero voxels of ``mask`` in mL, from the node's voxel size (oblique grids included)."""
    voxel_mm3 = abs(float(np.linalg.det(ijk_to_ras_matrix(volume_node)[:3, :3])))
    return float(np.count_nonzero(mask)) * voxel_mm3 / 1000.0


def oriented_labelmap(mask: np.ndarray, volume_node) -> vtkOrientedImageData:
    """``mask`` ``(K, J, I)`` as a binary ``vtkOrientedImageData`` on the volume node's grid."""
    slices, rows, columns = mask.shape
    image = vtkOrientedImageData()
    image.SetDimensions(columns, rows, slices)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    flat = np.ascontiguousarray(mask.reshape(-1) > 0, dtype=np.uint8)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(flat, deep=True, array_type=vtk.VTK_UNSIGNED_CHAR))
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    image.SetImageToWorldMatrix(matrix)
    return image


def write_mask_to_segment(
    scene,
    volume_node,
    mask: np.ndarray,
    style: SegmentStyle,
    segmentation_node: vtkMRMLSegmentationNode | None = None,
    segment_id: str | None = None,
) -> WrittenSegment:
    """Put ``mask`` (``(K, J, I)`` on ``volume_node``'s grid) into a segment and return where it went.

    - ``segmentation_node`` None: a new segmentation node named after the volume is added to ``scene``.
    - ``segment_id`` given: that existing segment's content is replaced; its name and colour are the user's
      and stay. Otherwise the segment named ``style.name`` is reused, or a new one is added.
    If anything fails, a node this call created is removed again, so a failure adds nothing to the scene.
    """
    image = volume_node.GetImageData()
    if image is None or tuple(reversed(image.GetDimensions())) != tuple(mask.shape):
        raise InputError(f"the mask {mask.shape} does not match the volume {volume_node.GetName()}")
    created = segmentation_node is None
    if created:
        segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{volume_node.GetName()} CMEDL")
        segmentation_node.CreateDefaultDisplayNodes()
    try:
        segment_id = _target_segment(segmentation_node, style, segment_id)
        _attach_to_volume(scene, segmentation_node, volume_node)
        labelmap = oriented_labelmap(mask, volume_node)
        if not vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
            labelmap, segmentation_node, segment_id, vtkSlicerSegmentationsModuleLogic.MODE_REPLACE
        ):
            raise OutputError(f"Slicer refused the labelmap for segment {segment_id!r}")
    except Exception:
        if created:
            scene.RemoveNode(segmentation_node)
        raise
    return WrittenSegment(segmentation_node, segment_id, created, mask_volume_ml(mask, volume_node))


def _target_segment(segmentation_node: vtkMRMLSegmentationNode, style: SegmentStyle, segment_id: str | None) -> str:
    segmentation = segmentation_node.GetSegmentation()
    if segment_id:
        if segmentation.GetSegment(segment_id) is None:
            raise InputError(f"segment {segment_id!r} is not in {segmentation_node.GetName()}")
        return segment_id
    existing = segmentation.GetSegmentIdBySegmentName(style.name)
    segment_id = existing or segmentation.AddEmptySegment("", style.name, list(style.color))
    if not segment_id:
        raise OutputError(f"could not add a segment to {segmentation_node.GetName()}")
    segment = segmentation.GetSegment(segment_id)
    segment.SetColor(*style.color)
    if style.terminology:
        segment.SetTag(vtkSegment.GetTerminologyEntryTagName(), style.terminology)
    return segment_id


def _attach_to_volume(scene, segmentation_node: vtkMRMLSegmentationNode, volume_node) -> None:
    """Reference geometry, parent transform and subject-hierarchy study of the input volume."""
    segmentation_node.SetNodeReferenceID(
        segmentation_node.GetReferenceImageGeometryReferenceRole(), volume_node.GetID()
    )
    segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    segmentation_node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
    hierarchy = vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if hierarchy is None:
        return
    volume_item = hierarchy.GetItemByDataNode(volume_node)
    if not volume_item:
        return
    parent = hierarchy.GetItemParent(volume_item)
    segmentation_item = hierarchy.GetItemByDataNode(segmentation_node)
    if not segmentation_item:
        segmentation_item = hierarchy.CreateItem(parent, segmentation_node)
    else:
        hierarchy.SetItemParent(segmentation_item, parent)


def segment_choices(segmentation_node: vtkMRMLSegmentationNode | None) -> list[tuple[str, str]]:
    """``(segment id, name)`` of the segments a result may replace, after ``("", ...)``: the segment named
    after the model's label (found or added by :func:`write_mask_to_segment`)."""
    choices = [("", "Segment named after the model's label")]
    if segmentation_node is not None:
        segmentation = segmentation_node.GetSegmentation()
        choices += [(segment_id, segmentation.GetSegment(segment_id).GetName())
                    for segment_id in segmentation.GetSegmentIDs()]  # fmt: skip
    return choices
