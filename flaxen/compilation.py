"""JAX's persistent compilation cache, on by default.

Why: compiling the train step is a fixed cost every start pays again: ~14 s for the MiniLM step on
a 2-core CPU, more on larger models. A rerun, a resume or a sweep's next trial compiles the same
programs for the same shapes; with the cache they load the compiled executable from disk instead.

`compilation_cache_dir` (train.py and eval.py) names the directory: by default
$XDG_CACHE_HOME/flaxen/jax (~/.cache/flaxen/jax); null or '' turns the cache off. JAX keys each
entry by the program, the jax/jaxlib version, the devices and the XLA flags, so a changed model,
shape, mesh or flag compiles anew and never loads a wrong program. Every program is written,
also the small ones (initialisation, sharding helpers), which a minimum-compile-time threshold
would leave to be compiled again on every start. The cache is trusted code: keep it in a
directory only you can write to.
"""
from __future__ import annotations

import os
from typing import Optional

import jax

from flaxen.errors import ConfigError

MIN_COMPILE_SECONDS = 0.0


def use_cache(directory: Optional[str], key: str = "compilation_cache_dir", *,
              min_compile_seconds: float = MIN_COMPILE_SECONDS) -> Optional[str]:
    """Points JAX's persistent compilation cache at `directory` (created if missing), or turns it
    off for None / ''. Returns the directory in use (absolute) or None. ConfigError naming `key`
    when the directory cannot be created or written. Takes effect for the next compilation, also
    after earlier ones in this process; programs compiled in under `min_compile_seconds` are not
    written."""
    from jax._src import compilation_cache

    path = os.path.abspath(os.path.expanduser(str(directory))) if directory else None
    if path is not None:
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as error:
            raise ConfigError(f"{key}={directory}: cannot create the compilation cache directory ({error}); "
                              f"give a writable directory, or {key}=null to compile without a cache") from error
        if not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError(f"{key}={directory}: the compilation cache directory is not writable; give a "
                              f"writable directory, or {key}=null to compile without a cache")
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_seconds))
    if jax.config.jax_compilation_cache_dir != path:
        jax.config.update("jax_compilation_cache_dir", path)
        compilation_cache.reset_cache()  # JAX opens its cache once per process: reopen it at the new path
    return path
