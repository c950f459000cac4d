"""User-facing errors.

A `SidaError` carries one line that names the problem and the fix. Stage command lines
catch it and print ``error: <message>`` without a traceback (see `sida.run.cli`), so bad
input never looks like a crash in our code.
"""


class SidaError(Exception):
    """An error caused by input the user can fix (config, files, environment)."""


class ConfigError(SidaError):
    """The experiment config is invalid (wrong type, unknown key, impossible value)."""


class CheckpointError(SidaError):
    """A checkpoint or network file is missing, truncated, corrupt or unsafe."""


class AssetError(SidaError):
    """An asset (teacher, dataset, reference statistics, weights) cannot be obtained."""


class DataError(SidaError):
    """A dataset or statistics file does not have the expected content or shape."""
