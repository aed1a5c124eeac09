"""Putting values into the panels' Qt widgets without importing Qt: any object with the methods Qt's have will do.

A panel hands its ``QComboBox`` or ``QTableWidget`` (and ``qt.QTableWidgetItem`` to make cells); a test hands
small stand-ins. The helpers leave a widget alone when it already shows the values, so that refreshing on
every parameter change keeps the user's selection.

The device list is the engine's (:data:`cmedl.devices.DEVICE_CHOICES`), read when a panel is built: importing
this module imports the standard library only, like the rest of this package.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def fill_combo(selector: Any, items: list[tuple[str, Any]], select: Any) -> None:
    """Show ``(text, data)`` items in a ``QComboBox``-like ``selector`` (untouched when already shown) and select
    the item whose data is ``select`` (else the first), without emitting its signals: the caller reacts once."""
    was_blocked = selector.blockSignals(True)
    if [(selector.itemText(i), selector.itemData(i)) for i in range(selector.count)] != items:
        selector.clear()
        for text, data in items:
            selector.addItem(text, data)
    selector.setCurrentIndex(max(0, selector.findData(select)))
    selector.blockSignals(was_blocked)


def device_items() -> list[tuple[str, str]]:
    """The devices a run can use, as ``(label, name)`` combo items: the engine's list, in its order."""
    from cmedl.devices import DEVICE_CHOICES

    return list(DEVICE_CHOICES)


def fill_device_combo(selector: Any, device: str) -> None:
    """Show the engine's devices in ``selector`` and select ``device`` (an unknown one selects the default)."""
    fill_combo(selector, device_items(), device)


def fill_table(table: Any, rows: list[tuple[str, ...]], make_item: Callable[[str], Any]) -> None:
    """Show ``rows`` of text in a ``QTableWidget``-like ``table`` whose columns its .ui file defines.

    ``make_item`` makes a cell (``qt.QTableWidgetItem``). An unchanged table keeps its selection.
    """
    shown = [
        tuple(_text(table.item(row, column)) for column in range(table.columnCount)) for row in range(table.rowCount)
    ]
    if shown == [tuple(cells) for cells in rows]:
        return
    table.clearContents()
    table.setRowCount(len(rows))
    for row, cells in enumerate(rows):
        for column, text in enumerate(cells):
            table.setItem(row, column, make_item(text))


def _text(item: Any) -> str:
    return item.text() if item is not None else ""
