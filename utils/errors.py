"""The errors a run can end with. This module imports nothing of ours, so every module can raise them without an
import circle; `utils.cli.run_script` turns them into one `error: ...` line and an exit status."""


class DataError(ValueError):
    """A row or data source that cannot become preference pairs; the message names the source, row and field."""


class ConfigError(SystemExit):
    """Flags or a config file that cannot work; the message names them. A SystemExit, so that it ends a
    script with its message (and no traceback) even outside `run_script`."""


class NonFiniteError(FloatingPointError):
    """A NaN or infinite loss or gradient; the message names the step and the rows."""
