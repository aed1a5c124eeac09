"""CMEDLTrain's scene code on the real MRML classes of slicer-core: training curves as table, plot series and
chart nodes updated in place, and a CT volume node with its tumour segment added to a dataset as NIfTI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from cmedl.errors import InputError, NotCTError
from cmedl.phantom import make_phantom
from cmedl.training.inventory import CT, scan_folder
from cmedl.training.runs import read_run

pytestmark = pytest.mark.slicer

LOSSES = ("seg_ct", "seg_mr", "hint", "cyc", "adv", "cx")


def epoch_record(epoch: int) -> dict:
    record = {"epoch": epoch, **{f"loss_{name}": 1.0 / (epoch + i) for i, name in enumerate(LOSSES)}}
    record["validation_dice"] = 0.1 * epoch
    record["seconds"] = 12.5
    return record


def append_epoch(run: Path, epoch: int) -> None:
    with open(run / "metrics.jsonl", "a", encoding="utf-8") as handle:
        handle.write(json.dumps(epoch_record(epoch)) + "\n")


def table_values(table_node, column: str) -> list[float]:
    array = table_node.GetTable().GetColumnByName(column)
    return [array.GetValue(row) for row in range(array.GetNumberOfTuples())]


def test_training_curves_are_updated_in_place_as_epochs_arrive(mrml, tmp_path: Path) -> None:
    from CMEDLTrainLib.plots import DICE_COLUMN, TrainingChart

    run = tmp_path / "cmedl-run"
    run.mkdir()
    for epoch in (1, 2):
        append_epoch(run, epoch)
    chart = TrainingChart(mrml.scene, run)
    assert chart.update(read_run(run).metrics)
    columns = ["epoch", *(f"loss_{name}" for name in LOSSES), DICE_COLUMN]
    assert chart.columns == columns and chart.rows() == 2
    ids = {
        "table": chart.table_node.GetID(),
        "chart": chart.chart_node.GetID(),
        **{column: node.GetID() for column, node in chart.series_nodes.items()},
    }
    assert set(chart.series_nodes) == set(columns[1:])
    assert chart.chart_node.GetNumberOfPlotSeriesNodes() == len(LOSSES) + 1
    dice_series = chart.series_nodes[DICE_COLUMN]
    assert dice_series.GetXColumnName() == "epoch" and dice_series.GetYColumnName() == DICE_COLUMN
    assert dice_series.GetTableNode() is chart.table_node
    assert not chart.update(read_run(run).metrics)  # nothing new: nothing touched

    append_epoch(run, 3)
    (run / "metrics.jsonl").open("a").write('{"epoch": 4, "loss_seg')  # an epoch being written
    assert chart.update(read_run(run).metrics)
    assert chart.rows() == 3
    assert table_values(chart.table_node, "epoch") == [1.0, 2.0, 3.0]
    assert table_values(chart.table_node, DICE_COLUMN) == pytest.approx([0.1, 0.2, 0.3])
    assert chart.table_node.GetID() == ids["table"] and chart.chart_node.GetID() == ids["chart"]
    assert {column: node.GetID() for column, node in chart.series_nodes.items()} == {
        k: v for k, v in ids.items() if k not in ("table", "chart")
    }
    # A reader made later (the module reopened) finds the same nodes instead of adding new ones.
    again = TrainingChart(mrml.scene, run)
    assert again.table_node.GetID() == ids["table"] and again.chart_node.GetID() == ids["chart"]
    assert {column: node.GetID() for column, node in again.series_nodes.items()} == {
        k: v for k, v in ids.items() if k not in ("table", "chart")
    }
    assert mrml.scene.GetNumberOfNodesByClass("vtkMRMLTableNode") == 1
    assert mrml.scene.GetNumberOfNodesByClass("vtkMRMLPlotChartNode") == 1
    assert mrml.scene.GetNumberOfNodesByClass("vtkMRMLPlotSeriesNode") == len(LOSSES) + 1


def test_a_run_without_validation_has_nan_dice_and_another_run_gets_its_own_chart(mrml, tmp_path: Path) -> None:
    from CMEDLTrainLib.plots import DICE_COLUMN, TrainingChart

    records = [{"epoch": 1, "loss_seg_ct": 0.9, "validation_dice": float("nan")}]
    first = TrainingChart(mrml.scene, tmp_path / "a")
    first.update(records)
    assert math.isnan(table_values(first.table_node, DICE_COLUMN)[0])
    second = TrainingChart(mrml.scene, tmp_path / "b")
    second.update(records)
    assert second.table_node.GetID() != first.table_node.GetID()
    assert second.chart_node.GetID() != first.chart_node.GetID()


@pytest.fixture(scope="module")
def oblique_case() -> tuple[sitk.Image, np.ndarray]:
    """A phantom CT with rotated axes and a moved origin, and its tumour mask (K, J, I)."""
    case = make_phantom("ct", seed=9, size=128)
    image = case.image
    a, b = math.radians(15), math.radians(6)
    about_z = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    about_x = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    image.SetDirection(tuple((about_x @ about_z).flatten()))
    image.SetOrigin((-40.25, 17.5, -120.0))
    return image, sitk.GetArrayFromImage(case.label) > 0


def volume_and_segment(mrml, image: sitk.Image, mask: np.ndarray, name: str = "CT"):
    from CMEDLSegmentLib.segmentation_nodes import SegmentStyle, write_mask_to_segment
    from CMEDLSegmentLib.volume_nodes import add_volume_from_image

    volume = add_volume_from_image(mrml.scene, image, name)
    written = write_mask_to_segment(mrml.scene, volume, mask.astype(np.uint8), SegmentStyle())
    return volume, written.segmentation_node, written.segment_id


def node_geometry_lps(volume) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(origin, spacing, direction) of a node, straight from its IJK-to-RAS matrix, in LPS."""
    import vtk

    matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    ras = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ ras
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    return lps[:3, 3], spacing, (lps[:3, :3] / spacing).flatten()


def test_the_ct_and_its_segment_are_added_as_nifti_with_the_nodes_geometry(mrml, oblique_case, tmp_path: Path) -> None:
    from CMEDLTrainLib.dataset_export import add_case, segment_ids_and_names

    image, mask = oblique_case
    volume, segmentation, segment_id = volume_and_segment(mrml, image, mask)
    assert segment_ids_and_names(segmentation) == [(segment_id, "Lung tumour")]
    images, labels = tmp_path / "ct" / "images", tmp_path / "ct" / "labels"
    added = add_case(mrml.scene, volume, segmentation, segment_id, images, labels, "patient_007")
    assert added.image == images / "patient_007.nii.gz" and added.label == labels / "patient_007.nii.gz"
    assert added.label_voxels == int(mask.sum()) > 0 and not added.replaced
    origin, spacing, direction = node_geometry_lps(volume)
    for path in (added.image, added.label):
        written = sitk.ReadImage(str(path))
        np.testing.assert_allclose(written.GetOrigin(), origin, atol=1e-4)
        np.testing.assert_allclose(written.GetSpacing(), spacing, atol=1e-5)
        np.testing.assert_allclose(written.GetDirection(), direction, atol=1e-5)
        assert written.GetSize() == image.GetSize()
    voxels = sitk.GetArrayFromImage(sitk.ReadImage(str(added.image)))
    np.testing.assert_array_equal(voxels, sitk.GetArrayFromImage(image))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(added.label))), mask.astype(np.uint8))
    assert mrml.scene.GetNumberOfNodesByClass("vtkMRMLLabelMapVolumeNode") == 0  # the export node is gone
    # The engine's data check accepts the new case as it is.
    folder = scan_folder(images, labels)
    assert [(c.name, c.modality, c.label_issue, c.label_voxels) for c in folder.cases] == [
        ("patient_007", CT, "", int(mask.sum()))
    ]
    assert not list(images.glob(".*")) and not list(labels.glob(".*"))  # no temporary files left


def test_an_existing_case_is_kept_unless_replacing_is_asked(mrml, oblique_case, tmp_path: Path) -> None:
    from CMEDLTrainLib.dataset_export import add_case, suggested_case_name

    image, mask = oblique_case
    volume, segmentation, segment_id = volume_and_segment(mrml, image, mask, name="Chest CT 1")
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    (images / "Chest_CT_1.nrrd").write_bytes(b"an older image of that case")
    assert suggested_case_name(volume, images) == "Chest_CT_1_2"
    with pytest.raises(InputError, match="already exists"):
        add_case(mrml.scene, volume, segmentation, segment_id, images, labels, "Chest_CT_1")
    assert (images / "Chest_CT_1.nrrd").read_bytes() == b"an older image of that case"
    assert not (labels / "Chest_CT_1.nii.gz").exists()
    added = add_case(mrml.scene, volume, segmentation, segment_id, images, labels, "Chest_CT_1", overwrite=True)
    assert added.replaced and sorted(p.name for p in images.iterdir()) == ["Chest_CT_1.nii.gz"]
    for bad in ("", "../escape", "case.nii.gz"):
        with pytest.raises(InputError, match="not a usable case name"):
            add_case(mrml.scene, volume, segmentation, segment_id, images, labels, bad)


def test_an_mr_volume_or_an_empty_segment_is_refused(mrml, oblique_case, tmp_path: Path) -> None:
    from CMEDLTrainLib.dataset_export import add_case

    image, mask = oblique_case
    mr = make_phantom("mr", seed=4, size=128)
    volume, segmentation, segment_id = volume_and_segment(mrml, mr.image, sitk.GetArrayFromImage(mr.label) > 0)
    with pytest.raises(NotCTError, match="does not look like a CT"):
        add_case(mrml.scene, volume, segmentation, segment_id, tmp_path / "images", tmp_path / "labels", "mr")
    ct, empty_segmentation, empty_id = volume_and_segment(mrml, image, np.zeros_like(mask), name="CT empty")
    with pytest.raises(InputError, match="empty"):
        add_case(mrml.scene, ct, empty_segmentation, empty_id, tmp_path / "images", tmp_path / "labels", "empty")
    with pytest.raises(InputError, match="not in the segmentation"):
        add_case(mrml.scene, ct, empty_segmentation, "nope", tmp_path / "images", tmp_path / "labels", "x")
    assert not (tmp_path / "images").exists() or not list((tmp_path / "images").iterdir())
