"""numba kernels: plain arrays in, plain arrays out; no validation, no I/O, no raise.

Every kernel is compiled with ``cache=True``. numba keeps the cache next to the source
(``_kernels/__pycache__``) or, when that is read-only, in the user cache (``~/.cache/numba``);
``NUMBA_CACHE_DIR`` overrides both. When neither is writable (a read-only install and home),
numba would refuse to load a cached kernel at all, so the cache goes to a per-user folder of the
temporary directory instead (docs/performance.md, "First call in a fresh process").
"""
from __future__ import annotations

import os
import tempfile


def _writable(folder: str) -> bool:
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def fallback_cache_dir() -> str:
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    return os.path.join(tempfile.gettempdir(), f"geomprobe-numba-cache-{uid}")


def ensure_cache_dir() -> str | None:
    """Point numba at the fallback cache folder when neither of its own is writable; returns the
    folder set, or None when numba's own choice stands."""
    import numba

    if numba.config.CACHE_DIR:
        return None
    if _writable(os.path.join(os.path.dirname(os.path.abspath(__file__)), "__pycache__")):
        return None
    from numba.misc.appdirs import AppDirs

    if _writable(AppDirs(appname="numba", appauthor=False).user_cache_dir):
        return None
    numba.config.CACHE_DIR = fallback_cache_dir()
    return numba.config.CACHE_DIR


ensure_cache_dir()
