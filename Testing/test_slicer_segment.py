"""CMEDLSegment's scene code on the real MRML classes of slicer-core: volume node -> engine child -> segment."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import shared_data

from cmedl.errors import CMEDLError, ModelFileError, NoLungsFoundError
from cmedl.lungs import detect_lungs
from cmedl.phantom import make_phantom
from cmedl.reference_models import write_threshold_model
from cmedl.volumes import SegmentInfo, read_volume

pytestmark = pytest.mark.slicer

LEVEL_HU = -200.5


def oblique(image: sitk.Image) -> sitk.Image:
    """A copy of ``image`` whose voxel axes are rotated 20 degrees about z and tilted 8 degrees about x."""
    a, b = math.radians(20), math.radians(8)
    about_z = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    about_x = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    rotated = sitk.Image(image)
    rotated.SetDirection(tuple((about_x @ about_z).flatten()))
    rotated.SetOrigin((-31.5, 12.25, -140.0))
    return rotated


@pytest.fixture(scope="module")
def phantom_ct() -> sitk.Image:
    return oblique(make_phantom("ct", seed=5, size=128).image)


@pytest.fixture(scope="module")
def threshold_model(tmp_path_factory, phantom_ct: sitk.Image) -> Path:
    folder = tmp_path_factory.mktemp("models")
    return write_threshold_model(folder / "threshold.safetensors", LEVEL_HU, spacing_mm=phantom_ct.GetSpacing()[:2])


def expected_mask(ct: sitk.Image) -> np.ndarray:
    roi = sitk.GetArrayFromImage(detect_lungs(ct).roi_mask).astype(bool)
    return (sitk.GetArrayFromImage(ct) > LEVEL_HU) & roi


def study_with(mrml, volume_node) -> int:
    """Put ``volume_node`` in a patient/study of the subject hierarchy, as loading DICOM does; returns the study."""
    import slicer

    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(mrml.scene)
    patient = hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), "Patient")
    study = hierarchy.CreateStudyItem(patient, "Study")
    hierarchy.CreateItem(study, volume_node)
    return study


def test_volume_node_round_trip_keeps_voxels_and_oblique_geometry(mrml, phantom_ct: sitk.Image) -> None:
    from CMEDLSegmentLib.volume_nodes import add_volume_from_image, ijk_to_ras_matrix, volume_node_to_image

    node = add_volume_from_image(mrml.scene, phantom_ct, "CT")
    back = volume_node_to_image(node)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(phantom_ct))
    np.testing.assert_allclose(back.GetOrigin(), phantom_ct.GetOrigin(), atol=1e-9)
    np.testing.assert_allclose(back.GetSpacing(), phantom_ct.GetSpacing(), atol=1e-9)
    np.testing.assert_allclose(back.GetDirection(), phantom_ct.GetDirection(), atol=1e-9)
    # The first voxel's centre in RAS is the LPS origin with x and y negated.
    origin_ras = ijk_to_ras_matrix(node)[:3, 3]
    np.testing.assert_allclose(origin_ras, [31.5, -12.25, -140.0], atol=1e-9)


def test_segmenting_an_oblique_ct_node_puts_the_mask_on_the_right_voxels(
    mrml, phantom_ct: sitk.Image, threshold_model: Path, tmp_path: Path
) -> None:
    import slicer
    import vtk

    from cmedl.progress import overall_fraction
    from CMEDLSegmentLib.segment_logic import SegmentationSettings, TumourSegmentationLogic
    from CMEDLSegmentLib.volume_nodes import add_volume_from_image, volume_array

    node = add_volume_from_image(mrml.scene, phantom_ct, "Chest CT")
    study = study_with(mrml, node)
    before = volume_array(node)
    modified_before = node.GetMTime()
    events: list[dict] = []
    logic = TumourSegmentationLogic(mrml.scene, work_root=tmp_path)
    outcome = logic.segment(node, SegmentationSettings(threshold_model, device="cpu"), on_event=events.append)

    segmentation = outcome.segmentation_node
    assert outcome.created_node and segmentation.GetName() == "Chest CT CMEDL"
    assert segmentation.GetNodeReference(segmentation.GetReferenceImageGeometryReferenceRole()) is node
    segment = segmentation.GetSegmentation().GetSegment(outcome.segment_id)
    tumour = SegmentInfo()
    assert segment.GetName() == tumour.name
    np.testing.assert_allclose(segment.GetColor(), tumour.color, atol=1e-6)
    terminology = vtk.reference("")
    assert segment.GetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), terminology)
    assert str(terminology) == tumour.terminology
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(mrml.scene)
    assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(segmentation)) == study

    mask = segment_array(segmentation, outcome.segment_id, node)
    expected = expected_mask(phantom_ct)
    assert expected.sum() > 1000
    np.testing.assert_array_equal(mask, expected)
    voxel_ml = float(np.prod(phantom_ct.GetSpacing())) / 1000.0
    assert outcome.volume_ml == pytest.approx(expected.sum() * voxel_ml, rel=1e-6)
    assert outcome.device == "cpu"
    assert "Lung tumour: " in outcome.status_line("Lung tumour")

    # The input volume is only read, and the child's progress reached the caller.
    np.testing.assert_array_equal(volume_array(node), before)
    assert node.GetMTime() == modified_before
    progress = [event for event in events if event["event"] == "progress"]
    assert "segment" in {event["stage"] for event in progress} and events[-1]["event"] == "done"
    fractions = [overall_fraction(event) for event in progress]
    assert fractions == sorted(fractions) and fractions[0] < 0.1 and fractions[-1] == 1.0
    assert list(tmp_path.iterdir()) == [], "the temporary hand-over folder is removed"


def segment_array(segmentation, segment_id: str, volume_node) -> np.ndarray:
    """The segment as a (K, J, I) array on the volume's grid, through Slicer's own export."""
    import slicer
    from vtkmodules.util import numpy_support

    labelmap = slicer.vtkMRMLLabelMapVolumeNode()
    volume_node.GetScene().AddNode(labelmap)
    ids = _string_array([segment_id])
    assert slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
        segmentation, ids, labelmap, volume_node
    )
    columns, rows, slices = labelmap.GetImageData().GetDimensions()
    values = numpy_support.vtk_to_numpy(labelmap.GetImageData().GetPointData().GetScalars())
    volume_node.GetScene().RemoveNode(labelmap)
    return values.reshape(slices, rows, columns) > 0


def _string_array(values: list[str]):
    import vtk

    array = vtk.vtkStringArray()
    for value in values:
        array.InsertNextValue(value)
    return array


def test_a_second_run_replaces_the_segment_and_keeps_the_users_other_segments(
    mrml, phantom_ct: sitk.Image, threshold_model: Path, tmp_path: Path
) -> None:
    from CMEDLSegmentLib.segmentation_nodes import SegmentStyle, write_mask_to_segment
    from CMEDLSegmentLib.volume_nodes import add_volume_from_image

    node = add_volume_from_image(mrml.scene, phantom_ct, "CT")
    shape = tuple(reversed(phantom_ct.GetSize()))
    first = np.zeros(shape, dtype=np.uint8)
    first[10:20, 30:50, 30:50] = 1
    written = write_mask_to_segment(mrml.scene, node, first, SegmentStyle())
    segmentation = written.segmentation_node
    other_mask = np.zeros(shape, dtype=np.uint8)
    other_mask[40:45, 60:70, 60:70] = 1
    other = write_mask_to_segment(mrml.scene, node, other_mask, SegmentStyle(name="Heart"), segmentation)
    nodes_before = mrml.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")

    second = np.zeros(shape, dtype=np.uint8)
    second[12:14, 80:90, 20:25] = 1
    again = write_mask_to_segment(mrml.scene, node, second, SegmentStyle(), segmentation)
    assert again.segment_id == written.segment_id and not again.created_node
    assert mrml.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == nodes_before
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 2
    np.testing.assert_array_equal(segment_array(segmentation, written.segment_id, node), second > 0)
    np.testing.assert_array_equal(segment_array(segmentation, other.segment_id, node), other_mask > 0)
    assert again.volume_ml == pytest.approx(second.sum() * np.prod(phantom_ct.GetSpacing()) / 1000)

    # Writing into a chosen segment keeps that segment's name.
    chosen = write_mask_to_segment(mrml.scene, node, first, SegmentStyle(), segmentation, other.segment_id)
    assert segmentation.GetSegmentation().GetSegment(chosen.segment_id).GetName() == "Heart"
    np.testing.assert_array_equal(segment_array(segmentation, other.segment_id, node), first > 0)


def test_a_failing_run_adds_nothing_to_the_scene(mrml, threshold_model: Path, tmp_path: Path) -> None:
    from CMEDLSegmentLib.segment_logic import SegmentationSettings, TumourSegmentationLogic
    from CMEDLSegmentLib.volume_nodes import add_volume_from_image

    # A real abdomen-only CT series: no lungs in it.
    image = read_volume(shared_data("ct_nolabel/totalseg_example_ct_dicom"))
    node = add_volume_from_image(mrml.scene, image, "Abdomen")
    nodes_before = mrml.scene.GetNumberOfNodes()
    logic = TumourSegmentationLogic(mrml.scene, work_root=tmp_path)
    with pytest.raises(NoLungsFoundError, match="no lungs"):
        logic.segment(node, SegmentationSettings(threshold_model, device="cpu"))
    assert mrml.scene.GetNumberOfNodes() == nodes_before
    assert mrml.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0
    assert list(tmp_path.iterdir()) == []


def test_a_corrupt_model_is_refused_before_anything_starts(mrml, phantom_ct: sitk.Image, tmp_path: Path) -> None:
    from CMEDLSegmentLib.segment_logic import SegmentationSettings, TumourSegmentationLogic
    from CMEDLSegmentLib.volume_nodes import add_volume_from_image

    node = add_volume_from_image(mrml.scene, phantom_ct, "CT")
    corrupt = tmp_path / "model.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    work = tmp_path / "work"
    work.mkdir()
    logic = TumourSegmentationLogic(mrml.scene, work_root=work)
    nodes_before = mrml.scene.GetNumberOfNodes()
    with pytest.raises(ModelFileError):
        logic.start(node, SegmentationSettings(corrupt, device="cpu"))
    assert mrml.scene.GetNumberOfNodes() == nodes_before and list(work.iterdir()) == []


def test_a_cancelled_run_adds_nothing_and_leaves_no_files(
    mrml, phantom_ct: sitk.Image, threshold_model: Path, tmp_path: Path
) -> None:
    from CMEDLSegmentLib.segment_logic import SegmentationSettings, TumourSegmentationLogic
    from CMEDLSegmentLib.volume_nodes import add_volume_from_image

    node = add_volume_from_image(mrml.scene, phantom_ct, "CT")
    nodes_before = mrml.scene.GetNumberOfNodes()
    task = TumourSegmentationLogic(mrml.scene, work_root=tmp_path).start(
        node, SegmentationSettings(threshold_model, device="cpu")
    )
    assert task.running
    task.cancel()
    assert not task.running
    with pytest.raises(CMEDLError):
        task.finish()
    assert mrml.scene.GetNumberOfNodes() == nodes_before
    assert list(tmp_path.iterdir()) == []


def test_the_demo_model_segments_through_the_blocking_path_into_the_same_node(
    mrml, phantom_ct: sitk.Image, threshold_model: Path, tmp_path: Path
) -> None:
    from cmedl.catalogue import resolve_model
    from CMEDLSegmentLib.segment_logic import SegmentationSettings, TumourSegmentationLogic
    from CMEDLSegmentLib.volume_nodes import add_volume_from_image

    node = add_volume_from_image(mrml.scene, phantom_ct, "CT")
    logic = TumourSegmentationLogic(mrml.scene, work_root=tmp_path)
    first = logic.segment(node, SegmentationSettings(threshold_model, device="cpu"))
    demo = logic.segment(node, SegmentationSettings(resolve_model("demo"), device="cpu"), first.segmentation_node)
    assert demo.segmentation_node is first.segmentation_node and not demo.created_node
    assert demo.segment_id == first.segment_id
    assert mrml.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1
    mask = segment_array(demo.segmentation_node, demo.segment_id, node)
    roi = sitk.GetArrayFromImage(detect_lungs(phantom_ct).roi_mask).astype(bool)
    assert not np.any(mask & ~roi), "the demo model's mask stays inside the lung region"
    assert demo.volume_ml == pytest.approx(mask.sum() * np.prod(phantom_ct.GetSpacing()) / 1000, rel=1e-6)
    assert demo.summary["model"] == "cmedl-demo-unet"


def test_a_real_run_with_flips_and_the_overlay_brings_both_maps_on_the_cts_grid(
    mrml, phantom_ct: sitk.Image, tmp_path: Path
) -> None:
    from cmedl.catalogue import resolve_model
    from CMEDLSegmentLib.segment_logic import SegmentationSettings, TumourSegmentationLogic
    from CMEDLSegmentLib.volume_nodes import add_volume_from_image, volume_array, volume_node_to_image

    node = add_volume_from_image(mrml.scene, phantom_ct, "CT")
    logic = TumourSegmentationLogic(mrml.scene, work_root=tmp_path)
    settings = SegmentationSettings(resolve_model("demo"), device="cpu", probabilities=True, tta=True)
    outcome = logic.segment(node, settings)
    assert outcome.summary["tta"] is True
    probability, uncertainty = volume_array(outcome.probability_node), volume_array(outcome.uncertainty_node)
    assert probability.shape == uncertainty.shape == sitk.GetArrayViewFromImage(phantom_ct).shape
    placed = volume_node_to_image(outcome.uncertainty_node)
    np.testing.assert_allclose(placed.GetOrigin(), phantom_ct.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(placed.GetDirection(), phantom_ct.GetDirection(), atol=1e-9)
    # The flips disagree somewhere, and only where the model sees something: nowhere outside the lung region.
    roi = sitk.GetArrayFromImage(detect_lungs(phantom_ct).roi_mask).astype(bool)
    assert uncertainty.max() > 0 and not np.any(uncertainty[~roi])
    assert list(tmp_path.iterdir()) == [], "the hand-over folder is removed"


def test_automatic_mode_reacts_to_ct_only(mrml, phantom_ct: sitk.Image) -> None:
    import slicer

    from CMEDLSegmentLib.auto_segment import should_segment_automatically
    from CMEDLSegmentLib.volume_nodes import add_volume_from_image

    ct = add_volume_from_image(mrml.scene, phantom_ct, "CT")
    assert should_segment_automatically(ct) == (True, "CT in Hounsfield units")
    mr = add_volume_from_image(mrml.scene, make_phantom("mr", seed=5, size=128).image, "T2w")
    accepted, reason = should_segment_automatically(mr)
    assert not accepted and reason
    labelmap = slicer.vtkMRMLLabelMapVolumeNode()
    mrml.scene.AddNode(labelmap)
    labelmap.SetAndObserveImageData(ct.GetImageData())
    assert should_segment_automatically(labelmap) == (False, "a label map")
    empty = mrml.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    assert should_segment_automatically(empty)[0] is False
    segmentation = mrml.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "S")
    assert should_segment_automatically(segmentation) == (False, "not a scalar volume")
