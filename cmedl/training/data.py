"""Training data: finding image/label pairs, preparing volumes, and sampling 2D training patches.

Dataset convention: a folder holds ``images/`` and ``labels/``; a label belongs to the image with the
same file name. Volumes are reoriented to axial LPS, resampled in-plane to the run's pixel spacing,
normalised and kept in memory as float16 slices; patches are drawn from them at random.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from scipy import ndimage

from cmedl.errors import InputError, NotCTError, TrainingError
from cmedl.modality import check_finite_voxels, check_looks_like_ct
from cmedl.patches import crop_centered, resize_slices
from cmedl.training.augment import AugmentConfig, augment_pair
from cmedl.training.inventory import label_values_problem
from cmedl.volumes import list_volumes, read_volume, same_geometry, stem_of

CANONICAL_ORIENTATION = "LPS"
BACKGROUND = -1.0  # normalised value of air, used to pad patches


@dataclass(frozen=True)
class CasePaths:
    """One case of a dataset folder: its name, image and (optional) label."""

    name: str
    image: Path
    label: Path | None


def find_cases(folder: str | Path, require_labels: bool = True) -> list[CasePaths]:
    """The cases of a dataset folder (``folder/images`` and ``folder/labels``), sorted by name.

    Raises :class:`InputError` when ``images/`` is missing or empty, or when labels are required and some
    image has none (the message names the first few).
    """
    folder = Path(folder)
    images_dir, labels_dir = folder / "images", folder / "labels"
    if not images_dir.is_dir():
        raise InputError(f"{folder} has no images/ folder (expected {folder}/images and {folder}/labels)")
    labels = {stem_of(path): path for path in list_volumes(labels_dir)} if labels_dir.is_dir() else {}
    cases = [CasePaths(stem_of(path), path, labels.get(stem_of(path))) for path in list_volumes(images_dir)]
    if not cases:
        raise InputError(f"no images found in {images_dir}")
    if require_labels:
        unlabelled = [case.name for case in cases if case.label is None]
        if unlabelled:
            shown = ", ".join(unlabelled[:3]) + (" ..." if len(unlabelled) > 3 else "")
            raise InputError(f"{len(unlabelled)} image(s) in {images_dir} have no label in {labels_dir}: {shown}")
    return cases


@dataclass
class PreparedVolume:
    """A volume ready for patch sampling.

    Attributes:
        image: ``(Z, H, W)`` float16 normalised intensities, in-plane spacing = the run's spacing.
        label: ``(Z, H, W)`` uint8 class indices, or None for an unlabelled case.
        tumour_slices: indices of slices with at least one foreground voxel.
        context_slices: indices of the slices background patches are drawn from: for CT the slices holding
            lung (where inference runs, lung bases and apices included), otherwise every slice.
        paired: ``(Z, H, W)`` float16 normalised image of another modality on the same grid (the real MRI of a
            phantom CT's own anatomy), or None. Patches of it are cut and augmented with the image's.
    """

    name: str
    image: np.ndarray
    label: np.ndarray | None
    tumour_slices: np.ndarray
    context_slices: np.ndarray
    paired: np.ndarray | None = None


def lung_slices(hu: np.ndarray, air_hu: float = -500.0, min_fraction: float = 0.02) -> np.ndarray:
    """Slices of a ``(Z, H, W)`` CT in which air-density pixels enclosed by the body (lung, not the air around
    the patient) make up at least ``min_fraction`` of the body's cross-section."""
    found = []
    for z, plane in enumerate(hu):
        dense = plane >= air_hu
        body = ndimage.binary_fill_holes(dense)
        area = np.count_nonzero(body)
        if area and np.count_nonzero(body & ~dense) >= min_fraction * area:
            found.append(z)
    return np.array(found, dtype=np.int64)


def tumour_mask(values: np.ndarray, label_value: int, path: str | Path) -> np.ndarray:
    """The ``uint8`` 0/1 tumour mask of a label file's voxels ``values``, which must hold only 0 and
    ``label_value``; anything else is refused with :class:`InputError` naming ``path`` and the values found (a
    cast would turn 257 into 1, 256 and 0.5 into 0, and a case would silently train as tumour-free)."""
    problem = label_values_problem(values, label_value)
    if problem:
        raise InputError(f"{path} {problem}")
    return (np.asarray(values) == label_value).astype(np.uint8)


def prepare_volume(
    case: CasePaths,
    spacing_mm: tuple[float, float],
    normalise: Callable[[np.ndarray], np.ndarray],
    is_ct: bool = True,
    label_value: int = 1,
) -> PreparedVolume:
    """Read, reorient, resample in-plane to ``spacing_mm`` (x, y) and normalise one case; its label must hold
    only 0 and ``label_value`` (:func:`tumour_mask`).

    Refused as each file is read, naming it (:func:`check_training_image`): an image or float label with NaN or
    infinite voxels (:class:`InputError`), and with ``is_ct`` an image that does not look like a CT in HU
    (:class:`NotCTError`).
    """
    image = read_volume(case.image)
    check_training_image(image, case.image, is_ct)
    image = sitk.DICOMOrient(image, CANONICAL_ORIENTATION)
    label_array = None
    if case.label is not None:
        label = read_volume(case.label)
        check_finite_voxels(label, str(case.label))
        label = sitk.DICOMOrient(label, CANONICAL_ORIENTATION)
        if not same_geometry(image, label, tolerance=1e-3):
            raise InputError(f"label of case {case.name} is not on the image's grid")
        label_array = tumour_mask(sitk.GetArrayViewFromImage(label), label_value, case.label)
    pixels = sitk.GetArrayFromImage(image)
    spacing_x, spacing_y = image.GetSpacing()[:2]
    rows, cols = pixels.shape[1:]
    size = (max(1, round(rows * spacing_y / spacing_mm[1])), max(1, round(cols * spacing_x / spacing_mm[0])))
    normalised = resize_slices(normalise(pixels).astype(np.float32), size).astype(np.float16)
    if label_array is not None:
        label_array = resize_slices(label_array, size, mode="nearest")
        tumour_slices = np.flatnonzero(label_array.reshape(len(label_array), -1).any(axis=1))
    else:
        tumour_slices = np.zeros(0, dtype=np.int64)
    # Background patches come from where the model will be applied: slices with lung, not neck or pelvis.
    context = lung_slices(pixels) if is_ct else np.arange(len(pixels))
    if len(context) == 0:
        context = np.arange(len(pixels))
    return PreparedVolume(case.name, normalised, label_array, tumour_slices, context)


def check_training_image(image: sitk.Image, path: str | Path, is_ct: bool) -> None:
    """Refuse a training image that would train a wrong model, naming its file: NaN or infinite voxels
    (:class:`InputError`, with their count), and with ``is_ct`` one that does not look like a CT in Hounsfield
    units (:class:`NotCTError`).

    Why at reading time: NaN voxels surfaced only steps later as a non-finite loss with advice to lower the
    learning rate, and an MR image in the CT folder trained without a word (the HU window turns it into a flat,
    meaningless image). The CT test is :func:`cmedl.modality.check_looks_like_ct`, the one ``cmedl segment`` applies
    before segmenting, so a model is trained only on images it would accept. An MRI has no such test.
    """
    check_finite_voxels(image, str(path))
    if is_ct:
        try:
            check_looks_like_ct(image, str(path))
        except NotCTError as error:
            raise NotCTError(
                f"{error}; the CT training and validation folders must hold CT images (MR images go in the MRI "
                f"folder, --mr, of method cmedl)"
            ) from None


@dataclass(frozen=True)
class ValidationSample:
    """The slices of one validation case that are scored, and what each stands for.

    Attributes:
        slices: sorted slice indices.
        weights: per slice, how many slices of its stratum (tumour, or the rest of the range) it stands for: 1
            everywhere when every slice is scored.
        range_slices: the slices of the case's range (what a full validation scores).
    """

    slices: np.ndarray
    weights: np.ndarray
    range_slices: int


def validation_sample(volume: PreparedVolume, count: int, seed: int) -> ValidationSample:
    """The fixed sample of ``volume``'s slices that validation scores: at most ``count`` (0: every slice).

    The range is every slice from the first to the last lung (context) or tumour slice, as inference sees them,
    lung bases and apices included. It is split into two strata: the tumour slices, and the rest. Half of
    ``count`` (at least one) goes to the tumour slices, all of them when they are fewer; the rest goes to the
    other slices, all of them when they are fewer (and what they leave goes back to the tumour). Within a stratum
    the slices are spread evenly: the stratum is cut into as many runs of neighbouring slices as it gets, and
    one slice is drawn from each run.

    Why: Dice's true positives and misses lie only on the tumour slices, so a uniform sample of a CT's 100-300
    ROI slices would hold a handful of them and the score would swing with which ones; false positives can lie
    anywhere, so the other half spreads over the whole range. Each slice carries a weight, the size of its stratum
    over its share of the sample, so that the weighted Dice (:func:`weighted_dice`) estimates the Dice of the whole
    range rather than one of a volume with half its slices tumour. On phantoms a sample of 6 slices per case ranked
    a run's epochs like every slice did (``benchmarks/README.md``, ``validation_cost.py``).

    The draw depends only on ``seed`` (the run's), the case's name and its slices: every epoch, and every resume,
    scores the same slices, so epochs stay comparable.
    """
    seen = np.union1d(volume.context_slices, volume.tumour_slices)
    every = np.arange(int(seen.min()), int(seen.max()) + 1)
    if count == 0 or count >= len(every):
        return ValidationSample(every, np.ones(len(every)), len(every))
    tumour = np.asarray(volume.tumour_slices, dtype=np.int64)
    other = np.setdiff1d(every, tumour)
    tumour_count = min(len(tumour), max(1, count // 2))
    other_count = min(len(other), count - tumour_count)
    tumour_count = min(len(tumour), count - other_count)
    rng = np.random.default_rng([seed, zlib.crc32(volume.name.encode("utf-8"))])
    slices, weights = [], []
    for stratum, taken in ((tumour, tumour_count), (other, other_count)):
        if taken:
            slices.extend(int(rng.choice(run)) for run in np.array_split(stratum, taken))
            weights.extend([len(stratum) / taken] * taken)
    order = np.argsort(slices)
    return ValidationSample(np.asarray(slices, dtype=np.int64)[order], np.asarray(weights)[order], len(every))


def weighted_dice(predicted: np.ndarray, truth: np.ndarray, weights: np.ndarray) -> float:
    """Dice of ``(N, H, W)`` masks pooled as one volume, slice ``i``'s voxels counted ``weights[i]`` times: the
    full range's Dice estimated from a :class:`ValidationSample` (with weights 1, the plain volume Dice). NaN when
    both masks are empty."""
    predicted, truth = predicted.astype(bool), truth.astype(bool)
    overlap = np.count_nonzero(predicted & truth, axis=(1, 2))
    sizes = np.count_nonzero(predicted, axis=(1, 2)) + np.count_nonzero(truth, axis=(1, 2))
    total = float(np.dot(weights, sizes))
    return 2.0 * float(np.dot(weights, overlap)) / total if total else float("nan")


def attach_paired(
    volumes: list[PreparedVolume],
    cases: list[CasePaths],
    folder: str | Path,
    spacing_mm: tuple[float, float],
    normalise: Callable[[np.ndarray], np.ndarray],
) -> None:
    """Give each prepared volume the image of the same name in ``folder``, prepared the same way.

    Raises :class:`InputError` when a case has no image there or the image is not on the case's grid.
    """
    available = {stem_of(path): path for path in list_volumes(Path(folder))} if Path(folder).is_dir() else {}
    for volume, case in zip(volumes, cases):
        path = available.get(case.name)
        if path is None:
            raise InputError(f"no paired image for case {case.name} in {folder}")
        if not same_geometry(read_volume(case.image), read_volume(path), tolerance=1e-3):
            raise InputError(f"paired image {path.name} is not on the grid of case {case.name}")
        volume.paired = prepare_volume(CasePaths(case.name, path, None), spacing_mm, normalise, is_ct=False).image


def split_cases(cases: list[CasePaths], fraction: float, seed: int) -> tuple[list[CasePaths], list[CasePaths]]:
    """Split into (training, validation) with ``round(fraction * n)`` validation cases (at least one when
    ``fraction > 0`` and there are two or more cases), reproducibly for ``seed``."""
    if fraction <= 0 or len(cases) < 2:
        return list(cases), []
    count = min(len(cases) - 1, max(1, round(fraction * len(cases))))
    order = np.random.default_rng(seed).permutation(len(cases))
    validation = sorted(order[:count])
    return [c for i, c in enumerate(cases) if i not in set(validation)], [cases[i] for i in validation]


class PatchSampler:
    """Draws random training patches from prepared volumes.

    With probability ``tumour_fraction`` a patch is centred near a tumour voxel (jittered by up to a quarter
    patch, so the patch holds tumour together with the mediastinum or chest wall around it); otherwise it is
    centred on the body in a random slice.

    Args:
        volumes: prepared volumes (with labels for supervised sampling).
        patch_size: side of the square patches in pixels.
        tumour_fraction: share of patches centred near tumour.
        augment: augmentation settings, or None for none.
        rng: the random generator (its state is part of a run's checkpoint).
    """

    def __init__(
        self,
        volumes: list[PreparedVolume],
        patch_size: int,
        tumour_fraction: float,
        augment: AugmentConfig | None,
        rng: np.random.Generator,
    ) -> None:
        if not volumes:
            raise TrainingError("no training volumes")
        self.volumes = volumes
        self.patch_size = patch_size
        self.tumour_fraction = tumour_fraction
        self.augment = augment
        self.rng = rng
        self._with_tumour = [v for v in volumes if len(v.tumour_slices)]

    def sample(self) -> tuple[np.ndarray, np.ndarray, bool]:
        """One ``(1, P, P)`` float32 image patch (``(2, P, P)`` with the paired image's patch as channel 1 when
        the volumes carry one), its ``(P, P)`` int64 label patch, and whether the case has a label (an
        unlabelled case gives an all-background label that must not be trained on)."""
        rng = self.rng
        if self._with_tumour and rng.random() < self.tumour_fraction:
            volume = self._with_tumour[rng.integers(len(self._with_tumour))]
            z = int(volume.tumour_slices[rng.integers(len(volume.tumour_slices))])
            rows, cols = np.nonzero(volume.label[z])
            pick = rng.integers(len(rows))
            jitter = rng.integers(-self.patch_size // 4, self.patch_size // 4 + 1, size=2)
            centre = (int(rows[pick] + jitter[0]), int(cols[pick] + jitter[1]))
        else:
            volume = self.volumes[rng.integers(len(self.volumes))]
            z = int(volume.context_slices[rng.integers(len(volume.context_slices))])
            centre = self._body_centre(volume.image[z])
        image = crop_centered(volume.image[z].astype(np.float32), centre, self.patch_size, BACKGROUND)
        if volume.paired is not None:
            paired = crop_centered(volume.paired[z].astype(np.float32), centre, self.patch_size, BACKGROUND)
            image = np.stack([image, paired])
        if volume.label is not None:
            label = crop_centered(volume.label[z], centre, self.patch_size, 0)
        else:
            label = np.zeros(image.shape, dtype=np.uint8)
        if self.augment is not None:
            image, label = augment_pair(image, label, rng, self.augment)
        image = image if image.ndim == 3 else image[None]
        return image.astype(np.float32), label.astype(np.int64), volume.label is not None

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``size`` patches: images ``(size, 1, P, P)`` float32, labels ``(size, P, P)`` int64 and a
        ``(size,)`` bool tensor telling which samples come from labelled cases."""
        images, labels, labelled = zip(*(self.sample() for _ in range(size)))
        return torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(labels)), torch.tensor(labelled)

    def _body_centre(self, image: np.ndarray) -> tuple[int, int]:
        """A random point near the centre of the body in one slice (anything denser than lung)."""
        body = image > BACKGROUND + 0.5
        rows, cols = np.nonzero(body)
        if len(rows) == 0:
            return image.shape[0] // 2, image.shape[1] // 2
        jitter = self.rng.integers(-self.patch_size // 4, self.patch_size // 4 + 1, size=2)
        return int(rows.mean() + jitter[0]), int(cols.mean() + jitter[1])


def draw_batch(
    samplers: dict[str, PatchSampler], domains: tuple[str, ...], size: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """One batch per domain (``images, labels, labelled``, as :meth:`PatchSampler.batch` gives them).

    Domain ``paired_mr`` has no sampler of its own: it is channel 1 of the CT sampler's patches (the paired
    image cut at the same place and augmented with the same transform), split off here so that every domain's
    images are ``(size, 1, P, P)``.
    """
    batch = {}
    for domain in domains:
        if domain == "paired_mr":
            continue
        images, labels, labelled = samplers[domain].batch(size)
        if images.shape[1] > 1:
            batch["paired_mr"] = (images[:, 1:], labels, labelled)
            images = images[:, :1]
        batch[domain] = (images, labels, labelled)
    if "paired_mr" in domains and "paired_mr" not in batch:
        raise TrainingError("the teacher needs paired images, but the CT training volumes carry none")
    return batch
