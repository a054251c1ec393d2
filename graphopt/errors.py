"""Error types and the exit codes they map to.

Every error a user can cause (a bad file, an unknown pass, a bad option, an
input file that cannot be read) is a :class:`GraphoptError`; the CLI prints its
message on one line and exits with its ``exit_code`` without a traceback.
Anything else that escapes is a bug in graphopt or a library and exits with
:data:`EXIT_INTERNAL`.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_VERIFY_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 3


class GraphoptError(Exception):
    """A problem the user can fix: the message says what is wrong and what to do."""

    exit_code = EXIT_BAD_INPUT


class ModelError(GraphoptError):
    """The model file is missing, unreadable, invalid or unsafe."""


class OptionError(GraphoptError):
    """An unknown pass/target/option, or an option value of the wrong type or range."""


class DataError(GraphoptError):
    """An inputs/calibration file that cannot be read or does not fit the model."""


class PluginError(GraphoptError):
    """A plugin failed to import, register or run; the message names it."""


class UnsupportedOpsError(GraphoptError):
    """The target cannot lower some ops; ``ops`` maps op type to the node names using it."""

    def __init__(self, message: str, ops: dict[str, list[str]]):
        super().__init__(message)
        self.ops = ops


class LoweringError(GraphoptError):
    """The target could not lower the graph (the message says which step and why)."""


class ArtifactError(GraphoptError):
    """An artifact directory that is missing, damaged or built for another machine."""


class VerificationError(GraphoptError):
    """Outputs differ from the reference beyond tolerance."""

    exit_code = EXIT_VERIFY_FAILED


class OutputError(OptionError):
    """An output that cannot or must not be written: it would overwrite, sit inside or contain an input,
    it would overwrite an existing dump, or the file system refused it (read-only, full, name too long)."""
