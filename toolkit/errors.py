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
