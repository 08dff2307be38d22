"""The two kinds of failure.

A :class:`ToolchainError` is the user's to fix (bad model file, unknown target, malformed
profile, bad data): the CLI prints its message and exits with :data:`EXIT_USER_ERROR`, no
traceback. Anything else is a bug in the toolchain and keeps its traceback.
"""

EXIT_OK = 0
EXIT_USER_ERROR = 2  # the same code click uses for bad command-line usage
EXIT_PARITY_FAILURE = 3


def reason(e: BaseException, last: bool = False, limit: int = 300) -> str:
    """One line of an exception's message, for a one-line error: the first non-empty line, or
    the last (``last``: native libraries put the cause there), cut at ``limit`` characters;
    the exception's type name when the message is empty."""
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return (lines[-1] if last else lines[0])[:limit] if lines else type(e).__name__


class ToolchainError(Exception):
    """An error the user can fix; its message is shown as it is."""


class ConfigError(ToolchainError):
    """A target profile or stage option is malformed."""


class ModelLoadError(ToolchainError):
    """The model file is missing, corrupt, untrusted or of an unknown kind."""


class DataError(ToolchainError):
    """Calibration or validation data is missing, empty, non-finite or the wrong shape."""


class StageError(ToolchainError):
    """A stage could not handle this model (e.g. an operator a backend cannot lower).

    The build records it against the artifact that needed the stage and carries on with
    the other artifacts.
    """
