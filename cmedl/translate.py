"""Pseudo-MRI from CT with a trained CMEDL translator (``cmedl translate CT -o PMRI --model M``).

A CMEDL run exports, beside the student, ``translator.safetensors``: the CT->MR generator and the MRI
teacher with a model card of kind ``translator``. Translation runs the fully convolutional generator on
whole axial slices (resampled in-plane to the run's spacing, windowed like the student's input) and
writes the pseudo-MRI on exactly the CT's grid, in arbitrary units 0..1000.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from cmedl.devices import autocast_context, autocast_dtype, resolve_device
from cmedl.errors import ConfigError, InputError, ModelFileError
from cmedl.filebase import file_sha256
from cmedl.modality import check_finite_voxels, check_looks_like_ct
from cmedl.modelfile import TRANSLATOR_KIND, ModelCard, PseudoMRIModel, load_weights, read_model_card
from cmedl.nets import build_segmentor
from cmedl.nets.cyclegan import build_translator
from cmedl.patches import pad_to_at_least, resize_slices
from cmedl.progress import Progress
from cmedl.volumes import normalise_hu, read_volume, write_volume

PSEUDO_MR_SCALE = 1000.0
SIZE_DIVISOR = 4  # the generator halves the resolution twice


@dataclass
class LoadedTranslator:
    model: PseudoMRIModel
    card: ModelCard
    sha256: str


def load_translator(path: str | Path, device: torch.device | str = "cpu") -> LoadedTranslator:
    """Rebuild the generator and the teacher described by a translator model file."""
    path = Path(path)
    card = read_model_card(path)
    if card.kind != TRANSLATOR_KIND:
        raise ModelFileError(f"{path.name} holds a {card.kind} model; translation needs a CMEDL translator file")
    teacher_spec = card.training.get("teacher", {})
    try:
        generator = build_translator(card.architecture, **card.architecture_options).g_ct_to_mr
        teacher = build_segmentor(
            teacher_spec.get("architecture", "unet"),
            in_channels=1,
            num_classes=card.num_classes,
            **teacher_spec.get("options", {}),
        )
    except ConfigError as error:
        raise ModelFileError(f"{path.name}: cannot rebuild its networks: {error}") from None
    model = PseudoMRIModel(generator, teacher)
    load_weights(path, model, card)
    model.eval().to(device)
    return LoadedTranslator(model=model, card=card, sha256=file_sha256(path))


def translate_volume(
    ct: sitk.Image, translator: LoadedTranslator, device: torch.device, progress: Progress | None = None
) -> sitk.Image:
    """Pseudo-MRI (float32, 0..1000 a.u.) of every slice of ``ct``, on exactly ``ct``'s grid."""
    progress = progress or Progress()
    card = translator.card
    oriented = sitk.DICOMOrient(ct, "LPS")
    volume = sitk.GetArrayViewFromImage(oriented)
    rows, cols = volume.shape[1:]
    spacing_x, spacing_y = oriented.GetSpacing()[:2]
    work = (max(1, round(rows * spacing_y / card.spacing_mm[1])), max(1, round(cols * spacing_x / card.spacing_mm[0])))
    padded_to = max(SIZE_DIVISOR, -(-max(work) // SIZE_DIVISOR) * SIZE_DIVISOR)
    output = np.zeros(volume.shape, dtype=np.float32)
    dtype = autocast_dtype(device, "auto")
    for z in range(len(volume)):
        progress.update("translate", z, len(volume), "slices")
        pixels = resize_slices(normalise_hu(volume[z], card.hu_window)[None], work)[0]
        padded, _ = pad_to_at_least(pixels, padded_to, -1.0)
        with torch.inference_mode(), autocast_context(device, dtype):
            generated = translator.model.generator(torch.from_numpy(padded)[None, None].to(device))
        generated = generated[0, 0, : work[0], : work[1]].float().cpu().numpy()
        output[z] = resize_slices(generated[None], (rows, cols))[0]
    progress.update("translate", len(volume), len(volume), "slices")
    image = sitk.GetImageFromArray((np.clip(output, -1.0, 1.0) + 1.0) * (PSEUDO_MR_SCALE / 2.0))
    image.CopyInformation(oriented)
    original = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(ct.GetDirection())
    result = sitk.DICOMOrient(image, original)
    result.CopyInformation(ct)
    return result


def translate_file(
    input_path: str | Path,
    output_path: str | Path,
    model_path: str | Path,
    device: str = "auto",
    force: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Read a CT, write its pseudo-MRI (atomically); returns a summary."""
    started = time.perf_counter()
    if Path(input_path).resolve() == Path(output_path).resolve():
        raise InputError("the output path is the input path; the input is never overwritten")
    target = resolve_device(device)
    translator = load_translator(model_path, target)
    ct = read_volume(input_path)
    check_finite_voxels(ct, Path(input_path).name)  # even with force: NaN has no pseudo-MRI
    if not force:
        check_looks_like_ct(ct, Path(input_path).name)
    write_volume(translate_volume(ct, translator, target, progress), output_path)
    return {
        "input": str(input_path),
        "output": str(output_path),
        "model": translator.card.name,
        "model_sha256": translator.sha256,
        "device": target.type,
        "seconds": round(time.perf_counter() - started, 2),
    }
