# ruff: noqa: N999 -- Slicer names Python packages beside its modules in CamelCase, like CMEDLSegmentLib.
"""Slicer-side helpers that both CMEDL modules use, so that neither module imports the other's Lib.

- :mod:`.settings`: user preferences under a module's prefix in ``QSettings`` (testable with any store).
- :mod:`.engine`: the interpreter that runs the engine's child processes (Slicer's ``PythonSlicer``).
- :mod:`.dependencies`: the Python packages the engine needs, checked and installed after one confirmation.
- :mod:`.stopping`: stopping a child process on timer ticks instead of waiting in the GUI thread.
- :mod:`.widgets`: filling the panels' combo boxes (the engine's device list among them) and tables without Qt.

Importing this package, or any module in it, imports the standard library only: Slicer loads the modules
that use it before torch or any other package CMEDL needs is installed. The extension's top-level
CMakeLists.txt installs it beside the modules, the way it installs the engine.
"""

PAPER = (
    "J. Jiang, A. Rimner, J. O. Deasy, H. Veeraraghavan. Unpaired cross-modality educed distillation (CMEDL) for "
    "medical image segmentation. IEEE Transactions on Medical Imaging 41(5):1057-1068, 2022. "
    "doi:10.1109/TMI.2021.3132291"
)
CITE_REQUEST = "If you use CMEDL in your work, please cite: " + PAPER
ACKNOWLEDGEMENT = "The method is described in: " + PAPER
