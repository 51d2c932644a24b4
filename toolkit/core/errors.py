"""User-facing errors.

Library code raises these with a message that names the problem (file, flag, shape, dtype);
`toolkit.cli` turns them into one line on stderr and a non-zero exit code. Anything else that
escapes is a bug and keeps its traceback.
"""


class ToolkitError(Exception):
    """A problem with the user's input or environment, reported as one line."""

    exit_code = 2


class ConfigError(ToolkitError, ValueError):
    """An invalid flag or config value."""


class DataError(ToolkitError):
    """A missing, empty or malformed dataset."""


class CheckpointError(ToolkitError):
    """A missing, incomplete or incompatible checkpoint or run folder."""


class LaunchError(ToolkitError):
    """The process topology is not what was asked for (for example a world-size mismatch)."""


class DivergenceError(ToolkitError):
    """Training produced a non-finite loss."""

    exit_code = 4


class Interrupted(ToolkitError):
    """Stopped by SIGTERM/SIGINT/SIGUSR1 after writing a checkpoint; `--resume latest` continues.

    75 is EX_TEMPFAIL: a temporary failure, worth retrying.
    """

    exit_code = 75


class ArtifactError(ToolkitError):
    """A missing, unreadable or mismatched export artifact (model file, manifest, metadata)."""


class InputError(ToolkitError, ValueError):
    """A batch that does not fit the model input (rank, shape, dtype, non-finite values)."""


class VerificationError(ToolkitError):
    """An exported artifact does not behave like the eager model (reported after the table)."""

    exit_code = 3


def exit_code(exc: BaseException) -> int:
    """The exit code a `toolkit` command ends with when `exc` escapes it (`apps/cli.py` and status.json agree)."""
    if isinstance(exc, ToolkitError):
        return exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        return 130  # 128 + SIGINT, the shell's convention
    if isinstance(exc, OSError):
        return 2  # disk full, unwritable folder: the environment, reported as one line
    return 1  # a bug: Python's own status for an uncaught exception, traceback included


def first_line(exc: BaseException) -> str:
    """`Type: first line of the message`, for wrapping a library's multi-line error into one line."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else 'no detail'}"
