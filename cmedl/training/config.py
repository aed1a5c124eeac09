"""Training configuration: every value a run uses, with defaults, parsing and validation.

A configuration is a flat dataclass so that any value can be set from the command line
(``--set key=value``), from a JSON file (``--config FILE``) or from the Slicer panel, and so that the
resolved configuration saved in a run folder is one readable JSON object.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cmedl.devices import DEFAULT_DEVICE, DEVICES, is_device_name
from cmedl.errors import ConfigError
from cmedl.filebase import CARD_SPACING_RANGE_MM, CARD_WIDTH_RANGE
from cmedl.memory import describe_bytes
from cmedl.training.choices import METHODS, SEGMENTORS

TEACHER_INPUTS = ("pseudo_mr", "paired_mr")
# The values that name files or folders. A new run stores them absolute (TrainConfig.with_absolute_paths), so that
# its config.json means the same data from any working directory: --resume, CMEDL Train and torchrun workers
# started elsewhere read the files the run was started with.
PATH_KEYS = ("ct", "mr", "validation", "paired_mr", "vgg_weights", "init")
TRANSLATORS = ("cyclegan",)

# Ranges a run can use at all; memory is checked separately (memory_problem), against the machine.
RANGES: dict[str, tuple[int, int]] = {
    "epochs": (1, 1_000_000),
    "iterations_per_epoch": (1, 10_000_000),
    "batch_size": (1, 4096),
    "patch_size": (32, 4096),
    "early_stopping_patience": (1, 1_000_000),
    "validation_max_cases": (1, 100_000),
    "validation_slices_per_case": (0, 1_000_000),
    "pool_size": (0, 100_000),
    "cx_max_positions": (1, 100_000_000),
    "hint_start_epoch": (0, 1_000_000),
    "freeze_encoder_epochs": (0, 1_000_000),
    "warmup_epochs": (0, 1_000_000),
    "seed": (0, 2**63 - 1),
    "label_value": (1, 2**31 - 1),
}
# Network options that set a width: model cards are held to the same range (cmedl.catalogue), and a huge
# value would allocate gigabytes before failing.
WIDTH_OPTIONS = ("base_channels", "growth_rate", "stem_channels")
# Rough bytes of activations and gradients one training step keeps per patch pixel and per unit of width (fp32,
# forward and backward, measured on the CPU at 128x128 patches): the segmentors by their width option and its
# default, the CycleGAN translator (two generators and a discriminator) and the VGG16 of the contextual loss.
_SEGMENTOR_BYTES = {"unet": (170, "base_channels", 64), "mrrn": (480, "base_channels", 32),
                    "densefcn": (1000, "growth_rate", 16)}  # fmt: skip
_TRANSLATOR_BYTES_PER_WIDTH = 260
_VGG_BYTES = 3000


@dataclass
class TrainConfig:
    """Everything one training run needs.

    Data: ``ct`` (and ``mr`` for CMEDL) are folders holding ``images/`` and ``labels/`` with matching file names.
    Geometry: slices are resampled in-plane to ``spacing_mm`` (x, y) and cut into ``patch_size`` square patches.

    CMEDL values the paper leaves open, with the defaults chosen here:

    - ``hint_reduction``: ``mean`` (mean squared difference per feature element, summed over the two hint
      layers) rather than the literal squared Frobenius norm (``sum``) of eq. 2; with lambda_hint = 1 the sum
      over a 64x256x256 feature map outweighs the Dice terms by orders of magnitude.
    - ``hint_to_generator``, ``seg_pm_to_generator``: True, following the paper's update rules (the generators
      minimise lambda_hint*L_hint + lambda_seg*L_seg).
    - ``hint_to_teacher``: False: the hint loss trains the student toward the teacher's features, and the teacher
      learns from its segmentation losses only (the teacher guides, as in hint learning). With True (the paper's
      update rule) both segmentors lower L_hint by moving toward each other. Measured with an oracle teacher
      input (benchmarks/cmedl_vs_ct_only.py, 3 seeds, 24 test phantoms at -8 HU, each arm against its
      lambda_hint = 0 twin): False raises the fraction of tumours found by 0.146 (p = 0.0003) and
      juxta-mediastinal tumour Dice by 0.102 (p = 0.002); True loses both gains (+0.062, p = 0.11; +0.006,
      p = 0.95). With the real translator neither rule helps (2-3 seeds; benchmarks/README.md).
    - ``hint_start_epoch``: 0, the hint loss is on from the first epoch as in the paper. N > 0 keeps its weight at 0
      for the first N epochs (it is still computed and logged), so that the translator and the teacher can learn
      before the student is pulled toward the teacher's features.
    - ``segmentor_seg_weight``: 1, the weight of the Dice terms in the segmentor update, which follows the paper's
      update rule literally (the segmentors descend the gradient of L_hint + L_seg). Its total loss, with
      lambda_seg = 5 beside lambda_hint = 1, would give 5; both readings are defensible, 1 is the paper's rule.
    - ``teacher_input``: ``pseudo_mr`` (CMEDL). ``paired_mr`` is an experiment, not a training method: the teacher
      sees the real MRI of each training CT's own anatomy (``paired_mr`` folder: one MRI per CT image, same file
      name, same grid), which exists only for phantoms; no translator is trained. It bounds what the hint
      mechanism can pass on when the translation is perfect.
    - ``lambda_identity``: 0 (the paper lists no identity term).
    - learning rates constant for the first ``1 - lr_decay_fraction`` of the epochs, then linear decay to 0
      (the CycleGAN schedule).
    - ``cx_max_positions``: the contextual loss compares at most this many randomly sampled feature positions.
    - MRI intensities are scaled to [-1, 1] between 0 and the ``mr_percentile`` percentile of each volume.

    Fine-tuning (:mod:`cmedl.training.finetune`): ``init`` names a model file, a catalogue name or a run folder
    whose weights the networks start from (empty: random weights, training from scratch). The architecture then
    comes from the model's card; :func:`cmedl.training.finetune.apply_init` fills it in, with the card's patch size,
    spacing and HU window and a tenth of the learning rate unless given. ``freeze_encoder_epochs``: the student's
    encoder (:meth:`cmedl.nets.Segmentor.encoder_parameters`) keeps a learning rate of 0 for the first N epochs,
    so the decoder adapts before the pretrained features move (it needs ``init``). ``warmup_epochs``: every
    learning rate rises linearly over the first N epochs (1/(N+1), 2/(N+1), ... of its value), then follows the
    usual schedule.

    Validation (after every epoch, on rank 0): the student segments up to ``validation_max_cases`` held-out CTs
    (``validation``, or a ``validation_fraction`` of ``ct``) and the score is their mean 3D Dice over the slices
    from the first to the last lung or tumour slice. ``validation_slices_per_case``: each case is scored on a
    fixed sample of at most this many of those slices, half of them (at least one) tumour slices and the rest
    spread over the other slices, drawn once from the run's ``seed`` so that every epoch and every resume scores
    the same slices; each slice is weighted by the slices it stands for, so the score estimates the Dice of the
    whole range (:func:`cmedl.training.data.validation_sample`). The default 6 keeps validation within about a
    fifth of an epoch's training on a CPU in the CPU preset of ``benchmarks/cmedl_vs_ct_only.py`` (6 cases, 125
    iterations: 15-20%; 8 slices took 21-26%) and in the README's example (2 cases, 50 iterations: 15%);
    ``benchmarks/validation_cost.py`` measures it. 0 scores every slice, which there cost 1.5 to 1.8 times the
    epoch's training. ``validation_overlap``: how much the validation tiles (training-size patches) overlap.

    ``cache_volumes``: True keeps every case as prepared for training (reoriented, resampled to ``spacing_mm``,
    normalised) in the run folder's ``cache/volumes``, so that a resumed or restarted run reads it back instead of
    preparing the case again (:mod:`cmedl.training.volume_cache`); an entry is used only while the case's files
    and these settings are unchanged. It changes no result, only the time to the first step, and a run may be
    resumed with another value.

    Precision and layout: ``amp`` ``auto`` trains in the precision the hardware computes natively
    (:func:`cmedl.devices.autocast_dtype`): bf16 autocast on a GPU with bf16 (else fp16, with loss scaling) and on
    a CPU with AVX512-BF16 or AMX, fp32 on other CPUs, where bf16 is emulated and several times slower; ``off``
    is fp32 everywhere, ``bf16``/``fp16`` force one. Training keeps the NCHW layout on every device: channels_last
    speeds up inference but slowed the training step on a CPU (the convolutions' backward pass;
    ``benchmarks/train_step_time.py --memory-formats``, benchmarks/README.md).
    """

    method: str = "ct_only"
    ct: str = ""
    mr: str = ""
    out: str = ""
    validation: str = ""
    validation_fraction: float = 0.2
    segmentor: str = "unet"
    segmentor_options: dict[str, Any] = field(default_factory=dict)
    epochs: int = 50
    iterations_per_epoch: int = 100
    batch_size: int = 2
    patch_size: int = 256
    spacing_mm: tuple[float, float] = (1.0, 1.0)
    hu_window: tuple[float, float] = (-1000.0, 500.0)
    # The label value that marks tumour; every other voxel of a label file must be 0 (see cmedl.training.data).
    label_value: int = 1
    tumour_patch_fraction: float = 0.7
    augment: bool = True
    lr_segmentor: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.999)
    weight_decay: float = 0.0
    early_stopping_patience: int = 10
    validation_max_cases: int = 8
    # Slices scored per validation case, a fixed sample (0: every slice); see the class docstring.
    validation_slices_per_case: int = 6
    validation_overlap: float = 0.25
    # CMEDL (method "cmedl"): translator, teacher and hint distillation. Defaults are the paper's (section III.A.3).
    translator: str = "cyclegan"
    translator_options: dict[str, Any] = field(default_factory=dict)
    lr_translator: float = 1e-4
    gan_mode: str = "lsgan"
    pool_size: int = 50
    lambda_adv: float = 1.0
    lambda_cyc: float = 10.0
    lambda_cx: float = 1.0
    lambda_hint: float = 1.0
    lambda_seg: float = 5.0
    lambda_identity: float = 0.0
    use_cx: bool = True
    use_cycle: bool = True
    use_seg_rm: bool = True
    use_seg_pm: bool = True
    hint_reduction: str = "mean"
    hint_to_teacher: bool = False
    hint_start_epoch: int = 0
    hint_to_generator: bool = True
    seg_pm_to_generator: bool = True
    segmentor_seg_weight: float = 1.0
    teacher_input: str = "pseudo_mr"
    paired_mr: str = ""
    lr_decay_fraction: float = 0.5
    vgg_weights: str = ""
    cx_band_width: float = 0.5
    cx_max_positions: int = 4225
    mr_percentile: float = 99.5
    seed: int = 0
    device: str = DEFAULT_DEVICE
    amp: str = "auto"
    name: str = ""
    license: str = "Apache-2.0"
    # Fine-tuning (see the class docstring); the defaults train from scratch as before.
    init: str = ""
    freeze_encoder_epochs: int = 0
    warmup_epochs: int = 0
    # Keep prepared volumes in RUN/cache/volumes (see the class docstring); results are the same either way.
    cache_volumes: bool = True

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        unknown = sorted(set(data) - set(cls.field_names()))
        if unknown:
            raise ConfigError(f"unknown configuration key(s): {', '.join(unknown)}")
        config = cls()
        for key, value in data.items():
            setattr(config, key, _coerce(key, value, getattr(config, key)))
        return config

    @classmethod
    def from_file(cls, path: str | Path) -> TrainConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"configuration file not found: {path}") from None
        except json.JSONDecodeError as error:
            raise ConfigError(f"configuration file {path.name} is not valid JSON: {error}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"configuration file {path.name} must hold one JSON object")
        return cls.from_dict(data)

    def with_overrides(self, assignments: list[str]) -> TrainConfig:
        """Apply ``key=value`` strings; values are parsed as JSON when they parse, else taken as text."""
        config = dataclasses.replace(self)
        for assignment in assignments:
            key, sep, text = assignment.partition("=")
            key = key.strip()
            if not sep:
                raise ConfigError(f"--set expects key=value, got {assignment!r}")
            if key not in self.field_names():
                raise ConfigError(f"unknown configuration key {key!r}")
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                value = text
            setattr(config, key, _coerce(key, value, getattr(config, key)))
        return config

    def with_absolute_paths(self) -> TrainConfig:
        """A copy whose :data:`PATH_KEYS` values are absolute, taken relative to the current directory (``~``
        expanded; symbolic links kept, so the path stays the one the user gave).

        Left as they are: empty values, ``vgg_weights`` ``random``, and an ``init`` that names no existing file or
        folder (a catalogue name, or a missing path that :func:`cmedl.training.finetune.resolve_init` reports).
        """
        changes = {}
        for key in PATH_KEYS:
            value = getattr(self, key)
            if not value or (key == "vgg_weights" and value == "random"):
                continue
            path = Path(value).expanduser()
            if key == "init" and not path.exists():
                continue
            if not path.is_absolute() or str(path) != value:
                changes[key] = os.path.abspath(path)
        return dataclasses.replace(self, **changes)

    def relative_paths_in_use(self) -> dict[str, str]:
        """The :data:`PATH_KEYS` values this configuration reads that are relative paths (``key: value``): they
        mean different files from another working directory. ``init`` is left out: a relative name there may be a
        catalogue name, and a resumed run does not read it."""
        used = ["ct", "validation"]
        if self.method == "cmedl":
            used += ["mr", "paired_mr" if self.teacher_input == "paired_mr" else "vgg_weights"]
        found = {}
        for key in used:
            value = getattr(self, key)
            if value and value != "random" and not Path(value).expanduser().is_absolute():
                found[key] = value
        return found

    def validate(self) -> TrainConfig:
        """Raise :class:`ConfigError` naming the first inconsistent value.

        Every number must be finite and within its range (:data:`RANGES`, and the checks below); names must be
        known. Whether a batch fits in memory depends on the machine: :meth:`memory_problem`.
        """
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if not self.ct:
            raise ConfigError("no CT folder given (--ct DIR with images/ and labels/)")
        if self.method == "cmedl" and not self.mr:
            raise ConfigError("method cmedl needs an MRI folder (--mr DIR)")
        if not self.out:
            raise ConfigError("no run folder given (--out RUN)")
        if self.segmentor not in SEGMENTORS:
            raise ConfigError(f"unknown segmentor {self.segmentor!r}; choose one of {', '.join(SEGMENTORS)}")
        if self.method == "cmedl" and self.translator not in TRANSLATORS:
            raise ConfigError(f"unknown translator {self.translator!r}; choose one of {', '.join(TRANSLATORS)}")
        if not is_device_name(self.device):
            raise ConfigError(f"unknown device {self.device!r}; choose one of {', '.join(DEVICES)} (or cuda:N)")
        for key, (low, high) in RANGES.items():
            value = getattr(self, key)
            if value < low:
                raise ConfigError(f"{key} must be {'0 or more' if low == 0 else f'at least {low}'}, got {value}")
            if value > high:
                raise ConfigError(f"{key} must be at most {high:,}, got {value}")
        if self.patch_size % 32:
            raise ConfigError(f"patch_size must be a multiple of 32, got {self.patch_size}")
        for key in ("lr_segmentor", "lr_translator"):
            _check_number(key, getattr(self, key), low=0.0, low_open=True)
        _check_number("weight_decay", self.weight_decay, low=0.0)
        if len(self.betas) != 2 or not all(math.isfinite(beta) and 0.0 <= beta < 1.0 for beta in self.betas):
            raise ConfigError(f"betas must be two numbers in [0, 1) (Adam's decay rates), got {list(self.betas)}")
        for key in ("lambda_adv", "lambda_cyc", "lambda_cx", "lambda_hint", "lambda_seg", "lambda_identity"):
            _check_number(key, getattr(self, key), low=0.0)
        _check_number("validation_fraction", self.validation_fraction, low=0.0, high=1.0, high_open=True)
        _check_number("tumour_patch_fraction", self.tumour_patch_fraction, low=0.0, high=1.0)
        # Above 0.9 the tiles of a slice multiply without changing the result.
        _check_number("validation_overlap", self.validation_overlap, low=0.0, high=0.9)
        _check_number("cx_band_width", self.cx_band_width, low=0.0, low_open=True)
        _check_number("mr_percentile", self.mr_percentile, low=0.0, high=100.0, low_open=True)
        low, high = CARD_SPACING_RANGE_MM
        if len(self.spacing_mm) != 2 or not all(math.isfinite(v) and low <= v <= high for v in self.spacing_mm):
            raise ConfigError(f"spacing_mm must be two values from {low:g} to {high:g} mm, got {list(self.spacing_mm)}")
        if len(self.hu_window) != 2 or not all(math.isfinite(v) for v in self.hu_window):
            raise ConfigError(f"hu_window must be two finite HU values, got {list(self.hu_window)}")
        if self.hu_window[0] >= self.hu_window[1]:
            raise ConfigError(f"hu_window must be (low, high) with low < high, got {list(self.hu_window)}")
        for key in ("segmentor_options", "translator_options"):
            _check_network_options(key, getattr(self, key))
        if self.hint_reduction not in ("mean", "sum"):
            raise ConfigError(f"hint_reduction must be mean or sum, got {self.hint_reduction!r}")
        if self.gan_mode not in ("lsgan", "vanilla"):
            raise ConfigError(f"gan_mode must be lsgan or vanilla, got {self.gan_mode!r}")
        if not 0.0 <= self.lr_decay_fraction <= 1.0:
            raise ConfigError(f"lr_decay_fraction must be in [0, 1], got {self.lr_decay_fraction}")
        if self.method == "cmedl" and not (self.use_seg_rm or self.use_seg_pm or self.lambda_hint > 0):
            raise ConfigError("method cmedl with no teacher loss (use_seg_rm, use_seg_pm and lambda_hint all off)")
        if not (self.segmentor_seg_weight > 0 and math.isfinite(self.segmentor_seg_weight)):
            raise ConfigError(f"segmentor_seg_weight must be a positive number, got {self.segmentor_seg_weight}")
        if self.teacher_input not in TEACHER_INPUTS:
            raise ConfigError(f"teacher_input must be one of {', '.join(TEACHER_INPUTS)}, got {self.teacher_input!r}")
        if self.teacher_input == "paired_mr" and self.method == "cmedl" and not self.paired_mr:
            raise ConfigError("teacher_input paired_mr needs a paired_mr folder (one MRI per CT image, same name)")
        if self.amp not in ("auto", "off", "bf16", "fp16"):
            raise ConfigError(f"amp must be auto, off, bf16 or fp16, got {self.amp!r}")
        if self.freeze_encoder_epochs > 0 and not self.init:
            # A frozen encoder of random weights would only hold the decoder back.
            raise ConfigError("freeze_encoder_epochs needs init (a model or run folder whose encoder is kept)")
        return self

    def memory_estimate_bytes(self, half_precision: bool = False) -> int:
        """A rough figure for the memory one training step needs: activations and gradients of every network
        trained (and of the VGG16 of the contextual loss) for one batch of patches. Meant to refuse sizes that
        cannot fit long before they are allocated, not to plan a run to the last megabyte."""
        per_width, option, default = _SEGMENTOR_BYTES.get(self.segmentor, _SEGMENTOR_BYTES["unet"])
        width = _width(self.segmentor_options, option, default)
        per_pixel = per_width * width
        if self.method == "cmedl":
            per_pixel *= 2  # teacher and student
            if self.teacher_input != "paired_mr":
                per_pixel += _TRANSLATOR_BYTES_PER_WIDTH * _width(self.translator_options, "base_channels", 64)
                if self.use_cx and self.lambda_cx > 0:
                    per_pixel += _VGG_BYTES
        if half_precision:
            per_pixel /= 2
        return int(self.batch_size * self.patch_size**2 * per_pixel)

    def memory_problem(self, available_bytes: int | None, where: str, half_precision: bool = False) -> str:
        """Why a training step cannot fit in ``available_bytes`` (one line naming ``where``: "RAM", "cuda:0"),
        or ``""`` (also when the available memory is not known)."""
        estimate = self.memory_estimate_bytes(half_precision)
        if available_bytes is None or estimate <= available_bytes:
            return ""
        return (
            f"batch_size {self.batch_size} with {self.patch_size}x{self.patch_size} patches needs about "
            f"{describe_bytes(estimate)} for one {self.method} training step ({self.segmentor}), more than the "
            f"{describe_bytes(available_bytes)} free in {where}; lower batch_size or patch_size"
        )


def _check_number(
    key: str,
    value: float,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Refuse a value that is not finite or outside its interval (open ends excluded), naming ``key``."""
    fine = math.isfinite(value)
    if fine and low is not None:
        fine = value > low if low_open else value >= low
    if fine and high is not None:
        fine = value < high if high_open else value <= high
    if fine:
        return
    if low is not None and high is not None:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ConfigError(f"{key} must be a finite number in {interval}, got {value}")
    if low is not None:
        bound = "positive" if low_open and low == 0 else f"{'above' if low_open else 'at least'} {low:g}"
        raise ConfigError(f"{key} must be {bound} and finite, got {value}")
    raise ConfigError(f"{key} must be a finite number, got {value}")


def _check_network_options(key: str, options: dict[str, Any]) -> None:
    """Widths within :data:`CARD_WIDTH_RANGE` and every number finite; the networks check the rest."""
    low, high = CARD_WIDTH_RANGE
    for name, value in options.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key} {name} must be a finite number, got {value}")
        integer = isinstance(value, int) and not isinstance(value, bool)
        if name in WIDTH_OPTIONS and not (integer and low <= value <= high):
            raise ConfigError(f"{key} {name} must be an integer from {low} to {high}, got {value!r}")


def _width(options: dict[str, Any], name: str, default: int) -> int:
    value = options.get(name, default)
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Convert ``value`` to the type of ``default`` (tuples from lists, numbers from text)."""
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if isinstance(default, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if isinstance(default, float):
            return float(value)
        if isinstance(default, tuple):
            items = value if isinstance(value, (list, tuple)) else str(value).replace(",", " ").split()
            if len(items) != len(default):
                raise ValueError(value)
            return tuple(type(d)(v) for d, v in zip(default, items))
        if isinstance(default, dict):
            if not isinstance(value, dict):
                raise ValueError(value)
            return dict(value)
        if isinstance(default, str):
            return "" if value is None else str(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: int(inf)
        raise ConfigError(f"invalid value for {key}: {value!r}") from None
    return value


def paper_deviations(config: TrainConfig) -> list[str]:
    """Where a CMEDL configuration departs from the paper (Jiang et al., IEEE TMI 2022), one line each.

    Written into every CMEDL model card (``training.deviations``) so that a reader of a model knows what was
    trained. The reasons and the measurements behind the defaults are in the class docstring and the
    benchmarks README.
    """
    if config.method != "cmedl":
        return []
    found = []
    if not config.hint_to_teacher:
        found.append(
            "hint_to_teacher=false: the hint loss trains the student only; the paper's update rule also trains "
            "the teacher with it (on phantoms with an oracle teacher input that rule lost the hint's gain in "
            "tumour detection, +0.146 with false against +0.062 with true, each over its hint-free twin)"
        )
    if config.hint_reduction == "mean":
        found.append("hint_reduction=mean: mean squared feature difference instead of the squared Frobenius norm")
    if config.vgg_weights == "random" and config.use_cx and config.lambda_cx > 0:
        found.append("contextual loss computed on a randomly initialised VGG16, not ImageNet weights")
    if config.teacher_input != "pseudo_mr":
        found.append(f"teacher_input={config.teacher_input}: the teacher sees the paired real MRI (phantoms only)")
    if config.segmentor_seg_weight != 1.0:
        found.append(f"segmentor_seg_weight={config.segmentor_seg_weight:g}: Dice terms reweighted (paper's rule: 1)")
    if config.hint_start_epoch > 0:
        found.append(f"hint_start_epoch={config.hint_start_epoch}: no hint loss for the first epochs")
    for key, paper in (("lambda_adv", 1.0), ("lambda_cyc", 10.0), ("lambda_cx", 1.0), ("lambda_hint", 1.0),
                       ("lambda_seg", 5.0)):  # fmt: skip
        if getattr(config, key) != paper:
            found.append(f"{key}={getattr(config, key):g} (paper: {paper:g})")
    for key in ("use_cx", "use_cycle", "use_seg_rm", "use_seg_pm", "hint_to_generator", "seg_pm_to_generator"):
        if not getattr(config, key):
            found.append(f"{key}=false (paper: on)")
    if config.lambda_identity > 0:
        found.append(f"lambda_identity={config.lambda_identity:g}: identity term the paper does not use")
    return found
