"""The one exception type flaxen raises for mistakes a user can make.

Config keys, data files, checkpoint directories and model paths that are wrong raise
`FlaxenError` (or a subclass) with a message naming the key, file, line or parameter and what
was expected. Catch `FlaxenError` to handle them all.

`FlaxenError`, `ConfigError` and `CheckpointError` are models.errors' classes (models/ imports
nothing from flaxen, so it owns them): errors raised inside models/ are FlaxenErrors too.
`DataError` belongs to flaxen's data pipeline and `StorageError` to run outputs; both are defined here.
"""
from __future__ import annotations

import errno as errno_codes
import os
import re

from models.errors import CheckpointError, ConfigError, Error as FlaxenError

__all__ = ["FlaxenError", "ConfigError", "DataError", "CheckpointError", "StorageError"]


class DataError(FlaxenError):
    """A data file is missing, malformed or inconsistent with its config."""


class StorageError(FlaxenError):
    """Writing a run output (checkpoint, metrics, results, config) failed in the operating system:
    no space left, a read-only file system, permission denied. The message names the path and the
    cause by its errno name (ENOSPC, EROFS, EACCES, ...).

    `StorageError.from_exception(error, what, path)` turns an OSError, or any exception that wraps
    one (orbax re-raises through its own errors: the OSError is in the `__cause__` / `__context__`
    chain; TensorStore reports it as text, "[OS error 28: No space left on device]"), into a
    StorageError; it returns None when no operating-system error is found.
    """

    WATCHED = ("ENOSPC", "EDQUOT", "EROFS", "EACCES", "EPERM", "EIO", "EFBIG", "EMFILE")

    @classmethod
    def os_error_in(cls, error: BaseException) -> tuple[int, str | None] | None:
        """(errno, filename or None) of the first operating-system error along `error`'s chain."""
        seen, chain = set(), []
        while error is not None and id(error) not in seen:
            seen.add(id(error))
            chain.append(error)
            if isinstance(error, OSError) and error.errno is not None:
                return error.errno, os.fspath(error.filename) if error.filename else None
            error = error.__cause__ or error.__context__
        for error in chain:
            text = str(error)
            found = re.search(r"OS error (\d+)|\[Errno (\d+)\]", text)
            if found:
                return int(found.group(1) or found.group(2)), None
            for name in cls.WATCHED:
                code = getattr(errno_codes, name, None)
                if code is not None and (os.strerror(code) in text or re.search(rf"\b{name}\b", text)):
                    return code, None
        return None

    @classmethod
    def from_exception(cls, error: BaseException, path: str, what: str = "", advice: str = "") -> StorageError | None:
        """A StorageError "could not write [WHAT to ]PATH: ENOSPC (No space left on device)[ writing
        FILE][. ADVICE]" for the operating-system error in `error`'s chain (None when there is none;
        a bare OSError without an errno is reported by its text)."""
        found = cls.os_error_in(error)
        target = f"{what} to {path}" if what else path
        if found is None:
            if not isinstance(error, OSError):
                return None
            cause, where = f"{type(error).__name__} ({error})", None
        else:
            code, where = found
            cause = f"{errno_codes.errorcode.get(code, f'errno {code}')} ({os.strerror(code)})"
        message = f"could not write {target}: {cause}"
        if where and os.path.abspath(where) != os.path.abspath(path):
            message += f" writing {where}"
        return cls(message + (f". {advice}" if advice else ""))
