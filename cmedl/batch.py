"""Batch segmentation: many CTs, the model loaded once, one result and one lesion table per case.

``cmedl segment INPUT -o OUT`` runs a batch when INPUT is a folder of CT volumes (a folder that itself holds a
DICOM series is one CT, as :func:`cmedl.volumes.read_volume` reads it) or a ``.txt`` list file (one path per
line; blank lines and lines starting with ``#`` are skipped; relative paths are relative to the list file's
folder). For each case, named by its file name without the volume suffix (``<stem>``), OUT holds:

- ``<stem>.seg.nrrd`` (or ``<stem>.nii.gz`` with ``--format nii.gz``): the labelmap, with provenance fields;
- ``<stem>.lesions.json``: the lesion table with the provenance (model, model sha256, engine version,
  options, input sha256);
- optionally ``<stem>.probability.nrrd`` / ``<stem>.uncertainty.nrrd`` in the folders given for them
  (``.nii.gz`` with ``--format nii.gz``);

and ``summary.csv``, one row per case of this run: ``case, status, error, tumour_volume_ml, lesion_count,
seconds, input``, status ``ok``, ``failed`` or ``skipped``. It is rewritten after every case, so it is current
even when the batch is interrupted.

Resuming: a case whose outputs all exist and whose lesion table records the same model sha256, the same input
sha256 and the same result-changing options (:data:`cmedl.segment_options.RESULT_OPTIONS`; not device or batch size)
is skipped. One failing case is recorded with its one-line error and the next case starts; a cancel stops the
batch. The exit code is 0 when every case is ok or skipped, :data:`PARTIAL_FAILURE_EXIT_CODE` otherwise.
"""

from __future__ import annotations

import contextlib
import csv
import io
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cmedl.catalogue import check_model_integrity
from cmedl.errors import CancelledError, CMEDLError, InputError, OutputError
from cmedl.lesions import read_lesions
from cmedl.modelfile import load_model
from cmedl.progress import Progress
from cmedl.segment import Segmenter, input_sha256, segment_to_files
from cmedl.segment_options import RESULT_OPTIONS, SegmentOptions
from cmedl.volumes import VOLUME_SUFFIXES, _dicom_series_ids, atomic_output, list_volumes, stem_of, suffix_of

#: ``--format`` values and the labelmap suffix each gives.
BATCH_FORMATS = {"seg.nrrd": ".seg.nrrd", "nii.gz": ".nii.gz"}
LIST_SUFFIX = ".txt"
SUMMARY_NAME = "summary.csv"
SUMMARY_COLUMNS = ("case", "status", "error", "tumour_volume_ml", "lesion_count", "seconds", "input")
STATUS_OK, STATUS_FAILED, STATUS_SKIPPED = "ok", "failed", "skipped"


def is_batch_input(path: str | Path) -> bool:
    """True for a ``.txt`` list file or a folder that is not itself a DICOM series."""
    path = Path(path)
    if path.is_file():
        return path.suffix.lower() == LIST_SUFFIX
    return path.is_dir() and not _dicom_series_ids(path)


def batch_inputs(path: str | Path) -> list[Path]:
    """The CT inputs of a batch: the volumes and DICOM series folders in a folder, or the paths of a list file.

    Segmentations (``.seg.nrrd``) in a folder are left out: they are results, not CTs. A list file's entries
    are kept even when missing, so that the case is reported as failed rather than silently dropped.
    """
    path = Path(path)
    if path.is_file():
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise InputError(f"cannot read the list file {path.name}: {error}") from None
        entries = [line.strip() for line in lines]
        inputs = [
            entry_path if entry_path.is_absolute() else path.parent / entry_path
            for entry_path in (Path(entry) for entry in entries if entry and not entry.startswith("#"))
        ]
    else:
        inputs = [entry for entry in list_volumes(path) if suffix_of(entry) != ".seg.nrrd"]
    if not inputs:
        raise InputError(f"no CT volumes in {path}")
    return inputs


@dataclass
class CaseRow:
    """One line of ``summary.csv``: volumes in mL, time in seconds."""

    case: str
    status: str
    error: str = ""
    tumour_volume_ml: float | None = None
    lesion_count: int | None = None
    seconds: float = 0.0
    input: str = ""
    exit_code: int = 0


@dataclass
class CaseOutputs:
    """Where one case's results go."""

    segmentation: Path
    lesions: Path
    probabilities: Path | None = None
    uncertainty: Path | None = None

    def all(self) -> list[Path]:
        return [p for p in (self.segmentation, self.lesions, self.probabilities, self.uncertainty) if p is not None]


def case_outputs(
    case: str,
    out_folder: Path,
    output_format: str,
    probabilities_folder: Path | None = None,
    uncertainty_folder: Path | None = None,
) -> CaseOutputs:
    suffix = BATCH_FORMATS[output_format]
    map_suffix = ".nii.gz" if output_format == "nii.gz" else ".nrrd"
    return CaseOutputs(
        segmentation=out_folder / f"{case}{suffix}",
        lesions=out_folder / f"{case}.lesions.json",
        probabilities=probabilities_folder / f"{case}.probability{map_suffix}" if probabilities_folder else None,
        uncertainty=uncertainty_folder / f"{case}.uncertainty{map_suffix}" if uncertainty_folder else None,
    )


def finished_before(outputs: CaseOutputs, model_sha256: str, options: SegmentOptions, sha256: str) -> dict | None:
    """The lesion table of an earlier run of this case with the same model, input and options, else None."""
    if not all(path.is_file() for path in outputs.all()):
        return None
    try:
        document = read_lesions(outputs.lesions)
    except CMEDLError:
        return None
    record = document.get("provenance") or {}
    recorded_options = record.get("options") or {}
    same = (
        record.get("model_sha256") == model_sha256
        and record.get("input_sha256") == sha256
        and {key: recorded_options.get(key) for key in RESULT_OPTIONS} == options.result_options()
    )
    return document if same else None


def run_batch(
    inputs: list[Path],
    out_folder: str | Path,
    model_path: str | Path,
    options: SegmentOptions | None = None,
    progress: Progress | None = None,
    *,
    output_format: str = "seg.nrrd",
    probabilities_folder: str | Path | None = None,
    uncertainty_folder: str | Path | None = None,
) -> dict[str, Any]:
    """Segment every input with one model load; returns ``{"out", "summary_csv", "counts", "cases"}``.

    Problems with the batch as a whole (an unknown format, two cases with one name, an output that would
    overwrite an input, an output folder that is a file or named like a volume file, a bad model file) raise
    before any case runs, and then no folder the batch created is left behind. Problems with one case are
    recorded in its row; a cancel (:class:`CancelledError`, Ctrl-C) stops the batch after writing the summary
    so far.
    """
    progress = progress or Progress()
    options = options or SegmentOptions()
    if output_format not in BATCH_FORMATS:
        raise InputError(f"unknown --format {output_format!r}; use one of {', '.join(BATCH_FORMATS)}")
    out_folder = Path(out_folder)
    probabilities_folder = Path(probabilities_folder) if probabilities_folder else None
    uncertainty_folder = Path(uncertainty_folder) if uncertainty_folder else None
    folders = [folder for folder in (out_folder, probabilities_folder, uncertainty_folder) if folder is not None]
    for folder in folders:
        _check_output_folder(folder)
    if uncertainty_folder is not None and not options.tta:
        raise InputError("an uncertainty map needs test-time augmentation (--tta)")
    cases = _case_names(inputs)
    planned = {
        case: case_outputs(case, out_folder, output_format, probabilities_folder, uncertainty_folder) for case in cases
    }
    resolved_inputs = {path.resolve() for path in inputs}
    for outputs in planned.values():
        for path in outputs.all():
            if path.resolve() in resolved_inputs:
                raise InputError(f"output {path} would overwrite an input; choose another output folder")
    created: list[Path] = []
    rows: list[CaseRow] = []
    summary_path = out_folder / SUMMARY_NAME
    total = len(inputs)
    try:
        for folder in folders:
            created += _make_folder(folder)
        model = load_model(model_path)  # once for the whole batch
        check_model_integrity(model.path, model.sha256)
        segmenter = Segmenter(model, options, progress)
        for index, (path, case) in enumerate(zip(inputs, cases)):
            progress.update("batch", index, total, case)
            rows.append(_run_case(segmenter, path, case, planned[case]))
            progress.log(_row_line(rows[-1]))
            # After every case, so that an interrupted batch still leaves the summary of the cases it finished.
            write_summary(summary_path, rows)
    except BaseException:
        # A batch that stops before its first summary (a bad model, a cancel in the first case) leaves no
        # empty folder behind; a folder holding anything stays.
        _remove_empty_folders(created)
        raise
    progress.update("batch", total, total, "cases")
    statuses = (STATUS_OK, STATUS_SKIPPED, STATUS_FAILED)
    counts = {status: sum(row.status == status for row in rows) for status in statuses}
    return {
        "out": str(out_folder),
        "summary_csv": str(summary_path),
        "model": model.card.name,
        "model_sha256": model.sha256,
        "cases_total": total,
        "counts": counts,
        "cases": [asdict(row) for row in rows],
    }


def _check_output_folder(folder: Path) -> None:
    """Refuse an output folder that is a file, or whose name is a volume file's (``out.seg.nrrd``).

    Such a name shows that one output file was meant, not a batch: making a folder of that name would leave a
    folder that looks like a result file, and the results inside it where nobody looks for them.
    """
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"the output of a batch must be a folder: {folder} is a file")
    name = folder.name.lower()
    if any(name.endswith(suffix) for suffix in (".seg.nrrd", *VOLUME_SUFFIXES)):
        raise OutputError(
            f"the output of a batch must be a folder, and {folder} is named like a volume file; give a folder "
            "name (each CT of the batch gets its own files in it)"
        )


def _make_folder(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; returns those created, outermost first.

    They are listed so that a batch that fails before it writes anything removes them again
    (:func:`_remove_empty_folders`).
    """
    absent = [path for path in (folder, *folder.parents) if not path.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"cannot create the output folder {folder}: {error.strerror or error}") from None
    return absent[::-1]


def _remove_empty_folders(created: list[Path]) -> None:
    """Remove the folders a failed batch created, innermost first, as long as they are empty.

    ``rmdir`` removes only empty folders, so nothing anybody put there meanwhile is lost.
    """
    for folder in reversed(created):
        with contextlib.suppress(OSError):
            folder.rmdir()


def _case_names(inputs: list[Path]) -> list[str]:
    names = [stem_of(path) for path in inputs]
    seen: dict[str, Path] = {}
    for name, path in zip(names, inputs):
        if name in seen:
            raise InputError(f"two inputs give the case name {name!r}: {seen[name]} and {path}")
        seen[name] = path
    return names


def _run_case(segmenter: Segmenter, path: Path, case: str, outputs: CaseOutputs) -> CaseRow:
    started = time.perf_counter()
    row = CaseRow(case=case, status=STATUS_FAILED, input=str(path))
    try:
        if not path.exists():
            raise InputError(f"input not found: {path}")
        sha256 = input_sha256(path)
        earlier = finished_before(outputs, segmenter.model.sha256, segmenter.options, sha256)
        if earlier is not None:
            row.status = STATUS_SKIPPED
            row.tumour_volume_ml = earlier.get("tumour_volume_ml")
            row.lesion_count = earlier.get("lesion_count")
        else:
            summary = segment_to_files(
                segmenter,
                path,
                outputs.segmentation,
                lesions_path=outputs.lesions,
                probabilities_path=outputs.probabilities,
                uncertainty_path=outputs.uncertainty,
            )
            row.status = STATUS_OK
            row.tumour_volume_ml = summary["tumour_volume_ml"]
            row.lesion_count = summary["lesion_count"]
    except (CancelledError, KeyboardInterrupt):
        raise
    except CMEDLError as error:
        row.error, row.exit_code = _one_line(str(error) or type(error).__name__), error.exit_code
    except MemoryError:
        row.error, row.exit_code = "out of memory; try a smaller --batch-size or another device", 1
    except Exception as error:  # a bug met on one case must not cost the others their results
        row.error, row.exit_code = f"unexpected {type(error).__name__}: {_one_line(str(error))}", 1
    row.seconds = round(time.perf_counter() - started, 2)
    return row


def _one_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else ""


def _row_line(row: CaseRow) -> str:
    if row.status == STATUS_FAILED:
        return f"{row.case}: failed: {row.error}"
    volume = f"{row.tumour_volume_ml:.1f} mL" if row.tumour_volume_ml is not None else "? mL"
    return f"{row.case}: {row.status}, lung tumour {volume} in {row.lesion_count} lesion(s), {row.seconds:.1f} s"


def write_summary(path: str | Path, rows: list[CaseRow]) -> Path:
    """Write ``summary.csv`` (columns :data:`SUMMARY_COLUMNS`) atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(SUMMARY_COLUMNS), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        values = asdict(row)
        writer.writerow({key: "" if values[key] is None else values[key] for key in SUMMARY_COLUMNS})
    with atomic_output(path) as temp:
        temp.write_text(buffer.getvalue(), encoding="utf-8")
    return Path(path)


def read_summary(path: str | Path) -> list[dict[str, str]]:
    """The rows of a ``summary.csv`` as dicts of strings."""
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))
