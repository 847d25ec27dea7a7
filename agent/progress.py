"""Progress bars on stderr for long work; ENGRAM_PROGRESS=0 silences them."""
from __future__ import annotations

import os
import sys

from tqdm import tqdm


def progress(iterable=None, **kwargs) -> tqdm:
    enabled = os.environ.get("ENGRAM_PROGRESS", "1") != "0"
    kwargs.setdefault("file", sys.stderr)
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("mininterval", 0.5)
    return tqdm(iterable, disable=not enabled, **kwargs)
