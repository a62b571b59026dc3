"""flaxen: the training library (data, tasks, optimizers, sharding, checkpoints, loop, logging)."""
from flaxen.errors import CheckpointError, ConfigError, DataError, FlaxenError

__all__ = ["FlaxenError", "ConfigError", "DataError", "CheckpointError"]
