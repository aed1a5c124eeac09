"""The model card: what a model file says about its network, read without torch.

:class:`ModelCard` is the card as the engine uses it; :func:`read_model_card` reads it from a model file's
safetensors header and checks it, and :func:`describe_model` adds the file's facts (sha256, size, parameter
count from the header's tensor shapes). Nothing here imports torch, so ``cmedl info`` and the Slicer panels can
read a card before torch is installed; writing and loading weights is :mod:`cmedl.modelfile`'s.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from cmedl import __version__
from cmedl.errors import ModelFileError
from cmedl.filebase import card_from_metadata, check_card_values, file_sha256, missing_model_file
from cmedl.volumes import SegmentInfo

RESEARCH_USE_ONLY = "research use only; not for clinical decisions"
#: model card keys written only when set (lineage of fine-tuned models)
OPTIONAL_CARD_KEYS = ("parent", "fine_tuned_on")


@dataclass
class LabelInfo:
    """One output class of the network (class 0 is background and is not listed)."""

    value: int
    name: str
    color: tuple[float, float, float]
    terminology: str

    def segment_info(self) -> SegmentInfo:
        return SegmentInfo(
            name=self.name, label_value=self.value, color=tuple(self.color), terminology=self.terminology
        )


def default_labels() -> list[LabelInfo]:
    tumour = SegmentInfo()
    return [LabelInfo(value=1, name=tumour.name, color=tumour.color, terminology=tumour.terminology)]


@dataclass
class ModelCard:
    """What a model file says about its network.

    Attributes:
        architecture: segmentor name for :func:`cmedl.nets.build_segmentor` (``unet``, ``densefcn``, ``mrrn``).
        architecture_options: keyword options passed to the builder (JSON values).
        in_channels / num_classes: network input channels and output classes (background included).
        hu_window: (low, high) HU; the input is clipped to it and scaled linearly to [-1, 1].
        spacing_mm: (x, y) in-plane pixel spacing in mm the network was trained at.
        patch_size: side in pixels of the square patches the network was trained on.
        parent: for a fine-tuned model, the model it started from: ``name``, ``sha256`` and ``source`` (the
            file it was read from; ``run`` too when that was a run folder). None for a model trained from scratch.
        fine_tuned_on: for a fine-tuned model, the data it was fine-tuned on (``ct_folder`` and case counts).

    ``parent`` and ``fine_tuned_on`` are left out of :meth:`to_dict` while None, so the cards of models trained
    from scratch read exactly as before, and older engines, which ignore unknown keys, read the new ones.
    """

    name: str
    architecture: str
    architecture_options: dict[str, Any] = field(default_factory=dict)
    kind: str = "segmentor"
    in_channels: int = 1
    num_classes: int = 2
    method: str = "ct_only"
    hu_window: tuple[float, float] = (-1000.0, 500.0)
    spacing_mm: tuple[float, float] = (1.0, 1.0)
    patch_size: int = 256
    labels: list[LabelInfo] = field(default_factory=default_labels)
    training_data: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    engine_version: str = __version__
    license: str = "Apache-2.0"
    intended_use: str = RESEARCH_USE_ONLY
    description: str = ""
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    parent: dict[str, Any] | None = None
    fine_tuned_on: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in OPTIONAL_CARD_KEYS:
            if data[key] is None:
                del data[key]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelCard:
        known = {f for f in cls.__dataclass_fields__}
        missing = {"name", "architecture"} - set(data)
        if missing:
            raise ModelFileError(f"model card lacks {', '.join(sorted(missing))}")
        values = {key: value for key, value in data.items() if key in known}
        values["labels"] = [LabelInfo(**label) for label in data.get("labels", [])] or default_labels()
        for key in ("hu_window", "spacing_mm"):
            if key in values:
                values[key] = tuple(float(v) for v in values[key])
        for label in values["labels"]:
            label.color = tuple(label.color)
        return cls(**values)

    def segment_infos(self) -> list[SegmentInfo]:
        return [label.segment_info() for label in self.labels]


def read_model_card(path: str | Path) -> ModelCard:
    """The model card of a model file, read from its header only (the weights are not loaded)."""
    path = _existing(path)
    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise ModelFileError(
            f"{path.name} is not a readable model file (truncated or not safetensors): {error}"
        ) from None
    data = card_from_metadata(metadata, path.name)
    # Values inference cannot use (an empty HU window, patch size 0, a million channels) are refused here,
    # as one line, rather than failing later inside numpy or torch.
    check_card_values(data, path.name)
    try:
        return ModelCard.from_dict(data)
    except ModelFileError as error:
        raise ModelFileError(f"{path.name}: {error}") from None
    except (TypeError, ValueError, AttributeError) as error:
        # A card with fields of the wrong shape (a label without a name, a window that is not two numbers).
        raise ModelFileError(f"{path.name} has a damaged model card ({_first_line(error)})") from None


def describe_model(path: str | Path) -> dict[str, Any]:
    """What ``cmedl info`` prints: the model card plus file facts (sha256, size, parameter count)."""
    path = _existing(path)
    card = read_model_card(path)
    parameters = 0
    try:
        with safe_open(str(path), framework="numpy") as handle:
            for name in handle.keys():
                if not name.endswith(("running_mean", "running_var", "num_batches_tracked")):
                    parameters += _numel(handle.get_slice(name).get_shape())
    except (SafetensorError, OSError, ValueError) as error:
        raise ModelFileError(f"{path.name}: the weights cannot be read (truncated file?): {error}") from None
    return {
        "file": str(path),
        "sha256": file_sha256(path),
        "size_bytes": path.stat().st_size,
        "parameters": parameters,
        "model_card": card.to_dict(),
    }


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _numel(shape: list[int]) -> int:
    count = 1
    for extent in shape:
        count *= int(extent)
    return count


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(missing_model_file(path))
    if path.stat().st_size < 8:
        raise ModelFileError(f"{path.name} is not a readable model file (truncated: {path.stat().st_size} bytes)")
    return path
