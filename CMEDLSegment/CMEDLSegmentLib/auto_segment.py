"""Which newly loaded volumes "segment new CT volumes automatically" reacts to: CT in HU, nothing else."""

from __future__ import annotations

from cmedl.errors import CMEDLError
from cmedl.modality import ct_likelihood_report
from CMEDLSegmentLib.volume_nodes import volume_node_to_image


def should_segment_automatically(node) -> tuple[bool, str]:
    """Whether ``node`` is a scalar CT volume in Hounsfield units, and why not when it is not.

    Label maps, segmentations, vector volumes, MR images and nodes without voxels are never segmented
    automatically; an unexpected volume the user loads must not start a run.
    """
    if node is None or not node.IsA("vtkMRMLScalarVolumeNode"):
        return False, "not a scalar volume"
    if node.IsA("vtkMRMLLabelMapVolumeNode"):
        return False, "a label map"
    try:
        report = ct_likelihood_report(volume_node_to_image(node))
    except CMEDLError as error:
        return False, str(error)
    if not report["looks_like_ct"]:
        return False, str(report["reason"])
    return True, "CT in Hounsfield units"
