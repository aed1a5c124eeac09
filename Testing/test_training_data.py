"""Training data: pairing images with labels, preparing volumes, sampling patches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from cmedl.errors import InputError
from cmedl.phantom import Tissue, make_phantom
from cmedl.training.data import PatchSampler, find_cases, lung_slices, prepare_volume, split_cases
from cmedl.volumes import normalise_hu


def test_background_slices_are_the_lung_slices() -> None:
    case = make_phantom("ct", seed=3, size=96)
    hu = sitk.GetArrayFromImage(case.image)
    tissues = sitk.GetArrayFromImage(case.tissues)
    with_lung = np.flatnonzero((tissues == Tissue.LUNG).reshape(len(tissues), -1).sum(axis=1) > 20)
    found = lung_slices(hu)
    assert len(found) > 0
    # no slice without lung is taken, and nearly every lung slice is
    assert set(found) <= set(range(with_lung.min() - 1, with_lung.max() + 2))
    assert len(set(found) & set(with_lung)) >= 0.9 * len(with_lung)
    assert len(found) < len(hu)  # the neck and abdomen margins are left out


def test_pairs_splits_and_patches(small_phantoms: Path) -> None:
    cases = find_cases(small_phantoms / "ct")
    assert [case.name for case in cases] == ["ct_0000", "ct_0001", "ct_0002", "ct_0003"]
    assert all(case.label is not None and case.label.name == case.image.name for case in cases)
    training, validation = split_cases(cases, 0.25, seed=1)
    assert len(validation) == 1 and not {c.name for c in training} & {c.name for c in validation}
    assert split_cases(cases, 0.25, seed=1) == (training, validation)

    volumes = [prepare_volume(case, (3.0, 3.0), lambda v: normalise_hu(v, (-1000.0, 500.0))) for case in cases[:2]]
    for volume in volumes:
        assert volume.image.dtype == np.float16 and volume.label.shape == volume.image.shape
        assert len(volume.tumour_slices) > 0 and set(volume.tumour_slices) <= set(volume.context_slices) | set(
            volume.tumour_slices
        )
    sampler = PatchSampler(volumes, 64, tumour_fraction=1.0, augment=None, rng=np.random.default_rng(0))
    images, labels, labelled = sampler.batch(6)
    assert images.shape == (6, 1, 64, 64) and labels.shape == (6, 64, 64) and bool(labelled.all())
    # patches centred near a tumour hold tumour (the jitter is at most a quarter patch)
    assert all(int(label.sum()) > 0 for label in labels)
    assert float(images.min()) >= -1.0 and float(images.max()) <= 1.0


def test_missing_folders_are_named(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="images/"):
        find_cases(tmp_path)
