"""Phantom datasets on disk: :func:`write_phantom_dataset` writes CT and MR cases, their labels and tables.

:func:`case_seed` derives an independent seed per modality and case, so that a dataset's CT and MR sets are
unpaired, as in the CMEDL training setting. A dataset can stratify tumour sites, add the MR of each CT
case's anatomy (a perfect translation to compare with), and writes every tumour's measured contrast to
``tumours.csv`` (:data:`TUMOUR_TABLE_COLUMNS`) beside the ``phantoms.json`` description.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from cmedl.errors import ConfigError
from cmedl.phantom.case import PhantomCase, make_phantom, size_problem
from cmedl.phantom.rendering import _check_modality
from cmedl.phantom.tumours import LOCATIONS, _check_contrast, measure_tumour_contrast
from cmedl.volumes import OutputSet, atomic_output, write_labelmap, write_volume


def case_seed(seed: int, modality: str, index: int) -> int:
    """The seed of case ``index`` of ``modality`` in a dataset drawn with ``seed``.

    Seeds come from a ``SeedSequence`` keyed by (seed, modality, index), so CT case i and MR case i are
    independent anatomies.
    """
    key = 0 if _check_modality(modality) == "ct" else 1
    words = np.random.SeedSequence([int(seed), key, int(index)]).generate_state(2, np.uint32)
    return int(words[0]) << 31 | int(words[1]) >> 1


# Columns of ``tumours.csv``: one row per tumour of a dataset; measured values are empty where not measured.
TUMOUR_TABLE_COLUMNS = (
    "case",
    "modality",
    "tumour_id",
    "stratum",
    "volume_ml",
    "diameter_mm",
    "centre_x_mm",
    "centre_y_mm",
    "centre_z_mm",
    "ct_contrast_hu",
    "ct_noise_hu",
    "ct_cnr",
    "ct_reference",
    "mr_contrast",
    "mr_noise",
    "mr_cnr",
    "mr_reference",
)


def write_phantom_dataset(
    out: str | Path,
    n_ct: int,
    n_mr: int,
    seed: int,
    size: int = 512,
    progress: Callable[[int, int], None] | None = None,
    *,
    ct_tumour_contrast: float | None = None,
    stratified: bool = False,
    paired_mr: bool = False,
) -> dict:
    """Write an unpaired CT/MR phantom dataset and return its description.

    Layout: ``out/ct/images/ct_0000.nii.gz`` with its label ``out/ct/labels/ct_0000.nii.gz`` and its
    tumour instance map ``out/ct/instances/ct_0000.nii.gz`` (uint8, tumour k = k), the same images and
    labels under ``out/mr/`` with ``mr_0000``, ``out/phantoms.json`` (the returned dict: per case its
    name, modality, seed, requested tumour sites, relative file paths, size, spacing, origin and tumours)
    and ``out/tumours.csv`` (one row per tumour, :data:`TUMOUR_TABLE_COLUMNS`). Every file is written
    under a temporary name and verified; a case's files are renamed together only once the whole case
    is written, so a failed write (exit 6) leaves complete cases only. ``progress(done, total)`` is called
    after each case.

    Each tumour is measured with :func:`measure_tumour_contrast` on its case's image: ``ct_contrast_hu``,
    ``ct_noise_hu``, ``ct_cnr``, ``ct_reference`` for CT cases and ``mr_contrast``, ``mr_noise``,
    ``mr_cnr``, ``mr_reference`` where the MR of that anatomy is rendered; unmeasured values are None.

    Args:
        ct_tumour_contrast: the CT tumours' contrast to mediastinal soft tissue in HU (see
            :func:`make_phantom`), within -200..200; None keeps the default 3-9 HU below it.
        stratified: case i of each modality gets two tumours, at ``LOCATIONS[i % 3]`` and
            ``LOCATIONS[(i + 1) % 3]``, so every three cases hold each site twice.
        paired_mr: also write ``out/ct/paired_mr/ct_0000.nii.gz``, the MR of each CT case's anatomy on
            the CT's grid, and measure its tumours. The CT and MR sets stay unpaired (``"paired"`` is
            False); the paired MR is an extra, for experiments that need a perfect translation to compare
            with.
    """
    if n_ct < 0 or n_mr < 0:
        raise ConfigError(f"phantom case counts must not be negative (got {n_ct} CT, {n_mr} MR)")
    if seed < 0:
        raise ConfigError(f"phantom seed must be a non-negative integer, got {seed!r}")
    problem = size_problem(size)
    if problem:
        raise ConfigError(problem)
    ct_tumour_contrast = _check_contrast(ct_tumour_contrast)
    out = Path(out)
    total = n_ct + n_mr
    cases = []
    for modality, count in (("ct", n_ct), ("mr", n_mr)):
        for index in range(count):
            name = f"{modality}_{index:04d}"
            seed_of_case = case_seed(seed, modality, index)
            locations = [LOCATIONS[index % 3], LOCATIONS[(index + 1) % 3]] if stratified else None
            case = make_phantom(
                modality, seed_of_case, size=size, ct_tumour_contrast=ct_tumour_contrast, tumour_locations=locations
            )
            image_path = Path(modality) / "images" / f"{name}.nii.gz"
            label_path = Path(modality) / "labels" / f"{name}.nii.gz"
            entry = {
                "name": name,
                "modality": modality,
                "seed": seed_of_case,
                "tumour_locations": locations,
                "image": image_path.as_posix(),
                "label": label_path.as_posix(),
            }
            # A case's files appear together once all are written and verified: a failure (a full disk)
            # leaves the earlier, complete cases and nothing of this one under final names.
            with OutputSet():
                write_volume(case.image, out / image_path)
                write_labelmap(case.label, out / label_path)
                measured = {modality: measure_tumour_contrast(case.image, case.tissues, case.instances, modality)}
                if modality == "ct":
                    instances_path = Path("ct") / "instances" / f"{name}.nii.gz"
                    write_labelmap(case.instances, out / instances_path)  # a plain uint8 cast: ids are kept
                    entry["instances"] = instances_path.as_posix()
                    if paired_mr:
                        mr = make_phantom("mr", seed_of_case, size=size, tumour_locations=locations)
                        _check_same_anatomy(case, mr, name)
                        paired_path = Path("ct") / "paired_mr" / f"{name}.nii.gz"
                        write_volume(mr.image, out / paired_path)
                        entry["paired_mr"] = paired_path.as_posix()
                        measured["mr"] = measure_tumour_contrast(mr.image, mr.tissues, mr.instances, "mr")
            entry.update(
                {
                    "size": list(case.image.GetSize()),
                    "spacing_mm": [round(value, 6) for value in case.image.GetSpacing()],
                    "origin_mm": [round(value, 6) for value in case.image.GetOrigin()],
                    "tumours": [{**tumour, **_measured_columns(measured, tumour["id"])} for tumour in case.tumours],
                }
            )
            cases.append(entry)
            if progress is not None:
                progress(len(cases), total)
    description = {
        "generator": "cmedl.phantom",
        "seed": int(seed),
        "size": int(size),
        "n_ct": int(n_ct),
        "n_mr": int(n_mr),
        "paired": False,
        "paired_mr": bool(paired_mr),
        "stratified": bool(stratified),
        "ct_tumour_contrast": ct_tumour_contrast,
        "cases": cases,
    }
    with OutputSet():  # the table and the description name the same cases: both or neither
        with atomic_output(out / "tumours.csv") as temp:
            temp.write_text(_tumour_table(cases), encoding="utf-8")
        with atomic_output(out / "phantoms.json") as temp:
            temp.write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")
    return description


def _check_same_anatomy(ct: PhantomCase, mr: PhantomCase, name: str) -> None:
    """The paired MR must be the CT's anatomy on the CT's grid, or it is no pair at all."""
    same_grid = (
        ct.image.GetSize() == mr.image.GetSize()
        and ct.image.GetSpacing() == mr.image.GetSpacing()
        and ct.image.GetOrigin() == mr.image.GetOrigin()
    )
    if not same_grid or not np.array_equal(
        sitk.GetArrayViewFromImage(ct.tissues), sitk.GetArrayViewFromImage(mr.tissues)
    ):
        raise RuntimeError(f"the paired MR of {name} does not share the CT's grid and anatomy")


def _measured_columns(measured: dict[str, list[dict]], tumour_id: int) -> dict:
    """A tumour's measured contrast columns; None for a modality that was not rendered."""
    columns = {}
    for modality, unit in (("ct", "_hu"), ("mr", "")):
        found = next((row for row in measured.get(modality) or [] if row["id"] == tumour_id), {})
        columns[f"{modality}_contrast{unit}"] = found.get("contrast")
        columns[f"{modality}_noise{unit}"] = found.get("noise")
        columns[f"{modality}_cnr"] = found.get("cnr")
        columns[f"{modality}_reference"] = found.get("reference")
    return columns


def _tumour_table(cases: list[dict]) -> str:
    """``tumours.csv`` text: one row per tumour, empty cells for values that were not measured."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(TUMOUR_TABLE_COLUMNS)
    for case in cases:
        for tumour in case["tumours"]:
            row = {
                "case": case["name"],
                "modality": case["modality"],
                "tumour_id": tumour["id"],
                "stratum": tumour["location"],
                "volume_ml": tumour["volume_ml"],
                "diameter_mm": tumour["diameter_mm"],
                "centre_x_mm": tumour["centre_mm"][0],
                "centre_y_mm": tumour["centre_mm"][1],
                "centre_z_mm": tumour["centre_mm"][2],
                **{key: tumour.get(key) for key in TUMOUR_TABLE_COLUMNS[9:]},
            }
            writer.writerow(["" if row[column] is None else row[column] for column in TUMOUR_TABLE_COLUMNS])
    return buffer.getvalue()
