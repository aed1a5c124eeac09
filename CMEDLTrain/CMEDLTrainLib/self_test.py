"""The smallest real training run, shared by the module's self-test inside Slicer and by pytest outside it."""

from __future__ import annotations

from pathlib import Path

from cmedl.training.launch import wait_for_run
from cmedl.training.runs import RunSnapshot
from CMEDLTrainLib.launcher import start_training
from CMEDLTrainLib.settings import DataFolders, TrainingSettings


def tiny_ct_run(folder: str | Path, python: str, timeout: float = 600.0) -> RunSnapshot:
    """Two 128-pixel CT phantoms and one CT-only epoch of a two-channel U-Net on the CPU, started detached
    with ``python`` (Slicer's ``PythonSlicer``) and waited for; returns the run's last snapshot."""
    from cmedl.phantom import write_phantom_dataset

    folder = Path(folder)
    write_phantom_dataset(folder / "data", n_ct=2, n_mr=0, seed=7, size=128)
    data = folder / "data" / "ct"
    folders = DataFolders(ct_images=str(data / "images"), ct_labels=str(data / "labels"))
    settings = TrainingSettings(
        method="ct_only", segmentor="unet", epochs=1, iterations_per_epoch=2, batch_size=1, patch_size=32,
        spacing_mm=6.0, validation_fraction=0.5, device="cpu", name="selftest",
        extra={"segmentor_options": {"base_channels": 2}},
    )  # fmt: skip
    return wait_for_run(start_training(settings, folders, folder / "runs", python=python), timeout=timeout)
