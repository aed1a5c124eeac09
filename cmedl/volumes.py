"""Reading and writing CT/MR volumes and labelmaps with their full geometry.

Images live in memory as ``SimpleITK.Image``: it carries origin, spacing and direction (oblique
directions included) and reads NIfTI, NRRD, MHA and DICOM series. Arrays taken from an image are in
SimpleITK's numpy order ``(z, y, x)``.

Every write goes to a temporary name in the destination folder, is read back (header, and the voxel
bytes the header promises; compressed files are inflated to their end) and only then renamed, so a
half-written file never looks like a finished one, even where SimpleITK's NIfTI writer reports a full
disk without failing. :class:`OutputSet` extends that to the several outputs of one command: the files
replace earlier ones only once all of them are written, and a failure puts every earlier file back.
A failed write is one line naming the final path (never the temporary one) and saying why in words
(:func:`cmedl.filebase.write_failure`: a full disk with its free space, a read-only file system);
:func:`check_output_targets` refuses a target that can never be written before any work is done. Inputs
are checked the same way before they are read (:mod:`cmedl.imagefiles`), and their geometry after.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterable, Iterator
from contextvars import ContextVar, Token
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import numpy as np
import SimpleITK as sitk

from cmedl.errors import InputError, OutputError
from cmedl.filebase import PARTIAL_SUFFIX, default_file_mode, flush_to_disk, temp_file_beside, write_failure
from cmedl.imagefiles import ImageFileError, check_image_file, inflate_nifti_gz
from cmedl.niftigz import image_from_nifti_content, one_pass_fits

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
LABELMAP_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".mha")

#: Voxel spacings (mm) an input may have: outside, a header is damaged or not in millimetres.
SPACING_RANGE_MM = (0.01, 50.0)
#: Two DICOM slices closer than this (mm) along the slice normal are the same slice twice.
DUPLICATE_SLICE_MM = 0.01
#: Allowed deviation of one DICOM slice step from the series' typical step: the larger of these (mm, fraction).
SLICE_STEP_TOLERANCE = (0.01, 0.01)


@dataclass(frozen=True)
class SegmentInfo:
    """How one label value appears as a segment in Slicer (.seg.nrrd header).

    ``terminology`` is Slicer's terminology entry string
    (``context~category~type~type modifier~anatomic context~region~region modifier``).
    """

    name: str = "Lung tumour"
    label_value: int = 1
    color: tuple[float, float, float] = (0.85, 0.32, 0.26)
    terminology: str = (
        "Segmentation category and type - 3D Slicer General Anatomy list"
        "~SCT^49755003^Morphologically Altered Structure"
        "~SCT^108369006^Neoplasm"
        "~^^"
        "~Anatomic codes - DICOM master list"
        "~SCT^39607008^Lung"
        "~^^"
    )


def suffix_of(path: str | Path) -> str:
    """The volume suffix of ``path`` (``.nii.gz`` and ``.seg.nrrd`` count as one suffix)."""
    name = Path(path).name.lower()
    for suffix in (".seg.nrrd", ".nii.gz", *VOLUME_SUFFIXES):
        if name.endswith(suffix):
            return suffix
    return Path(path).suffix.lower()


def stem_of(path: str | Path) -> str:
    """The file name of ``path`` without its volume suffix (``case_001.nii.gz`` -> ``case_001``)."""
    name = Path(path).name
    suffix = suffix_of(path)
    return name[: len(name) - len(suffix)] if suffix and name.lower().endswith(suffix) else name


def list_volumes(folder: str | Path) -> list[Path]:
    """Volume files (and DICOM series sub-folders) directly inside ``folder``, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"not a folder: {folder}")
    found = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        # .seg.nrrd counts: label folders exported from Slicer hold segmentations under that suffix.
        if entry.is_file() and suffix_of(entry) in VOLUME_SUFFIXES + (".seg.nrrd",):
            found.append(entry)
        elif entry.is_dir() and _dicom_series_ids(entry):
            found.append(entry)
    return found


def read_volume(path: str | Path) -> sitk.Image:
    """Read a volume from a NIfTI/NRRD/MHA file or a folder holding one DICOM series.

    Returns a 3D ``SimpleITK.Image``; a single 2D slice is returned as a volume of one slice.
    Raises :class:`InputError` with one readable line when the path is missing or unreadable, when the
    file holds less than its header promises, when a DICOM series has missing, duplicate or unreadable
    slices, or when the geometry is impossible (spacing outside :data:`SPACING_RANGE_MM`, a singular or
    non-finite direction). ITK's own messages are held back when the read is refused.
    """
    # The whole read is one captured block: a refusal after ITK has already warned (an impossible spacing,
    # say) must still be the only line on stderr.
    with _native_stderr_captured():
        return _read_checked(Path(path))


def _read_checked(path: Path) -> sitk.Image:
    if not path.exists():
        raise InputError(f"input not found: {path}")
    if path.is_dir():
        image = _read_dicom_folder(path)
    else:
        if path.stat().st_size == 0:
            raise InputError(f"input file is empty: {path}")
        # SimpleITK fills the missing voxels of a truncated NIfTI with zeros and turns a NaN pixdim into
        # 1 mm, so the bytes are checked against the header first. A .nii.gz is inflated for that check, and
        # its voxels are then taken from that one decompression (cmedl.niftigz) where the file allows it.
        content = None
        try:
            if suffix_of(path) == ".nii.gz" and one_pass_fits(path):
                content = inflate_nifti_gz(path)
            else:
                check_image_file(path)
        except ImageFileError as problem:
            raise InputError(f"cannot read {path.name}: {problem}") from None
        except OSError as error:
            raise InputError(f"cannot read {path.name}: {error.strerror or error}") from None
        try:
            image = image_from_nifti_content(path, content) if content is not None else None
            del content
            if image is None:
                image = sitk.ReadImage(str(path))
        except RuntimeError as error:
            if "Bad direction" in str(error):  # ITK's message ends in matrix rows, useless as a last line
                raise InputError(f"{path.name}: {_BAD_DIRECTION}") from None
            raise InputError(f"cannot read {path.name}: not a readable image ({_first_line(error)})") from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{path.name} has {image.GetNumberOfComponentsPerPixel()} components per voxel; expected grey levels"
        )
    if image.GetDimension() == 2:
        image = sitk.JoinSeries(image)
    elif image.GetDimension() == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
    if image.GetDimension() != 3:
        raise InputError(f"{path.name} is {image.GetDimension()}D; expected a 3D volume")
    _check_geometry(image, path.name)
    return image


def _check_geometry(image: sitk.Image, name: str) -> None:
    """Refuse spacing, origin or direction values that no scanner writes (damaged or foreign headers)."""
    low, high = SPACING_RANGE_MM
    spacing = image.GetSpacing()
    if not all(math.isfinite(value) and low <= value <= high for value in spacing):
        shown = " x ".join(f"{value:g}" for value in spacing)
        raise InputError(f"{name}: voxel spacing {shown} mm is outside {low:g}-{high:g} mm (damaged header?)")
    if not all(math.isfinite(value) for value in image.GetOrigin()):
        raise InputError(f"{name}: the image origin is not a finite position (damaged header?)")
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(image.GetDimension(), image.GetDimension())
    if not np.all(np.isfinite(direction)) or abs(np.linalg.det(direction)) < 1e-3:
        raise InputError(f"{name}: {_BAD_DIRECTION}")


_BAD_DIRECTION = "the image direction is singular or not finite, not a valid orientation (damaged header?)"


def _dicom_series_ids(folder: Path) -> list[str]:
    # GDCM prints a multi-line warning on stderr for every folder without DICOM files; an empty answer
    # already says so, and the noise would break the one-line error contract of the command line.
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        return list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)) or [])
    except RuntimeError:
        return []
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


#: metadata key of a volume read from a folder holding several DICOM series: which one was read, what was left out
SERIES_NOTE_KEY = "cmedl_dicom_series_note"


def dicom_series_note(image: sitk.Image) -> str | None:
    """The note :func:`read_volume` leaves on a volume read from a folder of several DICOM series, else None."""
    return image.GetMetaData(SERIES_NOTE_KEY) if image.HasMetaDataKey(SERIES_NOTE_KEY) else None


def _read_dicom_folder(folder: Path) -> sitk.Image:
    series_ids = _dicom_series_ids(folder)
    if not series_ids:
        raise InputError(f"no DICOM series found in folder {folder}")
    # A folder with several series (a scout plus the axial CT, say): take the one with most slices.
    files_per_series = [sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), sid) for sid in series_ids]
    chosen = max(range(len(series_ids)), key=lambda index: len(files_per_series[index]))
    files = files_per_series[chosen]
    listed = {Path(name).name for names in files_per_series for name in names}
    _refuse_unlisted_slices(folder, series_ids[chosen], listed)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()  # the slice positions, checked below
    # ITK warns about non-uniform slices on stderr and reads on; the check below refuses them instead.
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        image = reader.Execute()
        _check_slice_positions(folder, files, reader, image)
    except RuntimeError as error:
        reason = _unreadable_slice(files) or _first_line(error)
        raise InputError(f"cannot read the DICOM series in {folder}: {reason}") from None
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)
    if len(series_ids) > 1:
        others = sorted((len(files_per_series[index]) for index in range(len(series_ids)) if index != chosen),
                        reverse=True)  # fmt: skip
        image.SetMetaData(
            SERIES_NOTE_KEY,
            f"{folder.name} holds {len(series_ids)} DICOM series: read the one with the most slices "
            f"({len(files)} slices, series {series_ids[chosen]}), left out "
            + ", ".join(f"{count} slice{'s' if count != 1 else ''}" for count in others),
        )
    return image


def _refuse_unlisted_slices(folder: Path, series_id: str, listed: set[str]) -> None:
    """Refuse a series one of whose files GDCM left out because it cannot parse it (a truncated slice).

    GDCM silently drops such a file from the series, which then reads as if the slice never existed. A
    DICOM file in the folder that is in no series but names the chosen series' UID is such a slice; so is an
    empty file named like the series' files (a copy that never finished), which names nothing at all.
    """
    needle = series_id.encode("ascii", "ignore")
    if not needle:
        return
    slice_suffixes = {Path(name).suffix.lower() for name in listed}
    for entry in sorted(folder.iterdir()):
        if entry.name in listed or entry.name.startswith(".") or entry.name.upper() == "DICOMDIR":
            continue
        try:
            if not entry.is_file():
                continue
            if entry.stat().st_size == 0 and entry.suffix.lower() in slice_suffixes:
                raise InputError(f"DICOM series in {folder}: slice file {entry.name} is empty (0 bytes)")
            with open(entry, "rb") as handle:
                head = handle.read(1 << 16)
        except OSError:
            continue
        if (head[128:132] == b"DICM" or entry.suffix.lower() == ".dcm") and needle in head:
            raise InputError(
                f"DICOM series in {folder}: slice file {entry.name} belongs to the series but cannot be read "
                "(truncated or damaged)"
            )


def _unreadable_slice(files: list[str]) -> str | None:
    """'FILE: reason' for the first file of a series that cannot be read on its own (None if all can)."""
    for name in files:
        try:
            sitk.ReadImage(name)
        except RuntimeError as error:
            return f"slice file {Path(name).name}: {_first_line(error)}"
    return None


def _check_slice_positions(folder: Path, files: list[str], reader: sitk.ImageSeriesReader, image: sitk.Image) -> None:
    """Refuse duplicate slices and missing slices or uneven steps along the slice normal, naming the slice.

    ITK reads such a series with one averaged slice spacing, which misplaces every slice after the gap.
    """
    if len(files) < 2:
        return
    normal = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)[:, 2]
    heights = []
    for index in range(len(files)):
        if not reader.HasMetaDataKey(index, "0020|0032"):
            return  # no positions (a secondary capture, say): nothing to check against
        try:
            position = [float(value) for value in reader.GetMetaData(index, "0020|0032").split("\\")]
        except ValueError:
            return
        if len(position) != 3:
            return
        heights.append(float(np.dot(position, normal)))
    names = [Path(name).name for name in files]
    steps = np.diff(heights)
    for index, step in enumerate(steps):
        if abs(step) <= DUPLICATE_SLICE_MM:
            raise InputError(
                f"DICOM series in {folder}: slices {names[index]} and {names[index + 1]} are at the same position "
                f"({heights[index]:.2f} mm): a duplicate slice"
            )
    typical = float(np.median(np.abs(steps)))
    tolerance = max(SLICE_STEP_TOLERANCE[0], SLICE_STEP_TOLERANCE[1] * typical)
    for index, step in enumerate(steps):
        if abs(abs(step) - typical) <= tolerance and np.sign(step) == np.sign(steps[0]):
            continue
        gap = abs(step)
        missing = round(gap / typical) - 1
        if missing >= 1 and abs(gap - (missing + 1) * typical) <= tolerance * (missing + 1):
            what = f"{missing} missing slice{'s' if missing > 1 else ''}"
        else:
            what = "uneven slice spacing"
        raise InputError(
            f"DICOM series in {folder}: {what} between {names[index]} and {names[index + 1]} "
            f"({gap:.4g} mm apart where the other slices are {typical:.4g} mm apart)"
        )


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    # ITK messages start with file/line noise; the last line is the useful description.
    return lines[-1] if lines else type(error).__name__


def same_geometry(a: sitk.Image, b: sitk.Image, tolerance: float = 1e-5) -> bool:
    """True when ``a`` and ``b`` share size, origin, spacing and direction."""
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tolerance)
        and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tolerance)
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=tolerance)
    )


def normalise_hu(values: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Clip HU values to ``window`` (low, high) and scale them linearly to [-1, 1] as float32."""
    low, high = window
    clipped = np.clip(values.astype(np.float32), low, high)
    return (clipped - low) * (2.0 / (high - low)) - 1.0


def normalise_mr(values: np.ndarray, percentile: float = 99.5) -> np.ndarray:
    """Scale MR intensities (arbitrary units) to [-1, 1]: 0 maps to -1, the volume's ``percentile`` to 1.

    A percentile rather than the maximum keeps a few bright voxels (vessels, artefacts) from compressing
    the tissue contrast.
    """
    values = values.astype(np.float32)
    high = float(np.percentile(values, percentile))
    if high <= 0:
        return np.full(values.shape, -1.0, dtype=np.float32)
    return np.clip(values / high, 0.0, 1.0) * 2.0 - 1.0


def image_like(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """A new image holding ``array`` (numpy order z, y, x) on ``reference``'s grid."""
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    return image


def _output_folder(path: Path) -> Path:
    folder = path.parent if str(path.parent) else Path(".")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"cannot create output folder {folder}: {error.strerror}") from None
    return folder


def check_output_targets(paths: Iterable[str | Path | None]) -> None:
    """Refuse, before any work, an output path that can never be written: a folder, or one under a file.

    Such a target otherwise fails only at the final rename, after the whole computation, and the other outputs
    of the command with it. Missing folders are fine (they are created); ``None`` entries (outputs not asked
    for) are skipped. Raises :class:`OutputError` naming the path.
    """
    for given in paths:
        if given is None:
            continue
        path = Path(given)
        if path.is_dir():
            raise write_failure(path, IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR)))
        folder = path.parent if str(path.parent) else Path(".")
        for above in (folder, *folder.parents):
            if os.path.lexists(above):
                if not above.is_dir():
                    raise OutputError(f"cannot write {path}: {above} is a file, not a folder")
                break


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it to ``path``, on failure remove it.

    The temporary name keeps the real suffix so that writers choose the right format. The file is flushed to
    disk before the rename (a crash never leaves ``path`` on a torn file). Inside an :class:`OutputSet` the
    rename waits for the end of the set. A target that is a folder is refused before anything is written.
    """
    path = Path(path)
    check_output_targets([path])
    _output_folder(path)
    temp = temp_file_beside(path, suffix_of(path) or path.suffix)
    handed_over = False
    try:
        yield temp
        flush_to_disk(temp)
        os.chmod(temp, default_file_mode())
        outputs = _ACTIVE_OUTPUTS.get()
        if outputs is None:
            os.replace(temp, path)
        else:
            outputs._stage([(temp, path)])
            handed_over = True
    except OSError as error:
        raise write_failure(path, error, temp) from None
    except RuntimeError as error:  # SimpleITK reports most failed writes (full disk) as RuntimeError
        raise write_failure(path, _first_line(error), temp) from None
    except Exception as error:
        # safetensors reports a full disk as its own error type (model files are written through here).
        if type(error).__name__ == "SafetensorError":
            raise write_failure(path, _first_line(error), temp) from None
        raise
    finally:
        if not handed_over:
            temp.unlink(missing_ok=True)


_ACTIVE_OUTPUTS: ContextVar[OutputSet | None] = ContextVar("cmedl_active_outputs", default=None)


class OutputSet:
    """The outputs of one command: they appear under their final names together, or not at all.

    Inside ``with OutputSet():`` every :func:`write_volume`, :func:`write_labelmap` and
    :func:`atomic_output` writes and verifies its file under a temporary name as usual, but the renames
    wait for the end of the block. When the block completes, all files are renamed; when anything in it
    fails (a write, a verification, any exception), every temporary file is removed and no final name is
    touched, so a command never leaves its first output behind after its second failed. A set entered
    inside another hands its files to the outer one. The same final path twice is refused.

    The renames themselves can still fail (a folder put in a target's place meanwhile, the folder removed):
    each file a rename replaces is kept under a hidden backup name until every rename has succeeded, and on
    a failure the files already renamed are taken back and the earlier ones put back, so what existed
    before the command is what exists after it.
    """

    def __init__(self) -> None:
        self._staged: list[tuple[list[tuple[Path, Path]], Path | None]] = []
        self._targets: set[str] = set()
        self._outer: OutputSet | None = None
        self._token: Token[OutputSet | None] | None = None

    @property
    def paths(self) -> list[Path]:
        """The final paths written so far (renamed only when the set completes)."""
        return [moves[-1][1] for moves, _ in self._staged]

    def __enter__(self) -> OutputSet:
        if self._token is not None:
            raise RuntimeError("an OutputSet is entered only once")
        self._outer = _ACTIVE_OUTPUTS.get()
        self._token = _ACTIVE_OUTPUTS.set(self)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self._token is not None:
            _ACTIVE_OUTPUTS.reset(self._token)
            self._token = None
        if kind is not None:
            self._discard()
        elif self._outer is not None:
            for moves, cleanup in self._staged:
                self._outer._stage(moves, cleanup)
            self._staged = []
        else:
            self._commit()

    def _stage(self, moves: list[tuple[Path, Path]], cleanup: Path | None = None) -> None:
        """Take over written temporary files: ``moves`` are (temporary, final) pairs, the main file last."""
        target = os.path.abspath(moves[-1][1])
        if target in self._targets:
            raise OutputError(f"{moves[-1][1]} is given twice as an output of one command")
        self._targets.add(target)
        self._staged.append((moves, cleanup))

    def _commit(self) -> None:
        """Rename every staged file into place, all or none; the error names the path whose rename failed."""
        moves = [move for moves, _ in self._staged for move in moves]
        done: list[tuple[Path, Path | None]] = []  # (final, backup of the file it replaced)
        current = moves[0][1] if moves else Path(".")
        try:
            for _, final in moves:  # the one failure the writes cannot have seen: a folder made since
                if final.is_dir():
                    current = final
                    raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
            for temp, final in moves:
                current = final
                done.append((final, _replace_keeping_backup(temp, final)))
        except BaseException as error:
            note = _put_back(done)
            self._discard()
            if isinstance(error, OSError):
                raise OutputError(f"{write_failure(current, error)}{note}") from None
            raise  # an interrupt in the middle of the renames: everything is put back, the interrupt goes on
        for _, backup in done:
            if backup is not None:
                with contextlib.suppress(OSError):
                    backup.unlink()
        self._discard()

    def _discard(self) -> None:
        for moves, cleanup in self._staged:
            for temp, _ in moves:
                temp.unlink(missing_ok=True)
            if cleanup is not None:
                shutil.rmtree(cleanup, ignore_errors=True)
        self._staged = []


def _replace_keeping_backup(temp: Path, final: Path) -> Path | None:
    """``os.replace(temp, final)``, keeping a file already at ``final`` under a hidden name, which is returned.

    A hard link keeps the earlier file without copying it and without a moment in which ``final`` is missing;
    on a file system without hard links the earlier file is moved aside instead, and moved back when the
    rename fails. Returns None when nothing was at ``final``.
    """
    if not os.path.lexists(final):
        os.replace(temp, final)
        return None
    backup = _unused_name_beside(final, ".backup")
    try:
        os.link(final, backup, follow_symlinks=False)
        linked = True
    except (OSError, NotImplementedError):
        os.replace(final, backup)
        linked = False
    try:
        os.replace(temp, final)
    except BaseException:
        if linked:
            backup.unlink(missing_ok=True)
        else:
            os.replace(backup, final)
        raise
    return backup


def _unused_name_beside(path: Path, suffix: str) -> Path:
    """A hidden name in ``path``'s folder that nothing has (``.NAME.XXXX<suffix>``), for a link or a rename."""
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(handle)
    os.unlink(name)  # os.link refuses an existing name; the random part keeps the name unused meanwhile
    return Path(name)


def _put_back(done: list[tuple[Path, Path | None]]) -> str:
    """Undo renames already done: remove new files, put back the files they replaced (from the last one).

    Returns an addition to the error message, empty unless an earlier file could not be put back: it then
    says where that file is kept, since it is the user's data.
    """
    kept = []
    for final, backup in reversed(done):
        try:
            if backup is None:
                final.unlink(missing_ok=True)
            else:
                os.replace(backup, final)
        except OSError:
            if backup is not None:
                kept.append(f"the earlier {final.name} could not be put back and is kept as {backup}")
    return "; " + "; ".join(kept) if kept else ""


# Formats whose header names a second file holding the voxels.
_DETACHED_SUFFIXES = (".mhd", ".nhdr")


def _write_detached(image: sitk.Image, path: Path, compress: bool) -> None:
    """Write a header + voxel-file pair atomically.

    The header records the voxel file's name, so both are written under their final names in a hidden
    temporary folder next to ``path``; the voxel file is moved out first and the header last, so a header
    that exists always names a complete voxel file.
    """
    check_output_targets([path])
    folder = _output_folder(path)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=PARTIAL_SUFFIX, dir=folder))
    except OSError as error:
        raise write_failure(path, error) from None
    handed_over = False
    try:
        staged_header = staging / path.name
        _write_verified(image, staged_header, path, compress)
        moves = [(entry, folder / entry.name) for entry in sorted(staging.iterdir()) if entry != staged_header]
        moves.append((staged_header, path))
        outputs = _ACTIVE_OUTPUTS.get()
        if outputs is None:
            for temp, final in moves:
                os.replace(temp, final)
        else:
            outputs._stage(moves, cleanup=staging)
            handed_over = True
    except OSError as error:
        raise write_failure(path, error, staging) from None
    except RuntimeError as error:
        raise write_failure(path, _first_line(error), staging) from None
    finally:
        if not handed_over:
            shutil.rmtree(staging, ignore_errors=True)


def _write_image_file(image: sitk.Image, path: Path, compress: bool) -> None:
    """The one call that puts an image into a file; what it leaves is checked by :func:`verify_written`."""
    sitk.WriteImage(image, str(path), compress)


def _write_verified(image: sitk.Image, temp: Path, shown: Path, compress: bool) -> None:
    """Write ``image`` to ``temp`` and check it there; ITK's own messages about a failure are held back."""
    with _native_stderr_captured():
        _write_image_file(image, temp, compress)
        verify_written(image, temp, shown)


def verify_written(image: sitk.Image, written: str | Path, shown: str | Path | None = None) -> None:
    """Raise :class:`OutputError` unless the file ``written`` holds all of ``image``.

    SimpleITK's NIfTI writer prints an error on a full disk but does not fail, leaving a truncated file
    that reads back as a complete image. So the header is read back (size, components and spacing must
    match) and the file must hold every voxel byte its header promises; compressed data are inflated to
    the end of their stream, which also checks their CRC. ``shown`` is the name the message uses (the
    final name, not the temporary one); a failure on a nearly full disk is reported as a full disk
    (:func:`cmedl.filebase.write_failure`), since that is what left the file unreadable.
    """
    written = Path(written)
    shown = Path(shown) if shown is not None else written
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(written))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        reason = f"the written file cannot be read back ({_first_line(error)})"
        raise write_failure(shown, reason, written) from None
    same = (
        tuple(reader.GetSize()) == tuple(image.GetSize())
        and reader.GetNumberOfComponents() == image.GetNumberOfComponentsPerPixel()
        and np.allclose(reader.GetSpacing(), image.GetSpacing(), rtol=1e-5, atol=1e-6)
    )
    if not same:
        reason = (
            f"the written file reads back as size {reader.GetSize()}, spacing "
            f"{tuple(round(v, 6) for v in reader.GetSpacing())} instead of {image.GetSize()}, "
            f"{tuple(round(v, 6) for v in image.GetSpacing())}"
        )
        raise write_failure(shown, reason, written)
    try:
        check_image_file(written, inflate=True)
    except (ImageFileError, OSError) as problem:
        reason = problem.strerror if isinstance(problem, OSError) else problem
        raise write_failure(shown, f"the written file is incomplete: {reason}", written) from None


_CAPTURE_LOCK = threading.Lock()


@contextlib.contextmanager
def _native_stderr_captured() -> Iterator[None]:
    """Hold back what native code (ITK, the NIfTI library, MetaIO) prints on stderr while the block runs.

    When the block succeeds the text is passed on to ``sys.stderr``; when it raises, the text is dropped:
    the exception becomes the command's one-line error, and ITK's multi-line messages beside it would
    break that contract. Only one block captures at a time; a concurrent one runs uncaptured.
    """
    saved = None
    sink = None
    if _CAPTURE_LOCK.acquire(blocking=False):
        try:
            sys.stderr.flush()
            sink = tempfile.TemporaryFile()
            saved = os.dup(2)
            os.dup2(sink.fileno(), 2)
        except (OSError, ValueError, AttributeError):  # no usable fd 2 (an embedding without a console)
            if saved is not None:
                os.close(saved)
                saved = None
            if sink is not None:
                sink.close()
            _CAPTURE_LOCK.release()
    succeeded = False
    try:
        yield
        succeeded = True
    finally:
        if saved is not None and sink is not None:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text = sink.read().decode("utf-8", "replace")
            sink.close()
            _CAPTURE_LOCK.release()
            if text and succeeded:
                sys.stderr.write(text)


def write_volume(image: sitk.Image, path: str | Path, compress: bool = True) -> Path:
    """Write ``image`` to ``path`` (format from the suffix) atomically; returns ``path``."""
    path = Path(path)
    writable = VOLUME_SUFFIXES + (".seg.nrrd",)
    if suffix_of(path) not in writable:
        raise OutputError(f"unsupported output format {path.name!r}; use one of {', '.join(writable)}")
    if suffix_of(path) in _DETACHED_SUFFIXES:
        _write_detached(image, path, compress)
        return path
    with atomic_output(path) as temp:
        _write_verified(image, temp, path, compress)
    return path


def write_labelmap(
    label: sitk.Image,
    path: str | Path,
    segments: list[SegmentInfo] | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write a labelmap as .nii.gz/.nii/.nrrd/.mha, or as Slicer's .seg.nrrd with named segments.

    ``label`` is cast to uint8. For .seg.nrrd, each :class:`SegmentInfo` becomes a segment with its
    name, colour and DICOM terminology in the header, so Slicer opens it as a named, coloured segment.
    ``metadata`` adds key/value fields to the header (provenance, say); NRRD and MetaImage keep them,
    NIfTI has no place for them and drops them. Keys must not hold ``:=`` and values are single lines.
    """
    path = Path(path)
    suffix = suffix_of(path)
    if suffix not in LABELMAP_SUFFIXES:
        raise OutputError(f"unsupported output format {path.name!r}; use one of {', '.join(LABELMAP_SUFFIXES)}")
    label = sitk.Cast(label, sitk.sitkUInt8)
    if suffix == ".seg.nrrd":
        label = _with_segmentation_header(label, segments or [SegmentInfo()])
    # Set on the final image: SimpleITK's NRRD writer drops fields set on an image before it was copied.
    for key, value in (metadata or {}).items():
        if ":=" in key or "\n" in str(value):
            raise OutputError(f"header field {key!r} cannot be written into {path.name}")
        label.SetMetaData(str(key), str(value))
    return write_volume(label, path)


def _with_segmentation_header(label: sitk.Image, segments: list[SegmentInfo]) -> sitk.Image:
    label = sitk.Image(label)  # the caller's image keeps its metadata
    size = label.GetSize()
    extent = f"0 {size[0] - 1} 0 {size[1] - 1} 0 {size[2] - 1}"
    for index, segment in enumerate(segments):
        key = f"Segment{index}_"
        label.SetMetaData(key + "ID", f"Segment_{segment.label_value}")
        label.SetMetaData(key + "Name", segment.name)
        label.SetMetaData(key + "NameAutoGenerated", "0")
        label.SetMetaData(key + "Color", " ".join(f"{c:.6g}" for c in segment.color))
        label.SetMetaData(key + "ColorAutoGenerated", "0")
        label.SetMetaData(key + "LabelValue", str(segment.label_value))
        label.SetMetaData(key + "Layer", "0")
        label.SetMetaData(key + "Extent", extent)
        label.SetMetaData(key + "Tags", f"TerminologyEntry:{segment.terminology}|")
    label.SetMetaData("Segmentation_MasterRepresentation", "Binary labelmap")
    label.SetMetaData("Segmentation_ContainedRepresentationNames", "Binary labelmap|")
    label.SetMetaData("Segmentation_ReferenceImageExtentOffset", "0 0 0")
    return label


def read_segments(path: str | Path) -> list[SegmentInfo]:
    """The segments described in a .seg.nrrd header (empty for a plain labelmap)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"input not found: {path}")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise InputError(f"cannot read {path.name}: not a readable image ({_first_line(error)})") from None
    keys = set(reader.GetMetaDataKeys())
    segments = []
    index = 0
    while f"Segment{index}_Name" in keys:
        key = f"Segment{index}_"
        color = (
            tuple(float(c) for c in reader.GetMetaData(key + "Color").split())
            if key + "Color" in keys
            else (1.0, 1.0, 0.0)
        )
        tags = reader.GetMetaData(key + "Tags") if key + "Tags" in keys else ""
        terminology = ""
        for tag in tags.split("|"):
            if tag.startswith("TerminologyEntry:"):
                terminology = tag[len("TerminologyEntry:") :]
        segments.append(
            SegmentInfo(
                name=reader.GetMetaData(key + "Name"),
                label_value=int(reader.GetMetaData(key + "LabelValue")) if key + "LabelValue" in keys else index + 1,
                color=color,  # type: ignore[arg-type]
                terminology=terminology,
            )
        )
        index += 1
    return segments
