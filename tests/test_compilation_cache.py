"""JAX's persistent compilation cache as flaxen turns it on (flaxen.compilation): a program compiled
once is loaded, not compiled, by a later compilation of the same program with the same cache
directory (counted by JAX's own cache-hit events); the config's default directory; off with null;
an unusable directory is one ConfigError naming the key."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxen import compilation
from flaxen import config as config_lib
from flaxen.errors import ConfigError


@pytest.fixture
def restore_cache():
    before = jax.config.jax_compilation_cache_dir
    yield
    compilation.use_cache(before)


def _hits_during(fn) -> int:
    hits = []

    def listener(event, **kwargs):
        if event == "/jax/compilation_cache/cache_hits":
            hits.append(event)

    jax.monitoring.register_event_listener(listener)
    try:
        fn()
    finally:
        jax.monitoring.unregister_event_listener(listener)
    return len(hits)


def _program(x):
    for _ in range(8):
        x = jnp.tanh(x @ x.T) + jnp.sin(x)
    return x.sum()


def test_second_compilation_is_loaded_from_the_cache(tmp_path, restore_cache):
    used = compilation.use_cache(str(tmp_path / "cache"), min_compile_seconds=0.0)
    assert used == str(tmp_path / "cache") and os.path.isdir(used)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 16)), jnp.float32)
    first = jax.jit(_program)(x)
    assert os.listdir(used), "the compiled program was not written to the cache"
    jax.clear_caches()  # forget in-memory executables: the next call compiles or loads
    hits = _hits_during(lambda: jax.jit(_program)(x).block_until_ready())
    assert hits >= 1
    np.testing.assert_array_equal(np.asarray(jax.jit(_program)(x)), np.asarray(first))
    # turned off: nothing is read or written
    assert compilation.use_cache(None) is None and jax.config.jax_compilation_cache_dir is None
    jax.clear_caches()
    assert _hits_during(lambda: jax.jit(_program)(x).block_until_ready()) == 0


def test_default_directory_is_under_the_user_cache_dir(monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", "/somewhere/cache")
    cfg = config_lib.compose([])
    assert cfg.compilation_cache_dir == "/somewhere/cache/flaxen/jax"
    monkeypatch.delenv("XDG_CACHE_HOME")
    cfg = config_lib.compose(["compilation_cache_dir=null"])
    assert cfg.compilation_cache_dir is None


def test_unusable_directory_is_a_config_error_naming_the_key(tmp_path, restore_cache):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match=r"compilation_cache_dir=.*file/cache"):
        compilation.use_cache(str(blocker / "cache"))
