"""Where atskv keeps what it builds once per machine: converted models and compiled kernels."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$ATSKV_CACHE``, default ``~/.cache/atskv``."""
    return Path(os.environ.get("ATSKV_CACHE", Path.home() / ".cache" / "atskv"))
