"""The interpreter that runs the engine's child processes inside Slicer."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable


def engine_python(which: Callable[[str], str | None] = shutil.which, slicer_home: str | None = None) -> str:
    """Slicer's ``PythonSlicer`` launcher: found on ``PATH`` (Slicer puts its ``bin`` there), else in
    ``<slicer_home>/bin`` (``slicer.app.slicerHome`` when not given).

    The launcher, not ``sys.executable``: Slicer's ``python-real`` needs the library paths the launcher sets.
    """
    name = "PythonSlicer.exe" if os.name == "nt" else "PythonSlicer"
    found = which(name)
    if found:
        return found
    if slicer_home is None:
        import slicer

        slicer_home = slicer.app.slicerHome
    return os.path.join(slicer_home, "bin", name)
