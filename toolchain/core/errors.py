"""The two kinds of failure.

A :class:`ToolchainError` is the user's to fix (bad model file, unknown target, malformed
profile, bad data): the CLI prints its message and exits with :data:`EXIT_USER_ERROR`, no
traceback. Anything else is a bug in the toolchain and keeps its traceback.
"""

import re

EXIT_OK = 0
EXIT_USER_ERROR = 2  # the same code click uses for bad command-line usage
EXIT_PARITY_FAILURE = 3
EXIT_NOT_JUDGED = 4  # built and measured, but nothing judged (random weights): not a pass
EXIT_REGRESSION = 5  # `matrix run`: a cell regressed against its last passing run (an alarm)

# First lines that only announce where an error happened; the cause is further down.
_HEADERS = ("The following operation failed in the TorchScript interpreter", "Traceback of TorchScript")


def reason(e: BaseException, last: bool = False, limit: int = 300) -> str:
    """One line of an exception's message, for a one-line error: the first non-empty line, or
    the last (``last``: native libraries put the cause there), cut at ``limit`` characters;
    the exception's type name when the message is empty."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    if not last and lines[0].startswith(_HEADERS):  # TorchScript: the cause is the last `...Error: ...` line
        causes = [line for line in lines if re.match(r"^[\w.]*(Error|Exception): ", line)]
        return (causes[-1] if causes else lines[-1])[:limit]
    return (lines[-1] if last else lines[0])[:limit]


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


class NotApplicable(StageError):
    """The stage does not fit this kind of model (dynamic INT8 for a CNN): nothing went wrong; the
    report lists the artifact under `not_applicable` with the reason, not as skipped."""
