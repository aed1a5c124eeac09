"""How hard, and in which direction, does the hint loss pull the CMEDL student? A diagnostic of trained runs.

For a CMEDL run folder (method ``cmedl``, real or oracle teacher) this loads the networks of its last checkpoint
(or, with ``--at-init``, the networks as the run's seed initialises them), draws training batches exactly as the
trainer does, and measures on each batch the student's parameter gradient of

- the hint term, ``lambda_hint * L_hint`` (teacher features fixed), and
- the student's Dice term, ``segmentor_seg_weight * L_seg^CT``,

as the segmentor update of :class:`cmedl.training.objectives.CMEDLObjective` weights them. It prints the norm of
each, their ratio, and the cosine between them: a hint gradient that is large against the Dice gradient and
orthogonal to it (cosine near 0) or opposed to it (negative) pulls the student away from what segmenting the CT
needs; a positive cosine means the teacher's features point the way the labels do.

Usage::

    python benchmarks/hint_gradients.py RUN [RUN ...] [--batches 20] [--at-init] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cmedl.losses import soft_dice_loss
from cmedl.training.augment import AugmentConfig
from cmedl.training.config import TrainConfig
from cmedl.training.data import PatchSampler, attach_paired, draw_batch, find_cases, prepare_volume
from cmedl.training.objectives import CMEDLObjective, hint_loss
from cmedl.training.runfolder import RunFolder
from cmedl.volumes import normalise_hu, normalise_mr


def samplers_for(config: TrainConfig, rng: np.random.Generator) -> dict[str, PatchSampler]:
    """The CT (with the paired MRI for an oracle run) and MRI patch samplers of a run's training data."""
    ct_cases = find_cases(config.ct, require_labels=True)

    def ct_norm(values: np.ndarray) -> np.ndarray:
        return normalise_hu(values, config.hu_window)

    def mr_norm(values: np.ndarray) -> np.ndarray:
        return normalise_mr(values, config.mr_percentile)

    ct = [prepare_volume(case, config.spacing_mm, ct_norm) for case in ct_cases]
    if config.teacher_input == "paired_mr":
        attach_paired(ct, ct_cases, config.paired_mr, config.spacing_mm, mr_norm)
    mr = [prepare_volume(case, config.spacing_mm, mr_norm, is_ct=False) for case in find_cases(config.mr, False)]
    augment = AugmentConfig() if config.augment else None
    return {
        "ct": PatchSampler(ct, config.patch_size, config.tumour_patch_fraction, augment, rng),
        "mr": PatchSampler(mr, config.patch_size, config.tumour_patch_fraction, augment, rng),
    }


def student_gradient(objective: CMEDLObjective, loss: torch.Tensor) -> torch.Tensor:
    parameters = [p for p in objective.student.parameters() if p.requires_grad]
    gradients = torch.autograd.grad(loss, parameters, retain_graph=True, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(gradients, parameters)])


def measure(run: Path, batches: int, at_init: bool) -> dict[str, Any]:
    folder = RunFolder(run)
    config = TrainConfig.from_dict(folder.read_json("config.json"))
    if config.method != "cmedl":
        raise SystemExit(f"{run} is a {config.method} run; the hint exists in CMEDL runs only")
    torch.manual_seed(config.seed)
    objective = CMEDLObjective(config, torch.device("cpu"), None)
    epoch = 0
    if not at_init:
        state = folder.load_checkpoint()
        objective.load_state_dict(state["objective"])
        epoch = int(state["epoch"])
    # Training mode, as in the segmentor update; the passes below must not move the BatchNorm statistics.
    objective.train()
    samplers = samplers_for(config, np.random.default_rng(1000 + config.seed))
    domains = ("ct", "mr", "paired_mr") if objective.oracle else ("ct", "mr")
    rows = []
    for _ in range(batches):
        batch = draw_batch(samplers, domains, config.batch_size)
        ct, labels, _ = batch["ct"]
        with torch.no_grad():
            if objective.oracle:
                teacher_input = batch["paired_mr"][0]
            else:
                teacher_input = objective.translator.g_ct_to_mr(ct)
            _, teacher_hints = objective.teacher(teacher_input, return_hints=True)
        logits, student_hints = objective.student(ct, return_hints=True)
        hint = config.lambda_hint * hint_loss(student_hints, teacher_hints, config.hint_reduction)
        dice = config.segmentor_seg_weight * soft_dice_loss(logits.float(), labels)
        g_hint, g_dice = student_gradient(objective, hint), student_gradient(objective, dice)
        norm_hint, norm_dice = float(g_hint.norm()), float(g_dice.norm())
        cosine = float(torch.dot(g_hint, g_dice) / (norm_hint * norm_dice)) if norm_hint and norm_dice else 0.0
        rows.append({"hint": float(hint.detach()), "dice": float(dice.detach()), "grad_hint": norm_hint,
                     "grad_dice": norm_dice, "ratio": norm_hint / norm_dice if norm_dice else float("inf"),
                     "cosine": cosine})  # fmt: skip
    summary = {key: float(np.median([row[key] for row in rows])) for key in rows[0]}
    return {"run": str(run), "epoch": epoch, "teacher_input": config.teacher_input, "batches": len(rows),
            "median": summary, "rows": rows}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Student gradient of the hint term against its Dice term.")
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--at-init", action="store_true", help="measure the freshly initialised networks")
    parser.add_argument("--json", type=Path, help="write every measurement here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = []
    print("| run | epoch | L_hint | L_seg^CT | |grad hint| / |grad Dice| (median) | cosine (median) |")
    print("|---|---|---|---|---|---|")
    for run in args.runs:
        result = measure(run, args.batches, args.at_init)
        results.append(result)
        m = result["median"]
        print(f"| {run.parent.name}/{run.name} | {result['epoch']} | {m['hint']:.3f} | {m['dice']:.3f} "
              f"| {m['ratio']:.2f} | {m['cosine']:+.3f} |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
