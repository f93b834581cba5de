"""XLA's persistent compilation cache, on by default for the command-line entry points
(`python -m cdd_jax.main`, `cdd_jax.upscale`, `cdd_jax.evaluate`), so that a second run of the
same job loads its compiled steps from disk instead of compiling them again (minutes on a CPU).

Where: `$CDD_JAX_COMPILATION_CACHE` if set (a folder; "0", "off", "false", "no" or "" turn the
cache off), else `$XDG_CACHE_HOME/cdd_jax/xla` or `~/.cache/cdd_jax/xla`. A cache folder that
JAX was already given (`JAX_COMPILATION_CACHE_DIR` / `jax_compilation_cache_dir`) is kept.
Only computations that took at least `MIN_COMPILE_SECONDS` to compile are written, and the
folder is capped at `MAX_BYTES` (JAX evicts the least recently used entries) where the
`filelock` package is installed (JAX needs it for the cap; without it the folder is not capped:
delete it to reclaim the space). The key is
JAX's: the computation, the devices, the XLA flags and the jax/jaxlib versions, so a changed
model, config, device count or library version compiles afresh.
"""

from __future__ import annotations

import logging
import os

ENV = "CDD_JAX_COMPILATION_CACHE"
OFF = ("0", "off", "false", "no", "")
MIN_COMPILE_SECONDS = 1.0
MAX_BYTES = 4 << 30


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "cdd_jax", "xla")


def enable_compilation_cache(path: str | None = None) -> str | None:
    """Turns on the persistent compilation cache in `path` (default: from the environment, as
    the module docstring says); returns the folder in use, or None when it is off. Call before
    the first compilation."""
    import jax

    if path is None:
        value = os.environ.get(ENV)
        if value is not None and value.strip().lower() in OFF:
            jax.config.update("jax_enable_compilation_cache", False)
            return None
        if value is not None:
            path = os.path.abspath(os.path.expanduser(value))
        else:
            path = jax.config.jax_compilation_cache_dir or default_cache_dir()
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:  # A read-only home: run without the cache rather than fail.
        logging.getLogger(__name__).warning("compilation cache off: cannot create %s (%s)",
                                            path, e)
        return None
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    try:  # JAX's size cap needs the `filelock` package; without it the folder is not capped.
        import filelock  # noqa: F401

        jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    except ImportError:
        pass
    return path
