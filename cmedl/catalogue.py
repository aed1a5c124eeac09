"""The models a user can pick by name: the built-in demo model, or any model file by path.

``cmedl segment --model M`` accepts a catalogue name or a path to a model file.
"""

from __future__ import annotations

from pathlib import Path

from cmedl.errors import ModelFileError

BUILTIN_DEMO = "demo"
_RESOURCES = Path(__file__).resolve().parents[1] / "Resources"
BUILTIN_MODELS = {BUILTIN_DEMO: _RESOURCES / "Models" / "cmedl-demo-unet.safetensors"}


def builtin_model_path(name: str = BUILTIN_DEMO) -> Path:
    """Path of a built-in model file; raises :class:`ModelFileError` when the file is not installed."""
    path = BUILTIN_MODELS[name]
    if not path.is_file():
        raise ModelFileError(f"the built-in model {name!r} is not installed (expected {path})")
    return path


def resolve_model(name_or_path: str | None) -> Path:
    """A model file path for a catalogue name, a file path, or None (the built-in demo model)."""
    if not name_or_path:
        return builtin_model_path()
    if name_or_path in BUILTIN_MODELS:
        return builtin_model_path(name_or_path)
    path = Path(name_or_path)
    if not path.exists():
        known = ", ".join(sorted(BUILTIN_MODELS))
        raise ModelFileError(f"no model named {name_or_path!r} and no such file (known names: {known})")
    return path
