"""Shared fixtures: a temp store, no progress bars, and the real default model loaded once."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("ENGRAM_PROGRESS", "0")


@pytest.fixture
def store(tmp_path):
    from memory.store import FactStore

    return FactStore(f"sqlite:///{tmp_path / 'store.sqlite'}")


@pytest.fixture(scope="session")
def default_model():
    """The real SmolLM2-135M-Instruct from its PyPI wheel (cached as safetensors after the first load)."""
    from editors.model import load_model

    return load_model("smollm2-135m", "cpu")
