"""Training configuration: every value a run uses, with defaults, parsing and validation.

A configuration is a flat dataclass so that any value can be set from the command line
(``--set key=value``), from a JSON file (``--config FILE``) or from the Slicer panel, and so that the
resolved configuration saved in a run folder is one readable JSON object.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cmedl.errors import ConfigError

METHODS = ("ct_only", "cmedl")
TEACHER_INPUTS = ("pseudo_mr", "paired_mr")


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
      learns from its segmentation losses only (the teacher guides, as in hint learning). With True, both
      segmentors can lower L_hint by agreeing on features that carry no tumour information: on phantoms (small
      benchmark preset, 2,000 steps, one seed) L_hint fell from 1.2 to 0.02 within 400 steps while L_seg^CT stayed
      at 0.97 and the student never learned (best validation Dice 0.02); with False the same run reached 0.38.
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
    tumour_patch_fraction: float = 0.7
    augment: bool = True
    lr_segmentor: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.999)
    weight_decay: float = 0.0
    early_stopping_patience: int = 10
    validation_max_cases: int = 8
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
    device: str = "auto"
    amp: str = "auto"
    name: str = ""
    license: str = "Apache-2.0"

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

    def validate(self) -> TrainConfig:
        """Raise :class:`ConfigError` naming the first inconsistent value."""
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if not self.ct:
            raise ConfigError("no CT folder given (--ct DIR with images/ and labels/)")
        if self.method == "cmedl" and not self.mr:
            raise ConfigError("method cmedl needs an MRI folder (--mr DIR)")
        if not self.out:
            raise ConfigError("no run folder given (--out RUN)")
        positive = ("epochs", "iterations_per_epoch", "batch_size", "patch_size", "early_stopping_patience")
        for key in positive:
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be at least 1, got {getattr(self, key)}")
        if self.patch_size % 32:
            raise ConfigError(f"patch_size must be a multiple of 32, got {self.patch_size}")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ConfigError(f"validation_fraction must be in [0, 1), got {self.validation_fraction}")
        if not 0.0 <= self.tumour_patch_fraction <= 1.0:
            raise ConfigError(f"tumour_patch_fraction must be in [0, 1], got {self.tumour_patch_fraction}")
        if min(self.spacing_mm) <= 0:
            raise ConfigError(f"spacing_mm must be positive, got {self.spacing_mm}")
        if self.hu_window[0] >= self.hu_window[1]:
            raise ConfigError(f"hu_window must be (low, high) with low < high, got {self.hu_window}")
        if self.hint_reduction not in ("mean", "sum"):
            raise ConfigError(f"hint_reduction must be mean or sum, got {self.hint_reduction!r}")
        if self.hint_start_epoch < 0:
            raise ConfigError(f"hint_start_epoch must be 0 or more, got {self.hint_start_epoch}")
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
        return self


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
    except (TypeError, ValueError):
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
            "the teacher with it (with it on, both segmentors agreed on features and the student did not learn "
            "on phantoms)"
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
