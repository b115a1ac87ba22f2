"""The hybridps exception hierarchy: every error hybridps raises on purpose is a HybridPSError.

Each subclass names the part of the system that found the problem; the message says what was
wrong, where, and what to do about it.
"""


class HybridPSError(Exception):
    """Base class of every error raised by hybridps on purpose."""


class ConfigError(HybridPSError, ValueError):
    """A configuration field, CLI flag or argument has a bad value."""


class TableInputError(HybridPSError, ValueError):
    """A hash-table call got arrays of the wrong dtype, shape or length."""


class TableFullError(HybridPSError):
    """An embedding table reached its configured row capacity (policy on_full=raise)."""


class NonFiniteGradientError(HybridPSError, FloatingPointError):
    """A row gradient contained NaN or Inf (policy nonfinite=raise)."""


class DataError(HybridPSError, ValueError):
    """An input data file is malformed (the message names file and line)."""


class OutputError(HybridPSError):
    """An output (metrics file, state dump) could not be written: the message names the path
    and the reason (disk full, permissions); no partial or temporary file is left."""


class CommError(HybridPSError):
    """MPI or Horovod could not be initialised or a collective failed."""


class CheckpointError(HybridPSError):
    """A checkpoint or delta is missing, damaged, partial, or belongs to another model
    (the message names the directory, the file and what is wrong)."""


class RequestError(HybridPSError, ValueError):
    """A serving request is malformed (the message names the feature and the row); the server
    answers it with HTTP 400 and keeps serving."""
