"""Whether an image file holds what its header promises, checked from the file's bytes.

SimpleITK trusts a file's length more than it should: its NIfTI reader fills the voxels missing from a
truncated ``.nii`` or ``.nii.gz`` with zeros, its NIfTI writer reports a full disk on stderr without
failing, and a NaN or zero ``pixdim`` silently becomes 1 mm. The functions here read the header of a
NIfTI (1 and 2), NRRD (attached or detached data) or MetaImage (``.mha``/``.mhd``) file themselves,
work out how many bytes of voxel data it promises and compare that with what the file holds; compressed
data can be inflated to the end, which also catches a damaged or cut-off gzip/zlib stream.

The caller decides what a problem means: :mod:`cmedl.volumes` refuses such an input (exit 3) and treats
such an output as a failed write (exit 6). Only the standard library is used.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

#: The largest header read while looking for the end of a NRRD or MetaImage header.
MAX_TEXT_HEADER_BYTES = 1 << 20

# Bytes per voxel component of the NRRD and MetaImage element types (unknown types are not checked).
_NRRD_TYPE_BYTES = {
    **dict.fromkeys(("signed char", "int8", "int8_t", "uchar", "unsigned char", "uint8", "uint8_t"), 1),
    **dict.fromkeys(
        ("short", "short int", "signed short", "signed short int", "int16", "int16_t", "ushort",
         "unsigned short", "unsigned short int", "uint16", "uint16_t"),
        2,
    ),
    **dict.fromkeys(("int", "signed int", "int32", "int32_t", "uint", "unsigned int", "uint32", "uint32_t"), 4),
    **dict.fromkeys(
        ("longlong", "long long", "long long int", "signed long long", "signed long long int", "int64",
         "int64_t", "ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t"),
        8,
    ),
    "float": 4,
    "double": 8,
}  # fmt: skip
# MetaIO's own sizes: MET_LONG is 4 bytes there; an under-estimate can only make the check more lenient.
_META_TYPE_BYTES = {
    "MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
    "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8,
}  # fmt: skip


class ImageFileError(Exception):
    """The file does not hold what its header promises; ``str()`` is one line without the file name."""


@dataclass(frozen=True)
class NiftiHeader:
    """What this module reads of a NIfTI-1 or NIfTI-2 header.

    Attributes:
        byte_order: ``<`` or ``>`` (``struct`` notation).
        datatype: the NIfTI datatype code (4 = int16, 16 = float32, ...).
        dims: ``dim[0..7]``: the rank, then the extent of each axis.
        voxel_offset: bytes before the voxels (``vox_offset``).
        scaling: ``(scl_slope, scl_inter)``.
        voxel_bytes: the bytes of voxel data the header promises; None when ``bitpix`` does not allow a count.
        problem: a field SimpleITK would silently replace (a NaN spacing, say), or a damaged ``dim``; None if none.
    """

    byte_order: str
    datatype: int
    dims: tuple[int, ...]
    voxel_offset: int
    scaling: tuple[float, float]
    voxel_bytes: int | None
    problem: str | None


# Where the fields read here lie in each header version: (size, magic offset, magic, {field: (offset, format)}).
_NIFTI_LAYOUTS = (
    (348, 344, b"n+1", {
        "dims": (40, "8h"), "datatype": (70, "h"), "bitpix": (72, "h"), "pixdim": (76, "8f"), "offset": (108, "f"),
        "scaling": (112, "2f"), "codes": (252, "2h"), "quatern": (256, "6f"), "srow": (280, "12f"),
    }),
    (540, 4, b"n+2", {
        "datatype": (12, "h"), "bitpix": (14, "h"), "dims": (16, "8q"), "pixdim": (104, "8d"), "offset": (168, "q"),
        "scaling": (176, "2d"), "codes": (344, "2i"), "quatern": (352, "6d"), "srow": (400, "12d"),
    }),
)  # fmt: skip


def check_image_file(path: str | Path, inflate: bool = False) -> None:
    """Raise :class:`ImageFileError` when ``path`` holds less voxel data than its header promises.

    NIfTI: the (decompressed) length against ``vox_offset + prod(dim) * bitpix / 8``, plus finite,
    positive spatial ``pixdim`` and finite qform/sform values. NRRD and MetaImage with raw data: the data
    file's length against the header's sizes and element type. ``.nii.gz`` is always inflated to its end
    (SimpleITK reads a cut-off one without complaint); other compressed data only when ``inflate`` is
    true (their readers notice a short stream, but their writers are verified with it). Other formats,
    and headers this module does not understand, pass: SimpleITK remains the judge of those.
    """
    path = Path(path)
    name = path.name.lower()
    if name.endswith(".nii.gz"):
        _check_nifti_gz(path)
    elif name.endswith(".nii"):
        _check_nifti(path)
    elif name.endswith((".nrrd", ".nhdr")):
        _check_nrrd(path, inflate)
    elif name.endswith((".mha", ".mhd")):
        _check_meta(path, inflate)


# -- NIfTI --------------------------------------------------------------------------------------------


def _check_nifti(path: Path) -> None:
    size = path.stat().st_size
    with open(path, "rb") as handle:
        header = read_nifti_header(handle.read(540))
    if header is None:
        return
    if header.problem:
        raise ImageFileError(header.problem)
    if header.voxel_bytes is not None and size < header.voxel_offset + header.voxel_bytes:
        raise ImageFileError(
            f"the file is truncated: {size} bytes where its NIfTI header promises "
            f"{header.voxel_offset + header.voxel_bytes}"
        )


def _check_nifti_gz(path: Path) -> None:
    _inflated_nifti_gz(path, keep_all=False)


def inflate_nifti_gz(path: str | Path) -> bytearray | None:
    """The whole decompressed content of a ``.nii.gz`` (header, extensions and voxels), checked as
    :func:`check_image_file` checks it: :class:`ImageFileError` when the stream is damaged or cut off, when it
    holds fewer bytes than the header promises, or when the header's geometry is unusable. None when the
    content is not a NIfTI-1 or NIfTI-2 file (nothing is checked then). The caller gets the voxels from the same
    single decompression that checks them.
    """
    return _inflated_nifti_gz(Path(path), keep_all=True)


def _inflated_nifti_gz(path: Path, keep_all: bool) -> bytearray | None:
    content, total = _inflated(path, 0, wbits=31, keep=-1 if keep_all else 540)
    header = read_nifti_header(content)
    if header is None:
        return None
    if header.problem:
        raise ImageFileError(header.problem)
    if header.voxel_bytes is not None and total < header.voxel_offset + header.voxel_bytes:
        raise ImageFileError(
            f"the file is truncated: it decompresses to {total} bytes where its NIfTI header promises "
            f"{header.voxel_offset + header.voxel_bytes}"
        )
    return content


def read_nifti_header(raw: bytes | bytearray) -> NiftiHeader | None:
    """The header at the start of ``raw`` (a NIfTI file's first 540 bytes or more, decompressed), in either byte
    order; None when ``raw`` does not start with a NIfTI-1 or NIfTI-2 header."""
    for order in ("<", ">"):
        for size, magic_at, magic, fields in _NIFTI_LAYOUTS:
            if len(raw) < size or struct.unpack_from(order + "i", raw, 0)[0] != size:
                continue
            if bytes(raw[magic_at : magic_at + 3]) != magic:
                continue
            values = {name: struct.unpack_from(order + code, raw, at) for name, (at, code) in fields.items()}
            return _nifti_facts(order, values)
    return None


def _nifti_facts(order: str, values: dict[str, tuple]) -> NiftiHeader:
    dims, (bitpix,), pixdim, (offset,) = values["dims"], values["bitpix"], values["pixdim"], values["offset"]
    (qform, sform), quatern, srow = values["codes"], values["quatern"], values["srow"]
    scaling = (float(values["scaling"][0]), float(values["scaling"][1]))

    def header(voxel_offset: int, voxel_bytes: int | None, problem: str | None) -> NiftiHeader:
        return NiftiHeader(order, values["datatype"][0], tuple(dims), voxel_offset, scaling, voxel_bytes, problem)

    rank = dims[0]
    if not 1 <= rank <= 7 or any(extent < 1 for extent in dims[1 : rank + 1]) or not math.isfinite(offset):
        return header(0, None, f"damaged NIfTI header (dim = {list(dims[: rank + 1] if rank > 0 else dims)})")
    count = math.prod(dims[1 : rank + 1])
    voxel_bytes = count * bitpix // 8 if bitpix > 0 and bitpix % 8 == 0 else None
    problem = None
    spatial = range(1, min(rank, 3) + 1)
    # NIfTI readers replace a non-finite or non-positive pixdim by 1 mm without a word; when the qform (or
    # no transform at all) is in use, that made-up spacing would become the CT's geometry.
    pixdim_used = qform > 0 or sform <= 0
    for axis in spatial:
        value = pixdim[axis]
        if not math.isfinite(value) or (pixdim_used and value <= 0):
            problem = f"pixdim[{axis}] is {value!r} in the NIfTI header: the voxel spacing is unknown"
            break
    if problem is None and qform > 0 and not all(math.isfinite(v) for v in quatern):
        problem = "the NIfTI qform holds non-finite values: the image orientation is unknown"
    if problem is None and sform > 0 and not all(math.isfinite(v) for v in srow):
        problem = "the NIfTI sform holds non-finite values: the image orientation is unknown"
    return header(int(offset), voxel_bytes, problem)


# -- NRRD ---------------------------------------------------------------------------------------------


def _check_nrrd(path: Path, inflate: bool) -> None:
    text, header_end = _text_header(path, b"NRRD", _nrrd_header_end)
    if text is None:
        return
    fields: dict[str, str] = {}
    for line in text.splitlines()[1:]:
        if not line or line.startswith("#") or ":=" in line or ": " not in line:
            continue
        key, value = line.split(": ", 1)
        fields[key.strip().lower().replace(" ", "")] = value.strip()
    element = _NRRD_TYPE_BYTES.get(fields.get("type", "").lower())
    try:
        sizes = [int(v) for v in fields.get("sizes", "").split()]
        byte_skip = int(fields.get("byteskip", "0"))
        line_skip = int(fields.get("lineskip", "0"))
    except ValueError:
        return
    encoding = fields.get("encoding", "").lower()
    if element is None or not sizes or line_skip != 0:
        return
    expected = math.prod(sizes) * element
    data_file, offset = _data_file(path, fields.get("datafile", ""), header_end)
    if data_file is None:
        return
    if encoding == "raw":
        _require_length(data_file, offset + max(byte_skip, 0) + expected, path)
    elif encoding in ("gzip", "gz") and inflate and byte_skip >= 0:
        _, total = _inflated(data_file, offset, wbits=31)
        if total < byte_skip + expected:
            raise ImageFileError(
                f"the file is truncated: its data decompress to {total} bytes where the header promises "
                f"{byte_skip + expected}"
            )


def _nrrd_header_end(raw: bytes) -> int | None:
    for blank in (b"\n\n", b"\r\n\r\n"):
        index = raw.find(blank)
        if index >= 0:
            return index + len(blank)
    return None


# -- MetaImage ----------------------------------------------------------------------------------------


def _check_meta(path: Path, inflate: bool) -> None:
    text, header_end = _text_header(path, b"", _meta_header_end)
    if text is None:
        return
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if "=" in line:
            key, value = line.split("=", 1)
            fields[key.strip().lower()] = value.strip()
    element = _META_TYPE_BYTES.get(fields.get("elementtype", "").upper())
    try:
        sizes = [int(v) for v in fields.get("dimsize", "").split()]
        channels = int(fields.get("elementnumberofchannels", "1"))
        header_size = int(fields.get("headersize", "0"))
        compressed_size = int(fields["compresseddatasize"]) if "compresseddatasize" in fields else None
    except ValueError:
        return
    if element is None or not sizes or fields.get("binarydata", "true").lower() == "false":
        return
    data_file, offset = _data_file(path, fields.get("elementdatafile", ""), header_end, local="LOCAL")
    if data_file is None:
        return
    expected = math.prod(sizes) * channels * element
    if fields.get("compresseddata", "false").lower() != "true":
        _require_length(data_file, offset + max(header_size, 0) + expected, path)
        return
    start = offset + max(header_size, 0)
    if compressed_size is not None:
        _require_length(data_file, start + compressed_size, path)
    if inflate:
        _, total = _inflated(data_file, start, wbits=15)
        if total < expected:
            raise ImageFileError(
                f"the file is truncated: its data decompress to {total} bytes where the header promises {expected}"
            )


def _meta_header_end(raw: bytes) -> int | None:
    index = raw.lower().find(b"elementdatafile")
    if index < 0:
        return None
    newline = raw.find(b"\n", index)
    return None if newline < 0 else newline + 1


# -- shared -------------------------------------------------------------------------------------------


def _text_header(path: Path, magic: bytes, find_end: Callable[[bytes], int | None]) -> tuple[str | None, int]:
    """The text header of ``path`` and the offset where its data start; (None, 0) when not found.

    A file that ends inside its header (a detached header is nothing else) is all header.
    """
    raw = bytearray()
    with open(path, "rb") as handle:
        while len(raw) < MAX_TEXT_HEADER_BYTES:
            block = handle.read(1 << 16)
            raw += block
            if not raw.startswith(magic):
                break
            end = find_end(bytes(raw)) if block else len(raw)
            if end is not None:
                return bytes(raw[:end]).decode("latin-1"), end
    return None, 0


def _data_file(header: Path, value: str, header_end: int, local: str = "") -> tuple[Path | None, int]:
    """The file holding the voxels and the offset where they start there; (None, 0) when not checkable."""
    if not value or (local and value.upper() == local):
        return header, header_end
    # A list of files or a numbered pattern: several files, not checked here.
    if value.split()[0].upper() == "LIST" or "%" in value or len(value.split()) > 1:
        return None, 0
    data = Path(value)
    return (data if data.is_absolute() else header.parent / data), 0


def _require_length(data_file: Path, needed: int, header: Path) -> None:
    try:
        have = data_file.stat().st_size
    except OSError:
        raise ImageFileError(f"its voxel file {data_file.name} is missing") from None
    if have < needed:
        where = "" if data_file == header else f" (voxel file {data_file.name})"
        raise ImageFileError(f"the file is truncated{where}: {have} bytes where its header promises {needed}")


def _inflated(path: Path, offset: int, wbits: int, keep: int = 0) -> tuple[bytearray, int]:
    """Decompress ``path`` from ``offset`` to the end of its (gzip or zlib) stream, keeping at most ``keep`` bytes.

    Returns the first ``keep`` decompressed bytes (all of them when ``keep`` is negative) and the decompressed
    length. A stream that ends early or fails its checksum raises :class:`ImageFileError`. Several gzip members
    one after the other (what ``cat a.gz b.gz`` makes) are read as one stream, as gzip readers do.
    """
    head = bytearray()
    total = 0
    decompressor = zlib.decompressobj(wbits)
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            while True:
                block = handle.read(1 << 20)
                if not block:
                    break
                while block:
                    # max_length bounds memory: a block of a very compressible image inflates a thousandfold.
                    out = decompressor.decompress(block, 1 << 24)
                    total += len(out)
                    if keep < 0:
                        head += out
                    elif len(head) < keep:
                        head += out[: keep - len(head)]
                    block = decompressor.unconsumed_tail
                    if decompressor.eof:
                        rest = decompressor.unused_data
                        if wbits != 31 or not rest.startswith(b"\x1f\x8b"):
                            return head, total
                        decompressor = zlib.decompressobj(wbits)
                        block = rest + block
    except zlib.error as error:
        raise ImageFileError(f"the compressed data are damaged ({error})") from None
    except OSError as error:
        raise ImageFileError(f"the file cannot be read ({error.strerror or error})") from None
    if not decompressor.eof:
        raise ImageFileError("the compressed data end early: the file is truncated")
    return head, total
