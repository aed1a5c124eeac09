"""Frozen VGG16 feature extractor for the contextual loss, without torchvision.

The CMEDL paper computes the contextual loss on the features "after Conv7, Conv8 and Conv9" of an
ImageNet-trained VGG16. Counting VGG16's convolutions, these are conv3_3, conv4_1 and conv4_2, i.e. the
indices 14, 17 and 19 of torchvision's ``vgg16().features`` (reference/method_notes.md section 3.2). The
paper gives their sizes as 64x64x256, 64x64x256 and 32x32x512 for a 256x256 input; conv4_1 follows the third
max pool, so by the layer count it is 32x32x512 (as is conv4_2), which is what this module produces.

:class:`VGG16Features` rebuilds that ``features`` stack up to a chosen index with torchvision's module
order, so its ``state_dict`` keys are torchvision's own (``features.0.weight`` ... ``features.19.bias``) and
the published weights file ``vgg16-397923af.pth`` loads into it directly.

Weights come from :func:`load_vgg16_features`: a user-given file, the torch hub cache (downloading the
torchvision file once when the network allows it), or an explicitly requested random initialisation.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from cmedl.errors import ConfigError

__all__ = [
    "CONV_INDICES",
    "DEFAULT_LAYERS",
    "OFFLINE_ENV",
    "VGG16_FILE_NAME",
    "VGG16_URL",
    "VGG16Features",
    "load_vgg16_features",
    "vgg16_cache_dir",
]

# torchvision's VGG16 (configuration "D"): five blocks of 3x3 convolutions (each followed by a ReLU), each block
# closed by a 2x2 max pool
_VGG16_BLOCKS: tuple[tuple[int, ...], ...] = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))

#: torchvision feature indices of the 13 convolutions (conv1_1 = 0 ... conv5_3 = 28)
CONV_INDICES: tuple[int, ...] = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
#: the paper's Conv7, Conv8, Conv9 = conv3_3, conv4_1, conv4_2
DEFAULT_LAYERS: tuple[int, ...] = (14, 17, 19)
#: the torchvision ImageNet VGG16 weights, as torch hub names and stores them
VGG16_FILE_NAME = "vgg16-397923af.pth"
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
#: set this environment variable to 1 to forbid the download attempt (offline machines, tests, CI)
OFFLINE_ENV = "CMEDL_OFFLINE"

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_LAST_INDEX = 30  # the final max pool of vgg16().features


class VGG16Features(nn.Module):
    """VGG16's ``features`` stack up to and including index ``last_index``, frozen and in eval mode.

    The layers sit in ``self.features`` (an ``nn.Sequential``) in torchvision's order, so the state dict
    keys are ``features.<index>.weight`` / ``features.<index>.bias`` exactly as in ``vgg16().state_dict()``.
    ReLUs are not in-place, so the output of a convolution stays intact when the ReLU after it runs.

    ``forward(x, layers)`` returns the output of the module at each torchvision index in ``layers``. The
    default ``(14, 17, 19)`` takes the raw **convolution outputs** (pre-ReLU) of conv3_3, conv4_1 and
    conv4_2: the paper names convolution layers, and the pre-ReLU responses keep the negative half of each
    filter's response, so no channel vector is clipped to zero before the cosine distances of the contextual
    loss. The ReLU outputs are available too: pass ``(15, 18, 20)`` (with ``last_index >= 20``).

    At a 256x256 input: index 14 -> ``(B, 256, 64, 64)``; 17 and 19 -> ``(B, 512, 32, 32)``.

    Parameters never require gradients and the module stays in eval mode (``train()`` is a no-op), but
    gradients do flow through it to the input image, which is how the contextual loss trains the generator.

    Attributes:
        weights_source: where the weights came from (a path, ``"torch-hub"``, ``"random"`` or ``"none"``
            before loading); the training run records it in the model card.
    """

    def __init__(self, last_index: int = 19) -> None:
        super().__init__()
        if isinstance(last_index, bool) or not isinstance(last_index, int) or not 0 <= last_index <= _LAST_INDEX:
            raise ConfigError(f"VGG16 last_index must be an integer in 0..{_LAST_INDEX}, got {last_index!r}")
        layers: list[nn.Module] = []
        channels = 3
        for block in _VGG16_BLOCKS:
            for width in block:
                layers += [nn.Conv2d(channels, width, kernel_size=3, padding=1), nn.ReLU(inplace=False)]
                channels = width
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        self.features = nn.Sequential(*layers[: last_index + 1])
        self.last_index = last_index
        self.weights_source = "none"
        # not persistent: the state dict keeps torchvision's key set and nothing else
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.reset_parameters()
        self.requires_grad_(False)
        super().train(False)

    def reset_parameters(self) -> None:
        """Random initialisation as torchvision does it (Kaiming normal, fan-out, ReLU gain; zero biases)."""
        for module in self.features:
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)

    def train(self, mode: bool = True) -> VGG16Features:
        """Stay in eval mode: the network is a fixed feature extractor."""
        return super().train(False)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """Map engine images ``(B, 1 or 3, H, W)`` in ``[-1, 1]`` to ImageNet-normalised ``(B, 3, H, W)``."""
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"VGG16Features expects (B, 1, H, W) or (B, 3, H, W) images, got {tuple(x.shape)}")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # grey -> RGB, the way ImageNet grey images look
        x = (x + 1.0) * 0.5  # [-1, 1] -> [0, 1], the range torchvision's normalisation assumes
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def forward(self, x: torch.Tensor, layers: Sequence[int] = DEFAULT_LAYERS) -> list[torch.Tensor]:
        """Features of ``x`` at the torchvision indices ``layers``, in the order given.

        Args:
            x: ``(B, 1, H, W)`` (or 3-channel) images in ``[-1, 1]``.
            layers: indices into ``features`` (each ``<= last_index``); the output of that module is returned.

        Returns:
            A list of ``(B, C_l, H_l, W_l)`` tensors, one per entry of ``layers``.
        """
        wanted = self.check_layers(layers)
        h = self.normalise(x)
        outputs: dict[int, torch.Tensor] = {}
        for index, module in enumerate(self.features):
            if index > max(wanted):
                break  # nothing deeper is needed
            h = module(h)
            if index in wanted:
                outputs[index] = h
        return [outputs[index] for index in wanted]

    def check_layers(self, layers: Sequence[int]) -> tuple[int, ...]:
        """Return ``layers`` as a tuple after checking each is an index of this stack; ConfigError otherwise."""
        try:
            wanted = tuple(int(index) for index in layers)
        except (TypeError, ValueError):
            raise ConfigError(f"VGG16 layers must be a list of integer indices, got {layers!r}") from None
        bad = [index for index in wanted if not 0 <= index <= self.last_index]
        if not wanted or bad:
            raise ConfigError(
                f"VGG16 layer indices must lie in 0..{self.last_index} (conv3_3=14, conv4_1=17, conv4_2=19), "
                f"got {list(layers)!r}"
            )
        return wanted


def vgg16_cache_dir() -> Path:
    """The folder where torch hub keeps downloaded weights (``$TORCH_HOME/hub/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict from a torch.save file (no pickled code: weights_only) or a safetensors file."""
    if not path.is_file():
        raise ConfigError(f"VGG16 weights file not found: {path}")
    readers = ["safetensors", "torch"] if path.suffix == ".safetensors" else ["torch", "safetensors"]
    errors = []
    for reader in readers:
        try:
            if reader == "torch":
                state = torch.load(path, map_location="cpu", weights_only=True)
            else:
                from safetensors.torch import load_file

                state = load_file(str(path), device="cpu")
        except Exception as error:  # each reader reports its own failure type; try the next
            errors.append(f"{reader}: {_first_line(error)}")
            continue
        if not isinstance(state, dict):
            raise ConfigError(f"VGG16 weights file {path} holds a {type(state).__name__}, not a state dict")
        return state
    raise ConfigError(f"cannot read VGG16 weights from {path} ({'; '.join(errors)})")


def _load_into(model: VGG16Features, state: dict, source: str) -> None:
    """Copy the ``features.*`` tensors of a torchvision-named VGG16 state dict into ``model``."""
    # a state dict of a bare ``features`` Sequential ("0.weight") is accepted as well
    if not any(str(key).startswith("features.") for key in state):
        state = {f"features.{key}": value for key, value in state.items()}
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    if missing:
        shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        raise ConfigError(f"VGG16 weights {source} lack the feature key(s) {shown}; expected a VGG16 state dict")
    selected = {}
    for key, reference in expected.items():
        value = state[key]
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(reference.shape):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ConfigError(
                f"VGG16 weights {source}: {key} has shape {shape}, expected {tuple(reference.shape)}; "
                "is this a VGG16 (not VGG19 or a batch-norm variant)?"
            )
        selected[key] = value.to(reference.dtype)
    model.load_state_dict(selected, strict=True)


def load_vgg16_features(
    weights: str | os.PathLike | None, last_index: int = 19, download: bool | None = None
) -> VGG16Features:
    """Build a frozen :class:`VGG16Features` and give it weights.

    Args:
        weights: one of
            * a path to a saved VGG16 state dict with torchvision's key names (``features.N.weight``;
              ``classifier.*`` entries are ignored), written by ``torch.save`` (read with
              ``weights_only=True``, so no code is unpickled) or as a safetensors file;
            * ``"random"``: a randomly initialised network (tests, offline experiments; the caller records
              this deviation from the paper);
            * ``None``: the ImageNet weights from torch hub's cache, ``vgg16_cache_dir()/vgg16-397923af.pth``;
              when absent they are downloaded there once (hash checked), unless downloading is off.
        last_index: deepest torchvision index to build (19 = conv4_2).
        download: whether ``weights=None`` may try the download; ``None`` means yes unless the environment
            variable ``CMEDL_OFFLINE`` is ``1`` (set it on offline machines to fail at once).

    Raises:
        ConfigError: unreadable file, missing or misshapen feature keys, or (``weights=None``) no cached
            file and no download; the message names ``--vgg-weights PATH``, the cache folder and
            ``--vgg-weights random``.
    """
    model = VGG16Features(last_index)
    if isinstance(weights, str) and weights == "random":
        model.weights_source = "random"
        return model
    if weights is not None:
        path = Path(weights).expanduser()
        _load_into(model, _read_state_dict(path), str(path))
        model.weights_source = str(path)
        return model

    cache_dir = vgg16_cache_dir()
    cached = cache_dir / VGG16_FILE_NAME
    if cached.is_file():
        _load_into(model, _read_state_dict(cached), str(cached))
        model.weights_source = "torch-hub"
        return model
    reason = "downloading is switched off"
    if download is None:
        download = os.environ.get(OFFLINE_ENV, "").strip().lower() not in ("1", "true", "yes")
        reason = f"{OFFLINE_ENV}=1 forbids the download"
    if download:
        try:
            state = torch.hub.load_state_dict_from_url(
                VGG16_URL, map_location="cpu", progress=False, check_hash=True, weights_only=True
            )
        except Exception as error:  # no network, proxy, hash mismatch, disk: all end in the same advice
            reason = f"download failed: {_first_line(error)}"
        else:
            _load_into(model, state, VGG16_URL)
            model.weights_source = "torch-hub"
            return model
    raise ConfigError(
        f"no ImageNet VGG16 weights for the contextual loss ({reason}): pass --vgg-weights PATH "
        f"(a saved VGG16 state dict) or place {VGG16_FILE_NAME} in {cache_dir}; "
        "--vgg-weights random uses an untrained VGG16 instead (recorded as a deviation)"
    )
