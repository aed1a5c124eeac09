"""Scene code of the CMEDLSegment module: Qt-free, it takes the scene and the nodes it works on explicitly.

- :mod:`.volume_nodes`: volume nodes to and from SimpleITK images and files, geometry kept exactly.
- :mod:`.segmentation_nodes`: a mask into a named, coloured segment with DICOM terminology.
- :mod:`.segment_logic`: a segmentation run as a child engine process, polled or blocking.
- :mod:`.runner`: one run at a time for the scene, queued, polled by a timer, cancelled without waiting,
  dropped when the scene closes.
- :mod:`.auto_segment`: "segment new CT volumes automatically", observing the scene from Slicer's startup.
- :mod:`.models`: the models the panel lists (a damaged catalogue file costs only its own entries).
- :mod:`.lesion_nodes`: lesions in the scene (one segment per lesion, removing one, the probability overlay).
- :mod:`.lesion_panel`: the panel's lesion table, kept on the segmentation node, and its row actions.

This file imports nothing, so the module file can read the settings keys and help below when Slicer loads it.
"""

# The module's help (the citation is appended by the module from CMEDLCommon).
HELP_TEXT = (
    "Segments lung tumours on chest CT with a student network trained by cross-modality educed distillation "
    "(CMEDL): an MRI teacher guided it in training; only the CT network runs here.<br><br><b>Research use "
    "only.</b> Not a medical device: review every contour. Each model's card (shown before first use) states "
    "its training data and license; the built-in demo model knows only synthetic phantoms.<br><br>Press "
    "Apply and keep working: the result is an editable segment, ready for Segment Statistics and DICOM SEG "
    "export. The <i>Lesions</i> table lists each lesion (volume, RECIST long and short axes, peak tumour "
    "probability, where it lies): click a row to go to it, delete a false positive, or make one segment per "
    "lesion; <i>Show tumour probability</i> adds the model's confidence as a colour overlay.<br><br>"
)

# The module's user settings (QSettings, under SETTINGS_PREFIX): they belong to the user, not to a scene.
SETTINGS_PREFIX = "CMEDL/Segment/"
MODEL_KEY = "model"
DEVICE_KEY = "device"
AUTO_KEY = "autoSegment"
ACCEPTED_KEY = "acceptedModelCards/"
