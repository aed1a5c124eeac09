"""What validation costs against an epoch's training: every slice against the fixed sample of each case's slices.

Trains the same small CT-only run twice on the same phantoms with the same seed, once scoring every validation
slice (``validation_slices_per_case=0``, the behaviour before sampling) and once with the configuration's default
sample. Validation does not touch the training's random streams, so the two runs train the same networks and
their validation Dice per epoch differ only by the sampling. Per run and epoch it prints the seconds of training
(the epoch's ``seconds`` less its ``validation_seconds`` in ``metrics.jsonl``), the seconds of validation, their
ratio and the validation Dice.

Presets: ``tiny`` (the default: 6 CT phantoms at 128 px, 2 epochs x 20 iterations, batch 2, patch 64, a U-Net of
width 8), ``benchmark`` (the CT-only arm of ``cmedl_vs_ct_only.py --preset cpu``: 8 training and 6 validation
phantoms at 128 px, 125 iterations per epoch) and ``readme`` (the README's smallest example: 12 CT phantoms at
256 px, the default configuration: 256 px patches at 1 mm, a U-Net of width 64, 50 iterations per epoch).

Usage::

    python benchmarks/validation_cost.py                       # tiny, one torch thread, in a temporary folder
    python benchmarks/validation_cost.py --preset readme --epochs 1 --out OUT
    python benchmarks/validation_cost.py --slices 0,24,48      # compare several sample sizes
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from cmedl.phantom import write_phantom_dataset
from cmedl.training.config import TrainConfig
from cmedl.training.runfolder import RunFolder
from cmedl.training.trainer import Trainer

DEFAULT_SLICES = TrainConfig().validation_slices_per_case
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"ct": 6, "size": 128, "validation_fraction": 0.34, "epochs": 2, "iterations": 20, "batch": 2,
             "patch": 64, "spacing": 3.0, "base_channels": 8},
    # cmedl_vs_ct_only.py --preset cpu: 8 training CTs and a validation set of 6 (here 6 of 14 cases).
    "benchmark": {"ct": 14, "size": 128, "validation_fraction": 6 / 14, "epochs": 2, "iterations": 125, "batch": 2,
                  "patch": 64, "spacing": 3.0, "base_channels": 8},
    # README: cmedl phantom data --ct 12 ... --size 256; cmedl train --method ct_only --iterations-per-epoch 50
    "readme": {"ct": 12, "size": 256, "validation_fraction": 0.2, "epochs": 2, "iterations": 50, "batch": 2,
               "patch": 256, "spacing": 1.0, "base_channels": 64},
}  # fmt: skip


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--out", type=Path, help="work folder (phantoms and runs); default: a temporary one")
    parser.add_argument("--slices", default=f"0,{DEFAULT_SLICES}", help="validation_slices_per_case of each run")
    parser.add_argument("--epochs", type=int, help="override the preset's epochs")
    parser.add_argument("--iterations", type=int, help="override the preset's iterations per epoch")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0, help="phantom and training seed")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.slices = [int(value) for value in args.slices.split(",") if value.strip()]
    return args


def train(args: argparse.Namespace, data: Path, out: Path, slices: int) -> list[dict[str, Any]]:
    """Train one run; its metrics.jsonl records."""
    config = TrainConfig.from_dict(
        {
            "method": "ct_only",
            "ct": str(data / "ct"),
            "out": str(out),
            "validation_fraction": args.validation_fraction,
            "validation_slices_per_case": slices,
            "segmentor": "unet",
            "segmentor_options": {"base_channels": args.base_channels},
            "epochs": args.epochs,
            "iterations_per_epoch": args.iterations,
            "batch_size": args.batch,
            "patch_size": args.patch,
            "spacing_mm": (args.spacing, args.spacing),
            "early_stopping_patience": args.epochs,
            "seed": args.seed,
            "device": args.device,
        }
    )
    status = Trainer(config).fit()
    if status["state"] != "finished":
        sys.exit(f"run {out} ended {status['state']}: {status['message']}")
    return RunFolder(out).read_metrics()


def rows_of(slices: int, records: list[dict[str, Any]], log: str) -> list[dict[str, Any]]:
    scored = next((line.split("validation: ", 1)[1] for line in log.splitlines() if "validation: " in line), "")
    rows = []
    for record in records:
        validation = float(record["validation_seconds"])
        training = float(record["seconds"]) - validation
        rows.append(
            {
                "validation_slices_per_case": slices,
                "scored": scored,
                "epoch": record["epoch"],
                "training_seconds": round(training, 2),
                "validation_seconds": round(validation, 2),
                "ratio": round(validation / training, 3) if training > 0 else None,
                "validation_dice": record["validation_dice"],
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="validation_cost_") as temporary:
        root = args.out or Path(temporary)
        data = root / "data"
        if not (data / "ct" / "images").is_dir():
            write_phantom_dataset(data, n_ct=args.ct, n_mr=0, seed=args.seed, size=args.size)
        rows = []
        for slices in args.slices:
            out = root / "runs" / f"slices{slices}"
            if out.exists() and RunFolder(out).read_status().get("state") != "finished":
                sys.exit(f"{out} holds an unfinished run: remove it")
            records = RunFolder(out).read_metrics() if out.exists() else train(args, data, out, slices)
            rows.extend(rows_of(slices, records, RunFolder(out).log_path.read_text()))
    settings = {key: getattr(args, key) for key in PRESETS[args.preset]}
    print(f"preset {args.preset}: {json.dumps(settings)}; {args.threads} torch thread(s), device {args.device}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    header = ("slices/case", "epoch", "train s", "validate s", "validate/train", "validation Dice")
    print(" | ".join(header))
    for row in rows:
        ratio = "n/a" if row["ratio"] is None else f"{row['ratio']:.3f}"
        print(
            f"{row['validation_slices_per_case'] or 'all':>11} | {row['epoch']:>5} | {row['training_seconds']:>7.2f} | "
            f"{row['validation_seconds']:>10.2f} | {ratio:>14} | {row['validation_dice']:.4f}"
        )
    for slices in args.slices:
        scored = next(row["scored"] for row in rows if row["validation_slices_per_case"] == slices)
        print(f"slices/case {slices or 'all'}: {scored}")
    if args.json:
        args.json.write_text(json.dumps({"preset": args.preset, "settings": settings, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
