"""Scene and run code of the CMEDLTrain module: Qt-free, it takes the scene, nodes and folders explicitly.

- :mod:`.settings`: the panel's training values and data folders, turned into the engine's ``TrainConfig``.
- :mod:`.parameters`: the parameter node's fields and the training settings they stand for.
- :mod:`.start_from_model`: "Start from model" (fine-tuning): the models offered, and what choosing one does.
- :mod:`.launcher`: starting a detached training run from the panel's values (reading, resuming, stopping runs
  and registering their models is the engine's: :mod:`cmedl.training.runs`, :mod:`cmedl.training.launch`).
- :mod:`.monitor`: following the selected run on timer ticks: its curves, the timer, stopping without waiting.
- :mod:`.actions`: what the panel's buttons do, with the questions they ask.
- :mod:`.plots`: the loss and validation Dice curves as table, plot series and chart nodes, updated in place.
- :mod:`.dataset_export`: a CT volume node and one of its segments written into a dataset folder as NIfTI.
- :mod:`.self_test`: the smallest real training run, for the self-test and pytest.

This file imports nothing: the module file reads the help text below when Slicer loads it.
"""

# The module's help (the citation is appended by the module from CMEDLCommon).
HELP_TEXT = (
    "Trains the CT lung tumour network on your data: CT only, or by cross-modality educed distillation (CMEDL), "
    "where an MRI teacher trained on unpaired MRI guides the CT student.<br><br>"
    "1. <b>Training data</b>: CT images and labels folders (labels named like their image), for CMEDL MRI images "
    "(labels optional), a validation share or folder; <i>Check data</i> shows what was found. The loaded CT and "
    "its tumour segment can be added to the CT folders.<br>"
    "2. <b>Method</b>: <i>Start from model</i> fine-tunes a model (a catalogue model, a run folder or a model file: "
    "its architecture, patch size and spacing are filled in, the learning rates lowered) instead of training from "
    "scratch; segmentor (U-Net, DenseFCN, MRRN), the CycleGAN translator with contextual loss, loss "
    "weights (the paper's defaults), epochs, batch size, learning rates, device. Values the engine would refuse "
    "are named under the section.<br>"
    "3. <b>Runs</b>: <i>Start</i> trains in a separate process in a new run folder; it goes on when Slicer is "
    "closed, and reopening the module shows it again with losses, validation Dice, curves and previews. "
    "<i>Stop</i> keeps a checkpoint that <i>Resume</i> continues from; <i>Register model</i> adds the best model "
    "to your models, for CMEDL Segment.<br><br><b>Research use only.</b> A trained model is not a medical device."
)
