"""The Python packages the engine needs inside Slicer, and installing them after one confirmation.

Slicer bundles numpy and SimpleITK; torch comes from the PyTorch extension (PyTorchUtils picks the build
that matches the GPU); the rest comes from PyPI (``Resources/CMEDLRequirements.txt``, floors only). Nothing
here runs at import time: packages are checked and installed only when the user first presses Apply or Start.

Every way an installation can fail (pip's non-zero exit, which Slicer's ``pip_install``, ``pip_ensure`` and
PyTorchUtils raise as ``subprocess.CalledProcessError``; a launcher that cannot be started; the PyTorch
extension missing) becomes one :class:`DependencyError` with a one-line message for a message box.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

MINIMUM_TORCH = "2.2"
# Installed beside this file by the extension's CMakeLists.txt, as in the source tree.
REQUIREMENTS_FILE = Path(__file__).resolve().parent / "Resources" / "CMEDLRequirements.txt"

_REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:>=\s*([0-9][0-9A-Za-z.+-]*))?\s*$")

VersionLookup = Callable[[str], str]


class DependencyError(RuntimeError):
    """An installation failed or cannot be made; the message is one line a user can act on."""


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


def version_at_least(installed: str, minimum: str) -> bool:
    """Whether version ``installed`` is ``minimum`` or newer.

    Slicer bundles ``packaging`` (its own package tools use it), which orders pre-releases and local builds
    such as ``2.3.0+cu121`` correctly; without it the leading numbers are compared.
    """
    try:
        from packaging.version import InvalidVersion, Version
    except ImportError:
        return _numbers(installed) >= _numbers(minimum)
    try:
        return Version(installed) >= Version(minimum)
    except InvalidVersion:
        return _numbers(installed) >= _numbers(minimum)


def _numbers(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("+", 1)[0].split("."):
        digits = re.match(r"\d+", piece)
        if not digits:
            break
        parts.append(int(digits.group()))
    return tuple(parts)


def missing_requirements(requirements: list[str], version_of: VersionLookup = importlib.metadata.version) -> list[str]:
    """The requirements that are not installed, or installed below their minimum version."""
    missing = []
    for requirement in requirements:
        match = _REQUIREMENT.match(requirement)
        if match is None:
            raise ValueError(f"unsupported requirement {requirement!r}")
        name, minimum = match.groups()
        try:
            installed = version_of(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(requirement)
            continue
        if minimum and not version_at_least(installed, minimum):
            missing.append(requirement)
    return missing


def installed_torch(version_of: VersionLookup = importlib.metadata.version) -> str | None:
    """The installed torch version, or None (read from the package metadata: importing torch takes seconds)."""
    try:
        return version_of("torch")
    except importlib.metadata.PackageNotFoundError:
        return None


def torch_problem(version_of: VersionLookup = importlib.metadata.version) -> str:
    """Why the installed torch cannot be used (``""`` when it can): missing, or older than the minimum."""
    version = installed_torch(version_of)
    if version is None:
        return f"PyTorch >= {MINIMUM_TORCH} (through the PyTorch extension)"
    if not version_at_least(version, MINIMUM_TORCH):
        return f"PyTorch >= {MINIMUM_TORCH} (through the PyTorch extension; {version} is installed)"
    return ""


def missing_packages(
    requirements_path: str | Path = REQUIREMENTS_FILE, version_of: VersionLookup = importlib.metadata.version
) -> list[str]:
    """Everything the engine still needs, torch first, as lines a user reads (empty: all is there)."""
    torch = torch_problem(version_of)
    return ([torch] if torch else []) + missing_requirements(read_requirements(requirements_path), version_of)


def self_test_skip_reason(
    requester: str,
    requirements_path: str | Path = REQUIREMENTS_FILE,
    version_of: VersionLookup = importlib.metadata.version,
) -> str:
    """Why a self-test cannot run here (``""`` when it can): the packages it needs, and how to get them.

    Slicer's tests run in its testing mode, where nothing is installed; a missing package skips the test.
    """
    missing = "; ".join(missing_packages(requirements_path, version_of))
    return f"Python packages are missing ({missing}): press {requester} once to install them" if missing else ""


def ensure_dependencies(
    requirements_path: str | Path = REQUIREMENTS_FILE,
    requester: str = "CMEDL",
    confirm: Callable[[str, str, str], bool] | None = None,
    install_torch: Callable[[str], None] | None = None,
    install_packages: Callable[[list[str], str], None] | None = None,
    version_of: VersionLookup = importlib.metadata.version,
) -> bool:
    """Inside Slicer: install what is missing after one confirmation; False when the user declined.

    ``confirm(message, title, details)``, ``install_torch(requirement)`` and ``install_packages(lines,
    requester)`` default to Slicer's dialog, PyTorchUtils and Slicer's pip functions.

    Raises:
        DependencyError: an installation failed, the PyTorch extension is missing, or torch is still too
            old afterwards (one line; pip's own output is in Slicer's Python console).
    """
    requirements = read_requirements(requirements_path)
    missing = missing_requirements(requirements, version_of)
    torch = torch_problem(version_of)
    if not missing and not torch:
        return True
    listing = ([torch] if torch else []) + missing
    if not (confirm or _confirm)(
        f"{requester} needs Python packages that are not installed yet. Install them now? "
        "This can take several minutes (PyTorch is a large download).",
        f"{requester}: install Python packages",
        "\n".join(listing),
    ):
        return False
    torch_loaded = "torch" in sys.modules
    steps = []
    if torch:
        steps.append(("PyTorch", lambda: (install_torch or _install_torch)(f">={MINIMUM_TORCH}")))
    if missing:
        steps.append((", ".join(missing), lambda: (install_packages or _install_packages)(missing, requester)))
    for what, step in steps:
        try:
            step()
        except subprocess.CalledProcessError as error:
            hint = " (PyTorch is loaded in this session: restart Slicer and try again)" if torch_loaded else ""
            raise DependencyError(
                f"installing {what} failed: pip ended with exit code {error.returncode}{hint}; "
                "its output is in the Python console"
            ) from None
        except OSError as error:
            raise DependencyError(f"installing {what} failed: {error.strerror or error}") from None
    still = torch_problem(version_of)
    if still:
        raise DependencyError(f"{still} is still needed after the installation; see the Python console")
    return True


def _confirm(message: str, title: str, details: str) -> bool:
    import slicer

    return bool(slicer.util.confirmOkCancelDisplay(message, windowTitle=title, detailedText=details))


def _install_torch(requirement: str) -> None:
    """Install or upgrade torch through PyTorchUtils (it picks the CUDA build that matches the driver)."""
    try:
        import PyTorchUtils
    except ImportError:
        raise DependencyError(
            "the PyTorch extension is not installed: install 'PyTorch' from the Extensions Manager and restart Slicer"
        ) from None
    # Not skipped when torchInstalled(): an installed torch may be older than the requirement, and
    # light-the-torch upgrades it to one that meets it.
    torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False, torchVersionRequirement=requirement)
    if torch is None:
        raise DependencyError("PyTorch could not be installed; see the Python console for pip's output")


def _install_packages(missing: list[str], requester: str) -> None:
    """``slicer.packaging.pip_ensure`` where Slicer has it (5.12 on), else ``slicer.util.pip_install``."""
    try:
        packaging = importlib.import_module("slicer.packaging")
    except ImportError:
        packaging = None
    if packaging is not None and hasattr(packaging, "pip_ensure"):
        # The user already confirmed the whole list once; the restart prompt stays Slicer's.
        packaging.pip_ensure(missing, prompt_install=False, requester=requester)
        return
    import slicer

    slicer.util.pip_install(" ".join(missing))
