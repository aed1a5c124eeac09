"""Does dropping small or doubtful lesions help? A measurement for the defaults of ``cmedl segment``.

``cmedl segment --min-lesion-ml V --min-lesion-probability P`` removes every connected component smaller than V mL
or whose peak tumour probability is below P. This script measures what each setting does, so that a default is
switched on only where it helps:

- on phantoms with known tumours (``cmedl.phantom.make_phantom``, default tumour draw, seeds the built-in model
  never saw): case Dice, false-positive volume (kept lesions that touch no true tumour), and the share of true
  tumours still detected (touched by a kept lesion), overall and for tumours under 1 mL;
- on the real CTs in ``../shared/data`` (no tumour labels): the predicted tumour volume and lesion count left,
  which is false-positive volume on the tumour-free scans. ``elastix_3DCT_lung.mha`` holds a large lower-lobe
  mass without a label: its largest lesion is reported separately, as a check that a filter keeps it.

Each CT is segmented once, with no filter; the filters are then applied to the lesions of that one result, which
is what ``cmedl segment`` does with the same options (it removes whole components, never parts of one).

Usage::

    python benchmarks/lesion_filtering.py --out benchmarks/results/lesion_filtering_cpu.json
    python benchmarks/lesion_filtering.py --model MODEL --phantoms 12 --size 256

Prints a table per filter and writes every per-case figure to the JSON (and the printed table to a .txt beside it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from cmedl.catalogue import resolve_model
from cmedl.lesions import Lesion, label_lesions, split_by_minimums
from cmedl.modelfile import load_model
from cmedl.phantom import make_phantom
from cmedl.segment import Segmenter, SegmentOptions
from cmedl.volumes import read_volume

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
REAL_CTS = (
    "ct_lungmask/cip_ct-64.nrrd",
    "ct_lungmask/elastix_3DCT_lung.mha",
    "ct_lungmask/totalseg_example_ct_sm.nii.gz",
    "ct_nolabel/cip_TestInput.nrrd",
    "ct_nolabel/totalseg_example_ct.nii.gz",
    "ct_nolabel/totalseg_pulmonary_ct_cropped.nii.gz",
)
#: the real CT with a visible, unlabelled mass: its largest lesion should survive a filter
MASS_CT = "ct_lungmask/elastix_3DCT_lung.mha"
MIN_VOLUMES_ML = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0)
MIN_PEAKS = (0.0, 0.6, 0.75, 0.9)
SMALL_TUMOUR_ML = 1.0
PHANTOM_SEED_BASE = 5000  # the built-in model was trained on seed 7's phantoms


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def filters() -> list[tuple[float, float]]:
    """(minimum volume mL, minimum peak probability): each setting alone, then the pairs."""
    single = [(v, 0.0) for v in MIN_VOLUMES_ML] + [(0.0, p) for p in MIN_PEAKS if p > 0]
    pairs = [(v, p) for v in MIN_VOLUMES_ML if v > 0 for p in MIN_PEAKS if p > 0]
    return single + pairs


def kept(lesions: list[Lesion], min_ml: float, min_peak: float) -> list[Lesion]:
    """The lesions ``cmedl segment`` keeps with these options."""
    return split_by_minimums(lesions, min_ml, min_peak)[0]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def phantom_rows(segmenter: Segmenter, count: int, size: int) -> list[dict[str, Any]]:
    """Per phantom and filter: Dice, false-positive volume, detected tumours (all and small)."""
    rows = []
    for index in range(count):
        seed = PHANTOM_SEED_BASE + index
        case = make_phantom("ct", seed, size=size)
        result = segmenter.segment(case.image, name=f"phantom{seed}")
        label = sitk.GetArrayViewFromImage(result.label) == 1
        truth = sitk.GetArrayViewFromImage(case.label) > 0
        instances = sitk.GetArrayViewFromImage(case.instances)
        ids = label_lesions(label)
        voxel_ml = float(np.prod(case.image.GetSpacing())) / 1000.0
        tumour_ids = [t["id"] for t in case.tumours]
        small = {t["id"] for t in case.tumours if t["volume_ml"] < SMALL_TUMOUR_ML}
        touching = {lesion.id: bool(truth[ids == lesion.id].any()) for lesion in result.lesions}
        for min_ml, min_peak in filters():
            keep = kept(result.lesions, min_ml, min_peak)
            mask = np.isin(ids, [lesion.id for lesion in keep]) & (ids > 0)
            detected = {int(t) for t in np.unique(instances[mask]) if t > 0}
            rows.append(
                {
                    "case": f"phantom{seed}",
                    "min_ml": min_ml,
                    "min_peak": min_peak,
                    "dice": dice(mask, truth),
                    "fp_ml": sum(lesion.volume_ml for lesion in keep if not touching[lesion.id]),
                    "fp_lesions": sum(1 for lesion in keep if not touching[lesion.id]),
                    "tumours": len(tumour_ids),
                    "detected": len(detected & set(tumour_ids)),
                    "small_tumours": len(small),
                    "small_detected": len(detected & small),
                    "predicted_ml": float(mask.sum()) * voxel_ml,
                }
            )
        log(f"phantom {seed}: {len(result.lesions)} lesions, {len(tumour_ids)} tumours")
    return rows


def real_rows(segmenter: Segmenter, data: Path) -> list[dict[str, Any]]:
    """Per real CT and filter: lesion volume and count left; for the mass CT, whether its largest lesion stays."""
    rows = []
    for relative in REAL_CTS:
        path = data / relative
        if not path.exists():
            log(f"skipped {relative}: not found")
            continue
        try:
            result = segmenter.segment(read_volume(path), name=path.name)
        except Exception as error:  # a CT without lungs is a result here, not a failure of the benchmark
            log(f"{relative}: {error}")
            continue
        largest = max(result.lesions, key=lambda lesion: lesion.volume_ml, default=None)
        for min_ml, min_peak in filters():
            keep = kept(result.lesions, min_ml, min_peak)
            rows.append(
                {
                    "case": relative,
                    "min_ml": min_ml,
                    "min_peak": min_peak,
                    "lesions": len(keep),
                    "predicted_ml": sum(lesion.volume_ml for lesion in keep),
                    "largest_kept": largest is not None and any(lesion.id == largest.id for lesion in keep),
                    "largest_ml": largest.volume_ml if largest is not None else 0.0,
                }
            )
        log(f"{relative}: {len(result.lesions)} lesions, {result.tumour_volume_ml:.1f} mL")
    return rows


def summarise(phantoms: list[dict], reals: list[dict]) -> list[str]:
    lines = [
        "filter (min mL, min peak) | phantoms: Dice, FP mL/case, FP lesions/case, detected, detected <1 mL | "
        "real tumour-free CTs: mL/CT, lesions/CT | mass CT: largest kept"
    ]
    for min_ml, min_peak in filters():
        p = [r for r in phantoms if r["min_ml"] == min_ml and r["min_peak"] == min_peak]
        q = [r for r in reals if r["min_ml"] == min_ml and r["min_peak"] == min_peak and r["case"] != MASS_CT]
        m = [r for r in reals if r["min_ml"] == min_ml and r["min_peak"] == min_peak and r["case"] == MASS_CT]
        tumours, small = sum(r["tumours"] for r in p), sum(r["small_tumours"] for r in p)
        mass = f"{'yes' if m[0]['largest_kept'] else 'NO'} ({m[0]['largest_ml']:.1f} mL)" if m else "-"
        lines.append(
            f"  {min_ml:4.2f} mL, {min_peak:4.2f} | "
            f"{np.mean([r['dice'] for r in p]):.3f}, {np.mean([r['fp_ml'] for r in p]):6.2f}, "
            f"{np.mean([r['fp_lesions'] for r in p]):5.2f}, "
            f"{sum(r['detected'] for r in p)}/{tumours}, {sum(r['small_detected'] for r in p)}/{small} | "
            f"{np.mean([r['predicted_ml'] for r in q]) if q else float('nan'):6.2f}, "
            f"{np.mean([r['lesions'] for r in q]) if q else float('nan'):5.2f} | "
            f"{mass}"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model file or catalogue name (default: built-in)")
    parser.add_argument("--phantoms", type=int, default=12)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--data", type=Path, default=SHARED_DATA)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="results JSON (a .txt of the table beside it)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model_path = resolve_model(args.model)
    segmenter = Segmenter(load_model(model_path), SegmentOptions(device="cpu"))
    phantoms = phantom_rows(segmenter, args.phantoms, args.size)
    reals = real_rows(segmenter, args.data)
    lines = summarise(phantoms, reals)
    print("\n".join(lines))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        record = {"model": str(model_path), "phantoms": phantoms, "real": reals, "table": lines}
        args.out.write_text(json.dumps(record, indent=1))
        args.out.with_suffix(".txt").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
