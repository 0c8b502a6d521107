"""The persistent XLA compilation cache, on by default for the CLI and the pipeline.

Compiling the SEGA loop is most of a cold start (seconds on CPU for the tiny model, a minute or more for
SD 1.5 on a TPU); with the cache, a second process loads the compiled programs from disk instead.

Where: `$SEGA_JAX_CACHE_DIR`, else `$XDG_CACHE_HOME/sega-jax/xla`, else `~/.cache/sega-jax/xla`.
Off: `SEGA_JAX_CACHE_DIR=off` (or `0`, `none`, `false`, `no`, `disable`), or `sega-jax generate --no-cache`.
A cache folder the user already gave JAX (`JAX_COMPILATION_CACHE_DIR` or `jax.config`) is kept as it is.

The cache is trusted code: do not point it at a folder others can write to.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

ENV_VAR = "SEGA_JAX_CACHE_DIR"
OFF_VALUES = frozenset({"off", "0", "none", "false", "no", "disable", "disabled"})
_JAX_DEFAULT_MIN_COMPILE_TIME = 1.0
_STATE: dict = {"configured": False, "path": None}


def disabled_by_env() -> bool:
    """True when `$SEGA_JAX_CACHE_DIR` switches the cache off."""
    return os.environ.get(ENV_VAR, "").strip().lower() in OFF_VALUES


def default_cache_dir() -> Path | None:
    """The folder the cache uses by default, or None when `$SEGA_JAX_CACHE_DIR` switches it off."""
    value = os.environ.get(ENV_VAR, "").strip()
    if value.lower() in OFF_VALUES:
        return None
    if value:
        return Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or os.path.join("~", ".cache")
    return Path(base).expanduser() / "sega-jax" / "xla"


def enable_compilation_cache(path: str | os.PathLike | None = None) -> Path | None:
    """Turn JAX's persistent compilation cache on; returns the folder in use, or None when off.

    `path=None` uses `default_cache_dir()` and is idempotent and cheap, so library entry points call it
    freely; a folder already set in JAX's config (by the user or `JAX_COMPILATION_CACHE_DIR`) wins over
    the default, and `SEGA_JAX_CACHE_DIR=off` leaves JAX's settings untouched. Small programs are cached
    too (JAX's default skips compiles under one second). A cache folder that cannot be created only
    logs a warning: the cache never makes a run fail.
    """
    import jax

    if path is None:
        if _STATE["configured"]:
            return _STATE["path"]
        current = jax.config.jax_compilation_cache_dir
        folder = None if disabled_by_env() else Path(current) if current else default_cache_dir()
    else:
        folder = Path(path).expanduser()
    _STATE["configured"] = True
    _STATE["path"] = _apply(jax, folder)
    return _STATE["path"]


def _apply(jax, folder: Path | None) -> Path | None:
    if folder is None:
        return None
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        logger.warning("compilation cache off: cannot create %s (%s); set %s to another folder or 'off'",
                       folder, err, ENV_VAR)
        return None
    jax.config.update("jax_compilation_cache_dir", str(folder))
    if jax.config.jax_persistent_cache_min_compile_time_secs == _JAX_DEFAULT_MIN_COMPILE_TIME:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    if jax.config.jax_persistent_cache_min_entry_size_bytes > 0:
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return folder


def cache_path() -> Path | None:
    """The folder `enable_compilation_cache` configured (None when off or not configured yet)."""
    return _STATE["path"]
