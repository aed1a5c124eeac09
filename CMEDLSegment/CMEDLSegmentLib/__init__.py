"""Scene code of the CMEDLSegment module: Qt-free, it takes the scene and the nodes it works on explicitly.

- :mod:`.volume_nodes`: volume nodes to and from SimpleITK images and files, geometry kept exactly.
- :mod:`.segmentation_nodes`: a mask into a named, coloured segment with DICOM terminology.
- :mod:`.segment_logic`: a segmentation run as a child engine process, polled or blocking.
"""
