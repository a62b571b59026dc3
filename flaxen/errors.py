"""The one exception type flaxen raises for mistakes a user can make.

Config keys, data files, checkpoint directories and model paths that are wrong raise
`FlaxenError` (or a subclass) with a message naming the key, file, line or parameter and what
was expected. Catch `FlaxenError` to handle them all.

`FlaxenError`, `ConfigError` and `CheckpointError` are models.errors' classes (models/ imports
nothing from flaxen, so it owns them): errors raised inside models/ are FlaxenErrors too.
`DataError` belongs to flaxen's data pipeline and is defined here.
"""
from models.errors import CheckpointError, ConfigError, Error as FlaxenError

__all__ = ["FlaxenError", "ConfigError", "DataError", "CheckpointError"]


class DataError(FlaxenError):
    """A data file is missing, malformed or inconsistent with its config."""
