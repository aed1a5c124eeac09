"""The panel's lesion table: one row per lesion of the last run, and what clicking, deleting and splitting do.

Qt-free: the table lives on the segmentation node, so that it needs no panel to exist and survives the panel
being closed, another output being chosen and back, and a scene being saved.

- :func:`record_result` (the import step of a run, :mod:`.segment_logic`) stores the lesion rows of the
  segment just written as an attribute of its segmentation node, with node references to the CT and to the
  probability map; it replaces the previous run's table and removes that run's probability map.
- :class:`LesionTable` reads it back and carries out the row actions: the centre of a row for the views,
  delete a lesion (its voxels leave the segment; the ids after it move up by one, as the engine would number
  the lesions that are left), one segment per lesion, and showing or hiding the probability overlay.
- :func:`table_action`: what the panel's row click, buttons and overlay box do, as one status line.

A lesion's id is its rank by volume among the segment's connected components (:mod:`cmedl.lesions`). Before
a delete or a split, the segment's components are counted again and compared with the table's voxel counts:
a segment edited since the run (painted, erased, a lesion removed by hand) is refused with one line rather
than a wrong lesion deleted.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from cmedl.errors import CMEDLError, InputError
from CMEDLSegmentLib.lesion_nodes import (
    DEFAULT_OVERLAY_OPACITY,
    LESION_ID_TAG,
    centre_views_on,
    remove_lesion,
    segment_mask,
    show_probability_overlay,
    split_lesions_into_segments,
)

LESIONS_ATTRIBUTE = "CMEDL.LesionTable"
VOLUME_ROLE = "cmedlLesionVolume"  # the CT the lesions were measured on
PROBABILITY_ROLE = "cmedlProbabilityVolume"  # the run's tumour probability map, when it was asked for
PROBABILITY_ATTRIBUTE = "CMEDL.Probability"  # set by lesion_nodes.add_probability_volume on its nodes
UNCERTAINTY_ROLE = "cmedlUncertaintyVolume"  # the run's uncertainty map (test-time augmentation with the overlay)
TABLE_VERSION = 1
COLUMNS = ("#", "Volume (mL)", "Long x short", "Peak p", "Location")
EDITED_TEXT = (
    "the segment was edited after the run, so its lesions no longer match the table; run the segmentation "
    "again to measure them"
)
NO_MAP_TEXT = "This result has no probability map: keep the box ticked and press Apply to make one."
NEXT_RUN_TEXT = "The tumour probability map comes with the next Apply."


def record_result(
    segmentation_node: Any,
    segment_id: str,
    volume_node: Any,
    rows: list[dict] | None,
    probability_node: Any = None,
    uncertainty_node: Any = None,
) -> None:
    """Keep the lesion ``rows`` of segment ``segment_id`` (just written from ``volume_node``) on the node.

    ``rows`` None (an engine that gave no table) removes the previous run's table rather than leaving it beside
    a result it does not describe. The previous run's probability and uncertainty maps of this segmentation are
    removed from the scene for the same reason (only nodes
    :func:`~CMEDLSegmentLib.lesion_nodes.add_probability_volume` made).
    """
    for role, node in ((PROBABILITY_ROLE, probability_node), (UNCERTAINTY_ROLE, uncertainty_node)):
        old = segmentation_node.GetNodeReference(role)
        if old is not None and old is not node and old.GetAttribute(PROBABILITY_ATTRIBUTE) == "1":
            _remove_volume(old)
        segmentation_node.SetNodeReferenceID(role, node.GetID() if node else None)
    segmentation_node.SetNodeReferenceID(VOLUME_ROLE, volume_node.GetID())
    if rows is None:
        segmentation_node.RemoveAttribute(LESIONS_ATTRIBUTE)
        return
    _store(segmentation_node, {"segment_id": segment_id, "lesions": [dict(row) for row in rows], "segments": {}})


def _remove_volume(node: Any) -> None:
    """Remove a volume node and its display nodes (the scene leaves those behind otherwise)."""
    scene = node.GetScene()
    if scene is None:
        return
    displays = [node.GetNthDisplayNode(index) for index in range(node.GetNumberOfDisplayNodes())]
    scene.RemoveNode(node)
    for display in displays:
        if display is not None:
            scene.RemoveNode(display)


def _store(segmentation_node: Any, table: dict[str, Any]) -> None:
    segmentation_node.SetAttribute(LESIONS_ATTRIBUTE, json.dumps({"version": TABLE_VERSION, **table}))


def lesion_cells(row: dict[str, Any]) -> tuple[str, ...]:
    """One row of the panel's table (:data:`COLUMNS`) from a lesion table row of the engine."""
    peak = row.get("max_probability")
    location = str(row.get("location") or "unknown").replace("_", " ")
    return (
        str(int(row["id"])),
        f"{float(row['volume_ml']):.2f}",
        f"{float(row['long_axis_mm']):.1f} x {float(row['short_axis_mm']):.1f} mm",
        "-" if peak is None else f"{float(peak):.2f}",
        location,
    )


class LesionTable:
    """The lesion table kept on ``segmentation_node`` (see the module docstring); None from :meth:`of` if none.

    Args:
        segmentation_node: the segmentation a run wrote into.
        table: the stored table (``segment_id``, ``lesions`` rows, ``segments``: lesion id -> segment id once split).
        remove / split / centre: the scene operations (those of :mod:`.lesion_nodes`; a test may pass its own).
    """

    def __init__(
        self,
        segmentation_node: Any,
        table: dict[str, Any],
        remove: Callable[..., float] = remove_lesion,
        split: Callable[..., list] = split_lesions_into_segments,
        centre: Callable[[Any, tuple[float, float, float]], None] = centre_views_on,
    ) -> None:
        self.segmentation_node = segmentation_node
        self.segment_id: str = str(table.get("segment_id") or "")
        self.rows: list[dict[str, Any]] = [dict(row) for row in table.get("lesions") or []]
        self.segments: dict[int, str] = {int(key): str(value) for key, value in (table.get("segments") or {}).items()}
        self._remove, self._split, self._centre = remove, split, centre

    @classmethod
    def of(cls, segmentation_node: Any, **operations: Callable) -> LesionTable | None:
        """The table a run left on ``segmentation_node``; None for no node, no run, or an unreadable attribute
        (a hand-edited scene file: the panel then shows no table rather than failing)."""
        text = segmentation_node.GetAttribute(LESIONS_ATTRIBUTE) if segmentation_node is not None else None
        try:
            table = json.loads(text) if text else None
            return cls(segmentation_node, table, **operations) if isinstance(table, dict) else None
        except (ValueError, TypeError, AttributeError):
            return None

    # -- what the panel shows --

    @property
    def volume_node(self) -> Any:
        return self.segmentation_node.GetNodeReference(VOLUME_ROLE)

    @property
    def probability_node(self) -> Any:
        return self.segmentation_node.GetNodeReference(PROBABILITY_ROLE)

    @property
    def is_split(self) -> bool:
        return bool(self.segments)

    @property
    def can_split(self) -> bool:
        return bool(self.rows) and not self.is_split

    def cells(self) -> list[tuple[str, ...]]:
        return [lesion_cells(row) for row in self.rows]

    @staticmethod
    def buttons(table: LesionTable | None) -> tuple[bool, bool]:
        """Whether "Delete lesion" and "One segment per lesion" can be pressed for ``table`` (None: no result)."""
        return (bool(table and table.rows), bool(table and table.can_split))

    # -- row actions --

    def centre_of(self, index: int) -> tuple[float, float, float]:
        """The centroid of row ``index`` in world RAS mm (the CT's parent transform applied)."""
        row = self._row(index)
        local = [float(row["centroid_r_mm"]), float(row["centroid_a_mm"]), float(row["centroid_s_mm"])]
        volume = self.volume_node
        if volume is None:
            return (local[0], local[1], local[2])
        world = [0.0, 0.0, 0.0]
        volume.TransformPointToWorld(local, world)
        return (world[0], world[1], world[2])

    def centre(self, index: int) -> None:
        """Centre every slice view on lesion ``index`` (a row click)."""
        self._centre(self.segmentation_node.GetScene(), self.centre_of(index))

    def delete(self, index: int) -> str:
        """Remove lesion ``index`` from the segmentation and the table; returns the line for the status label.

        Unsplit, its voxels leave the tumour segment; split, its own segment goes. The lesions after it move up
        by one (id, and for split lesions the segment's name and id tag), as numbering the rest would give.
        """
        row = self._row(index)
        lesion_id = int(row["id"])
        segmentation = self.segmentation_node.GetSegmentation()
        if self.is_split:
            segment_id = self.segments.pop(lesion_id, "")
            segment = segmentation.GetSegment(segment_id) if segment_id else None
            removed_ml = float(row["volume_ml"])
            if segment is not None:
                segmentation.RemoveSegment(segment_id)
        else:
            self._check_unchanged()
            removed_ml = self._remove(self.segmentation_node, self.segment_id, self._volume(), lesion_id=lesion_id)
        del self.rows[index]
        self._renumber_after(lesion_id)
        self._save()
        left = len(self.rows)
        return f"Lesion {lesion_id} deleted ({removed_ml:.2f} mL); {left} lesion{'' if left == 1 else 's'} left."

    def split(self) -> str:
        """Replace the tumour segment by one segment per lesion, named "<name> <id>"; returns the status line."""
        if not self.can_split:
            raise InputError("the lesions already have their own segments" if self.is_split else "there are no lesions")
        self._check_unchanged()
        made = self._split(self.segmentation_node, self.segment_id, self._volume(), self.rows)
        self.segments = {int(lesion.lesion_id): str(lesion.segment_id) for lesion in made}
        self._save()
        return f"{len(made)} lesion segment{'' if len(made) == 1 else 's'} made, one per lesion."

    def show_probability(self, visible: bool) -> str:
        """Show (or hide) this result's probability map over the CT in the slice views; returns the status line."""
        node = self.probability_node
        if node is None:
            return NO_MAP_TEXT if visible else ""
        scene = self.segmentation_node.GetScene()
        show_probability_overlay(scene, node if visible else None, DEFAULT_OVERLAY_OPACITY, self.volume_node)
        return f"Showing {node.GetName()}." if visible else ""

    # -- helpers --

    def _row(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self.rows):
            raise InputError("select a lesion in the table first")
        return self.rows[index]

    def _volume(self) -> Any:
        volume = self.volume_node
        if volume is None:
            raise InputError("the CT these lesions were measured on is no longer in the scene")
        return volume

    def _check_unchanged(self) -> None:
        """Refuse (:class:`InputError`) when the segment's lesions are not those of the table any more."""
        # The engine's measuring code needs scipy and scikit-image, which a finished run has installed.
        import numpy as np

        from cmedl.lesions import label_lesions

        if self.segmentation_node.GetSegmentation().GetSegment(self.segment_id) is None:
            raise InputError(f"{EDITED_TEXT} (its tumour segment is gone)")
        labels = label_lesions(segment_mask(self.segmentation_node, self.segment_id, self._volume()))
        counts = np.bincount(labels.ravel())[1:].tolist()
        expected = [int(row["voxel_count"]) for row in sorted(self.rows, key=lambda row: int(row["id"]))]
        if counts != expected:
            raise InputError(EDITED_TEXT)

    def _renumber_after(self, lesion_id: int) -> None:
        segmentation = self.segmentation_node.GetSegmentation()
        for row in self.rows:
            old = int(row["id"])
            if old <= lesion_id:
                continue
            row["id"] = old - 1
            if old in self.segments:
                segment_id = self.segments.pop(old)
                self.segments[old - 1] = segment_id
                segment = segmentation.GetSegment(segment_id)
                if segment is not None:
                    # Only a name the split gave is renamed: one the user chose stays theirs.
                    name = segment.GetName()
                    if name.endswith(f" {old}"):
                        segment.SetName(f"{name[: -len(str(old))]}{old - 1}")
                    segment.SetTag(LESION_ID_TAG, str(old - 1))

    def _save(self) -> None:
        segments = {str(key): value for key, value in self.segments.items()}
        _store(self.segmentation_node, {"segment_id": self.segment_id, "lesions": self.rows, "segments": segments})


def table_action(table: LesionTable | None, action: str, row: int = -1, on: bool = False) -> str:
    """What the panel's lesion controls do; returns the status line ("": nothing to say).

    ``action`` is ``centre`` (a click on ``row``), ``delete`` (the selected ``row``; -1: none), ``split`` or
    ``probability`` ("Show tumour probability" ticked, ``on``, or unticked). ``table`` None (no result yet)
    does nothing but say that the overlay comes with the next run. A refusal reads "Failed: <the reason>".
    """
    try:
        if action == "probability":
            return (NEXT_RUN_TEXT if on else "") if table is None else table.show_probability(on)
        if table is None:
            return ""
        if action == "centre":
            table.centre(row)
            return ""
        if action == "delete":
            return table.delete(row)
        if action == "split":
            return table.split()
    except CMEDLError as error:
        return f"Failed: {error}"
    raise ValueError(f"unknown lesion table action {action!r}")
