"""Reading and writing CT/MR volumes and labelmaps with their full geometry.

Images live in memory as ``SimpleITK.Image``: it carries origin, spacing and direction (oblique
directions included) and reads NIfTI, NRRD, MHA and DICOM series. Arrays taken from an image are in
SimpleITK's numpy order ``(z, y, x)``.

Every write goes to a temporary name in the destination folder and is renamed at the end, so a
half-written file never looks like a finished one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from cmedl.errors import InputError, OutputError

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
LABELMAP_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".mha")


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
    Raises :class:`InputError` with one readable line when the path is missing or unreadable.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"input not found: {path}")
    if path.is_dir():
        image = _read_dicom_folder(path)
    else:
        if path.stat().st_size == 0:
            raise InputError(f"input file is empty: {path}")
        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError as error:
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
    return image


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


def _read_dicom_folder(folder: Path) -> sitk.Image:
    series_ids = _dicom_series_ids(folder)
    if not series_ids:
        raise InputError(f"no DICOM series found in folder {folder}")
    # A folder with several series (a scout plus the axial CT, say): take the one with most slices.
    files_per_series = [sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), sid) for sid in series_ids]
    files = max(files_per_series, key=len)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        return reader.Execute()
    except RuntimeError as error:
        raise InputError(f"cannot read the DICOM series in {folder}: {_first_line(error)}") from None


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


def _default_file_mode() -> int:
    # Temporary files are created private (0600); the finished file gets the mode a plain open() would give.
    # os.umask can only be read by setting it, so it is restored at once.
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it to ``path``, on failure remove it.

    The temporary name keeps the real suffix so that writers choose the right format.
    """
    path = Path(path)
    folder = _output_folder(path)
    suffix = suffix_of(path) or path.suffix
    try:
        handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".partial{suffix}", dir=folder)
    except OSError as error:
        raise OutputError(f"cannot write {path}: {error.strerror or error}") from None
    os.close(handle)
    temp = Path(temp_name)
    try:
        yield temp
        os.chmod(temp, _default_file_mode())
        os.replace(temp, path)
    except OSError as error:
        raise OutputError(f"cannot write {path}: {error.strerror or error}") from None
    except RuntimeError as error:  # SimpleITK reports failed writes (full disk) as RuntimeError
        raise OutputError(f"cannot write {path}: {_first_line(error)}") from None
    finally:
        temp.unlink(missing_ok=True)


# Formats whose header names a second file holding the voxels.
_DETACHED_SUFFIXES = (".mhd", ".nhdr")


def _write_detached(image: sitk.Image, path: Path, compress: bool) -> None:
    """Write a header + voxel-file pair atomically.

    The header records the voxel file's name, so both are written under their final names in a hidden
    temporary folder next to ``path``; the voxel file is moved out first and the header last, so a header
    that exists always names a complete voxel file.
    """
    folder = _output_folder(path)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=folder))
    except OSError as error:
        raise OutputError(f"cannot write {path}: {error.strerror or error}") from None
    try:
        staged_header = staging / path.name
        sitk.WriteImage(image, str(staged_header), compress)
        for entry in staging.iterdir():
            if entry != staged_header:
                os.replace(entry, folder / entry.name)
        os.replace(staged_header, path)
    except OSError as error:
        raise OutputError(f"cannot write {path}: {error.strerror or error}") from None
    except RuntimeError as error:
        raise OutputError(f"cannot write {path}: {_first_line(error)}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


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
        sitk.WriteImage(image, str(temp), compress)
    return path


def write_labelmap(label: sitk.Image, path: str | Path, segments: list[SegmentInfo] | None = None) -> Path:
    """Write a labelmap as .nii.gz/.nii/.nrrd/.mha, or as Slicer's .seg.nrrd with named segments.

    ``label`` is cast to uint8. For .seg.nrrd, each :class:`SegmentInfo` becomes a segment with its
    name, colour and DICOM terminology in the header, so Slicer opens it as a named, coloured segment.
    """
    path = Path(path)
    suffix = suffix_of(path)
    if suffix not in LABELMAP_SUFFIXES:
        raise OutputError(f"unsupported output format {path.name!r}; use one of {', '.join(LABELMAP_SUFFIXES)}")
    label = sitk.Cast(label, sitk.sitkUInt8)
    if suffix == ".seg.nrrd":
        label = _with_segmentation_header(label, segments or [SegmentInfo()])
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
