"""Putting values into the panel's Qt widgets without importing Qt: any object with the methods Qt's have will do.

The panel hands its ``QComboBox``; a test hands a small stand-in. (CMEDL Segment has its own copy: neither
module imports the other's Lib.)
"""

from __future__ import annotations

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
