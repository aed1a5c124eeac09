"""The names a training run chooses among: the methods and the trainable segmentors, each with its label.

:mod:`cmedl.training.config` checks a configuration against them, ``cmedl train`` offers them as its flags'
choices and CMEDL Train lists them. This module imports nothing, so that building the command line's parser
and the panel's lists loads neither the configuration nor torch.
"""

from __future__ import annotations

# (label, name) of each training method, as the Slicer panel lists them.
METHOD_CHOICES: tuple[tuple[str, str], ...] = (
    ("CT only (no MRI)", "ct_only"),
    ("CMEDL (CT student, MRI teacher)", "cmedl"),
)
# (label, name) of the trainable architectures of cmedl.nets (named here too, so that a configuration is checked
# without torch).
SEGMENTOR_CHOICES: tuple[tuple[str, str], ...] = (("U-Net", "unet"), ("DenseFCN", "densefcn"), ("MRRN", "mrrn"))
METHODS: tuple[str, ...] = tuple(name for _, name in METHOD_CHOICES)
SEGMENTORS: tuple[str, ...] = tuple(name for _, name in SEGMENTOR_CHOICES)
