"""What flaxen's command lines share (predict.py, export.py, scripts/explain.py, scripts/compress.py).

A user's mistake (a FlaxenError) ends a command with `error: MESSAGE` on stderr and exit status 1,
never a traceback. The scripts read `key=value` arguments: their own keys, and overrides of the
run's config (flaxen.inference.run_config applies those).
"""
from __future__ import annotations

import sys
from typing import Any, Callable, Optional, Sequence

from flaxen.errors import ConfigError, FlaxenError


def report(error: FlaxenError) -> int:
    """Prints `error: MESSAGE` to stderr; returns the exit status for it, 1."""
    print(f"error: {error}", file=sys.stderr)
    return 1


def exit_on_error(work: Callable[..., Any], *args: Any) -> Any:
    """work(*args); a FlaxenError is `report`ed and the process exits with status 1."""
    try:
        return work(*args)
    except FlaxenError as error:
        sys.exit(report(error))


def quiet_absl() -> None:
    """Only absl's (orbax's) errors reach the terminal."""
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)


def key_values(argv: Sequence[str], keys: Sequence[str], example: str) -> tuple[dict, list[str]]:
    """({key: value} of the arguments whose key is in `keys`, the other key=value arguments);
    ConfigError for an argument that is not key=value (`example` shows one)."""
    options, overrides = {}, []
    for argument in argv:
        key, equals, value = argument.partition("=")
        if not equals or not key:
            raise ConfigError(f"argument {argument!r}: expected key=value (e.g. {example})")
        if key in keys:
            options[key] = value
        else:
            overrides.append(argument)
    return options, overrides


def integer_option(options: dict, key: str, default: Optional[int] = None, positive: bool = False) -> None:
    """Turns options[key] into an int in place (`default` when absent; left absent when that is None);
    ConfigError when it is not an integer, or not positive where `positive`."""
    if key not in options:
        if default is not None:
            options[key] = default
        return
    try:
        options[key] = int(options[key])
    except ValueError:
        raise ConfigError(f"{key}={options[key]!r}: expected an integer") from None
    if positive and options[key] < 1:
        raise ConfigError(f"{key}={options[key]}: expected a positive integer")


def write_output(text: str, output: Optional[str]) -> None:
    """`text` to the file `output` (written to a temporary file beside it, then renamed, so an
    interrupted write never leaves half a file) or to stdout when `output` is None."""
    import os

    from flaxen.errors import StorageError

    if output is None:
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    output = os.path.abspath(os.path.expanduser(output))
    temporary = f"{output}.tmp-{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(output), exist_ok=True)
        with open(temporary, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(temporary, output)
    except OSError as error:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise StorageError.from_exception(error, output) from error
