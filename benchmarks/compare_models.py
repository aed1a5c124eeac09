"""Score segmentation model files side by side on the same held-out phantom CTs.

Each model segments each phantom CT through the real inference pipeline (:class:`cmedl.segment.Segmenter`) and is
scored in 3D on the CT's voxel spacing: Dice, surface Dice at a tolerance and HD95. The first model is the
baseline; for every other model the script prints a paired Wilcoxon signed-rank test of its per-case Dice against
the baseline's. The phantoms come from their own dataset seed (default 99), which the training recipes here do
not use.

Usage::

    python benchmarks/compare_models.py OLD.safetensors NEW.safetensors --cases 10 --size 256 --device auto
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import wilcoxon

from cmedl.evaluate import score_case
from cmedl.modelfile import load_model
from cmedl.phantom import write_phantom_dataset
from cmedl.segment import Segmenter, SegmentOptions
from cmedl.volumes import read_volume


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="model files; the first one is the baseline")
    parser.add_argument("--cases", type=int, default=10, help="held-out phantom CTs")
    parser.add_argument("--seed", type=int, default=99, help="dataset seed of the phantoms")
    parser.add_argument("--size", type=int, default=256, help="phantom in-plane matrix")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tolerance", type=float, default=2.0, help="surface Dice tolerance, mm")
    parser.add_argument("--json", help="also write per-case rows and summaries to this file")
    return parser.parse_args(argv)


def score(model_path: str, cases: list[tuple[Path, Path]], device: str, tolerance_mm: float) -> list[dict[str, Any]]:
    segmenter = Segmenter(load_model(model_path), SegmentOptions(device=device))
    rows = []
    for image_path, label_path in cases:
        label = segmenter.segment(read_volume(image_path)).label
        case = score_case(label, read_volume(label_path), tolerance_mm, label=1, case=image_path.name)
        rows.append({"case": case.case, "dice": case.dice, "surface_dice": case.surface_dice, "hd95": case.hd95_mm})
    return rows


def mean_sd(values: list[float]) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "n/a"
    spread = float(np.std(finite, ddof=1)) if len(finite) > 1 else 0.0
    missing = len(values) - len(finite)
    return f"{np.mean(finite):.3f} ± {spread:.3f}" + (f" ({missing} empty)" if missing else "")


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    with tempfile.TemporaryDirectory(prefix="cmedl-compare-") as folder:
        write_phantom_dataset(Path(folder), n_ct=args.cases, n_mr=0, seed=args.seed, size=args.size)
        images = sorted((Path(folder) / "ct" / "images").iterdir())
        labels = sorted((Path(folder) / "ct" / "labels").iterdir())
        cases = list(zip(images, labels, strict=True))
        results = {path: score(path, cases, args.device, args.tolerance) for path in args.models}
    baseline = args.models[0]
    names = [Path(path).name for path in args.models]
    shown_names = {
        path: name if names.count(name) == 1 else f"{Path(path).parent.name}/{name}"
        for path, name in zip(args.models, names, strict=True)
    }
    print(f"{args.cases} phantom CTs (seed {args.seed}, {args.size} px); surface Dice at {args.tolerance} mm")
    print(f"{'model':<40} {'Dice':>16} {'surface Dice':>16} {'HD95 mm':>22} {'p (Dice vs first)':>18}")
    for path, rows in results.items():
        dice = [row["dice"] for row in rows]
        if path == baseline:
            p_value = "-"
        else:
            base = [row["dice"] for row in results[baseline]]
            differences = np.subtract(dice, base)
            p_value = f"{wilcoxon(dice, base).pvalue:.3f}" if np.any(differences) else "identical"
        print(f"{shown_names[path]:<40} {mean_sd(dice):>16} {mean_sd([r['surface_dice'] for r in rows]):>16} "
              f"{mean_sd([r['hd95'] for r in rows]):>22} {p_value:>18}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
