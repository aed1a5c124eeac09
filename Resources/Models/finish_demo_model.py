"""Turn the student a demo training run exported into the shipped demo model file.

The weights are copied unchanged; only the model card gains what a user of the built-in model should read: what
it is, what it was trained on (the phantom command instead of the run's temporary folders) and that it has never
seen a patient. Used by ``train_demo_model.sh``.

Usage: python Resources/Models/finish_demo_model.py RUN/model.safetensors Resources/Models/cmedl-demo-unet.safetensors
"""

from __future__ import annotations

import sys
from pathlib import Path

from cmedl.filebase import file_sha256
from cmedl.modelfile import load_model, save_model
from cmedl.training.config import TrainConfig, paper_deviations

PHANTOM_COMMAND = "cmedl phantom data --ct 20 --mr 10 --seed 7 --size 256"

DESCRIPTION = (
    "Demonstration model: a narrow U-Net (base_channels 16), the CT student of a CMEDL run (CycleGAN with the "
    "contextual loss, MRI teacher, hint losses) on unpaired synthetic phantoms ({command}: 20 labelled CTs, "
    "10 MRIs). For demonstrations and tests; it has never seen a real CT or MRI and is not for clinical use. "
    "Reproduce with Resources/Models/train_demo_model.sh."
)


def finish(run_model: Path, destination: Path) -> Path:
    model = load_model(run_model)
    card = model.card
    if card.method != "cmedl":
        raise SystemExit(f"{run_model} was trained by method {card.method!r}; the demo model is a CMEDL student")
    card.description = DESCRIPTION.format(command=PHANTOM_COMMAND)
    data = dict(card.training_data)
    data["ct_folder"] = f"synthetic phantoms: {PHANTOM_COMMAND}, ct/"
    data["mr_folder"] = f"synthetic phantoms: {PHANTOM_COMMAND}, mr/"
    data["real_patients"] = 0
    card.training_data = data
    card.training = {**card.training, "deviations": deviations_of(card.training)}
    return save_model(destination, model.network, card)


def deviations_of(training: dict) -> list[str]:
    """The paper deviations of the run a card describes, from the training values the card records."""
    known = set(TrainConfig.field_names())
    values = {key: value for key, value in training.items() if key in known and key != "deviations"}
    return paper_deviations(TrainConfig.from_dict({**values, "method": "cmedl"}))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__.strip().splitlines()[-1])
    finished = finish(Path(sys.argv[1]), Path(sys.argv[2]))
    print(finished)
    # Shipped as the built-in model, the file is checked against this value (cmedl.catalogue.BUILTIN_SHA256).
    print(f"sha256 for BUILTIN_SHA256: {file_sha256(finished)}")
