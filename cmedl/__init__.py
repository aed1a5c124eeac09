"""CMEDL engine: cross-modality educed distillation for lung tumour segmentation on CT.

The engine never imports Slicer, Qt or VTK; the Slicer modules drive it as a library or as a child process
(``python -m cmedl ...``).
"""

__version__ = "0.1.0"
