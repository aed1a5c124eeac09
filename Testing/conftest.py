"""Shared fixtures: paths to the real data beside the checkout, small phantom datasets, tiny models."""

from __future__ import annotations

import ast
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"


#: a CT-only training configuration that runs in seconds on a CPU (data and out paths added by each test)
TINY = {
    "segmentor": "unet",
    "segmentor_options": {"base_channels": 4},
    "patch_size": 64,
    "spacing_mm": (3.0, 3.0),
    "batch_size": 2,
    "iterations_per_epoch": 3,
    "epochs": 2,
    "validation_fraction": 0.25,
    "device": "cpu",
}

#: a run that takes seconds: 32x32 patches at 6 mm, a 4-channel U-Net, one step (no validation unless asked)
SECONDS_RUN = {
    "segmentor": "unet",
    "segmentor_options": {"base_channels": 4},
    "patch_size": 32,
    "spacing_mm": [6.0, 6.0],
    "batch_size": 2,
    "iterations_per_epoch": 1,
    "epochs": 1,
    "validation_fraction": 0.0,
    "augment": False,
    "device": "cpu",
}

#: the same for CMEDL: a one-block generator, a random VGG16, few contextual-loss positions
TINY_CMEDL = {
    "method": "cmedl",
    "segmentor": "unet",
    "segmentor_options": {"base_channels": 4},
    "translator_options": {"base_channels": 4, "n_blocks": 1},
    "vgg_weights": "random",
    "cx_max_positions": 64,
    "patch_size": 64,
    "spacing_mm": (4.0, 4.0),
    "batch_size": 2,
    "iterations_per_epoch": 2,
    "epochs": 2,
    "validation_fraction": 0.34,
    "device": "cpu",
}


def shared_data(relative: str) -> Path:
    """Path of a file in ../shared/data; skips the test with a reason when it is absent."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"real test data not available: {path}")
    return path


def parameter_node_values(module: str) -> tuple[dict, dict]:
    """The defaults and the ``WithinRange`` bounds of the module file's parameter node, field by field, read from
    its source (the module file itself imports only inside Slicer)."""
    tree = ast.parse((PROJECT_ROOT / module / f"{module}.py").read_text(encoding="utf-8"))
    defaults, ranges = {}, {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == f"{module}ParameterNode":
            for statement in node.body:
                if isinstance(statement, ast.AnnAssign) and statement.value is not None:
                    name = statement.target.id
                    defaults[name] = ast.literal_eval(statement.value)
                    for call in ast.walk(statement.annotation):
                        if isinstance(call, ast.Call) and getattr(call.func, "id", "") == "WithinRange":
                            ranges[name] = tuple(ast.literal_eval(arg) for arg in call.args)
    return defaults, ranges


def run_cmedl(*args: str, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """Run ``python -m cmedl ARGS`` as a real child process of this interpreter."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(PROJECT_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        # The engine writes UTF-8 (e.g. "cm²"); decoding must not depend on the test machine's locale.
        [sys.executable, "-m", "cmedl", *args], capture_output=True, encoding="utf-8", errors="replace",
        timeout=timeout, env=env, **kwargs,
    )  # fmt: skip


@pytest.fixture(scope="session")
def small_phantoms(tmp_path_factory) -> Path:
    """A dataset of 4 CT phantoms (128x128 in-plane) with images/ and labels/, written once per session."""
    from cmedl.phantom import write_phantom_dataset

    out = tmp_path_factory.mktemp("phantoms")
    write_phantom_dataset(out, n_ct=4, n_mr=0, seed=11, size=128)
    return out


class MRMLWorld:
    """A headless Slicer scene with the application, subject-hierarchy and segmentations logics it needs."""

    def __init__(self) -> None:
        import slicer

        self.scene = slicer.vtkMRMLScene()
        self.application_logic = slicer.vtkSlicerApplicationLogic()
        self.application_logic.SetMRMLScene(self.scene)
        # The logics register what the scene needs (subject hierarchy, labelmap converters); keep them alive.
        self.logics = []
        for logic_class in (slicer.vtkSlicerSubjectHierarchyModuleLogic, slicer.vtkSlicerSegmentationsModuleLogic):
            logic = logic_class()
            logic.SetMRMLApplicationLogic(self.application_logic)
            logic.SetMRMLScene(self.scene)
            self.logics.append(logic)


@pytest.fixture
def mrml() -> MRMLWorld:
    """A fresh headless MRML scene (skips when the slicer-core package is not installed)."""
    pytest.importorskip("slicer", reason="the slicer-core package is not installed")
    return MRMLWorld()


class FakeCombo:
    """What the panels' helpers use of a ``QComboBox``; filling it with its signals on fails the test."""

    def __init__(self) -> None:
        self.items, self.current, self.blocked, self.cleared = [], -1, False, 0

    @property
    def count(self) -> int:
        return len(self.items)

    def blockSignals(self, block: bool) -> bool:  # noqa: N802 -- Qt's name
        was, self.blocked = self.blocked, block
        return was

    def itemText(self, index: int) -> str:  # noqa: N802 -- Qt's name
        return self.items[index][0]

    def itemData(self, index: int) -> str:  # noqa: N802 -- Qt's name
        return self.items[index][1]

    def clear(self) -> None:
        self.items, self.cleared = [], self.cleared + 1

    def addItem(self, text: str, data: str) -> None:  # noqa: N802 -- Qt's name
        self.items.append((text, data))

    def findData(self, data: str) -> int:  # noqa: N802 -- Qt's name
        return next((index for index, item in enumerate(self.items) if item[1] == data), -1)

    def setCurrentIndex(self, index: int) -> None:  # noqa: N802 -- Qt's name
        assert self.blocked, "filled without its signals"
        self.current = index


def oblique_ct(shape: tuple[int, int, int]) -> sitk.Image:
    """An air-filled CT of ``shape`` (K, J, I) with anisotropic spacing, an oblique direction and an offset origin:
    the geometry lesion measurements and scene placement must carry through."""
    a, b = math.radians(25), math.radians(7)
    about_z = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    about_x = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    image = sitk.GetImageFromArray(np.full(shape, -800, dtype=np.int16))
    image.SetSpacing((0.8, 1.1, 2.5))
    image.SetDirection(tuple((about_x @ about_z).flatten()))
    image.SetOrigin((-31.5, 12.25, -140.0))
    return image
