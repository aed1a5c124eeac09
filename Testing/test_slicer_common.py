"""CMEDLCommon, the Slicer-side helpers both modules import: installing packages, user settings, the engine's
python, and stopping a child process on timer ticks. None of it needs Qt or a Slicer application."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


class Store:
    """A QSettings stand-in: ``value``/``setValue`` over a dict, values kept as Qt keeps them (text)."""

    def __init__(self) -> None:
        self.values: dict[str, str] = {}

    def value(self, key: str, default=None):
        return self.values.get(key, default)

    def setValue(self, key: str, value) -> None:  # noqa: N802 -- Qt's name
        self.values[key] = str(value)


def versions(**installed: str):
    """A metadata lookup that knows only ``installed`` (package -> version)."""

    def version_of(name: str) -> str:
        key = name.lower().replace("-", "_")
        for package, version in installed.items():
            if package.lower().replace("-", "_") == key:
                return version
        raise importlib.metadata.PackageNotFoundError(name)

    return version_of


EVERYTHING = {"torch": "2.5.1", "safetensors": "0.4.5", "scikit-image": "0.24.0", "scipy": "1.14.1",
              "psutil": "6.1.0", "pillow": "11.0.0"}  # fmt: skip


def requirements(tmp_path: Path) -> Path:
    path = tmp_path / "requirements.txt"
    path.write_text("safetensors>=0.4\nscikit-image>=0.21  # for lungs\nscipy>=1.10\n", encoding="utf-8")
    return path


# -- installing packages (defects 1 and 8) ---------------------------------------------------------------


def test_the_shipped_requirements_are_floors_and_installed_here() -> None:
    from CMEDLCommon.dependencies import REQUIREMENTS_FILE, missing_requirements, read_requirements

    assert REQUIREMENTS_FILE == ROOT / "CMEDLCommon" / "Resources" / "CMEDLRequirements.txt"
    shipped = read_requirements(REQUIREMENTS_FILE)
    assert {line.split(">=")[0] for line in shipped} >= {"safetensors", "scikit-image", "scipy", "psutil"}
    assert all(">=" in line for line in shipped), "floors only, never exact pins"
    assert missing_requirements(shipped) == [], "the test environment has everything the modules ask for"


def test_a_failed_pip_run_becomes_one_message_not_a_traceback(tmp_path: Path) -> None:
    """Defect 1: Slicer's pip_install, pip_ensure and PyTorchUtils raise CalledProcessError on pip's failure."""
    from CMEDLCommon.dependencies import DependencyError, ensure_dependencies

    def pip_fails(lines: list[str], requester: str) -> None:
        raise subprocess.CalledProcessError(1, ["PythonSlicer", "-m", "pip", "install", *lines])

    asked = []
    with pytest.raises(DependencyError, match=r"installing scipy>=1.10 failed: pip ended with exit code 1") as caught:
        ensure_dependencies(
            requirements(tmp_path), confirm=lambda *question: asked.append(question) or True,
            install_packages=pip_fails, version_of=versions(**{k: v for k, v in EVERYTHING.items() if k != "scipy"}),
        )  # fmt: skip
    assert "\n" not in str(caught.value) and "Python console" in str(caught.value)
    assert len(asked) == 1 and asked[0][2] == "scipy>=1.10", "one confirmation listing what is missing"

    def launcher_missing(requirement: str) -> None:
        raise FileNotFoundError(2, "No such file or directory")

    with pytest.raises(DependencyError, match="installing PyTorch failed: No such file or directory"):
        ensure_dependencies(requirements(tmp_path), confirm=lambda *question: True, install_torch=launcher_missing,
                            version_of=versions(**{k: v for k, v in EVERYTHING.items() if k != "torch"}))  # fmt: skip


def test_nothing_is_asked_when_everything_is_there_and_a_refusal_installs_nothing(tmp_path: Path) -> None:
    from CMEDLCommon.dependencies import ensure_dependencies

    def never(*arguments) -> None:
        raise AssertionError("nothing may be installed")

    assert ensure_dependencies(requirements(tmp_path), confirm=never, install_torch=never, install_packages=never,
                               version_of=versions(**EVERYTHING))  # fmt: skip
    assert not ensure_dependencies(requirements(tmp_path), confirm=lambda *question: False, install_torch=never,
                                   install_packages=never, version_of=versions(scipy="1.14"))  # fmt: skip


def test_a_torch_older_than_the_minimum_is_upgraded_not_accepted(tmp_path: Path) -> None:
    """Defect 8: only the presence of torch used to be checked."""
    from CMEDLCommon.dependencies import (
        MINIMUM_TORCH,
        DependencyError,
        ensure_dependencies,
        missing_packages,
        torch_problem,
    )

    old = {**EVERYTHING, "torch": "2.0.1+cu117"}
    assert "2.0.1+cu117 is installed" in torch_problem(versions(**old))
    assert torch_problem(versions(**EVERYTHING)) == ""
    assert missing_packages(requirements(tmp_path), versions(**old))[0].startswith(f"PyTorch >= {MINIMUM_TORCH}")
    installed = dict(old)
    requested = []

    def upgrade(requirement: str) -> None:
        requested.append(requirement)
        installed["torch"] = "2.5.1"

    # The lookup reads ``installed`` at each call, so it sees the upgrade.
    assert ensure_dependencies(requirements(tmp_path), confirm=lambda *question: True, install_torch=upgrade,
                               version_of=lambda name: versions(**installed)(name))  # fmt: skip
    assert requested == [f">={MINIMUM_TORCH}"]
    # An installation that leaves the old torch in place is reported, not taken for a success.
    with pytest.raises(DependencyError, match="is still needed after the installation"):
        ensure_dependencies(requirements(tmp_path), confirm=lambda *question: True, install_torch=lambda req: None,
                            version_of=versions(**old))  # fmt: skip


def test_versions_are_compared_as_versions() -> None:
    from CMEDLCommon.dependencies import _numbers, version_at_least

    assert version_at_least("2.10.0", "2.2") and not version_at_least("2.1.2", "2.2")
    assert version_at_least("2.2.0+cpu", "2.2") and not version_at_least("2.2.0rc1", "2.2.0")
    assert _numbers("2.10.1+cu121") == (2, 10, 1) and _numbers("2.2.0rc1") == (2, 2, 0)


def test_a_self_test_is_skipped_with_the_reason_when_a_package_is_missing(tmp_path: Path) -> None:
    """Defect 11: the self-tests failed without safetensors or scikit-image; they skip with this reason now."""
    from CMEDLCommon.dependencies import self_test_skip_reason

    assert self_test_skip_reason("Apply", requirements(tmp_path), versions(**EVERYTHING)) == ""
    reason = self_test_skip_reason("Apply", requirements(tmp_path), versions(torch="2.5.1", scipy="1.14"))
    assert "safetensors>=0.4" in reason and "scikit-image>=0.21" in reason and "press Apply once" in reason


# -- user settings and the engine's python ---------------------------------------------------------------


def test_user_settings_live_under_the_module_prefix() -> None:
    from CMEDLCommon.settings import UserSettings

    store = Store()
    settings = UserSettings("CMEDL/Segment/", store)
    assert settings.text("model", "demo") == "demo" and settings.flag("autoSegment") is False
    settings.set_text("model", "site-model")
    settings.set_flag("autoSegment", True)
    assert store.values == {"CMEDL/Segment/model": "site-model", "CMEDL/Segment/autoSegment": "true"}
    assert UserSettings("CMEDL/Segment/", store).flag("autoSegment") is True
    assert UserSettings("CMEDL/Train/", store).text("model") == ""


def test_the_engine_python_is_slicers_launcher() -> None:
    from CMEDLCommon.engine import engine_python

    assert engine_python(which=lambda name: f"/opt/Slicer/bin/{name}") == "/opt/Slicer/bin/PythonSlicer"
    fallback = engine_python(which=lambda name: None, slicer_home="/opt/Slicer")
    assert fallback == str(Path("/opt/Slicer/bin/PythonSlicer"))


def test_importing_the_shared_package_imports_the_standard_library_only() -> None:
    names = sorted(path.stem for path in (ROOT / "CMEDLCommon").glob("*.py") if path.stem != "__init__")
    script = (
        "import importlib, sys\n"
        "before = set(sys.modules)\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module('CMEDLCommon.' + name)\n"
        "new = {m.split('.')[0] for m in set(sys.modules) - before}\n"
        "foreign = sorted(m for m in new if m not in sys.stdlib_module_names and m != 'CMEDLCommon')\n"
        "assert not foreign, foreign\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]


# -- filling the panels' widgets ---------------------------------------------------------------------------


def test_both_panels_list_the_engines_devices() -> None:
    """Each module file held its own copy of the device list; both fill their combo box from the engine now."""
    from conftest import FakeCombo

    from cmedl.devices import DEFAULT_DEVICE, DEVICE_CHOICES
    from CMEDLCommon.widgets import fill_device_combo

    combo = FakeCombo()
    fill_device_combo(combo, "cpu")
    assert combo.items == list(DEVICE_CHOICES) and combo.items[combo.current][1] == "cpu"
    for stored in ("", "tpu"):  # never chosen, or a name the engine does not know (any more)
        fill_device_combo(combo, stored)
        assert combo.items[combo.current][1] == DEFAULT_DEVICE
    assert combo.cleared == 1, "an unchanged list is not refilled"


# -- stopping without waiting (defect 9) -----------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_stop_sequence_asks_waits_on_ticks_then_forces() -> None:
    from CMEDLCommon.stopping import ASKED, DONE, FORCED, OVERDUE, StopSequence

    clock, calls, alive = Clock(), [], [True]
    sequence = StopSequence(ask=lambda: calls.append("ask"), alive=lambda: alive[0], grace_seconds=3.0,
                            force=lambda: calls.append("force"), give_up_seconds=2.0, clock=clock)  # fmt: skip
    assert sequence.start() == ASKED and calls == ["ask"]
    clock.now += 2.9
    assert sequence.tick() == ASKED and calls == ["ask"], "nothing is forced within the grace period"
    clock.now += 0.2
    assert sequence.tick() == FORCED and calls == ["ask", "force"]
    clock.now += 2.5
    assert sequence.tick() == OVERDUE, "a process that survives the kill is reported, not waited for"
    alive[0] = False
    assert sequence.tick() == DONE and sequence.done


def test_a_stop_sequence_without_force_leaves_the_decision_to_the_user() -> None:
    from CMEDLCommon.stopping import ASKED, DONE, OVERDUE, StopSequence

    clock, alive = Clock(), [True]
    sequence = StopSequence(ask=lambda: None, alive=lambda: alive[0], grace_seconds=1.0, clock=clock)
    assert sequence.start() == ASKED
    clock.now += 5
    assert sequence.tick() == OVERDUE
    alive[0] = False
    assert sequence.tick() == DONE
    gone = StopSequence(ask=lambda: None, alive=lambda: False, grace_seconds=1.0, clock=clock)
    assert gone.start() == DONE, "a process that went at once needs no tick"
