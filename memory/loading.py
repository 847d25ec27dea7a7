"""One lock for every transformers model load in the process.

Two `from_pretrained` calls at once in one process (transformers 5) can leave weights newly initialised
(the store then refuses that copy's fingerprint) or fail a lazy import; loads therefore take turns. It is
re-entrant: a load that converts a model loads it again inside.
"""
from __future__ import annotations

import threading

MODEL_LOAD_LOCK = threading.RLock()
