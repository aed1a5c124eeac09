"""Segmenting a CT volume node with a child engine process, and putting the result into the scene.

The volume is written to a private temporary folder, ``python -m cmedl segment ... --progress json`` runs as
a child process (so the GUI stays responsive, Cancel can kill it, and a crash cannot take Slicer down),
and only when the child has finished cleanly is its labelmap read and written into a segment. A failed or
cancelled run adds nothing to the scene, and the input volume node is only ever read.

The child also writes the lesion table (``--lesions``) and, when the panel asks for the overlay, the tumour
probability map (``--probabilities``) into the hand-over folder, and with test-time augmentation the per-voxel
uncertainty map (``--uncertainty``) too; the import step adds the maps as colour volumes and keeps the table on
the segmentation node (:func:`CMEDLSegmentLib.lesion_panel.record_result`).
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cmedl.devices import DEFAULT_DEVICE, DEVICES
from cmedl.errors import CancelledError, InputError
from cmedl.filebase import peek_model_card
from cmedl.jobs import Job, JobResult
from cmedl.progress import overall_fraction
from cmedl.segment_options import SegmentOptions
from CMEDLSegmentLib.lesion_nodes import add_probability_volume
from CMEDLSegmentLib.lesion_panel import record_result
from CMEDLSegmentLib.segmentation_nodes import SegmentStyle, WrittenSegment, write_mask_to_segment
from CMEDLSegmentLib.volume_nodes import read_labelmap_on_grid, write_volume_node

# The hand-over folder's files besides the input and the labelmap.
LESIONS_FILE = "lesions.json"
PROBABILITIES_FILE = "probabilities.nrrd"
UNCERTAINTY_FILE = "uncertainty.nrrd"
# The uncertainty map (standard deviation over the flips, 0-255 for 0-1) is transparent below this; the deviation
# of three probabilities is at most 0.47, so the probability overlay's 0.1 would hide most of what it shows.
UNCERTAINTY_VISIBLE_FROM = 0.05

_DEFAULTS = SegmentOptions()
# Parameter node field (the panel's) -> the SegmentOptions field of the same meaning, whose default it has.
PANEL_FIELDS = {
    "lungThreshold": "lung_threshold_hu",
    "roiMargin": "roi_margin_mm",
    "probabilityThreshold": "probability_threshold",
    "batchSize": "batch_size",
    "tta": "tta",
    "minLesionMl": "min_lesion_ml",
    "minLesionProbability": "min_lesion_probability",
}
# A parameter node holds no None: the panel's batch size spin box shows "auto" at 0, which lets the engine choose.
AUTO_BATCH_SIZE = 0


def option_from_panel(field: str, value: Any) -> Any:
    """A panel value as the :class:`~cmedl.segment_options.SegmentOptions` field ``field`` takes it."""
    if field == "batch_size":
        return None if int(value) == AUTO_BATCH_SIZE else int(value)
    return type(getattr(_DEFAULTS, field))(value)


@dataclass
class SegmentationSettings:
    """What the user chose in the panel: the engine's ``cmedl segment`` options (defaults: its
    :class:`~cmedl.segment_options.SegmentOptions`), the model and whether to show the probability map."""

    model_path: Path
    device: str = DEFAULT_DEVICE
    lung_threshold_hu: float = _DEFAULTS.lung_threshold_hu
    roi_margin_mm: float = _DEFAULTS.roi_margin_mm
    probability_threshold: float = _DEFAULTS.probability_threshold
    batch_size: int | None = _DEFAULTS.batch_size
    force: bool = _DEFAULTS.force
    tta: bool = _DEFAULTS.tta
    min_lesion_ml: float = _DEFAULTS.min_lesion_ml
    min_lesion_probability: float = _DEFAULTS.min_lesion_probability
    probabilities: bool = False  # write the tumour probability map and add it to the scene

    @classmethod
    def from_panel(cls, parameters: Any, model_path: Path, device: str) -> SegmentationSettings:
        """The settings of a run from the panel's parameter node (its advanced values); None: the defaults.

        An automatic run after a scene close may come before any parameter node exists again. A value the object
        lacks (a script's stand-in may hold only some of :data:`PANEL_FIELDS`) is the engine's default.
        """
        if parameters is None:
            return cls(model_path=model_path, device=device)
        values = {
            field: option_from_panel(field, getattr(parameters, name)) if hasattr(parameters, name)
            else getattr(_DEFAULTS, field)
            for name, field in PANEL_FIELDS.items()
        }  # fmt: skip
        probabilities = bool(getattr(parameters, "showProbability", cls.probabilities))
        return cls(model_path=model_path, device=device, probabilities=probabilities, **values)

    def command_arguments(
        self,
        input_path: Path,
        output_path: Path,
        lesions_path: Path | None = None,
        probabilities_path: Path | None = None,
        uncertainty_path: Path | None = None,
    ) -> list[str]:
        """The ``cmedl segment`` arguments for these settings, writing the lesion table, the probability map and
        (with ``tta``) the uncertainty map to the paths given (None: not written)."""
        if self.device not in DEVICES:
            raise InputError(f"unknown device {self.device!r}; use one of {', '.join(DEVICES)}")
        arguments = [
            "segment", str(input_path), "-o", str(output_path),
            "--model", str(self.model_path),
            "--device", self.device,
            "--lung-threshold", f"{self.lung_threshold_hu:g}",
            "--roi-margin", f"{self.roi_margin_mm:g}",
            "--threshold", f"{self.probability_threshold:g}",
            "--batch-size", "auto" if self.batch_size is None else str(int(self.batch_size)),
            "--min-lesion-ml", f"{self.min_lesion_ml:g}",
            "--min-lesion-probability", f"{self.min_lesion_probability:g}",
            "--progress", "json",
        ]  # fmt: skip
        if self.tta:
            arguments.append("--tta")
        if lesions_path is not None:
            arguments += ["--lesions", str(lesions_path)]
        if probabilities_path is not None:
            arguments += ["--probabilities", str(probabilities_path)]
        if uncertainty_path is not None:
            if not self.tta:
                raise InputError("the uncertainty map needs test-time augmentation")
            arguments += ["--uncertainty", str(uncertainty_path)]
        if self.force:
            arguments.append("--force")
        return arguments


@dataclass
class SegmentationOutcome:
    """A finished run: where the segment went and what the engine reported."""

    segmentation_node: Any
    segment_id: str
    volume_ml: float
    seconds: float
    device: str
    created_node: bool
    summary: dict[str, Any] = field(default_factory=dict)
    lesions: list[dict[str, Any]] | None = None  # the lesion table rows (None: the engine gave none)
    probability_node: Any = None  # the tumour probability volume, when the run was asked for it
    uncertainty_node: Any = None  # the uncertainty volume, when the run was asked for the map with tta

    def status_line(self, segment_name: str) -> str:
        """The one-line result a user reads, e.g. ``Lung tumour: 12.4 mL in 2 lesions, 38 s on cuda``.

        Lesions the minimum volume or peak probability removed are counted, so that an empty result explains itself.
        """
        where = f" on {self.device}" if self.device else ""
        count = "" if self.lesions is None else f" in {len(self.lesions)} lesion{'' if len(self.lesions) == 1 else 's'}"
        dropped = int(self.summary.get("removed_lesion_count") or 0)
        count += f" ({dropped} below the minimum removed)" if dropped else ""
        return f"{segment_name}: {self.volume_ml:.1f} mL{count}, {self.seconds:.0f} s{where}"


class SegmentationTask:
    """One running segmentation: poll it from a timer, cancel it, and finish it into the scene."""

    def __init__(
        self,
        scene,
        volume_node,
        style: SegmentStyle,
        job: Job,
        work_folder: Path,
        output_path: Path,
        segmentation_node=None,
        segment_id: str | None = None,
        lesions_path: Path | None = None,
        probabilities_path: Path | None = None,
        uncertainty_path: Path | None = None,
    ) -> None:
        self.scene = scene
        self.volume_node = volume_node
        self.style = style
        self.job = job
        self.work_folder = work_folder
        self.output_path = output_path
        self.segmentation_node = segmentation_node
        self.segment_id = segment_id
        self.lesions_path = lesions_path
        self.probabilities_path = probabilities_path
        self.uncertainty_path = uncertainty_path
        self.started = time.monotonic()
        self._finished = False

    @property
    def running(self) -> bool:
        return self.job.running

    def poll(self) -> list[dict]:
        """Events that arrived since the last poll (non-blocking)."""
        return self.job.poll()

    def fraction(self) -> float | None:
        """Share of the whole run that is done, in [0, 1], or None before the first progress event."""
        return overall_fraction(self.job.latest_progress)

    def stage_text(self) -> str:
        """What the engine is doing, e.g. ``segment 12/40 slices``."""
        event = self.job.latest_progress
        if not event:
            return "starting"
        unit = f" {event['message']}" if event.get("message") == "slices" else ""
        return f"{event.get('stage', '')} {event.get('done', 0)}/{event.get('total', 0)}{unit}"

    def cancel(self) -> None:
        """Kill the child's whole process tree and discard its files; nothing reaches the scene.

        Blocks until the tree is gone (scripts); a panel uses :meth:`kill_now` and :meth:`discard` on timer ticks.
        """
        self.job.cancel()
        self._cleanup()

    def kill_now(self) -> None:
        """Kill the child's whole process tree without a grace period (the child has nothing to save)."""
        self.job.cancel(grace_seconds=0.0)

    def discard(self) -> None:
        """Drop the run: its files are removed and :meth:`finish` refuses it, so nothing reaches the scene."""
        self._finished = True
        self._cleanup()

    def wait(self, timeout: float | None = None, on_event: Callable[[dict], None] | None = None) -> JobResult:
        """Block until the child ends (the scripting and self-test path)."""
        return self.job.wait(timeout=timeout, on_event=on_event)

    def finish(self) -> SegmentationOutcome:
        """Import the child's result into the scene once it has ended; raises the engine's error otherwise.

        The segment, the probability and uncertainty volumes (when the run wrote them) and the lesion table go in
        together:
        a result that cannot be read adds nothing. Always removes the temporary folder. Raises
        :class:`cmedl.errors.CMEDLError` subclasses with the engine's one-line message when the run failed or
        was cancelled.
        """
        if self._finished:
            raise InputError("this segmentation run has already been finished")
        probability_node = uncertainty_node = None
        try:
            result = self.job.wait()
            result.raise_for_error()
            if not self.output_path.is_file():
                raise InputError("the engine ended without writing its result")
            mask = read_labelmap_on_grid(self.output_path, self.volume_node)
            summary = result.result or {}
            rows = self._lesion_rows(summary)
            if self.probabilities_path is not None:
                # Read and checked against the CT's grid before the segment is written, so that a bad map
                # fails the run instead of leaving a segment without its overlay.
                probability_node = add_probability_volume(self.scene, self.probabilities_path, self.volume_node)
            if self.uncertainty_path is not None:
                uncertainty_node = add_probability_volume(
                    self.scene,
                    self.uncertainty_path,
                    self.volume_node,
                    name=f"{self.volume_node.GetName()} uncertainty",
                    visible_from=UNCERTAINTY_VISIBLE_FROM,
                    what="uncertainty map",
                )
            written: WrittenSegment = write_mask_to_segment(
                self.scene, self.volume_node, mask, self.style, self.segmentation_node, self.segment_id
            )
            maps = {"probability_node": probability_node, "uncertainty_node": uncertainty_node}
            record_result(written.segmentation_node, written.segment_id, self.volume_node, rows, **maps)
        except BaseException:
            for node in (probability_node, uncertainty_node):
                if node is not None:
                    self.scene.RemoveNode(node)
            raise
        finally:
            self._finished = True
            self._cleanup()
        return SegmentationOutcome(
            segmentation_node=written.segmentation_node,
            segment_id=written.segment_id,
            volume_ml=written.volume_ml,
            seconds=time.monotonic() - self.started,
            device=str(summary.get("device", "")),
            created_node=written.created_node,
            summary=summary,
            lesions=rows,
            probability_node=probability_node,
            uncertainty_node=uncertainty_node,
        )

    def _lesion_rows(self, summary: dict[str, Any]) -> list[dict[str, Any]] | None:
        """The lesion table the child wrote (with its provenance on disk), else the one in its result, else None."""
        if self.lesions_path is not None and self.lesions_path.is_file():
            # cmedl.lesions needs scipy and scikit-image, which the child that just ran had.
            from cmedl.lesions import read_lesions

            return list(read_lesions(self.lesions_path).get("lesions") or [])
        rows = summary.get("lesions")
        return list(rows) if isinstance(rows, list) else None

    def _cleanup(self) -> None:
        shutil.rmtree(self.work_folder, ignore_errors=True)


class TumourSegmentationLogic:
    """Starts segmentation runs for volume nodes of one scene.

    Args:
        scene: the MRML scene results are added to.
        python_executable: the interpreter for the child (``PythonSlicer`` inside Slicer; the current
            interpreter when None).
        work_root: where the private temporary folders go (the system temporary folder when None).
    """

    def __init__(self, scene, python_executable: str | None = None, work_root: str | Path | None = None) -> None:
        self.scene = scene
        self.python_executable = python_executable
        self.work_root = Path(work_root) if work_root else None

    def start(
        self,
        volume_node,
        settings: SegmentationSettings,
        segmentation_node=None,
        segment_id: str | None = None,
    ) -> SegmentationTask:
        """Export the volume and start the child; returns at once with a task to poll."""
        if volume_node is None:
            raise InputError("choose an input CT volume")
        card = peek_model_card(settings.model_path)
        if card.get("kind", "segmentor") != "segmentor":
            raise InputError(f"{Path(settings.model_path).name} is not a segmentation model")
        work_folder = Path(tempfile.mkdtemp(prefix="cmedl-segment-", dir=self.work_root))
        try:
            # Named after the node, so that the engine's messages name what the user sees.
            input_folder = work_folder / "input"
            input_folder.mkdir()
            input_path = write_volume_node(volume_node, input_folder / f"{_file_stem(volume_node.GetName())}.nrrd")
            output_path = work_folder / "segmentation.nrrd"
            lesions_path = work_folder / LESIONS_FILE
            probabilities_path = work_folder / PROBABILITIES_FILE if settings.probabilities else None
            # The flips' disagreement comes with the overlay: a run that shows the map and averages flips shows both.
            uncertainty_path = work_folder / UNCERTAINTY_FILE if settings.probabilities and settings.tta else None
            job = Job.start(
                settings.command_arguments(input_path, output_path, lesions_path, probabilities_path, uncertainty_path),
                python=self.python_executable,
                device=settings.device,
            )
        except BaseException:
            shutil.rmtree(work_folder, ignore_errors=True)
            raise
        return SegmentationTask(
            self.scene,
            volume_node,
            SegmentStyle.from_model_card(card),
            job,
            work_folder,
            output_path,
            segmentation_node,
            segment_id,
            lesions_path=lesions_path,
            probabilities_path=probabilities_path,
            uncertainty_path=uncertainty_path,
        )

    def segment(
        self,
        volume_node,
        settings: SegmentationSettings,
        segmentation_node=None,
        segment_id: str | None = None,
        on_event: Callable[[dict], None] | None = None,
        timeout: float | None = None,
    ) -> SegmentationOutcome:
        """The blocking path (scripts, batch runs and self-tests): start, wait, import."""
        task = self.start(volume_node, settings, segmentation_node, segment_id)
        result = task.wait(timeout=timeout, on_event=on_event)
        if result.cancelled:
            task._cleanup()
            raise CancelledError(result.error or "cancelled")
        return task.finish()


def _file_stem(name: str) -> str:
    """A file name made from a node name (characters that are unsafe in file names replaced by ``_``)."""
    stem = re.sub(r"[^A-Za-z0-9._ -]+", "_", name or "").strip(" .")
    return stem[:80] or "volume"
