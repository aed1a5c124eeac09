"""Lesions in the scene on the real MRML classes of slicer-core: one segment per lesion, removing one, the overlay."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import oblique_ct as oblique_ct_of_shape

from cmedl.errors import InputError
from cmedl.lesions import find_lesions, label_lesions, lesions_table

pytestmark = pytest.mark.slicer

SHAPE = (20, 48, 56)  # (K, J, I)


def oblique_ct() -> sitk.Image:
    return oblique_ct_of_shape(SHAPE)


def three_lesions() -> np.ndarray:
    """A large L-shaped lesion (its centroid lies outside it), a ball and a small block."""
    mask = np.zeros(SHAPE, dtype=np.uint8)
    mask[4:14, 5:30, 5:10] = 1
    mask[4:14, 25:30, 5:30] = 1
    k, j, i = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    mask[((k - 10) / 4.0) ** 2 + ((j - 12) / 6.0) ** 2 + ((i - 40) / 6.0) ** 2 <= 1] = 1
    mask[15:18, 40:44, 45:50] = 1
    return mask


@pytest.fixture
def scene_with_tumour(mrml):
    from CMEDLSegmentLib.segmentation_nodes import SegmentStyle, write_mask_to_segment
    from CMEDLSegmentLib.volume_nodes import add_volume_from_image

    ct = oblique_ct()
    node = add_volume_from_image(mrml.scene, ct, "Chest CT")
    mask = three_lesions()
    style = SegmentStyle(terminology="Segmentation category and type~SCT^49755003^Morphologically Altered Structure")
    written = write_mask_to_segment(mrml.scene, node, mask, style)
    return mrml, ct, node, mask, written


def voxel_ml(ct: sitk.Image) -> float:
    return float(np.prod(ct.GetSpacing())) / 1000.0


def test_each_lesion_becomes_its_own_segment_with_its_measurements(scene_with_tumour) -> None:
    import slicer
    import vtk

    from CMEDLSegmentLib.lesion_nodes import lesion_segment_ids, segment_mask, split_lesions_into_segments

    mrml, ct, node, mask, written = scene_with_tumour
    segmentation = written.segmentation_node
    rows = lesions_table(find_lesions(mask, None, ct))
    ids = label_lesions(mask)
    made = split_lesions_into_segments(segmentation, written.segment_id, node, rows)

    assert [lesion.lesion_id for lesion in made] == [1, 2, 3]
    assert segmentation.GetSegmentation().GetSegment(written.segment_id) is None  # replaced by the lesions
    names = [segmentation.GetSegmentation().GetSegment(lesion.segment_id).GetName() for lesion in made]
    assert names == ["Lung tumour 1", "Lung tumour 2", "Lung tumour 3"]
    assert lesion_segment_ids(segmentation) == {lesion.lesion_id: lesion.segment_id for lesion in made}
    for lesion, row in zip(made, rows):
        np.testing.assert_array_equal(segment_mask(segmentation, lesion.segment_id, node), ids == lesion.lesion_id)
        assert lesion.volume_ml == pytest.approx(row["volume_ml"], abs=1e-4)
        segment = segmentation.GetSegmentation().GetSegment(lesion.segment_id)
        value = vtk.reference("")
        assert segment.GetTag("CMEDL.volume_ml", value) and float(str(value)) == row["volume_ml"]
        assert segment.GetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), value)
        assert "Morphologically Altered Structure" in str(value)
    colours = {tuple(segmentation.GetSegmentation().GetSegment(m.segment_id).GetColor()) for m in made}
    assert len(colours) == 3

    # Splitting one of them again with ids given (as the engine computes them) keeps the original this time.
    again = split_lesions_into_segments(
        segmentation, made[0].segment_id, node, lesion_labels=label_lesions(ids == 1), keep_original=True
    )
    assert len(again) == 1 and segmentation.GetSegmentation().GetSegment(made[0].segment_id) is not None
    with pytest.raises(InputError, match="do not match"):
        split_lesions_into_segments(segmentation, made[1].segment_id, node, lesion_labels=ids[:-1])


def test_removing_a_lesion_by_id_or_by_a_point_on_it(scene_with_tumour) -> None:
    from CMEDLSegmentLib.lesion_nodes import remove_lesion, segment_mask
    from CMEDLSegmentLib.volume_nodes import ijk_to_ras_matrix

    mrml, ct, node, mask, written = scene_with_tumour
    segmentation = written.segmentation_node
    ids = label_lesions(mask)
    removed_ml = remove_lesion(segmentation, written.segment_id, node, lesion_id=3)
    assert removed_ml == pytest.approx(np.count_nonzero(ids == 3) * voxel_ml(ct))
    np.testing.assert_array_equal(segment_mask(segmentation, written.segment_id, node), (ids == 1) | (ids == 2))

    # A click on the L-shaped lesion's far arm (its centroid is outside it): that lesion goes, the ball stays.
    k, j, i = 8, 7, 7
    assert ids[k, j, i] == 1
    point = (ijk_to_ras_matrix(node) @ np.array([i + 0.3, j - 0.2, k, 1.0]))[:3]
    remove_lesion(segmentation, written.segment_id, node, point_ras=tuple(point))
    np.testing.assert_array_equal(segment_mask(segmentation, written.segment_id, node), ids == 2)

    with pytest.raises(InputError, match="no lesion"):
        remove_lesion(segmentation, written.segment_id, node, point_ras=tuple(point))
    with pytest.raises(InputError, match="has no lesion 5"):
        remove_lesion(segmentation, written.segment_id, node, lesion_id=5)


def test_the_probability_map_is_an_overlay_on_the_cts_grid(scene_with_tumour) -> None:
    import slicer

    from CMEDLSegmentLib.lesion_nodes import (
        OWN_COLOR_TABLE_NAME,
        add_probability_volume,
        centre_views_on,
        show_probability_overlay,
    )
    from CMEDLSegmentLib.volume_nodes import add_volume_from_image, volume_array, volume_node_to_image

    mrml, ct, node, mask, written = scene_with_tumour
    probabilities = sitk.GetImageFromArray((mask * 230).astype(np.uint8))
    probabilities.CopyInformation(ct)
    overlay = add_probability_volume(mrml.scene, probabilities, node)
    back = volume_node_to_image(overlay)
    np.testing.assert_allclose(back.GetOrigin(), ct.GetOrigin(), atol=1e-9)
    np.testing.assert_allclose(back.GetDirection(), ct.GetDirection(), atol=1e-9)
    np.testing.assert_allclose(back.GetSpacing(), ct.GetSpacing(), atol=1e-9)
    np.testing.assert_array_equal(volume_array(overlay), mask * 230)
    display = overlay.GetDisplayNode()
    colours = display.GetColorNode()
    assert colours.GetName() == OWN_COLOR_TABLE_NAME and colours.GetNumberOfColors() == 256  # a bare scene
    assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == (0.0, 255.0)
    assert display.GetApplyThreshold() and display.GetLowerThreshold() == 26.0  # p < 0.1 is transparent

    # Inside Slicer the colour logic has made its tables: one of those is used.
    color_logic = slicer.vtkMRMLColorLogic()
    color_logic.SetMRMLScene(mrml.scene)
    second = add_probability_volume(mrml.scene, probabilities, node, name="again")
    assert second.GetDisplayNode().GetColorNodeID() in (
        "vtkMRMLPETProceduralColorNodePET-Heat", "vtkMRMLColorTableNodeRainbow"
    )  # fmt: skip

    shifted = sitk.Image(probabilities)
    shifted.SetOrigin(tuple(v + 1.0 for v in ct.GetOrigin()))
    with pytest.raises(InputError, match="not on the CT's grid"):
        add_probability_volume(mrml.scene, shifted, node)

    views = []
    for name in ("Red", "Green", "Yellow"):
        composite = mrml.scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
        composite.SetLayoutName(name)
        views.append(composite)
    other = add_volume_from_image(mrml.scene, ct, "Other CT")
    views[0].SetBackgroundVolumeID(other.GetID())
    assert show_probability_overlay(mrml.scene, overlay, opacity=0.4, background_node=node) == 3
    for composite in views:
        assert composite.GetForegroundVolumeID() == overlay.GetID()
        assert composite.GetForegroundOpacity() == pytest.approx(0.4)
    assert views[0].GetBackgroundVolumeID() == other.GetID()  # a view's own background is kept
    assert views[1].GetBackgroundVolumeID() == node.GetID()
    assert show_probability_overlay(mrml.scene, None) == 3
    assert all(not composite.GetForegroundVolumeID() for composite in views)

    red = mrml.scene.AddNewNodeByClass("vtkMRMLSliceNode")
    red.SetLayoutName("Red")
    red.SetOrientationToAxial()
    centre_views_on(mrml.scene, (12.5, -40.0, -120.0))
    matrix = red.GetSliceToRAS()
    assert [matrix.GetElement(row, 3) for row in range(3)] == pytest.approx([12.5, -40.0, -120.0])
