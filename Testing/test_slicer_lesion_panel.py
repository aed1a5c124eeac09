"""CMEDL Segment's lesion panel on the real MRML classes of slicer-core (issue 15, part 2).

The panel's new options become the child's ``cmedl segment`` arguments (parsed by the engine's own parser);
the import step adds the probability map as a volume and keeps the lesion table on the segmentation node;
the table's controller centres the views on a row, deletes a lesion (renumbering the rest), makes one segment
per lesion and shows or hides the overlay. The Qt half (the table widget, the buttons) runs only inside Slicer.
"""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import oblique_ct as oblique_ct_of_shape
from conftest import parameter_node_values
from scipy import ndimage

from cmedl import cli
from cmedl.catalogue import builtin_model_path
from cmedl.errors import InputError
from cmedl.jobs import JobResult
from cmedl.lesions import find_lesions, label_lesions, lesions_table, write_lesions

pytestmark = pytest.mark.slicer

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (20, 48, 56)  # (K, J, I)


def oblique_ct() -> sitk.Image:
    return oblique_ct_of_shape(SHAPE)


def three_lesions() -> np.ndarray:
    """A block of 1000 voxels, a ball and a small block: three lesions of distinct volumes."""
    mask = np.zeros(SHAPE, dtype=np.uint8)
    mask[2:12, 5:15, 5:15] = 1
    k, j, i = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    mask[((k - 10) / 4.0) ** 2 + ((j - 30) / 6.0) ** 2 + ((i - 40) / 6.0) ** 2 <= 1] = 1
    mask[15:18, 40:44, 5:10] = 1
    return mask


def probability_image(ct: sitk.Image, mask: np.ndarray) -> sitk.Image:
    """uint8 probabilities (0-255 for 0-1) on the CT's grid, as ``cmedl segment --probabilities`` writes them."""
    values = np.where(mask > 0, 230, 20).astype(np.uint8)
    values[15:18, 40:44, 5:10] = np.where(mask[15:18, 40:44, 5:10] > 0, 140, 20)
    image = sitk.GetImageFromArray(values)
    image.CopyInformation(ct)
    return image


def ok_job(result: dict) -> SimpleNamespace:
    """A child that ended cleanly with ``result`` as its ``done`` event (the files are the test's)."""
    outcome = JobResult(returncode=0, cancelled=False, timed_out=False, result=result, error="", exit_code=0, stderr="")
    return SimpleNamespace(wait=lambda timeout=None, on_event=None: outcome, stderr_tail=lambda: "")


def uncertainty_image(ct: sitk.Image, mask: np.ndarray) -> sitk.Image:
    """uint8 standard deviations over the flips (0-255 for 0-1), as ``cmedl segment --uncertainty`` writes them:
    high on the lesions' borders, nearly none elsewhere."""
    edge = np.logical_xor(mask > 0, ndimage.binary_erosion(mask > 0))
    image = sitk.GetImageFromArray(np.where(edge, 90, 2).astype(np.uint8))
    image.CopyInformation(ct)
    return image


def hand_over(folder: Path, ct: sitk.Image, mask: np.ndarray, probabilities: bool,
              uncertainty: bool = False) -> tuple[Path, list[dict]]:  # fmt: skip
    """What the child leaves in the hand-over folder: the labelmap, the lesion table and maybe the maps."""
    folder.mkdir(parents=True, exist_ok=True)
    label = sitk.GetImageFromArray(mask)
    label.CopyInformation(ct)
    sitk.WriteImage(label, str(folder / "segmentation.nrrd"))
    probability = probability_image(ct, mask)
    rows = lesions_table(find_lesions(mask, probability, ct))
    write_lesions(folder / "lesions.json", rows, {"model": "test"}, {"removed_lesion_count": 1})
    if probabilities:
        sitk.WriteImage(probability, str(folder / "probabilities.nrrd"))
    if uncertainty:
        sitk.WriteImage(uncertainty_image(ct, mask), str(folder / "uncertainty.nrrd"))
    return folder, rows


def import_result(mrml, volume, ct, mask, folder: Path, probabilities: bool, segmentation=None, segment_id=None):
    """The child's files written, then the import step (``SegmentationTask.finish``): (outcome, lesion rows)."""
    _, rows = hand_over(folder, ct, mask, probabilities)
    return finish(mrml, volume, folder, probabilities, segmentation, segment_id), rows


def finish(mrml, volume, folder: Path, probabilities: bool, segmentation=None, segment_id=None, uncertainty=False):
    from CMEDLSegmentLib.segment_logic import SegmentationTask
    from CMEDLSegmentLib.segmentation_nodes import SegmentStyle

    task = SegmentationTask(
        mrml.scene, volume, SegmentStyle(), ok_job({"device": "cpu", "removed_lesion_count": 1}), folder,
        folder / "segmentation.nrrd", segmentation, segment_id, lesions_path=folder / "lesions.json",
        probabilities_path=folder / "probabilities.nrrd" if probabilities else None,
        uncertainty_path=folder / "uncertainty.nrrd" if uncertainty else None,
    )  # fmt: skip
    return task.finish()


@pytest.fixture
def chest(mrml):
    from CMEDLSegmentLib.volume_nodes import add_volume_from_image

    ct = oblique_ct()
    return mrml, ct, add_volume_from_image(mrml.scene, ct, "Chest CT"), three_lesions()


# -- the run's options --------------------------------------------------------------------------------------


def test_the_panels_lesion_options_become_the_engines_arguments(tmp_path: Path) -> None:
    from CMEDLSegmentLib.segment_logic import SegmentationSettings

    panel = SimpleNamespace(lungThreshold=-310.0, roiMargin=12.0, probabilityThreshold=0.4, batchSize=2, tta=True,
                            minLesionMl=0.75, minLesionProbability=0.6, showProbability=True)  # fmt: skip
    settings = SegmentationSettings.from_panel(panel, Path("m.safetensors"), "cpu")
    assert (settings.tta, settings.min_lesion_ml, settings.min_lesion_probability, settings.probabilities) == (
        True, 0.75, 0.6, True
    )  # fmt: skip
    arguments = settings.command_arguments(
        tmp_path / "ct.nrrd", tmp_path / "seg.nrrd", tmp_path / "lesions.json", tmp_path / "p.nrrd"
    )
    args = cli.build_parser().parse_args(arguments)
    options = cli._segment_options(args)
    assert options.tta and options.min_lesion_ml == 0.75 and options.min_lesion_probability == 0.6
    assert options.probability_threshold == 0.4 and options.batch_size == 2 and options.lung_threshold_hu == -310.0
    assert args.lesions == str(tmp_path / "lesions.json") and args.probabilities == str(tmp_path / "p.nrrd")
    assert args.progress == "json" and args.uncertainty is None

    # A stand-in without the new values (an older script's) runs with the engine's defaults.
    older = SimpleNamespace(lungThreshold=-300.0, roiMargin=30.0, probabilityThreshold=0.5, batchSize=4)
    plain = SegmentationSettings.from_panel(older, Path("m.safetensors"), "auto")
    args = cli.build_parser().parse_args(plain.command_arguments(tmp_path / "ct.nrrd", tmp_path / "seg.nrrd"))
    options = cli._segment_options(args)
    assert not options.tta and options.min_lesion_ml == 0.0 and options.min_lesion_probability == 0.0
    assert args.lesions is None and args.probabilities is None and not plain.probabilities


def test_the_panel_defaults_and_ranges_are_the_engines() -> None:
    """The parameter node's defaults are SegmentOptions' (the module file cannot import the engine when Slicer
    loads it, so they are checked here), and each end of a range the panel offers is a value the engine accepts."""
    from cmedl.segment_options import SegmentOptions
    from CMEDLSegmentLib.segment_logic import PANEL_FIELDS, SegmentationSettings, option_from_panel

    defaults, ranges = parameter_node_values("CMEDLSegment")
    engine, settings = SegmentOptions(), SegmentationSettings(Path("m.safetensors"))
    assert set(ranges) <= set(PANEL_FIELDS) <= set(defaults)
    for parameter, field in PANEL_FIELDS.items():
        panel_default = option_from_panel(field, defaults[parameter])
        assert panel_default == getattr(engine, field) == getattr(settings, field), parameter
        for value in ranges.get(parameter, ()):
            SegmentOptions(**{field: option_from_panel(field, value)}).validate()  # raises with the engine's reason


def test_the_panels_auto_batch_size_reaches_the_engine_as_auto(tmp_path: Path) -> None:
    """The spin box's 0 ("auto") leaves the batch size to the engine; any other value is passed as it is."""
    from CMEDLSegmentLib.segment_logic import SegmentationSettings

    for shown, expected in ((0, None), (1, 1), (16, 16)):
        panel = SimpleNamespace(batchSize=shown)
        settings = SegmentationSettings.from_panel(panel, Path("m.safetensors"), "cuda")
        assert settings.batch_size == expected
        arguments = settings.command_arguments(tmp_path / "ct.nrrd", tmp_path / "seg.nrrd")
        assert arguments[arguments.index("--batch-size") + 1] == ("auto" if expected is None else str(expected))
        assert cli._segment_options(cli.build_parser().parse_args(arguments)).batch_size == expected


def test_a_run_asks_the_child_for_the_lesion_table_and_the_map_only_when_shown(chest, monkeypatch, tmp_path) -> None:
    from CMEDLSegmentLib import segment_logic
    from CMEDLSegmentLib.segment_logic import LESIONS_FILE, PROBABILITIES_FILE, SegmentationSettings

    mrml, ct, volume, mask = chest
    started: list[list[str]] = []
    monkeypatch.setattr(segment_logic.Job, "start", lambda arguments, **kwargs: started.append(arguments) or "job")
    logic = segment_logic.TumourSegmentationLogic(mrml.scene, work_root=tmp_path)
    shown = logic.start(volume, SegmentationSettings(builtin_model_path(), "cpu", probabilities=True))
    hidden = logic.start(volume, SegmentationSettings(builtin_model_path(), "cpu"))
    assert shown.lesions_path == shown.work_folder / LESIONS_FILE
    assert shown.probabilities_path == shown.work_folder / PROBABILITIES_FILE and hidden.probabilities_path is None
    assert started[0][started[0].index("--probabilities") + 1] == str(shown.probabilities_path)
    assert started[1][started[1].index("--lesions") + 1] == str(hidden.lesions_path)
    assert "--probabilities" not in started[1]


def test_with_test_time_augmentation_the_overlay_brings_the_uncertainty_map(chest, monkeypatch, tmp_path) -> None:
    from CMEDLSegmentLib import segment_logic
    from CMEDLSegmentLib.segment_logic import UNCERTAINTY_FILE, SegmentationSettings

    mrml, ct, volume, mask = chest
    started: list[list[str]] = []
    monkeypatch.setattr(segment_logic.Job, "start", lambda arguments, **kwargs: started.append(arguments) or "job")
    logic = segment_logic.TumourSegmentationLogic(mrml.scene, work_root=tmp_path)
    both = logic.start(volume, SegmentationSettings(builtin_model_path(), "cpu", probabilities=True, tta=True))
    flips_only = logic.start(volume, SegmentationSettings(builtin_model_path(), "cpu", tta=True))
    map_only = logic.start(volume, SegmentationSettings(builtin_model_path(), "cpu", probabilities=True))
    assert both.uncertainty_path == both.work_folder / UNCERTAINTY_FILE
    assert flips_only.uncertainty_path is None and map_only.uncertainty_path is None
    assert started[0][started[0].index("--uncertainty") + 1] == str(both.uncertainty_path)
    assert "--uncertainty" not in started[1] and "--uncertainty" not in started[2]
    # The engine's own parser takes the arguments, and its options ask for the flips the map needs.
    options = cli._segment_options(cli.build_parser().parse_args(started[0]))
    assert options.tta and cli.build_parser().parse_args(started[0]).uncertainty == str(both.uncertainty_path)
    with pytest.raises(InputError, match="test-time augmentation"):
        SegmentationSettings(builtin_model_path(), "cpu").command_arguments(
            tmp_path / "ct.nrrd", tmp_path / "seg.nrrd", uncertainty_path=tmp_path / "u.nrrd"
        )


# -- the import step ----------------------------------------------------------------------------------------


def test_the_import_step_adds_the_probability_volume_and_keeps_the_lesion_table(chest, tmp_path: Path) -> None:
    from CMEDLSegmentLib.lesion_panel import LESIONS_ATTRIBUTE, PROBABILITY_ATTRIBUTE, PROBABILITY_ROLE, LesionTable
    from CMEDLSegmentLib.volume_nodes import volume_array, volume_node_to_image

    mrml, ct, volume, mask = chest
    outcome, rows = import_result(mrml, volume, ct, mask, tmp_path / "first", probabilities=True)
    overlay = outcome.probability_node
    assert overlay is not None and overlay.GetAttribute(PROBABILITY_ATTRIBUTE) == "1"
    np.testing.assert_array_equal(volume_array(overlay), sitk.GetArrayFromImage(probability_image(ct, mask)))
    np.testing.assert_allclose(volume_node_to_image(overlay).GetDirection(), ct.GetDirection(), atol=1e-9)
    segmentation = outcome.segmentation_node
    assert segmentation.GetNodeReference(PROBABILITY_ROLE) is overlay
    assert outcome.lesions == rows and len(rows) == 3
    assert "in 3 lesions (1 below the minimum removed)" in outcome.status_line("Lung tumour")
    table = LesionTable.of(segmentation)
    assert table.rows == rows and table.segment_id == outcome.segment_id and table.volume_node is volume
    assert not (tmp_path / "first").exists(), "the hand-over folder is removed"

    # A second run into the same segment without the overlay: the first run's map goes with its result.
    displays = mrml.scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeDisplayNode")
    again, _ = import_result(mrml, volume, ct, mask, tmp_path / "second", False, segmentation, outcome.segment_id)
    assert again.probability_node is None and segmentation.GetNodeReference(PROBABILITY_ROLE) is None
    assert mrml.scene.GetNodesByName(overlay.GetName()).GetNumberOfItems() == 0
    assert mrml.scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeDisplayNode") == displays - 1
    assert LesionTable.of(segmentation).rows == rows

    # A result without a lesion table (the child wrote none) leaves no stale table behind.
    hand_over(tmp_path / "third", ct, mask, probabilities=False)
    (tmp_path / "third" / "lesions.json").unlink()
    third = finish(mrml, volume, tmp_path / "third", False, segmentation, outcome.segment_id)
    assert third.lesions is None and LesionTable.of(segmentation) is None
    assert "lesion" not in third.status_line("Lung tumour")
    segmentation.SetAttribute(LESIONS_ATTRIBUTE, '{"lesions": [1, 2]}')  # a hand-edited scene file
    assert LesionTable.of(segmentation) is None


def test_the_import_step_adds_the_uncertainty_volume_and_a_rerun_replaces_it(chest, tmp_path: Path) -> None:
    from CMEDLSegmentLib.lesion_panel import PROBABILITY_ATTRIBUTE, UNCERTAINTY_ROLE
    from CMEDLSegmentLib.segment_logic import UNCERTAINTY_VISIBLE_FROM
    from CMEDLSegmentLib.volume_nodes import volume_array

    mrml, ct, volume, mask = chest
    hand_over(tmp_path / "first", ct, mask, probabilities=True, uncertainty=True)
    outcome = finish(mrml, volume, tmp_path / "first", True, uncertainty=True)
    shown = outcome.uncertainty_node
    assert shown is not None and shown is not outcome.probability_node
    assert shown.GetName() == "Chest CT uncertainty" and shown.GetAttribute(PROBABILITY_ATTRIBUTE) == "1"
    np.testing.assert_array_equal(volume_array(shown), sitk.GetArrayFromImage(uncertainty_image(ct, mask)))
    assert shown.GetDisplayNode().GetLowerThreshold() == np.ceil(UNCERTAINTY_VISIBLE_FROM * 255)
    segmentation = outcome.segmentation_node
    assert segmentation.GetNodeReference(UNCERTAINTY_ROLE) is shown

    # A run without the flips into the same segment: the old map goes with the old result.
    hand_over(tmp_path / "second", ct, mask, probabilities=True)
    again = finish(mrml, volume, tmp_path / "second", True, segmentation, outcome.segment_id)
    assert again.uncertainty_node is None and segmentation.GetNodeReference(UNCERTAINTY_ROLE) is None
    assert mrml.scene.GetNodesByName("Chest CT uncertainty").GetNumberOfItems() == 0


@pytest.mark.parametrize("shifted_map", ["probability map", "uncertainty map"])
def test_a_map_off_the_cts_grid_fails_the_run_and_adds_nothing(shifted_map: str, chest, tmp_path: Path) -> None:
    """Either map off the CT's grid: no segment and no volume, not even the other map, which was on it."""
    mrml, ct, volume, mask = chest
    folder, _ = hand_over(tmp_path / "run", ct, mask, probabilities=True, uncertainty=True)
    make, file = {
        "probability map": (probability_image, "probabilities.nrrd"),
        "uncertainty map": (uncertainty_image, "uncertainty.nrrd"),
    }[shifted_map]
    shifted = make(ct, mask)
    shifted.SetOrigin(tuple(v + 2.0 for v in ct.GetOrigin()))
    sitk.WriteImage(shifted, str(folder / file))
    volumes = mrml.scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
    with pytest.raises(InputError, match=f"the {shifted_map} is not on the CT's grid"):
        finish(mrml, volume, folder, probabilities=True, uncertainty=True)
    assert mrml.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0
    assert mrml.scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == volumes


# -- the table's controller ---------------------------------------------------------------------------------


def test_rows_come_from_the_result_and_a_click_gives_the_lesions_centre(chest, tmp_path: Path) -> None:
    import vtk

    from CMEDLSegmentLib.lesion_panel import COLUMNS, LesionTable, lesion_cells, table_action

    mrml, ct, volume, mask = chest
    outcome, rows = import_result(mrml, volume, ct, mask, tmp_path / "run", probabilities=False)
    centred: list = []
    table = LesionTable.of(outcome.segmentation_node, centre=lambda scene, point: centred.append((scene, point)))
    cells = table.cells()
    assert [cell[0] for cell in cells] == ["1", "2", "3"] and all(len(cell) == len(COLUMNS) for cell in cells)
    assert cells[0][1] == f"{rows[0]['volume_ml']:.2f}"
    assert cells[0][2] == f"{rows[0]['long_axis_mm']:.1f} x {rows[0]['short_axis_mm']:.1f} mm"
    assert cells[2][3] == f"{rows[2]['max_probability']:.2f}" and cells[0][4] == "unknown"  # no lung mask here
    assert lesion_cells({**rows[0], "max_probability": None, "location": "chest_wall"})[3:] == ("-", "chest wall")
    assert LesionTable.buttons(table) == (True, True) and LesionTable.buttons(None) == (False, False)

    table.centre(1)
    expected = (rows[1]["centroid_r_mm"], rows[1]["centroid_a_mm"], rows[1]["centroid_s_mm"])
    assert centred == [(mrml.scene, pytest.approx(expected))]
    # Under a transform, the views go where the lesion is shown, not where the file put it.
    transform = mrml.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    shift = vtk.vtkMatrix4x4()
    shift.SetElement(0, 3, 10.0)
    transform.SetMatrixTransformToParent(shift)
    volume.SetAndObserveTransformNodeID(transform.GetID())
    assert table.centre_of(1) == pytest.approx((expected[0] + 10.0, expected[1], expected[2]))

    # The real views move there.
    red = mrml.scene.AddNewNodeByClass("vtkMRMLSliceNode")
    red.SetLayoutName("Red")
    red.SetOrientationToAxial()
    assert table_action(LesionTable.of(outcome.segmentation_node), "centre", 0) == ""
    matrix = red.GetSliceToRAS()
    assert [matrix.GetElement(row, 3) for row in range(3)] == pytest.approx(list(table.centre_of(0)))


def test_a_delete_calls_remove_lesion_and_renumbers_the_rest(chest, tmp_path: Path) -> None:
    from CMEDLSegmentLib.lesion_nodes import remove_lesion, segment_mask
    from CMEDLSegmentLib.lesion_panel import EDITED_TEXT, LesionTable, table_action
    from CMEDLSegmentLib.segmentation_nodes import SegmentStyle, write_mask_to_segment

    mrml, ct, volume, mask = chest
    outcome, rows = import_result(mrml, volume, ct, mask, tmp_path / "run", probabilities=False)
    segmentation, segment_id = outcome.segmentation_node, outcome.segment_id
    ids = label_lesions(mask)
    calls: list[dict] = []

    def recording_remove(*args, **kwargs) -> float:
        calls.append(kwargs)
        return remove_lesion(*args, **kwargs)

    table = LesionTable.of(segmentation, remove=recording_remove)
    message = table.delete(1)
    assert calls == [{"lesion_id": 2}]
    assert message == f"Lesion 2 deleted ({rows[1]['volume_ml']:.2f} mL); 2 lesions left."
    np.testing.assert_array_equal(segment_mask(segmentation, segment_id, volume), (ids == 1) | (ids == 3))
    stored = LesionTable.of(segmentation)
    assert [row["id"] for row in stored.rows] == [1, 2]
    assert [row["voxel_count"] for row in stored.rows] == [rows[0]["voxel_count"], rows[2]["voxel_count"]]
    # The renumbered table still names the lesions as the engine would number what is left.
    assert stored.rows[1]["voxel_count"] == int(np.count_nonzero(label_lesions(ids == 3)))

    # Deleting the new lesion 2 (the old 3) removes exactly that one.
    assert stored.delete(1).startswith("Lesion 2 deleted")
    np.testing.assert_array_equal(segment_mask(segmentation, segment_id, volume), ids == 1)

    # A segment edited after the run (a lesion painted back) is refused, and nothing is removed.
    painted = (ids == 1) | (ids == 2)
    write_mask_to_segment(mrml.scene, volume, painted.astype(np.uint8), SegmentStyle(), segmentation, segment_id)
    edited = LesionTable.of(segmentation)
    assert table_action(edited, "delete", 0) == f"Failed: {EDITED_TEXT}"
    np.testing.assert_array_equal(segment_mask(segmentation, segment_id, volume), painted)
    assert table_action(edited, "delete", -1) == "Failed: select a lesion in the table first"


def test_one_segment_per_lesion_then_a_delete_renames_the_rest(chest, tmp_path: Path) -> None:
    import vtk

    from CMEDLSegmentLib.lesion_nodes import LESION_ID_TAG, segment_mask
    from CMEDLSegmentLib.lesion_panel import LesionTable, table_action

    mrml, ct, volume, mask = chest
    outcome, rows = import_result(mrml, volume, ct, mask, tmp_path / "run", probabilities=False)
    segmentation = outcome.segmentation_node.GetSegmentation()
    ids = label_lesions(mask)
    assert table_action(LesionTable.of(outcome.segmentation_node), "split") == "3 lesion segments made, one per lesion."
    table = LesionTable.of(outcome.segmentation_node)
    assert table.is_split and not table.can_split and LesionTable.buttons(table) == (True, False)
    assert segmentation.GetSegment(outcome.segment_id) is None
    names = [segmentation.GetSegment(table.segments[lesion]).GetName() for lesion in (1, 2, 3)]
    assert names == ["Lung tumour 1", "Lung tumour 2", "Lung tumour 3"]
    assert table_action(table, "split") == "Failed: the lesions already have their own segments"

    first = table.segments[1]
    assert table.delete(0) == f"Lesion 1 deleted ({rows[0]['volume_ml']:.2f} mL); 2 lesions left."
    assert segmentation.GetSegment(first) is None
    table = LesionTable.of(outcome.segmentation_node)
    assert [row["id"] for row in table.rows] == [1, 2]
    renamed = segmentation.GetSegment(table.segments[1])
    tag = vtk.reference("")
    assert renamed.GetName() == "Lung tumour 1" and renamed.GetTag(LESION_ID_TAG, tag) and str(tag) == "1"
    np.testing.assert_array_equal(segment_mask(outcome.segmentation_node, table.segments[1], volume), ids == 2)
    assert segmentation.GetSegment(table.segments[2]).GetName() == "Lung tumour 2"


def test_the_overlay_box_shows_and_hides_the_runs_map(chest, tmp_path: Path) -> None:
    from CMEDLSegmentLib.lesion_panel import NEXT_RUN_TEXT, NO_MAP_TEXT, LesionTable, table_action

    mrml, ct, volume, mask = chest
    views = [mrml.scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode") for _ in range(3)]
    assert table_action(None, "probability", on=True) == NEXT_RUN_TEXT and table_action(None, "probability") == ""
    plain, _ = import_result(mrml, volume, ct, mask, tmp_path / "plain", probabilities=False)
    assert table_action(LesionTable.of(plain.segmentation_node), "probability", on=True) == NO_MAP_TEXT

    outcome, _ = import_result(mrml, volume, ct, mask, tmp_path / "shown", probabilities=True)
    table = LesionTable.of(outcome.segmentation_node)
    assert table_action(table, "probability", on=True) == f"Showing {outcome.probability_node.GetName()}."
    assert all(view.GetForegroundVolumeID() == outcome.probability_node.GetID() for view in views)
    assert all(view.GetBackgroundVolumeID() == volume.GetID() for view in views)
    assert table_action(table, "probability", on=False) == ""
    assert all(not view.GetForegroundVolumeID() for view in views)
    with pytest.raises(ValueError, match="unknown lesion table action"):
        table_action(table, "keep")


def test_a_finished_run_shows_its_map_while_the_box_is_ticked(chest, tmp_path: Path) -> None:
    from CMEDLCommon.settings import UserSettings
    from CMEDLSegmentLib.runner import FINISHED
    from CMEDLSegmentLib.session import SegmentSession

    mrml, ct, volume, mask = chest
    view = mrml.scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
    store = SimpleNamespace(values={})
    store.value = lambda key, default=None: store.values.get(key, default)
    store.setValue = lambda key, value: store.values.__setitem__(key, str(value))
    timer = SimpleNamespace(start=lambda: None, stop=lambda: None)
    panel = SimpleNamespace(inputVolume=volume, outputSegmentation=None, showProbability=False)
    session = SegmentSession(mrml.scene, UserSettings("CMEDL/Segment/", store), timer, defer=lambda ms, call: None,
                             parameters=lambda: panel, prompts=None, logic=object())  # fmt: skip
    outcome, _ = import_result(mrml, volume, ct, mask, tmp_path / "run", probabilities=True)
    session.runner._emit(FINISHED, None, outcome=outcome)
    assert panel.outputSegmentation is outcome.segmentation_node and not view.GetForegroundVolumeID()
    panel.showProbability = True
    session.runner._emit(FINISHED, None, outcome=outcome)
    assert view.GetForegroundVolumeID() == outcome.probability_node.GetID()


# -- the widgets ---------------------------------------------------------------------------------------------


class FakeItem:
    def __init__(self, text: str) -> None:
        self._text = text

    def text(self) -> str:
        return self._text


class FakeTable:
    """What fill_table uses of a QTableWidget (PythonQt reads rowCount and columnCount as properties)."""

    def __init__(self, columns: int) -> None:
        self.columnCount, self.rowCount, self.cells, self.rebuilt = columns, 0, {}, 0

    def item(self, row: int, column: int):
        return self.cells.get((row, column))

    def clearContents(self) -> None:  # noqa: N802 -- Qt's name
        self.cells.clear()
        self.rebuilt += 1

    def setRowCount(self, rows: int) -> None:  # noqa: N802 -- Qt's name
        self.rowCount = rows

    def setItem(self, row: int, column: int, item: FakeItem) -> None:  # noqa: N802 -- Qt's name
        self.cells[(row, column)] = item


def test_the_table_is_filled_once_and_its_columns_are_the_ui_files() -> None:
    from CMEDLCommon.widgets import fill_table
    from CMEDLSegmentLib.lesion_panel import COLUMNS

    tree = ElementTree.parse(ROOT / "CMEDLSegment" / "Resources" / "UI" / "CMEDLSegment.ui")
    table = next(widget for widget in tree.iter("widget") if widget.get("name") == "lesionTable")
    assert tuple(column.find("property/string").text for column in table.findall("column")) == COLUMNS

    fake = FakeTable(len(COLUMNS))
    rows = [("1", "2.00", "12.0 x 8.0 mm", "0.90", "inside lung"), ("2", "0.50", "5.0 x 4.0 mm", "-", "unknown")]
    fill_table(fake, rows, FakeItem)
    assert fake.rowCount == 2 and fake.item(1, 4).text() == "unknown" and fake.rebuilt == 1
    fill_table(fake, [tuple(row) for row in rows], FakeItem)
    assert fake.rebuilt == 1, "an unchanged table is left alone, so its selection stays"
    fill_table(fake, rows[:1], FakeItem)
    assert fake.rowCount == 1 and fake.rebuilt == 2
