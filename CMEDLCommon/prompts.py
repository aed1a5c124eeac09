"""Questions and messages to the user behind one small interface, so that the flows that ask them run in tests.

The panels' flows (install packages, download a model, start or stop a run, register a model) take a
:class:`Prompts`. Inside Slicer that is :class:`SlicerPrompts`, Slicer's own dialogs (which answer themselves
in testing mode); a test passes an object that records the questions and gives scripted answers.
"""

from __future__ import annotations

from typing import Any, Protocol


class ProgressDialog(Protocol):
    """What the flows use of a ``QProgressDialog``."""

    wasCanceled: bool  # noqa: N815 -- Qt's name

    def setValue(self, value: int) -> None: ...  # noqa: N802 -- Qt's name

    def setLabelText(self, text: str) -> None: ...  # noqa: N802 -- Qt's name

    def close(self) -> Any: ...


class Prompts(Protocol):
    """The questions and messages a flow may show; ``details`` go into the expandable part of the box."""

    def confirm(self, text: str, details: str = "") -> bool: ...

    def ask(self, text: str) -> bool: ...

    def ask_text(self, text: str, default: str) -> str: ...

    def error(self, text: str, details: str = "") -> None: ...

    def info(self, text: str) -> None: ...

    def progress(self, label: str) -> ProgressDialog: ...

    def process_events(self) -> None: ...


class SlicerPrompts:
    """:class:`Prompts` as Slicer's dialogs, titled ``title`` (the module's name)."""

    def __init__(self, title: str) -> None:
        self.title = title

    @staticmethod
    def _details(details: str) -> dict[str, str]:
        return {"detailedText": details} if details else {}

    def confirm(self, text: str, details: str = "") -> bool:
        """OK/Cancel; True for OK."""
        import slicer

        return bool(slicer.util.confirmOkCancelDisplay(text, windowTitle=self.title, **self._details(details)))

    def ask(self, text: str) -> bool:
        """Yes/No; True for Yes."""
        import slicer

        return bool(slicer.util.confirmYesNoDisplay(text, windowTitle=self.title))

    def ask_text(self, text: str, default: str) -> str:
        """One line of text; ``""`` when cancelled."""
        import qt
        import slicer

        answer = qt.QInputDialog.getText(slicer.util.mainWindow(), self.title, text, qt.QLineEdit.Normal, default)
        return str(answer or "").strip()

    def error(self, text: str, details: str = "") -> None:
        import slicer

        slicer.util.errorDisplay(text, windowTitle=self.title, **self._details(details))

    def info(self, text: str) -> None:
        import slicer

        slicer.util.infoDisplay(text, windowTitle=self.title)

    def progress(self, label: str) -> ProgressDialog:
        import slicer

        return slicer.util.createProgressDialog(windowTitle=self.title, labelText=label, maximum=100)

    def process_events(self) -> None:
        import slicer

        slicer.app.processEvents()
