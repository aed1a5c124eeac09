"""Allows ``python -m cmedl ...``: the command-line process (also how Slicer runs segmentation, as a child).

Marking the process as the command line lets inference set torch's threads (one per idle physical core, see
:mod:`cmedl.cpu`); as a library, inside another program, the engine leaves them alone. Nothing heavy is
imported here: each command imports what it needs (``cmedl --help``, ``lungs`` and ``models`` never load torch).
"""

from cmedl.cli import console

console()
