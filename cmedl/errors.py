"""Errors the engine reports to its users, each with its own process exit code.

Every failure a user can cause (a wrong file, a CT without lungs, a corrupt model) is raised as a
subclass of :class:`CMEDLError`. The command line prints ``str(error)`` as one line and exits with
``error.exit_code``, so scripts and the Slicer modules can tell the outcomes apart.
"""

from __future__ import annotations

#: Exit code of a batch in which at least one case failed (the other cases' results are written): not an error
#: class, since the batch itself completes; beside the error codes so that all codes are listed in one place.
PARTIAL_FAILURE_EXIT_CODE = 9


class CMEDLError(Exception):
    """Base class: a problem the user can act on, reported as one line."""

    exit_code = 1


class NoLungsFoundError(CMEDLError):
    """The image holds no lungs (for example an abdomen-only scan)."""

    exit_code = 2


class InputError(CMEDLError):
    """An input file or folder is missing, unreadable or of the wrong kind."""

    exit_code = 3


class ModelFileError(CMEDLError):
    """A model file is truncated, corrupt, not a CMEDL model, or has an unknown architecture."""

    exit_code = 4


class NotCTError(CMEDLError):
    """The image does not look like a CT in Hounsfield units (an MR image, say)."""

    exit_code = 5


class OutputError(CMEDLError):
    """An output could not be written (disk full, no permission)."""

    exit_code = 6


class ConfigError(CMEDLError):
    """A configuration value is unknown, malformed or inconsistent."""

    exit_code = 7


class TrainingError(CMEDLError):
    """Training cannot go on (non-finite loss, no usable data)."""

    exit_code = 8


class CancelledError(CMEDLError):
    """The user cancelled the run."""

    exit_code = 130


class RunInUseError(OutputError):
    """A training run folder is claimed by another live process (two runs would interleave their files)."""


class Interrupted(BaseException):  # noqa: N818 - named like KeyboardInterrupt, which it stands in for
    """SIGTERM or SIGINT arrived where the work in hand has nothing worth saving (see :mod:`cmedl.interrupts`).

    A ``BaseException`` like :class:`KeyboardInterrupt`, so that the ``except Exception`` of ordinary error
    handling does not swallow it, while ``finally`` blocks (which remove temporary output files) still run.
    """

    exit_code = 130

    def __init__(self, signal_name: str = "a stop signal") -> None:
        super().__init__(signal_name)
        self.signal_name = signal_name
