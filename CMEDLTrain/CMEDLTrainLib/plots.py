"""The training curves of a run as MRML nodes: one table, one plot series per column, one chart.

The table has a row per finished epoch (``metrics.jsonl``): ``epoch``, every loss term the method reports
(``loss_seg_ct``, ``loss_cyc``, ...) and ``validation_dice``. Each time the panel looks at the run,
:meth:`TrainingChart.update` writes the rows into the same table and adds a series only for a column that
was not there before, so views showing the chart keep showing it and node IDs stay the same. The nodes
carry the run folder as an attribute, so a chart made before Slicer was restarted (and saved with the
scene) is found again rather than duplicated.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import vtk
from slicer import vtkMRMLPlotChartNode, vtkMRMLPlotSeriesNode, vtkMRMLTableNode

RUN_ATTRIBUTE = "CMEDLTrain.RunFolder"
COLUMN_ATTRIBUTE = "CMEDLTrain.Column"
EPOCH_COLUMN = "epoch"
DICE_COLUMN = "validation_dice"
# Distinct colours for the curves (RGB in [0, 1]); validation Dice is always black.
PALETTE = (
    (0.84, 0.15, 0.16), (0.12, 0.47, 0.71), (0.17, 0.63, 0.17), (1.0, 0.5, 0.05), (0.58, 0.4, 0.74),
    (0.55, 0.34, 0.29), (0.89, 0.47, 0.76), (0.5, 0.5, 0.5), (0.74, 0.74, 0.13), (0.09, 0.75, 0.81),
)  # fmt: skip


def metric_columns(records: list[dict[str, Any]]) -> list[str]:
    """The columns for ``records``: epoch, the loss terms in order of first appearance, validation Dice."""
    losses = []
    for record in records:
        for key in record:
            if key.startswith("loss_") and key not in losses:
                losses.append(key)
    return [EPOCH_COLUMN, *losses, DICE_COLUMN]


def series_label(column: str) -> str:
    """How a column is named in the legend: the loss term without its prefix, or "validation Dice"."""
    if column == DICE_COLUMN:
        return "validation Dice"
    return column[len("loss_") :] if column.startswith("loss_") else column


def _value(record: dict[str, Any], column: str) -> float:
    value = record.get(column)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    return float(value)


def _nodes_with(scene, class_name: str, run: str) -> list:
    found = []
    collection = scene.GetNodesByClass(class_name)
    # The scene hands over a new collection the caller must delete (vtkMRMLScene.h); in Python the wrapper holds
    # its own reference, so the scene's one is released at once, as Slicer's own slicer.util.getNodesByClass does.
    collection.UnRegister(None)
    for index in range(collection.GetNumberOfItems()):
        node = collection.GetItemAsObject(index)
        if node.GetAttribute(RUN_ATTRIBUTE) == run:
            found.append(node)
    return found


class TrainingChart:
    """The curves of the run in ``run_path`` in ``scene`` (see the module docstring)."""

    def __init__(self, scene, run_path: str | Path) -> None:
        self.scene = scene
        self.run = str(Path(run_path).absolute())
        self.name = Path(run_path).name
        tables = _nodes_with(scene, "vtkMRMLTableNode", self.run)
        charts = _nodes_with(scene, "vtkMRMLPlotChartNode", self.run)
        self.table_node: vtkMRMLTableNode = tables[0] if tables else self._new_table()
        self.chart_node: vtkMRMLPlotChartNode = charts[0] if charts else self._new_chart()
        self.series_nodes: dict[str, vtkMRMLPlotSeriesNode] = {}
        for series in _nodes_with(scene, "vtkMRMLPlotSeriesNode", self.run):
            column = series.GetAttribute(COLUMN_ATTRIBUTE)
            if column:
                self.series_nodes[column] = series

    def _new_table(self) -> vtkMRMLTableNode:
        node = self.scene.AddNewNodeByClass("vtkMRMLTableNode", f"{self.name} training curves")
        node.SetAttribute(RUN_ATTRIBUTE, self.run)
        return node

    def _new_chart(self) -> vtkMRMLPlotChartNode:
        node = self.scene.AddNewNodeByClass("vtkMRMLPlotChartNode", f"{self.name} training")
        node.SetAttribute(RUN_ATTRIBUTE, self.run)
        node.SetTitle(f"CMEDL training: {self.name}")
        node.SetXAxisTitle("epoch")
        node.SetYAxisTitle("loss / validation Dice")
        node.SetLegendVisibility(True)
        return node

    @property
    def columns(self) -> list[str]:
        table = self.table_node.GetTable()
        return [table.GetColumnName(index) for index in range(table.GetNumberOfColumns())]

    def rows(self) -> int:
        return self.table_node.GetTable().GetNumberOfRows()

    def update(self, records: list[dict[str, Any]]) -> bool:
        """Write ``records`` (the run's metrics, oldest first) into the nodes; False when nothing changed."""
        table = self.table_node.GetTable()
        wanted = metric_columns(records)
        if self.rows() == len(records) and set(wanted) <= set(self.columns):
            if not records or self._row_matches(table, len(records) - 1, records[-1]):
                return False
        modified = self.table_node.StartModify()
        try:
            for column in wanted:
                if column not in self.columns:
                    array = vtk.vtkDoubleArray()
                    array.SetName(column)
                    array.SetNumberOfTuples(table.GetNumberOfRows())
                    array.Fill(math.nan)
                    table.AddColumn(array)
            for index in range(table.GetNumberOfColumns()):
                array = table.GetColumn(index)
                column = table.GetColumnName(index)
                array.SetNumberOfTuples(len(records))
                for row, record in enumerate(records):
                    array.SetValue(row, _value(record, column))
                array.Modified()
            table.Modified()
            self.table_node.Modified()
        finally:
            self.table_node.EndModify(modified)
        for column in wanted[1:]:
            if column not in self.series_nodes:
                self.series_nodes[column] = self._new_series(column)
        return True

    @staticmethod
    def _row_matches(table, row: int, record: dict[str, Any]) -> bool:
        for index in range(table.GetNumberOfColumns()):
            stored = table.GetColumn(index).GetValue(row)
            value = _value(record, table.GetColumnName(index))
            if not (stored == value or (math.isnan(stored) and math.isnan(value))):
                return False
        return True

    def _new_series(self, column: str) -> vtkMRMLPlotSeriesNode:
        series = self.scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", f"{self.name} {series_label(column)}")
        series.SetAttribute(RUN_ATTRIBUTE, self.run)
        series.SetAttribute(COLUMN_ATTRIBUTE, column)
        series.SetAndObserveTableNodeID(self.table_node.GetID())
        series.SetXColumnName(EPOCH_COLUMN)
        series.SetYColumnName(column)
        series.SetPlotType(vtkMRMLPlotSeriesNode.PlotTypeScatter)
        series.SetMarkerStyle(vtkMRMLPlotSeriesNode.MarkerStyleCircle)
        series.SetLineStyle(vtkMRMLPlotSeriesNode.LineStyleSolid if column != DICE_COLUMN
                            else vtkMRMLPlotSeriesNode.LineStyleDash)  # fmt: skip
        color = (0.0, 0.0, 0.0) if column == DICE_COLUMN else PALETTE[len(self.series_nodes) % len(PALETTE)]
        series.SetColor(*color)
        self.chart_node.AddAndObservePlotSeriesNodeID(series.GetID())
        return series
