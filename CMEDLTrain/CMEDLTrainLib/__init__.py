"""Scene and run code of the CMEDLTrain module: Qt-free, it takes the scene, nodes and folders explicitly.

- :mod:`.settings`: the panel's training values and data folders, turned into the engine's ``TrainConfig``.
- :mod:`.runs`: what a run folder says (state, epoch, losses, previews, the engine's error), without torch.
- :mod:`.launcher`: starting, resuming, stopping a detached training process, and registering its model.
- :mod:`.plots`: the loss and validation Dice curves as table, plot series and chart nodes, updated in place.
- :mod:`.dataset_export`: a CT volume node and one of its segments written into a dataset folder as NIfTI.
"""
