"""Where symmerge keeps what it builds once and reuses: the zoo's trained models (``zoo/``) and the float32 copy of
SmolLM2 (``smollm2-135m-instruct/``). ``$SYMMERGE_CACHE`` when set, else ``.cache`` in the working directory. Read at
each call, so every caller in a process agrees on one place, and a variable set after import still counts."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_VARIABLE = "SYMMERGE_CACHE"


def cache_root() -> Path:
    """``$SYMMERGE_CACHE``, or ``.cache`` under the working directory when it is unset or empty."""
    return Path(os.environ.get(CACHE_VARIABLE) or ".cache")
