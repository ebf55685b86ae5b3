"""Where ultraedit keeps what it fetches or builds once: built-in models and key statistics."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$ULTRAEDIT_CACHE``, else ``~/.cache/ultraedit``."""
    return Path(os.environ.get("ULTRAEDIT_CACHE") or Path.home() / ".cache" / "ultraedit")
