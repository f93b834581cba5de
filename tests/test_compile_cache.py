"""XLA's persistent compilation cache (`cdd_jax.compile_cache`): where it goes, how it is turned
off, and that a second process loads what the first compiled instead of compiling it."""

import json
import os
import subprocess
import sys

import jax

from cdd_jax import compile_cache

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Compiles one function (twice the work of a trivial one, so the cache keeps it with the minimum
# compile time lowered to 0) and prints the cache folder and the cache events it saw.
_CHILD = """
import json, jax, jax.numpy as jnp
from cdd_jax.compile_cache import enable_compilation_cache
events = []
jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
path = enable_compilation_cache()
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())
f(jnp.ones((8, 8))).block_until_ready()
print(json.dumps({"path": path, "events": [e for e in events if "compilation_cache" in e]}))
"""


def _child(env_value: str | None, home: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != compile_cache.ENV}
    env.update(PYTHONPATH=REPO, JAX_PLATFORMS="cpu", HOME=home, XDG_CACHE_HOME="")
    if env_value is not None:
        env[compile_cache.ENV] = env_value
    out = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True,
                         env=env, timeout=120, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_second_process_hits_the_cache_and_off_writes_nothing(tmp_path):
    folder = tmp_path / "cache"
    first = _child(str(folder), str(tmp_path / "home"))
    assert first["path"] == str(folder)
    entries = sorted(os.listdir(folder))
    assert entries, "the first process wrote no cache entry"
    assert "/jax/compilation_cache/cache_hits" not in first["events"]
    second = _child(str(folder), str(tmp_path / "home"))
    assert "/jax/compilation_cache/cache_hits" in second["events"]
    assert sorted(os.listdir(folder)) == entries  # Loaded, not written again.
    # Turned off: nothing anywhere, not even in the default folder under HOME.
    off = _child("off", str(tmp_path / "home"))
    assert off["path"] is None
    assert "/jax/compilation_cache/task_disabled_cache" in off["events"]
    assert "/jax/compilation_cache/tasks_using_cache" not in off["events"]
    assert not (tmp_path / "home").exists()
    # Default: the user's cache folder.
    default = _child(None, str(tmp_path / "home"))
    assert default["path"] == str(tmp_path / "home" / ".cache" / "cdd_jax" / "xla")
    assert os.listdir(default["path"])


def test_default_folder_follows_xdg_and_tests_run_without_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache.default_cache_dir() == str(tmp_path / "cdd_jax" / "xla")
    assert os.environ[compile_cache.ENV] == "off"  # tests/conftest.py
    enabled = jax.config.jax_enable_compilation_cache
    try:
        assert compile_cache.enable_compilation_cache() is None
        assert jax.config.jax_enable_compilation_cache is False
    finally:
        jax.config.update("jax_enable_compilation_cache", enabled)
