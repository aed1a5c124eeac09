"""Model files: safetensors weights with a JSON model card in the file's metadata.

A model file holds the student network's weights (no pickle anywhere, so opening a model file cannot run
code) and, in the safetensors header metadata under ``cmedl.model_card``, the model card: what the network
is, how its input must be prepared, what its labels mean, what it was trained on, how well it did, and
what it may be used for. Everything inference needs to rebuild and run the network is in the card.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from cmedl import __version__

# The header keys live beside the torch-free header reader that GUIs use, so they are defined once.
from cmedl.catalogue import CARD_KEY, FORMAT_KEY, FORMAT_NAME, check_card_values
from cmedl.errors import ConfigError, ModelFileError
from cmedl.volumes import SegmentInfo, atomic_output

FORMAT_VERSION = 1

TRANSLATOR_KIND = "translator"
#: Every network of a CMEDL run's translator (both generators and both discriminators), for fine-tuning.
CYCLEGAN_KIND = "cyclegan"
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


@dataclass
class LoadedModel:
    network: torch.nn.Module
    card: ModelCard
    path: Path
    sha256: str


class PseudoMRIModel(torch.nn.Module):
    """The CT->MR generator and the MRI teacher of one CMEDL run, saved together as a translator file."""

    def __init__(self, generator: torch.nn.Module, teacher: torch.nn.Module) -> None:
        super().__init__()
        self.generator = generator
        self.teacher = teacher


def save_translator(path: str | Path, generator: torch.nn.Module, teacher: torch.nn.Module, card: ModelCard) -> Path:
    """Write a CMEDL run's generator and teacher as one model file of kind ``translator``.

    ``card.architecture`` names the translator, ``card.training["teacher"]`` the teacher's architecture.
    """
    card.kind = TRANSLATOR_KIND
    return save_model(path, PseudoMRIModel(generator, teacher), card)


def save_cyclegan(path: str | Path, translator: torch.nn.Module, card: ModelCard) -> Path:
    """Write every network of a CMEDL run's translator (generators and discriminators) as one model file.

    ``cmedl translate`` needs only the CT->MR generator (:func:`save_translator`); this file lets a fine-tuning
    run (``cmedl train --init RUN``) take over the whole translator from safetensors rather than a pickle.
    """
    card.kind = CYCLEGAN_KIND
    return save_model(path, translator, card)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_model(path: str | Path, network: torch.nn.Module, card: ModelCard) -> Path:
    """Write ``network``'s weights and ``card`` to a safetensors model file (atomically)."""
    state = {name: tensor.detach().to("cpu").contiguous() for name, tensor in network.state_dict().items()}
    # Tied or shared storage cannot be saved by safetensors; cloning breaks the sharing.
    state = {name: tensor.clone() for name, tensor in state.items()}
    metadata = {
        FORMAT_KEY: f"{FORMAT_NAME}/{FORMAT_VERSION}",
        CARD_KEY: json.dumps(card.to_dict(), sort_keys=True),
    }
    path = Path(path)
    with atomic_output(path) as temp:
        save_file(state, str(temp), metadata=metadata)
    return path


def read_model_card(path: str | Path) -> ModelCard:
    """The model card of a model file, read from its header only (the weights are not loaded)."""
    path = _existing(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise ModelFileError(
            f"{path.name} is not a readable model file (truncated or not safetensors): {error}"
        ) from None
    if not metadata.get(FORMAT_KEY, "").startswith(FORMAT_NAME) or CARD_KEY not in metadata:
        raise ModelFileError(f"{path.name} is a safetensors file but not a CMEDL model (no model card)")
    try:
        data = json.loads(metadata[CARD_KEY])
    except json.JSONDecodeError:
        raise ModelFileError(f"{path.name} has a damaged model card") from None
    if not isinstance(data, dict):
        raise ModelFileError(f"{path.name} has a damaged model card (not a JSON object)")
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


def load_model(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild the network described by the model card and load its weights, in eval mode on ``device``."""
    from cmedl.nets import build_segmentor

    path = _existing(path)
    card = read_model_card(path)
    if card.kind != "segmentor":
        raise ModelFileError(f"{path.name} holds a {card.kind} model, not a tumour segmentation model")
    if not isinstance(card.architecture_options, dict):
        raise ModelFileError(f"{path.name} has a damaged model card (architecture_options is not a JSON object)")
    try:
        network = build_segmentor(
            card.architecture, in_channels=card.in_channels, num_classes=card.num_classes, **card.architecture_options
        )
    except (ConfigError, TypeError, ValueError) as error:
        raise ModelFileError(
            f"{path.name}: the model card names an architecture this engine cannot build: {error}"
        ) from None
    load_weights(path, network, card)
    network.eval().to(device)
    return LoadedModel(network=network, card=card, path=path, sha256=file_sha256(path))


def check_model_file(path: str | Path) -> ModelCard:
    """Refuse a segmentation model file that could not be used, before anything relies on it.

    Reads and checks the model card (:func:`read_model_card`), builds the network it names on the CPU and
    loads the weights into it, so an unknown architecture or weights of the wrong shapes are a
    :class:`ModelFileError` now (``cmedl models add`` calls it), not at segment time. Returns the card.
    """
    return load_model(path, "cpu").card


def load_weights(path: str | Path, network: torch.nn.Module, card: ModelCard) -> None:
    """Load a model file's weights into ``network`` (built from ``card``); a mismatch is a ModelFileError."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            state = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise ModelFileError(f"{path.name}: the weights cannot be read (truncated file?): {error}") from None
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ModelFileError(
            f"{path.name}: the weights do not match architecture {card.architecture!r} "
            f"{card.architecture_options} ({_state_dict_problem(error)})"
        ) from None


def describe_model(path: str | Path) -> dict[str, Any]:
    """What ``cmedl info`` prints: the model card plus file facts (sha256, size, parameter count)."""
    path = _existing(path)
    card = read_model_card(path)
    parameters = 0
    try:
        with safe_open(str(path), framework="pt") as handle:
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


def _state_dict_problem(error: RuntimeError) -> str:
    """The first concrete mismatch of a failed ``load_state_dict``.

    torch's message starts with a generic line ("Error(s) in loading state_dict for UNet:"); the next line
    names the offending tensor and shapes, which is what tells a user the card and weights disagree.
    """
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if len(lines) > 1:
        return lines[1]
    return lines[0] if lines else type(error).__name__


def _numel(shape: list[int]) -> int:
    count = 1
    for extent in shape:
        count *= int(extent)
    return count


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file not found: {path}")
    if path.stat().st_size < 8:
        raise ModelFileError(f"{path.name} is not a readable model file (truncated: {path.stat().st_size} bytes)")
    return path
