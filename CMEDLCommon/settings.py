"""User preferences (the model chosen, the device, folders) kept in Qt's settings under a module's prefix.

They belong to the user, not to a scene: a scene closed or loaded leaves them as they are. The store is
``qt.QSettings`` inside Slicer; anything with ``value(key, default)`` and ``setValue(key, value)`` works, so
the code that reads preferences runs in tests without Qt.
"""

from __future__ import annotations

from typing import Any, Protocol

_TRUE = ("true", "1", "yes")


class SettingsStore(Protocol):
    """What :class:`UserSettings` needs of ``qt.QSettings``."""

    def value(self, key: str, default: Any = None) -> Any: ...

    def setValue(self, key: str, value: Any) -> None: ...  # noqa: N802 -- Qt's name


class UserSettings:
    """The preferences under ``prefix`` (``"CMEDL/Segment/"``), stored as text.

    Args:
        prefix: put before every key, so that the two modules' keys cannot collide.
        store: a :class:`SettingsStore`; None opens ``qt.QSettings()`` at each access, as Slicer's own modules
            do (it is cheap and always sees what another part of Slicer wrote meanwhile).
    """

    def __init__(self, prefix: str, store: SettingsStore | None = None) -> None:
        self.prefix = prefix
        self._store = store

    def _backend(self) -> SettingsStore:
        if self._store is not None:
            return self._store
        import qt

        return qt.QSettings()

    def text(self, key: str, default: str = "") -> str:
        """The stored text of ``key``, or ``default`` when it was never set."""
        value = self._backend().value(self.prefix + key, default)
        return default if value is None else str(value)

    def set_text(self, key: str, value: str) -> None:
        self._backend().setValue(self.prefix + key, str(value))

    def flag(self, key: str, default: bool = False) -> bool:
        """A yes/no preference; Qt hands booleans back as the text ``"true"``/``"false"``."""
        return self.text(key, "true" if default else "false").strip().lower() in _TRUE

    def set_flag(self, key: str, value: bool) -> None:
        self.set_text(key, "true" if value else "false")
