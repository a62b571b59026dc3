"""The error types models/ raises for mistakes a user can make.

Why here: models/ stands alone (it imports nothing from flaxen), yet one except clause should
catch a bad config or checkpoint whichever package noticed it. flaxen re-exports these classes
(`flaxen.FlaxenError` is `Error`), so `except flaxen.FlaxenError` covers models/ and flaxen/ alike.
"""


class Error(Exception):
    """Base of every error a user can cause (bad config, path, checkpoint); flaxen re-exports it as
    `flaxen.FlaxenError`, so one except clause catches errors from models/ and flaxen/ alike."""


class ConfigError(Error):
    """A config key is unknown, missing or has a value of the wrong type."""


class CheckpointError(Error):
    """A checkpoint or model directory is missing or does not match the model."""
