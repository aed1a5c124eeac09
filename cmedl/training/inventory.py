"""What the training data folders hold, checked before a run starts.

A training run reads every case in full before its first iteration, and stops at the first file it cannot
use. This module looks at the folders first and cheaply, so that the user sees every problem at once,
each with its file and reason, before anything starts:

- per image: size and spacing from the file header (``ImageFileReader.ReadImageInformation``), and a
  modality guess from the intensities of a slab of middle slices (at most :data:`MAX_SAMPLED_VOXELS`
  voxels, judged with :func:`cmedl.modality.ct_likelihood_report`): a CT in Hounsfield units, an MR image
  (no air near -1000 and no negative values to speak of), or unknown (a CT stored with a +1024 offset, say);
- per label: readable, on the image's grid (the same corners in space, whatever the axis order), holding only
  0 and the tumour value (:func:`label_values_problem`), and the number of foreground voxels;
- per folder: images without a label, labels without an image, files that cannot be read, the spacing range.

Problems are what would make the engine refuse the data or train on the wrong thing (an unreadable file, a
CT without label, an MR image in the CT folder, a label off the image's grid); warnings are worth knowing
but do not block (an empty label, an unlabelled MR image, a label without image).

Only numpy and SimpleITK are used: the Slicer module runs this inside Slicer before torch is installed.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from cmedl.errors import CancelledError, CMEDLError
from cmedl.modality import ct_likelihood_report
from cmedl.volumes import list_volumes, read_volume, stem_of

CT, MR, UNKNOWN = "CT", "MR", "unknown"
MAX_SAMPLED_VOXELS = 2_000_000
# Below this 1st percentile an image holds real negative values: not an MR image in scanner units.
MR_LOWEST_P1 = -100.0
GRID_TOLERANCE_MM = 1e-3
SHOWN_NAMES = 8
SHOWN_VALUES = 8

# progress(done, total, name) after each file; raise CancelledError (or return True) to stop the scan.
ScanProgress = Callable[[int, int, str], object]


@dataclass
class CaseInfo:
    """One image of a folder and what was found about it and its label."""

    name: str
    image: Path
    label: Path | None
    size: tuple[int, ...]
    spacing_mm: tuple[float, ...]
    modality: str
    modality_reason: str
    label_issue: str = ""
    label_voxels: int | None = None


@dataclass
class Unreadable:
    """A file that cannot be used, and why (one line)."""

    path: Path
    reason: str


@dataclass
class FolderInventory:
    """What one dataset folder (images and, maybe, labels) holds."""

    role: str
    expected_modality: str
    images_folder: Path
    labels_folder: Path | None
    labels_required: bool
    cases: list[CaseInfo] = field(default_factory=list)
    unreadable: list[Unreadable] = field(default_factory=list)
    labels_without_image: list[Path] = field(default_factory=list)
    folder_problem: str = ""

    @property
    def labelled(self) -> list[CaseInfo]:
        return [case for case in self.cases if case.label is not None]

    @property
    def without_label(self) -> list[CaseInfo]:
        return [case for case in self.cases if case.label is None]

    @property
    def wrong_modality(self) -> list[CaseInfo]:
        """Images that do not look like the folder's modality (unknown counts as wrong for CT)."""
        if self.expected_modality == CT:
            return [case for case in self.cases if case.modality != CT]
        return [case for case in self.cases if case.modality == CT]

    @property
    def label_issues(self) -> list[CaseInfo]:
        return [case for case in self.cases if case.label_issue]

    @property
    def empty_labels(self) -> list[CaseInfo]:
        return [case for case in self.cases if case.label_voxels == 0 and not case.label_issue]

    def spacing_range(self) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        """(smallest, largest) spacing per axis in mm over the readable images, or None without any."""
        spacings = [case.spacing_mm for case in self.cases if len(case.spacing_mm) == 3]
        if not spacings:
            return None
        values = np.array(spacings)
        return tuple(float(v) for v in values.min(axis=0)), tuple(float(v) for v in values.max(axis=0))

    def problems(self) -> list[str]:
        """What would stop the run or spoil it; one line each, naming the folder and the files."""
        where = f"{self.role} ({self.images_folder})"
        if self.folder_problem:
            return [f"{self.role}: {self.folder_problem}"]
        found = []
        if not self.cases and not self.unreadable:
            found.append(f"{where}: no images found")
        if self.unreadable:
            found.append(f"{where}: {len(self.unreadable)} file(s) cannot be read: {_names(self.unreadable)}")
        if self.labels_required and self.without_label:
            found.append(f"{where}: {len(self.without_label)} image(s) without a label: {_names(self.without_label)}")
        wrong = self.wrong_modality
        if wrong:
            expected = "a CT in Hounsfield units" if self.expected_modality == CT else "an MR image"
            found.append(f"{where}: {len(wrong)} image(s) do not look like {expected}: {_names(wrong)}")
        if self.label_issues:
            found.append(f"{where}: {len(self.label_issues)} label(s) unusable: {_names(self.label_issues)}")
        if self.labels_required and self.labelled and len(self.empty_labels) == len(self.labelled):
            found.append(f"{where}: no label contains a tumour")
        return found

    def warnings(self) -> list[str]:
        where = f"{self.role} ({self.images_folder})"
        if self.folder_problem:
            return []
        found = []
        if self.labels_without_image:
            found.append(
                f"{where}: {len(self.labels_without_image)} label(s) without an image: "
                + _names(self.labels_without_image)
            )
        empty = self.empty_labels
        if empty and len(empty) < len(self.labelled):
            found.append(f"{where}: {len(empty)} label(s) without any tumour voxel: {_names(empty)}")
        if not self.labels_required and self.cases and self.without_label:
            found.append(
                f"{where}: {len(self.without_label)} of {len(self.cases)} image(s) have no label "
                "(the MRI teacher then learns from pseudo-MRI only)"
            )
        return found

    def summary_lines(self) -> list[str]:
        labels = f"labels: {self.labels_folder}" if self.labels_folder else "no labels folder"
        lines = [f"{self.role}: {self.images_folder} ({labels})"]
        if self.folder_problem:
            return lines + [f"  {self.folder_problem}"]
        counts: dict[str, int] = {}
        for case in self.cases:
            counts[case.modality] = counts.get(case.modality, 0) + 1
        modalities = ", ".join(f"{count} {name}" for name, count in sorted(counts.items())) or "none"
        lines.append(
            f"  {len(self.cases)} image(s), {len(self.labelled)} with a label; modality guessed from intensities: "
            f"{modalities}"
        )
        spacing = self.spacing_range()
        if spacing is not None:
            low, high = spacing
            axes = ", ".join(f"{axis} {a:.2f}-{b:.2f}" for axis, a, b in zip("xyz", low, high))
            lines.append(f"  spacing (mm): {axes}")
        for case in self.without_label:
            if self.labels_required:
                lines.append(f"  no label: {case.image.name}")
        for case in self.wrong_modality:
            lines.append(f"  looks like {case.modality}: {case.image.name} ({case.modality_reason})")
        for problem in self.unreadable:
            lines.append(f"  cannot be read: {problem.path.name}: {problem.reason}")
        for case in self.label_issues:
            lines.append(f"  label unusable: {case.name}: {case.label_issue}")
        for case in self.empty_labels:
            lines.append(f"  empty label: {case.name}")
        for path in self.labels_without_image:
            lines.append(f"  label without an image: {path.name}")
        return lines


@dataclass
class DataInventory:
    """The folders of one planned run and what they hold."""

    folders: list[FolderInventory]
    method: str = "ct_only"
    validation_fraction: float = 0.0
    notes: list[str] = field(default_factory=list)

    def folder(self, role: str) -> FolderInventory | None:
        return next((folder for folder in self.folders if folder.role == role), None)

    def problems(self) -> list[str]:
        return [problem for folder in self.folders for problem in folder.problems()]

    def warnings(self) -> list[str]:
        return [warning for folder in self.folders for warning in folder.warnings()] + list(self.notes)

    @property
    def ok(self) -> bool:
        """No problem that would stop or spoil the run."""
        return not self.problems()

    def validation_cases(self) -> int:
        """How many validation cases the run will have (the engine's split rule for a fraction)."""
        explicit = self.folder(VALIDATION_ROLE)
        if explicit is not None:
            return len(explicit.labelled)
        ct = self.folder(CT_ROLE)
        count = len(ct.cases) if ct else 0
        if self.validation_fraction <= 0 or count < 2:
            return 0
        return min(count - 1, max(1, round(self.validation_fraction * count)))

    def summary_text(self) -> str:
        """Several lines for the panel or a terminal: per folder what was found, then problems and warnings."""
        lines = []
        for folder in self.folders:
            lines.extend(folder.summary_lines())
        if self.folder(VALIDATION_ROLE) is None:
            lines.append(
                f"validation: {self.validation_cases()} CT case(s) held out "
                f"({self.validation_fraction:.0%} of the CT images)"
            )
        problems, warnings = self.problems(), self.warnings()
        if problems:
            lines.append("Problems (training cannot start):")
            lines.extend(f"  - {problem}" for problem in problems)
        if warnings:
            lines.append("Warnings:")
            lines.extend(f"  - {warning}" for warning in warnings)
        if not problems:
            lines.append("The data can be used for training.")
        return "\n".join(lines)


CT_ROLE, MR_ROLE, VALIDATION_ROLE = "CT training data", "MRI data", "CT validation data"


def scan_training_data(
    ct_images: str | Path,
    ct_labels: str | Path | None,
    mr_images: str | Path | None = None,
    mr_labels: str | Path | None = None,
    validation: str | Path | None = None,
    method: str = "ct_only",
    validation_fraction: float = 0.2,
    progress: ScanProgress | None = None,
    label_value: int = 1,
) -> DataInventory:
    """Scan the folders of a planned run (see the module docstring).

    ``validation`` is a dataset folder holding ``images/`` and ``labels/`` (as the engine's ``validation``
    value); without it the run holds out ``validation_fraction`` of the CT cases. MRI folders are scanned
    for method ``cmedl`` only. ``progress(done, total, name)`` is called after each image; it may raise
    :class:`CancelledError` (or return True) to stop. ``label_value`` is the run's tumour value (its
    ``label_value`` setting).
    """
    plans = [_plan(CT_ROLE, CT, ct_images, ct_labels, labels_required=True, label_value=label_value)]
    notes = []
    if method == "cmedl":
        if mr_images:
            plans.append(_plan(MR_ROLE, MR, mr_images, mr_labels or None, False, label_value))
        else:
            missing = FolderInventory(MR_ROLE, MR, Path(), None, labels_required=False)
            missing.folder_problem = "no MRI images folder given (method cmedl needs unpaired MRI)"
            plans.append(_Plan(missing, []))
    elif mr_images:
        notes.append("the MRI folder is not used by method ct_only")
    if validation:
        folder = Path(validation)
        plans.append(_plan(VALIDATION_ROLE, CT, folder / "images", folder / "labels", True, label_value))
    total = sum(len(plan.images) for plan in plans)
    done = 0
    for plan in plans:
        for image in plan.images:
            _scan_case(plan, image)
            done += 1
            if progress is not None and progress(done, total, image.name) is True:
                raise CancelledError("the data check was cancelled")
    return DataInventory(
        [plan.inventory for plan in plans], method=method, validation_fraction=validation_fraction, notes=notes
    )


def scan_folder(
    images: str | Path,
    labels: str | Path | None = None,
    role: str = CT_ROLE,
    expected_modality: str = CT,
    labels_required: bool = True,
    progress: ScanProgress | None = None,
) -> FolderInventory:
    """Scan one images folder and its labels folder (see the module docstring)."""
    plan = _plan(role, expected_modality, images, labels, labels_required)
    for index, image in enumerate(plan.images, start=1):
        _scan_case(plan, image)
        if progress is not None and progress(index, len(plan.images), image.name) is True:
            raise CancelledError("the data check was cancelled")
    return plan.inventory


@dataclass
class _Plan:
    inventory: FolderInventory
    images: list[Path]
    labels: dict[str, Path] = field(default_factory=dict)
    label_value: int = 1


def _plan(
    role: str,
    expected: str,
    images: str | Path,
    labels: str | Path | None,
    labels_required: bool,
    label_value: int = 1,
) -> _Plan:
    images = Path(images)
    labels_folder = Path(labels) if labels else None
    inventory = FolderInventory(role, expected, images, labels_folder, labels_required)
    if not images.is_dir():
        inventory.folder_problem = f"the images folder {images} does not exist"
        return _Plan(inventory, [])
    if labels_folder is not None and not labels_folder.is_dir():
        inventory.folder_problem = f"the labels folder {labels_folder} does not exist"
        return _Plan(inventory, [])
    if labels_folder is None and labels_required:
        inventory.folder_problem = "no labels folder given"
        return _Plan(inventory, [])
    image_paths = list_volumes(images)
    label_paths = {stem_of(path): path for path in list_volumes(labels_folder)} if labels_folder else {}
    stems = {stem_of(path) for path in image_paths}
    inventory.labels_without_image = [path for stem, path in sorted(label_paths.items()) if stem not in stems]
    return _Plan(inventory, image_paths, label_paths, label_value)


def _scan_case(plan: _Plan, image_path: Path) -> None:
    name = stem_of(image_path)
    try:
        header, sample = _read_header_and_sample(image_path)
    except CMEDLError as error:
        plan.inventory.unreadable.append(Unreadable(image_path, str(error)))
        return
    modality, reason = guess_modality(sample)
    case = CaseInfo(
        name=name,
        image=image_path,
        label=plan.labels.get(name),
        size=header.size,
        spacing_mm=header.spacing,
        modality=modality,
        modality_reason=reason,
    )
    if case.label is not None:
        case.label_issue, case.label_voxels = _check_label(case.label, header, plan.label_value)
    plan.inventory.cases.append(case)


def guess_modality(image: sitk.Image) -> tuple[str, str]:
    """``(CT | MR | unknown, reason)`` from the intensities of ``image`` (a sample of a volume will do)."""
    try:
        report = ct_likelihood_report(image)
    except CMEDLError as error:
        return UNKNOWN, str(error)
    if report["looks_like_ct"]:
        return CT, f"air or lung and a soft-tissue peak at {report['tissue_peak_hu']:g} HU"
    if report.get("offset_1024_suspected") or "p1" not in report:
        return UNKNOWN, report["reason"]
    if report["p1"] >= MR_LOWEST_P1:
        return MR, report["reason"]
    return UNKNOWN, report["reason"]


@dataclass(frozen=True)
class _Header:
    """Size, spacing, origin and direction of a 3D image (from its file header or from the image)."""

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    @classmethod
    def of(cls, image: sitk.Image) -> _Header:
        return cls(tuple(image.GetSize()), tuple(image.GetSpacing()), tuple(image.GetOrigin()), image.GetDirection())

    def same_grid(self, other: _Header) -> bool:
        """Stored the same way (size, origin, spacing, direction), within the tolerance the engine allows."""
        return self.size == other.size and all(
            np.allclose(mine, theirs, atol=GRID_TOLERANCE_MM)
            for mine, theirs in ((self.origin, other.origin), (self.spacing, other.spacing),
                                 (self.direction, other.direction))
        )  # fmt: skip

    def corners(self) -> np.ndarray:
        """The physical positions (mm) of the 8 corner voxel centres, sorted, as an (8, 3) array: equal for
        two images on one grid whatever order their axes are stored in."""
        direction = np.array(self.direction).reshape(3, 3)
        spacing, origin = np.array(self.spacing), np.array(self.origin)
        extents = [(0, n - 1) for n in self.size]
        points = [origin + direction @ (np.array(index) * spacing) for index in itertools.product(*extents)]
        return np.array(sorted(tuple(np.round(point, 3)) for point in points))


def _read_header_and_sample(path: Path) -> tuple[_Header, sitk.Image]:
    """The header of a volume file and a slab of its middle slices (a DICOM folder is read in full)."""
    if path.is_dir():
        image = read_volume(path)
        return _Header.of(image), image
    if path.stat().st_size == 0:
        raise CMEDLError("the file is empty")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise CMEDLError(f"not a readable image ({_itk_reason(error)})") from None
    size = list(reader.GetSize())
    dimension = len(size)
    if reader.GetNumberOfComponents() != 1:
        raise CMEDLError(f"{reader.GetNumberOfComponents()} components per voxel; expected grey levels")
    if dimension == 4 and size[3] == 1:
        size[3] = 0
    elif dimension not in (2, 3):
        raise CMEDLError(f"a {dimension}D image; expected a 3D volume")
    if 0 in reader.GetSize():
        raise CMEDLError(f"an empty image (size {tuple(reader.GetSize())})")
    header = _header_of_reader(reader)
    index = [0] * dimension
    if dimension >= 3:
        plane = max(size[0] * size[1], 1)
        slab = max(1, min(size[2], MAX_SAMPLED_VOXELS // plane))
        index[2] = (size[2] - slab) // 2
        size[2] = slab
    reader.SetExtractIndex(index)
    reader.SetExtractSize(size)
    try:
        sample = reader.Execute()
    except RuntimeError as error:
        raise CMEDLError(f"the voxels cannot be read ({_itk_reason(error)})") from None
    return header, sample


def _header_of_reader(reader: sitk.ImageFileReader) -> _Header:
    """The 3D header of a 2D, 3D or 4D (one time point) file: a 2D image is a volume of one slice."""
    dimension = reader.GetDimension()
    size, spacing, origin = list(reader.GetSize()), list(reader.GetSpacing()), list(reader.GetOrigin())
    direction = np.array(reader.GetDirection()).reshape(dimension, dimension)
    if dimension == 2:
        size, spacing, origin = size + [1], spacing + [1.0], origin + [0.0]
        grown = np.eye(3)
        grown[:2, :2] = direction
        direction = grown
    return _Header(tuple(size[:3]), tuple(spacing[:3]), tuple(origin[:3]), tuple(direction[:3, :3].flatten()))


def _check_label(label_path: Path, image: _Header, label_value: int = 1) -> tuple[str, int | None]:
    """``(issue, foreground voxels)``: issue is empty when the label is readable, on the image's grid and holds
    only 0 and ``label_value``."""
    try:
        label_image = read_volume(label_path)
    except CMEDLError as error:
        return str(error), None
    label = _Header.of(label_image)
    if sorted(label.size) != sorted(image.size):
        return f"size {label.size} differs from the image's {image.size}", None
    if not (label.same_grid(image) or np.allclose(label.corners(), image.corners(), atol=GRID_TOLERANCE_MM + 1e-3)):
        return "not on the image's grid (its corners lie elsewhere in space)", None
    values = sitk.GetArrayViewFromImage(label_image)
    problem = label_values_problem(values, label_value)
    if problem:
        return problem, None
    return "", int(np.count_nonzero(values))


def label_values_problem(values: np.ndarray, label_value: int = 1) -> str:
    """Why ``values`` (a label file's voxels) is not a tumour mask of 0 and ``label_value``, or ``""``.

    The engine trains one tumour class and never guesses: a label with other values (another class, 255 from
    a mask editor, -1), fractions (a resampled or probability map) or values a cast would fold onto 0 and 1
    (256, 257) is refused with the values found, and when one other value stands alone the way to take it
    as tumour (``--set label_value=N``). The message follows the file name: ``labels/a.nii.gz <message>``.
    """
    values = np.asarray(values)
    expected = f"expected 0 and {label_value}" + ("" if label_value == 1 else " (label_value)")
    if values.dtype.kind == "f":
        finite = np.isfinite(values)
        if not finite.all():
            return f"holds non-finite values ({_listed(np.unique(values[~finite]))}; {expected})"
        fractional = values != np.round(values)
        if fractional.any():
            return f"holds non-integer values such as {_listed(np.unique(values[fractional]))} ({expected})"
    elif values.dtype.kind not in "iub":
        return f"holds {values.dtype} values, not label values ({expected})"
    wrong = (values != 0) & (values != label_value)
    if not wrong.any():
        return ""
    found = np.unique(values)
    others = [value for value in found if value != 0]
    listing = f"holds values {_listed(found)}"
    if len(others) == 1 and float(others[0]) > 0:  # label_value is a positive integer
        other = _plain_number(others[0])
        return f"{listing} ({expected}; use --set label_value={other} to take {other} as tumour)"
    return f"{listing} ({expected}: one tumour value and 0 for everything else; merge or remove the other classes)"


def _plain_number(value: float | int | np.generic) -> str:
    """``2`` for 2.0 and 2, ``0.5`` for 0.5, ``nan`` for NaN: as a person would write the label value."""
    number = float(value)
    return str(int(number)) if number.is_integer() else f"{number:g}"


def _listed(values: np.ndarray) -> str:
    shown = ", ".join(_plain_number(value) for value in values[:SHOWN_VALUES])
    return shown + (f" and {len(values) - SHOWN_VALUES} more" if len(values) > SHOWN_VALUES else "")


def _itk_reason(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in reversed(lines):
        if "ERROR:" in line:
            return line.split("ERROR:", 1)[1].strip()
    return lines[-1] if lines else type(error).__name__


def _names(items: list) -> str:
    names = []
    for item in items:
        path = getattr(item, "image", None) or getattr(item, "path", None) or item
        names.append(Path(path).name)
    shown = ", ".join(names[:SHOWN_NAMES])
    return shown + (f" and {len(names) - SHOWN_NAMES} more" if len(names) > SHOWN_NAMES else "")
