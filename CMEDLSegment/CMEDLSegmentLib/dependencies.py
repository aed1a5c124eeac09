"""The Python packages the engine needs inside Slicer, and installing them after one confirmation.

Slicer bundles numpy and SimpleITK; torch comes from the PyTorch extension (PyTorchUtils picks the build
that matches the GPU); the rest comes from PyPI. Nothing here runs at import time: packages are checked
and installed only when the user first presses Apply or Start.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
from pathlib import Path

MINIMUM_TORCH = "2.2"
# The extension's requirements; CMake installs module resources beside the Lib packages, as in the source tree.
REQUIREMENTS_FILE = Path(__file__).resolve().parents[1] / "Resources" / "CMEDLRequirements.txt"

_REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:>=\s*([0-9][0-9A-Za-z.]*))?\s*$")


def read_requirements(path: str | Path) -> list[str]:
    """The requirement lines of a requirements file (``name`` or ``name>=version``; comments dropped)."""
    lines = []
    for raw in Path(path).read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            if not _REQUIREMENT.match(line):
                raise ValueError(f"{Path(path).name}: only 'name' or 'name>=version' lines are used, got {line!r}")
            lines.append(line)
    return lines


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("."):
        digits = re.match(r"\d+", piece)
        if not digits:
            break
        parts.append(int(digits.group()))
    return tuple(parts)


def missing_requirements(requirements: list[str]) -> list[str]:
    """The requirements that are not installed, or installed below their minimum version."""
    missing = []
    for requirement in requirements:
        match = _REQUIREMENT.match(requirement)
        if match is None:
            raise ValueError(f"unsupported requirement {requirement!r}")
        name, minimum = match.groups()
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(requirement)
            continue
        if minimum and _version_tuple(installed) < _version_tuple(minimum):
            missing.append(requirement)
    return missing


def torch_installed() -> bool:
    return importlib.util.find_spec("torch") is not None


def ensure_dependencies(requirements_path: str | Path = REQUIREMENTS_FILE, requester: str = "CMEDL") -> bool:
    """Inside Slicer: install what is missing after one confirmation; False when the user declined.

    Raises ``RuntimeError`` with a one-line message when an installation fails or needs the PyTorch
    extension first.
    """
    import slicer

    requirements = read_requirements(requirements_path)
    missing = missing_requirements(requirements)
    need_torch = not torch_installed()
    if not missing and not need_torch:
        return True
    listing = ([f"PyTorch >= {MINIMUM_TORCH} (through the PyTorch extension)"] if need_torch else []) + missing
    if not slicer.util.confirmOkCancelDisplay(
        f"{requester} needs Python packages that are not installed yet. Install them now? "
        "This can take several minutes (PyTorch is a large download).",
        windowTitle=f"{requester}: install Python packages",
        detailedText="\n".join(listing),
    ):
        return False
    if need_torch:
        _install_torch()
    if missing:
        _install_packages(missing, requester)
    return True


def _install_torch() -> None:
    try:
        import PyTorchUtils
    except ImportError:
        raise RuntimeError(
            "the PyTorch extension is not installed: install 'PyTorch' from the Extensions Manager and restart Slicer"
        ) from None
    torch_logic = PyTorchUtils.PyTorchUtilsLogic()
    if torch_logic.torchInstalled():
        return
    torch = torch_logic.installTorch(askConfirmation=False, torchVersionRequirement=f">={MINIMUM_TORCH}")
    if torch is None:
        raise RuntimeError("PyTorch could not be installed; see the Python console for pip's output")


def _install_packages(missing: list[str], requester: str) -> None:
    import slicer

    ensure = None
    for module_name in ("slicer.pydeps", "slicer.packaging"):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        ensure = getattr(module, "pip_ensure", None)
        if ensure is not None:
            break
    if ensure is not None:
        from packaging.requirements import Requirement

        # The user already confirmed the whole list once; the restart prompt stays Slicer's.
        ensure([Requirement(line) for line in missing], prompt_install=False, requester=requester)
        return
    slicer.util.pip_install(" ".join(missing))
