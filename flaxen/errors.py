"""The one exception type flaxen raises for mistakes a user can make.

Config keys, data files, checkpoint directories and model paths that are wrong raise
`FlaxenError` (or a subclass) with a message naming the key, file, line or parameter and what
was expected. Catch `FlaxenError` to handle them all.
"""


class FlaxenError(Exception):
    """A user-facing error: bad config, data, path or checkpoint."""


class ConfigError(FlaxenError):
    """A config key is unknown, missing or has a value of the wrong type."""


class DataError(FlaxenError):
    """A data file is missing, malformed or inconsistent with its config."""


class CheckpointError(FlaxenError):
    """A checkpoint or model directory is missing or does not match the model."""
