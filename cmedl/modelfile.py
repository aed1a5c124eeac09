"""Model files: safetensors weights with a JSON model card in the file's metadata.

A model file holds the student network's weights (no pickle anywhere, so opening a model file cannot run
code) and, in the safetensors header metadata under ``cmedl.model_card``, the model card: what the network
is, how its input must be prepared, what its labels mean, what it was trained on, how well it did, and
what it may be used for. Everything inference needs to rebuild and run the network is in the card.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from cmedl.errors import ConfigError, ModelFileError

# The format is defined once, beside the torch-free card reader that Slicer uses before torch is installed.
from cmedl.filebase import CARD_KEY, FORMAT_KEY, FORMAT_NAME, file_sha256
from cmedl.modelcard import (
    ModelCard,
    _existing,
    read_model_card,
)
from cmedl.volumes import atomic_output

FORMAT_VERSION = 1

TRANSLATOR_KIND = "translator"
#: Every network of a CMEDL run's translator (both generators and both discriminators), for fine-tuning.
CYCLEGAN_KIND = "cyclegan"


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
    # A training run that diverged can export NaN weights; such a network answers NaN everywhere, which
    # thresholds into an empty segmentation that looks like a confident "no tumour".
    broken = [name for name, tensor in state.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if broken:
        raise ModelFileError(
            f"{path.name}: {len(broken)} weight tensor{'s' if len(broken) != 1 else ''} hold NaN or infinite values "
            f"(first: {broken[0]}); the model is damaged or its training diverged"
        )
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ModelFileError(
            f"{path.name}: the weights do not match architecture {card.architecture!r} "
            f"{card.architecture_options} ({_state_dict_problem(error)})"
        ) from None


def _state_dict_problem(error: RuntimeError) -> str:
    """The first concrete mismatch of a failed ``load_state_dict``.

    torch's message starts with a generic line ("Error(s) in loading state_dict for UNet:"); the next line
    names the offending tensor and shapes, which is what tells a user the card and weights disagree.
    """
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if len(lines) > 1:
        return lines[1]
    return lines[0] if lines else type(error).__name__
