"""Putting values into the panel's Qt widgets without importing Qt: any object with the methods Qt's have will do.

The panel hands its ``QComboBox`` and ``QTableWidget`` (and ``qt.QTableWidgetItem`` to make cells); a test hands
small stand-ins. Both helpers leave a widget alone when it already shows the values, so that refreshing on
every parameter change keeps the user's selection.
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
